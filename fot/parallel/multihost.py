"""Runs that span several processes (hosts): ``jax.distributed`` start-up and what each process does.

JAX's multi-controller model: every process runs the same program; the mesh spans all devices of
all processes; a process can only touch its own (addressable) devices. This module holds the few
pieces fot needs on top of that:

* :func:`initialize` — ``jax.distributed.initialize`` with explicit coordinates (GPU clusters, local
  multi-process runs) or JAX's own cluster detection (Cloud TPU pod slices, SLURM, Open MPI, K8s),
  with failure timeouts in seconds instead of JAX's minutes;
* :func:`process_rows` / :func:`local_rows` — which rows of a global ``[B, ...]`` batch this process
  feeds (the rows its devices hold under the batch sharding, in ascending order, as
  ``jax.make_array_from_process_local_data`` expects them); :func:`make_global_batch` — this process's
  rows → global ``jax.Array``s;
* :func:`gather_cursor` / :func:`local_cursor` — the data cursor of every process in one checkpoint
  item, and this process's share of it on restore;
* :class:`StopVote` — one decision (stop now?) taken by all processes together, asynchronously;
* :func:`is_primary` — process 0, the only one that writes logs and results.

Single-process runs never pay for any of it: every function is the identity / a no-op there.
"""
from __future__ import annotations

import json
import re
import socket
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np

# Seconds. JAX's defaults (heartbeat 100 s, shutdown barrier 300 s) let a run whose peer froze sit for
# minutes; a dead process is noticed at once either way (its connection to the coordinator drops).
HEARTBEAT_TIMEOUT = 30
SHUTDOWN_TIMEOUT = 60
INITIALIZATION_TIMEOUT = 300  # workers of a pod slice start minutes apart: JAX's default

PER_PROCESS = "per_process"  # kind of a cursor gathered from several processes


def detected_cluster() -> str | None:
    """Name of the cluster environment JAX's ``jax.distributed.initialize()`` would auto-detect
    (``GceTpuCluster``, ``GkeTpuCluster``, ``SlurmCluster``, ``OmpiCluster``, ...) or None."""
    from jax._src import clusters  # JAX's registry of ClusterEnv subclasses (what initialize() consults)

    for env in clusters.ClusterEnv._cluster_types:  # pylint: disable=protected-access
        if getattr(env, "opt_in_only_method", False):
            continue
        try:
            if env.is_env_present():
                return env.__name__
        except Exception:  # noqa: BLE001 - a probe that fails means "not this environment"
            continue
    return None


