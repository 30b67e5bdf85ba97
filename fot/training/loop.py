"""The training loop: ``train(...)`` (gin-free; ``fot.train`` binds it from gin files).

One step: d from the curriculum → ``extra_rows = crossbatch_plan(B/m, d, pack=k)`` (a static shape
per d, so each distinct d compiles once) → jitted, donated train step on the mesh. Metrics of step
s are read after step s+1 is dispatched (host and device stay busy); they feed the curriculum, the
NaN guard, TensorBoard and the console. Checkpoints (orbax, async) every N steps, at the end, and on
SIGTERM; a run restarted on the same workdir resumes from the latest checkpoint exactly (params,
optimizer, step, RNG, data cursor, curriculum). A time budget (``max_train_seconds``) ends training
early and still evaluates and saves.

``init_from=W`` starts a new run from the params of run ``W`` (its latest checkpoint, or ``init_from_step``;
a trained run or one imported by ``fot.convert.from_hf``) with a fresh optimizer state at step 0: the
params are restored straight into their shardings (no gather on one host) after a name/shape/dtype check
against the model, and the first evaluation runs at step 0, before any update. Once the new run has
checkpoints of its own, restarting it resumes from them (``init_from`` is then ignored).
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
from typing import Any, Callable, Sequence

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec

from fot.model import Decoder, ModelConfig
from fot.parallel import DATA_AXIS, axis_rules, make_mesh, multihost
from fot.parallel.multihost import StopVote
from fot.training.checkpoint import CheckpointMismatchError, Checkpointer, is_params_only, restore_params
from fot.training.checks import (ConfigError, TrainingDivergedError, check_batch, check_int,  # noqa: F401
                                 check_layout, nan_guard)
from fot.training.curriculum import ConstantD, Curriculum
from fot.training.lock import WorkdirLock
from fot.training.metrics import MetricsLogger, write_results
from fot.training.state import (abstract_params, abstract_train_state, count_params, create_train_state,
                                state_from_params, state_shardings)
from fot.training.step import make_eval_step, make_train_step, plan_rows, put_batch


class StopSignal:
    """Sets ``requested`` on SIGTERM (TPU VM preemption): the loop saves a checkpoint and exits cleanly."""

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM,)):
        self.requested = False
        self.signum = None
        self._previous = {}
        for s in signals:
            self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        del frame
        self.requested, self.signum = True, signum

    def __call__(self) -> bool:
        return self.requested

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)


def _as_iterator(data):
    return data() if callable(data) and not hasattr(data, "__next__") else data


def _mesh_devices(mesh_config):
    """All devices, or the first prod(sizes) when every axis size is given and fewer are asked for
    (so ``{"data": 1}`` runs on one device of a multi-device host)."""
    devices = jax.devices()
    sizes = list(mesh_config.values()) if isinstance(mesh_config, dict) else [s for _, s in (mesh_config or [])]
    if sizes and all(int(s) > 0 for s in sizes) and math.prod(int(s) for s in sizes) < len(devices):
        if jax.process_count() > 1:
            raise ConfigError(f"mesh_config {dict(mesh_config)} uses {math.prod(int(s) for s in sizes)} of the "
                              f"{len(devices)} devices of this {jax.process_count()}-process run; a multi-process "
                              f"mesh spans every device (use -1 for one axis)")
        return devices[:math.prod(int(s) for s in sizes)]
    return devices


def evaluate(eval_fn, params, data, num_extra: int, steps: int, sharding, stepping: bool = True,
             vocab_size: int | None = None) -> dict[str, float]:
    """Per-token loss/accuracy over ``steps`` batches of ``data`` with ``num_extra`` crossbatch contexts.

    ``data`` restarts from its initial state (``set_state``) so every evaluation sees the same batches.
    """
    totals = {"loss": 0.0, "correct": 0.0, "tokens": 0.0}
    rows = plan_rows(data.batch_size, num_extra, data.pack, stepping)
    for i in range(steps):
        host_batch = next(data)
        check_batch(host_batch, vocab_size, f"eval batch {i + 1}")
        sums = jax.device_get(eval_fn(params, put_batch(host_batch, sharding, data.batch_size), rows))
        for k in totals:
            totals[k] += float(sums[k])
    n = max(totals["tokens"], 1.0)
    return {"loss": totals["loss"] / n, "accuracy": totals["correct"] / n, "tokens": totals["tokens"]}


def train(*, workdir: str, model_config: ModelConfig, train_data, optimizer: optax.GradientTransformation,
          total_steps: int, curriculum: Curriculum | None = None, eval_data=None, eval_every: int = 0,
          eval_steps: int = 4, eval_num_extra: Sequence[int] | None = None,
          mesh_config: dict[str, int] | None = None, fsdp: bool = False, num_microbatches: int = 1,
          stepping: bool = True, seed: int = 0, checkpoint_every: int = 1000, keep_checkpoints: int | None = 3,
          async_checkpointing: bool = True, restore_fallback: bool = True, log_every: int = 50,
          max_train_seconds: float | None = None,
          config_writer: Callable[[str], None] | None = None, should_stop: Callable[[], bool] | None = None,
          final_eval: Callable[[Any, Any], dict[str, Any]] | None = None, stream=None,
          init_from: str | None = None, init_from_step: int | None = None) -> dict[str, Any]:
    """Train ``Decoder(model_config)`` on ``train_data`` (batch-contract iterator or factory).

    ``final_eval(model, params) -> dict``: run once after training (not after a stop signal), e.g. the
    dictionary-lookup accuracy vs tokens in memory (``fot.eval.dictionary.evaluate`` bound in gin); its
    result goes to ``results["final_eval"]`` (console, ``results.json``).

    Returns the results dict (also printed as the final JSON line and written to workdir/results.json).
    Raises ``ConfigError`` for bad settings, ``TrainingDivergedError`` on a NaN/inf loss, gradient or
    parameter norm, and ``OSError`` (``CheckpointIOError``) for I/O failures and damaged checkpoints.
    ``restore_fallback``: resume from the newest intact checkpoint when newer ones are damaged (moved to
    ``workdir/rejected_checkpoints``); False refuses with the damaged step named.
    """
    t_start = time.perf_counter()
    for name, value, low, none_ok in (
            ("total_steps", total_steps, 1, False), ("num_microbatches", num_microbatches, 1, False),
            ("checkpoint_every", checkpoint_every, 1, False), ("keep_checkpoints", keep_checkpoints, 1, True),
            ("log_every", log_every, 1, False), ("eval_every", eval_every, 0, False),
            ("eval_steps", eval_steps, 1, False), ("seed", seed, 0, False)):
        check_int(name, value, low, none_ok)
    if init_from_step is not None and not init_from:
        raise ConfigError("train.init_from_step is set but train.init_from is not")
    if max_train_seconds is not None and (isinstance(max_train_seconds, bool) or
                                          not isinstance(max_train_seconds, (int, float)) or max_train_seconds <= 0):
        raise ConfigError(f"train.max_train_seconds must be a number > 0 or None, got {max_train_seconds!r}")
    workdir = os.path.abspath(workdir)
    parent = os.path.dirname(workdir)
    if not os.path.isdir(parent):
        raise ConfigError(f"workdir parent directory does not exist: {parent}")
    os.makedirs(workdir, exist_ok=True)
    curriculum = curriculum or ConstantD(1)
    data = _as_iterator(train_data)
    eval_iter = _as_iterator(eval_data) if eval_data is not None else None
    mesh = make_mesh(mesh_config, devices=_mesh_devices(mesh_config))
    data_size = dict(zip(mesh.axis_names, mesh.devices.shape)).get(DATA_AXIS, 1)
    batch_size, seq_len, pack = int(data.batch_size), int(data.seq_len), int(getattr(data, "pack", 1))
    check_layout("train_data", batch_size, pack, data_size, num_microbatches)
    if eval_iter is not None:
        check_layout("eval_data", int(eval_iter.batch_size), int(getattr(eval_iter, "pack", 1)), data_size, 1)
    vocab = getattr(data, "vocab_size", None)
    if vocab is not None and vocab > model_config.vocab_size:
        raise ConfigError(f"data vocab_size={vocab} exceeds model_config.vocab_size={model_config.vocab_size}")
    micro_batch = batch_size // num_microbatches
    for d in curriculum.values:
        if d >= micro_batch:
            raise ConfigError(f"curriculum d={d} needs at least d+1={d + 1} rows per (micro-)batch, got {micro_batch}")

    if eval_iter is not None:
        for d in list(eval_num_extra or ()) + list(curriculum.values):
            if int(d) >= int(eval_iter.batch_size):
                raise ConfigError(f"eval with d={d} needs at least {int(d) + 1} rows, eval_data has "
                                  f"batch_size={eval_iter.batch_size}")

    model = Decoder(model_config)
    shardings = state_shardings(model, optimizer, mesh, seq_len, rules=axis_rules(fsdp=fsdp))
    batch_sharding = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    for name, it in (("train_data", data), ("eval_data", eval_iter)):
        if it is not None and int(getattr(it, "local_batch_size", it.batch_size)) < int(it.batch_size):
            try:  # a process-sharded pipeline emits whole k-packs; they must stay whole on the mesh
                multihost.check_whole_packs(batch_sharding, int(it.batch_size), int(getattr(it, "pack", 1)))
            except ValueError as e:
                raise ConfigError(f"{name}: {e}") from None
    sharded = int(getattr(data, "local_batch_size", batch_size)) < batch_size  # per-process data shard
    primary = multihost.is_primary()  # the only process that writes console lines, metrics, config, results
    # One writer per workdir (process 0 of a multi-process run); released when this process exits anyway.
    lock = WorkdirLock(workdir).acquire() if primary else WorkdirLock(workdir)
    ckpt = log = None
    try:
        ckpt = Checkpointer(workdir, every=checkpoint_every, keep=keep_checkpoints, async_save=async_checkpointing)
        log = MetricsLogger(workdir, total_steps, stream=stream, active=primary)
        if config_writer is not None and primary:
            config_writer(workdir)
        eval_state0 = eval_iter.get_state() if eval_iter is not None else None

        latest = ckpt.latest_step()
        if latest is not None and _params_only(workdir, latest):
            raise ConfigError(f"{workdir} holds imported parameters without optimizer state (fot.convert.from_hf): "
                              f"train from them in a new run directory with train.init_from = '{workdir}'")
        try:
            restored = ckpt.restore_latest(abstract_train_state(model, optimizer, mesh, seq_len, shardings),
                                           fallback=restore_fallback, log=log.message)
        except CheckpointMismatchError as e:
            raise ConfigError(str(e)) from None
        if restored is not None:
            latest, state, cursor, cur_state = restored
            try:
                data.set_state(multihost.local_cursor(cursor))
            except ValueError as e:
                raise ConfigError(f"cannot resume the data cursor of {ckpt.directory}/{latest}: {e}") from None
            curriculum.set_state(cur_state)
            log.message(f"resumed from {ckpt.directory}/{latest} (step {int(state.step)})")
            log.truncate_after(int(state.step))
            if int(state.step) >= total_steps:
                done = _finished_results(workdir, int(state.step))
                if done is not None:  # re-run of a finished workdir: report, change nothing
                    log.message(f"{workdir} already finished at step {int(state.step)} (total_steps="
                                f"{total_steps}); results.json left unchanged")
                    ckpt.close()
                    log.close()
                    lock.close()
                    write_results(None, done, stream)
                    return done
        elif init_from:
            if not os.path.isdir(os.path.join(init_from, "checkpoints")):
                raise ConfigError(f"train.init_from = {init_from!r}: no checkpoints/ directory there (expected a "
                                  "run directory of fot.train or fot.convert.from_hf)")
            try:
                params, src_step = restore_params(init_from, abstract_params(model, seq_len, shardings),
                                                  init_from_step)
            except (ValueError, FileNotFoundError) as e:
                raise ConfigError(f"train.init_from = {init_from!r}: {e}") from None
            state = state_from_params(params, optimizer, seed, shardings)
            log.truncate_after(0)  # rows of an attempt killed before its first checkpoint
            log.message(f"initialised from {init_from} (step {src_step}): its params, a fresh optimizer state, "
                        "step 0")
        else:
            state = create_train_state(model, optimizer, mesh, seq_len, seed, shardings)
            log.truncate_after(0)  # rows of an attempt killed before its first checkpoint
    except BaseException:
        _abort(ckpt, log, data, eval_iter, lock)
        raise
    n_params = count_params(state.params)
    log.message(f"model: {n_params:,} params | mesh {dict(zip(mesh.axis_names, mesh.devices.shape))} | "
                f"batch {batch_size}x{seq_len} pack {pack} | curriculum: {curriculum.describe()}")

    train_step = make_train_step(model, optimizer, mesh=mesh, num_microbatches=num_microbatches, pack=pack,
                                 state_shardings=shardings, batch_sharding=batch_sharding)
    eval_step = make_eval_step(model, mesh=mesh, param_shardings=shardings.params, batch_sharding=batch_sharding)
    plans: dict[int, Any] = {}
    step = int(state.step)
    start_step = step
    tokens_per_step = batch_size * seq_len
    pending = None
    last: dict[str, float] = {}
    curve: list[dict[str, float]] = []
    stopped = "completed"
    vote, agreed_stop = StopVote(batch_sharding, batch_size), 0
    should_stop = should_stop or (lambda: False)

    def eval_ds() -> list[int]:
        if eval_num_extra is not None:
            return [int(x) for x in eval_num_extra]
        final_d = curriculum.d_at(step)
        return [final_d, 0] if final_d else [0]

    def run_eval() -> dict[str, float]:
        out = {}
        for d in eval_ds():
            eval_iter.set_state(eval_state0)
            r = evaluate(eval_step, state.params, eval_iter, d, eval_steps, batch_sharding, stepping,
                         model_config.vocab_size)
            out[f"eval_accuracy_d{d}"], out[f"eval_loss_d{d}"] = r["accuracy"], r["loss"]
        log.scalars(step, out)
        return out

    def process():
        nonlocal pending, last, agreed_stop
        if pending is None:
            return
        s, d, metrics, stop_vote = pending
        pending = None
        agreed_stop = max(agreed_stop, StopVote.result(stop_vote))
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        nan_guard(ckpt, s, m)
        curriculum.observe(s, m)
        m["d"] = d
        last = m
        if s % log_every == 0 or s == total_steps:
            log.progress(s, m)
            data_metrics = _data_metrics(data)
            if data_metrics:  # documents/tokens read, documents skipped as too short (seqio pipeline)
                log.scalars(s, data_metrics)

    if init_from and restored is None and eval_iter is not None:  # the starting model's own quality
        curve.append({"step": 0, **run_eval()})
        log.message("eval @ step 0 (init_from): " + ", ".join(f"{k} {v:.4f}" for k, v in curve[-1].items()
                                                                if k != "step"))
    try:
        while step < total_steps:
            # 2 = stop signal, 1 = time budget spent. Several processes act on the vote of all of them
            # (read with a step's metrics), so every process stops at the same step.
            reason = (2 if should_stop() else
                      1 if max_train_seconds is not None and time.perf_counter() - t_start > max_train_seconds else 0)
            stop = agreed_stop if vote.multi else reason
            if stop:
                stopped = "preempted" if stop == 2 else "time_budget"
                break
            d = curriculum.d_at(step)
            if d not in plans:
                plans[d] = plan_rows(micro_batch, d, pack, stepping)
            host_batch = next(data)
            check_batch(host_batch, model_config.vocab_size, f"training batch of step {step + 1}")
            batch = put_batch(host_batch, batch_sharding, batch_size)
            state, metrics = train_step(state, batch, plans[d])
            log.add_tokens(tokens_per_step)
            step += 1
            process()
            pending = (step, d, metrics, vote.cast(reason))
            if eval_iter is not None and eval_every and step % eval_every == 0:
                process()
                r = run_eval()
                curve.append({"step": step, **r})
                log.message(f"eval @ step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in r.items()))
            if ckpt.due(step):
                process()
                log.sync()
                ckpt.save(step, state, multihost.gather_cursor(data.get_state(), sharded=sharded), curriculum.get_state())
        process()
        log.sync()
        ckpt.save(step, state, multihost.gather_cursor(data.get_state(), sharded=sharded), curriculum.get_state())
        if step == start_step:  # nothing trained in this process: report the last logged step's figures
            last = {**log.last_row(step), "d": curriculum.d_at(step)}
        if stopped == "preempted":
            ckpt.wait()
            log.message(f"stop signal received: saved checkpoint at step {step}, exiting")
        train_seconds = time.perf_counter() - t_start
        results: dict[str, Any] = {"step": step, "stopped": stopped, "params": n_params,
                                   "train_loss": last.get("loss"), "train_accuracy": last.get("accuracy"),
                                   "d": last.get("d", curriculum.d_at(step)),
                                   "train_seconds": round(train_seconds, 2),
                                   "steps_per_sec": (round((step - start_step) / max(train_seconds, 1e-9), 3)
                                                     if step > start_step else None),
                                   "tokens_per_step": tokens_per_step}
        if eval_iter is not None and stopped != "preempted":
            r = run_eval()
            if not curve or curve[-1]["step"] != step:
                curve.append({"step": step, **r})
            results.update(r)
            results["curve"] = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in c.items()
                                 if k == "step" or k.startswith("eval_accuracy")} for c in curve]
        if final_eval is not None and stopped != "preempted":
            t_eval = time.perf_counter()
            results["final_eval"] = final_eval(model, state.params)
            results["final_eval_seconds"] = round(time.perf_counter() - t_eval, 2)
            log.message(f"final eval ({results['final_eval_seconds']:.0f}s): "
                        + _summary(results["final_eval"]))
        data_metrics = _data_metrics(data)
        if data_metrics:
            results["data"] = data_metrics
        results["wall_seconds"] = round(time.perf_counter() - t_start, 2)
        ckpt.close()
        log.close()
        if primary:
            write_results(workdir, results, stream)
        lock.close()
        return results
    except BaseException:
        _abort(ckpt, log, data, eval_iter, lock)
        raise


def _params_only(workdir: str, step: int) -> bool:
    """``is_params_only`` of an imported run's checkpoint; False when it cannot be read (restore_latest then
    names the damage)."""
    try:
        return is_params_only(workdir, step)
    except Exception:  # noqa: BLE001 - a damaged checkpoint: diagnosed by restore_latest
        return False


def _finished_results(workdir: str, step: int) -> dict[str, Any] | None:
    """``workdir/results.json`` when it reports ``step`` (the run finished there), else None."""
    try:
        with open(os.path.join(workdir, "results.json")) as f:
            results = json.load(f)
    except (OSError, ValueError):
        return None
    return results if isinstance(results, dict) and results.get("step") == step else None


def _abort(*closeables) -> None:
    """Error path: finish or abandon in-flight checkpoint writes, flush metrics, stop data threads, release
    the workdir lock; never raises (the original error is what gets reported)."""
    for fn in (getattr(c, "close", None) for c in closeables):
        if fn is None:
            continue
        try:
            fn()
        except Exception:  # noqa: BLE001 - secondary failure while handling the first
            pass
def _summary(result: dict[str, Any]) -> str:
    """One console line for a final-eval result: its ``sizes`` with the ``*accuracy`` lists, else its keys."""
    sizes = result.get("sizes")
    curves = {k: v for k, v in result.items() if k.endswith("accuracy") and isinstance(v, (list, tuple))}
    if sizes is None or not curves:
        return ", ".join(sorted(result))
    return "; ".join(f"{k} " + " ".join(f"{n}: {a:.3f}" for n, a in zip(sizes, v)) for k, v in curves.items())


def _data_metrics(data) -> dict[str, float]:
    """The iterator's own counters (``metrics()``: documents, tokens, skipped short documents), if any."""
    fn = getattr(data, "metrics", None)
    return {k: float(v) for k, v in fn().items()} if callable(fn) else {}