def _check_explicit(coordinator_address, num_processes, process_id, local_device_ids) -> None:
    if coordinator_address is not None and not re.fullmatch(r"\[?[\w.:-]+\]?:\d+", coordinator_address):
        raise ValueError(f"--coordinator_address must be HOST:PORT, got {coordinator_address!r}")
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"--num_processes must be >= 1, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"--process_id must be in [0, {num_processes}) for --num_processes={num_processes}, "
                         f"got {process_id}")
    if process_id is not None and process_id < 0:
        raise ValueError(f"--process_id must be >= 0, got {process_id}")
    if local_device_ids is not None and any(int(i) < 0 for i in local_device_ids):
        raise ValueError(f"--local_device_ids must be non-negative device ids, got {list(local_device_ids)}")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: Sequence[int] | None = None, *,
               mode: str = "auto", heartbeat_timeout: int = HEARTBEAT_TIMEOUT,
               shutdown_timeout: int = SHUTDOWN_TIMEOUT,
               initialization_timeout: int = INITIALIZATION_TIMEOUT) -> bool:
    """Start ``jax.distributed`` when the run spans several processes. Returns True if started.

    mode: ``"auto"`` — start when any coordinate is given explicitly, or when JAX detects a cluster
    environment (Cloud TPU VM / pod slice, SLURM, Open MPI); ``"on"`` — always (JAX fills the
    coordinates it can detect, errors otherwise); ``"off"`` — never (one process).
    With explicit coordinates, ``coordinator_address``, ``num_processes`` and ``process_id`` are all
    required unless a cluster environment supplies the missing ones.
    Must run before the first JAX computation or device query. Raises ValueError for bad arguments
    and RuntimeError when the coordinator cannot be reached in ``initialization_timeout`` seconds.
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"--distributed must be auto, on or off, got {mode!r}")
    explicit = [coordinator_address, num_processes, process_id, local_device_ids]
    _check_explicit(*explicit)
    if mode == "off":
        if any(x is not None for x in explicit):
            raise ValueError("--distributed=off contradicts --coordinator_address/--num_processes/--process_id")
        return False
    if jax.distributed.is_initialized():
        return True
    cluster = detected_cluster()
    if mode == "auto" and cluster is None and all(x is None for x in explicit):
        return False
    if cluster is None:
        missing = [f"--{n}" for n, v in (("coordinator_address", coordinator_address),
                                          ("num_processes", num_processes), ("process_id", process_id))
                   if v is None]
        if missing:
            raise ValueError(f"a multi-process run outside a detected cluster (TPU pod, SLURM, Open MPI) needs "
                             f"{', '.join(missing)}")
    for name, value in (("heartbeat", heartbeat_timeout), ("shutdown", shutdown_timeout),
                        ("initialization", initialization_timeout)):
        if value < 1:
            raise ValueError(f"--distributed_{name}_timeout must be >= 1 second, got {value}")
    if coordinator_address is not None and process_id not in (None, 0):
        # jaxlib aborts the process (C++ fatal error, no Python exception) when the coordinator does not
        # answer in time; check the port first so the failure is one clear line.
        _wait_for_port(coordinator_address, initialization_timeout)
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   list(local_device_ids) if local_device_ids is not None else None,
                                   initialization_timeout=int(initialization_timeout),
                                   heartbeat_timeout_seconds=int(heartbeat_timeout),
                                   shutdown_timeout_seconds=int(shutdown_timeout))
    except RuntimeError:
        raise
    except Exception as e:  # noqa: BLE001 - jaxlib raises its own error types (DEADLINE_EXCEEDED, ...)
        where = coordinator_address or f"the coordinator of the detected {cluster}"
        raise RuntimeError(f"could not join the run at {where} within {initialization_timeout} s "
                           f"({type(e).__name__}: {' '.join(str(e).split())[:300]})") from None
    return True


def _wait_for_port(address: str, timeout: float) -> None:
    """Return once ``HOST:PORT`` accepts TCP connections; RuntimeError after ``timeout`` seconds."""
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=min(5.0, timeout)).close()
            return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise RuntimeError(f"no coordinator answers at {address} after {timeout:g} s ({e.strerror or e}); "
                                   f"start process 0 (it hosts the coordinator) or fix --coordinator_address") from None
            time.sleep(min(1.0, max(deadline - time.monotonic(), 0.01)))


def is_primary() -> bool:
    """True on process 0 (the one that writes console lines, metrics, config.gin and results)."""
    return jax.process_index() == 0


def process_rows(sharding: jax.sharding.Sharding, num_rows: int) -> np.ndarray:
    """int64 [R]: the rows of a global ``[num_rows, ...]`` batch that this process's devices hold under
    ``sharding`` (sharded on dim 0), ascending — the order ``make_array_from_process_local_data``
    reads the process-local rows in. All rows on one process."""
    rows = set()
    for index in sharding.addressable_devices_indices_map((int(num_rows),)).values():
        rows.update(range(*index[0].indices(int(num_rows))))
    return np.asarray(sorted(rows), np.int64)


def local_rows(batch: Any, sharding: jax.sharding.Sharding, num_rows: int):
    """This process's rows of ``batch`` (a pytree of ``[rows, ...]`` arrays, e.g. a ``fot.data.batch.Batch``).
    A batch of ``num_rows`` rows (a global batch, e.g. from a
    process-independent generator) is sliced with :func:`process_rows`; a batch of exactly that
    many rows (already this process's share, e.g. the seqio pipeline's) passes through."""
    if jax.process_count() == 1:
        return batch
    rows = process_rows(sharding, num_rows)
    n = {int(np.shape(v)[0]) for v in jax.tree.leaves(batch)}
    if n == {int(num_rows)}:
        return jax.tree.map(lambda v: np.asarray(v)[rows], batch)
    if n == {len(rows)}:
        return batch
    raise ValueError(f"a batch with {sorted(n)} rows is neither the global batch ({num_rows} rows) nor this "
                     f"process's share ({len(rows)} rows of process {jax.process_index()})")


def make_global_batch(batch: Mapping[str, np.ndarray], sharding) -> dict[str, Any]:
    """Host-local batch → global ``jax.Array``s with ``jax.make_array_from_process_local_data``.

    ``sharding``: a ``jax.sharding.NamedSharding`` for the [B, L] arrays (batch over the data
    axis); arrays of fewer dimensions use its first spec entries. Or a dict key → sharding.
    Each host passes its own rows; the global batch is their concatenation in process order.
    """
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if isinstance(sharding, Mapping):
            s = sharding[k]
        elif isinstance(sharding, jax.sharding.NamedSharding):
            spec = tuple(sharding.spec) + (None,) * max(0, v.ndim - len(sharding.spec))
            s = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[:v.ndim]))
        else:
            s = sharding
        out[k] = jax.make_array_from_process_local_data(s, v)
    return out


def check_whole_packs(sharding: jax.sharding.Sharding, num_rows: int, pack: int) -> None:
    """ValueError unless every run of consecutive rows this process holds starts and ends on a k-pack
    boundary (a process-sharded pipeline emits whole packs, which must stay whole on the mesh)."""
    rows = process_rows(sharding, num_rows)
    if len(rows) == 0:
        return
    breaks = np.flatnonzero(np.diff(rows) != 1)
    starts = np.concatenate([rows[:1], rows[breaks + 1]])
    ends = np.concatenate([rows[breaks], rows[-1:]]) + 1
    if np.any(starts % pack) or np.any(ends % pack):
        runs = ", ".join(f"{a}-{b - 1}" for a, b in zip(starts, ends))
        raise ValueError(f"process {jax.process_index()} holds rows {runs} of the {num_rows}-row batch, which "
                         f"splits k-packs of {pack} rows across processes; use a batch with a multiple of "
                         f"pack rows per device")


def _allgather_bytes(payload: bytes) -> list[bytes]:
    """Every process's ``payload`` (in process order), through one small all-gather on the devices."""
    from jax.experimental import multihost_utils

    size = np.asarray([len(payload)], np.int64)
    sizes = np.asarray(multihost_utils.process_allgather(size)).reshape(-1)
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[:len(payload)] = np.frombuffer(payload, np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), -1)
    return [gathered[i, :int(s)].tobytes() for i, s in enumerate(sizes)]


def gather_cursor(state: Any, *, sharded: bool) -> Any:
    """The data cursors of all processes as one JSON object (collective: every process calls it).

    sharded: the iterator reads a per-process share of the data (the seqio pipeline's document shard
    and lanes), so its cursor only makes sense on the same process; False for iterators whose batches
    do not depend on the process (the dictionary generator: every process computes the global batch).
    One process: ``state`` unchanged. Several: ``{"kind": "per_process", "sharded": ..., "states":
    [s_0, s_1, ...]}``.
    """
    if jax.process_count() == 1:
        return state
    states = [json.loads(b.decode()) for b in _allgather_bytes(json.dumps(state, sort_keys=True).encode())]
    return {"kind": PER_PROCESS, "sharded": bool(sharded), "states": states}


def local_cursor(cursor: Any) -> Any:
    """This process's cursor from a checkpointed one (:func:`gather_cursor`).

    Cursors keyed by data shard (``{"shards": {index: ...}, ...}``, the pipeline's ``data_shards``):
    the union of all processes' shards, for any number of processes. Otherwise, same number of
    processes: this process's own state; another number: the common state of a process-independent
    iterator (it resumes on any number of processes); ValueError for a process-sharded one (its
    document shards and lanes are per process: exact resume needs the same process count or
    ``data_shards``; the device count may change).
    """
    if not (isinstance(cursor, Mapping) and cursor.get("kind") == PER_PROCESS):
        return cursor  # saved by one process
    states, n = cursor["states"], jax.process_count()
    if all(isinstance(s, Mapping) and isinstance(s.get("shards"), Mapping) for s in states):
        # Cursors keyed by data shard (``fot.data.segmenter.SegmenterGroup``): their union, from which
        # each process takes its own shards, whatever the number of processes.
        return {**states[0], "shards": {k: v for s in states for k, v in s["shards"].items()}}
    if len(states) == n:
        return states[jax.process_index()]
    if cursor.get("sharded", True) or any(s != states[0] for s in states):
        raise ValueError(f"the checkpoint's data cursor holds the document shards and lanes of {len(states)} "
                         f"processes; this run has {n}. A process-sharded pipeline (seqio) resumes exactly "
                         f"only with the same number of processes (the device count may change), or on any "
                         f"number that divides make_iterator.data_shards when that is set")
    return states[0]


class StopVote:
    """All processes agree, without stalling the step pipeline, on when to stop.

    Each step every process casts a vote (0 = go on, 1 = time budget spent, 2 = stop signal): a tiny
    jitted max over a ``[num_rows]`` array of the votes, dispatched asynchronously after the train
    step, so :meth:`result` is ready when that step's metrics are (the loop reads both together).
    Every process gets the same maximum at the same step, so all of them stop at the same step even
    when only one received SIGTERM or ran out of time. With one process the vote is a plain int.
    """

    def __init__(self, sharding: jax.sharding.NamedSharding, num_rows: int):
        self.multi = jax.process_count() > 1
        if self.multi:
            import jax.numpy as jnp

            self._sharding, self._n = sharding, len(process_rows(sharding, num_rows))
            replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
            self._max = jax.jit(jnp.max, out_shardings=replicated)

    def cast(self, value: int):
        """Dispatch this process's vote; returns a handle for :meth:`result`."""
        if not self.multi:
            return int(value)
        votes = jax.make_array_from_process_local_data(self._sharding, np.full(self._n, int(value), np.int32))
        return self._max(votes)

    @staticmethod
    def result(handle) -> int:
        """The largest vote of all processes (blocks until the vote's computation is done)."""
        return int(handle)
