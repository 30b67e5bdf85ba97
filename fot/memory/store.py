"""Inference memory store: one per memory layer, a FIFO ring buffer of keys/values with a valid mask.

A :class:`MemoryStore` is a small pytree (``jax.tree_util.register_dataclass``) manipulated by pure
functions, so it can be carried through ``jax.jit`` / ``lax.scan`` and sharded like any array tree:

* ``keys``, ``values``: ``[B, M, H, Dh]`` in the storage dtype (bf16 by default, as LongLLaMA's
  ``mem_dtype``); keys are in their *memory-view* encoding (what ``aux["mem_kv"]`` of the Decoder
  returns: un-rotated for ``mem_positional="as_first"``).
* ``mask``: bool ``[B, M]``, True for slots that hold a valid key of that row.
* ``write_pos``: int32 scalar, the next slot to write (shared by all rows: every row appends the same
  number of slots per window, so one pointer gives exact per-row FIFO order even after per-row resets).
* ``evicted``: int32 ``[B]``, how many valid keys of each row were overwritten (overflow report).
* ``appended``: int32 ``[B]``, how many valid keys each row has appended since its last reset.
* ``align``: static int (pytree metadata, not traced): a divisor of the capacity that the write pointer
  is known to be a multiple of — the capacity for an empty store (pointer 0), then its gcd with every
  appended length (``min(T, capacity)``) since. A lower value is always sound (the field's default 1,
  :func:`for_appends`); only the host, reading the pointer, may raise it (:func:`realign`). Programs are
  compiled per value (jit cache key), so callers keep it to one value per window length.

Eviction is FIFO: appending ``T`` slots to a full store overwrites the ``T`` oldest ones. The window is
written in blocks of ``gcd(align, T)`` slots, each of which lands whole (the pointer and the capacity are
multiples of the block): one ``lax.dynamic_update_slice`` when ``align`` is a multiple of ``T``
(streaming windows of one length, the usual case), a loop of them after mixed lengths or with an odd
capacity, a modular scatter when that would take more than ``BLOCK_WRITES_MAX`` of them. The choice is
made at trace time, from ``align``: a runtime choice (``lax.cond``, masked writes, a read) makes XLA:CPU
copy a bf16 store on every append (BUILD_NOTES, issue 14 prefill2 / ringfix). Callers that scan appends
of ``T`` slots lower ``align`` to what they keep first (:func:`for_appends`: a scan carry has one pytree
structure).

The update-slices are in place (the store is donated by its callers). bf16/f16 buffers are written
through their unsigned-integer bit pattern (``fot.ops.bits``): XLA:CPU has no native bfloat16
update-slice and otherwise converts the *whole* store to float32 and back on every append (measured:
9 → 120 ms per 4K-token append at 256K → 4M slots, vs ≤ 2 ms in place; ``benchmarks/memory_inference.py``).
The scatter is in place for float32 but copies a bf16 store on XLA:CPU; a loop iteration costs ~0.1 ms
on a bf16 store (``benchmarks/memory_append.py``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fot.model.state import LayerMemory
from fot.ops import bits
from fot.parallel import axis_rules, logical_to_spec


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MemoryStore:
    """FIFO key/value memory of one memory layer (see module docstring for shapes)."""

    keys: jax.Array
    values: jax.Array
    mask: jax.Array
    write_pos: jax.Array
    evicted: jax.Array
    appended: jax.Array
    align: int = dataclasses.field(default=1, metadata=dict(static=True))

    @property
    def capacity(self) -> int:
        return int(self.keys.shape[1])

    @property
    def batch_size(self) -> int:
        return int(self.keys.shape[0])

    def view(self) -> LayerMemory:
        """This store as the Decoder's ``memory={layer: LayerMemory}`` entry."""
        return LayerMemory(self.keys, self.values, self.mask)

    def size(self) -> jax.Array:
        """int32 ``[B]``: number of valid slots per row."""
        return jnp.sum(self.mask, axis=1, dtype=jnp.int32)


def init_store(batch_size: int, capacity: int, num_heads: int, head_dim: int, *,
               dtype: Any = jnp.bfloat16, sharding: NamedSharding | None = None) -> MemoryStore:
    """An empty store ``[batch_size, capacity, num_heads, head_dim]`` (all slots invalid).

    ``sharding`` (e.g. from :func:`store_sharding`) places keys/values/mask on a mesh.
    """
    for name, v in (("batch_size", batch_size), ("capacity", capacity), ("num_heads", num_heads),
                    ("head_dim", head_dim)):
        if int(v) <= 0:
            raise ValueError(f"init_store: {name} must be > 0, got {v}")
    shape = (batch_size, capacity, num_heads, head_dim)
    dtype = jnp.dtype(dtype)
    keys = jnp.zeros(shape, dtype)
    values = jnp.zeros(shape, dtype)
    mask = jnp.zeros((batch_size, capacity), bool)
    if sharding is not None:
        keys, values = jax.device_put(keys, sharding), jax.device_put(values, sharding)
        mask = jax.device_put(mask, NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[:2])))
    # Separate buffers for every leaf (stores are donated by the inference step).
    return MemoryStore(keys, values, mask, jnp.zeros((), jnp.int32), jnp.zeros((batch_size,), jnp.int32),
                       jnp.zeros((batch_size,), jnp.int32), align=int(capacity))


def store_spec(mesh: Mesh, shape: tuple[int, ...], *, shard_length: bool = True) -> PartitionSpec:
    """PartitionSpec for ``[B, M, Hkv, Dh]`` memory: batch over ``data``; memory length over ``model``
    (``shard_length=True``, for memories larger than one device) or heads over ``model``.

    The logical axes ``batch, mem_length | kv_heads`` of ``fot.parallel`` fitted to ``mesh``: axes that are
    absent from the mesh or do not divide the dimension are left replicated.
    """
    names = ("batch", "mem_length", None, None) if shard_length else ("batch", None, "kv_heads", None)
    return logical_to_spec(names, axis_rules(shard_memory_length=True), mesh, shape)


def store_sharding(mesh: Mesh, shape: tuple[int, ...], *, shard_length: bool = True) -> NamedSharding:
    """``NamedSharding`` of :func:`store_spec` on ``mesh``."""
    return NamedSharding(mesh, store_spec(mesh, shape, shard_length=shard_length))


def shard_store(store: MemoryStore, mesh: Mesh, *, shard_length: bool = True) -> MemoryStore:
    """Place an existing store on ``mesh`` (see :func:`store_spec`); counters are replicated."""
    spec = store_spec(mesh, store.keys.shape, shard_length=shard_length)
    kv = NamedSharding(mesh, spec)
    rep = NamedSharding(mesh, PartitionSpec())
    return MemoryStore(
        jax.device_put(store.keys, kv), jax.device_put(store.values, kv),
        jax.device_put(store.mask, NamedSharding(mesh, PartitionSpec(*spec[:2]))),
        jax.device_put(store.write_pos, rep), jax.device_put(store.evicted, rep),
        jax.device_put(store.appended, rep), align=store.align)


def _check_append(store: MemoryStore, keys, values, mask):
    b, m, h, dh = store.keys.shape
    if keys.ndim != 4 or keys.shape[0] != b or keys.shape[2:] != (h, dh):
        raise ValueError(f"append: keys must be [B={b}, T, H={h}, Dh={dh}], got {keys.shape}")
    if values.shape != keys.shape:
        raise ValueError(f"append: values shape {values.shape} != keys shape {keys.shape}")
    if mask is not None and tuple(mask.shape) != tuple(keys.shape[:2]):
        raise ValueError(f"append: mask must be [B, T]={keys.shape[:2]}, got {mask.shape}")


BLOCK_WRITES_MAX = 256  # the general path's most in-place block updates (a loop); more: one scatter


def _put(buf: jax.Array, update: jax.Array, pos) -> jax.Array:
    """One update-slice of ``update`` (``buf.dtype``) into ``buf`` along axis 1 at ``pos``, through the bits."""
    return bits.move(lambda b, u: jax.lax.dynamic_update_slice_in_dim(b, u, pos, axis=1), buf, update)


def _write(buf: jax.Array, update: jax.Array, pos, block: int) -> jax.Array:
    """``buf [B, M, ...]`` with ``update [B, T, ...]`` (``buf.dtype``) written at slots ``pos .. pos+T-1``
    (mod M), where ``block`` divides T and M and ``pos`` (static alignment): T / block update-slices of
    ``block`` slots, none of which wraps — one when ``block == T`` (the streaming case), a ``fori_loop``
    of them up to ``BLOCK_WRITES_MAX``, each in place; else a modular scatter, in place for float32 but a
    whole-store copy for bf16 on XLA:CPU (its bitcast-convert is not fused; BUILD_NOTES ringfix)."""
    t, m = update.shape[1], buf.shape[1]
    if block == t:
        return _put(buf, update, pos)
    if t // block <= BLOCK_WRITES_MAX:
        def body(j, b):
            return _put(b, jax.lax.dynamic_slice_in_dim(update, j * block, block, axis=1), (pos + j * block) % m)
        return jax.lax.fori_loop(0, t // block, body, buf)
    idx = (pos + jnp.arange(t, dtype=jnp.int32)) % m  # [T] slots written (wrapping)
    return bits.move(lambda b, u: b.at[:, idx].set(u), buf, update)


def append(store: MemoryStore, keys: jax.Array, values: jax.Array,
           mask: jax.Array | None = None) -> MemoryStore:
    """Append a window ``keys, values [B, T, H, Dh]`` (``mask`` bool ``[B, T]``, default all valid).

    FIFO: when the store is full the oldest slots are overwritten and counted in ``evicted``.
    If ``T > capacity`` only the last ``capacity`` entries are kept (the rest count as evicted).
    Pure; jit-friendly: the shapes and the static ``align`` decide the code path (module docstring); the
    result's ``align`` is ``gcd(align, T)``.
    """
    _check_append(store, keys, values, mask)
    b, cap = store.mask.shape
    t = int(keys.shape[1])
    if mask is None:
        mask = jnp.ones((b, t), bool)
    mask = mask.astype(bool)
    keys = keys.astype(store.keys.dtype)
    values = values.astype(store.values.dtype)
    dropped = jnp.zeros((b,), jnp.int32)  # [B] valid keys evicted before they were written
    if t > cap:  # keep the newest `cap` entries; the older ones are evicted immediately
        dropped = jnp.sum(mask[:, : t - cap], axis=1, dtype=jnp.int32)
        keys, values, mask = keys[:, t - cap:], values[:, t - cap:], mask[:, t - cap:]
        t = cap
    pos = store.write_pos
    block = math.gcd(store.align, t)  # divides t, the capacity and the pointer (static alignment)
    new_k, new_v = _write(store.keys, keys, pos, block), _write(store.values, values, pos, block)
    if block == t:
        # The pointer is a multiple of t: the window never wraps. One update-slice, the only write of a
        # bf16 store that XLA:CPU keeps in place outside a loop (a second write or a read copies it).
        old_mask = jax.lax.dynamic_slice_in_dim(store.mask, pos, t, axis=1)  # [B, t] slots overwritten
        new_m = jax.lax.dynamic_update_slice_in_dim(store.mask, mask, pos, axis=1)
    else:
        idx = (pos + jnp.arange(t, dtype=jnp.int32)) % cap  # [t] slots written (wrapping)
        old_mask = store.mask[:, idx]  # [B, t]
        new_m = store.mask.at[:, idx].set(mask)
    evicted = store.evicted + dropped + jnp.sum(old_mask, axis=1, dtype=jnp.int32)
    appended = store.appended + jnp.sum(mask, axis=1, dtype=jnp.int32) + dropped
    new_pos = ((pos + t) % cap).astype(jnp.int32)
    return MemoryStore(new_k, new_v, new_m, new_pos, evicted, appended, align=block)


def _each_store(fn, stores):
    """``fn`` applied to every :class:`MemoryStore` of the pytree ``stores`` (a store, ``{layer: store}``)."""
    return jax.tree.map(fn, stores, is_leaf=lambda x: isinstance(x, MemoryStore))


def for_appends(stores, length: int):
    """``stores`` (a store or a pytree of them) with ``align`` lowered to what appends of ``length`` slots
    keep (``gcd``; sound, nothing else changes): before a ``lax.scan`` whose body appends ``length`` slots
    (a carry keeps one pytree structure), or to give a jitted program one static alignment whatever ran
    before (no recompile per history)."""
    return _each_store(lambda s: dataclasses.replace(s, align=math.gcd(s.align, min(int(length), s.capacity))),
                       stores)


def realign(stores):
    """``stores`` (a store or a pytree of them) with the largest ``align`` the write pointer proves,
    ``gcd(capacity, pointer)``. Host-side: reads each pointer (a device sync; not under ``jit``)."""
    return _each_store(lambda s: dataclasses.replace(s, align=math.gcd(s.capacity, int(s.write_pos))), stores)


def constrain(stores: dict[int, MemoryStore], mesh: Mesh | None, *, shard_length: bool = True):
    """Inside ``jit``: every store's keys/values constrained to :func:`store_sharding` on ``mesh`` (identity
    without a mesh), so a program's output stores keep the layout of its donated inputs."""
    if mesh is None:
        return stores

    def one(s):
        sh = store_sharding(mesh, s.keys.shape, shard_length=shard_length)
        return dataclasses.replace(s, keys=jax.lax.with_sharding_constraint(s.keys, sh),
                                   values=jax.lax.with_sharding_constraint(s.values, sh))
    return _each_store(one, stores)


def reset(store: MemoryStore, rows: jax.Array | None = None) -> MemoryStore:
    """Empty the rows where ``rows`` (bool ``[B]``) is True (all rows if None): e.g. at a document start
    in single-doc evaluation. Only the mask and counters change; stale keys are never attended.
    """
    b = store.mask.shape[0]
    if rows is None:
        rows = jnp.ones((b,), bool)
    rows = jnp.asarray(rows, bool)
    if rows.shape != (b,):
        raise ValueError(f"reset: rows must be bool [B={b}], got shape {rows.shape}")
    mask = jnp.where(rows[:, None], False, store.mask)  # [B, M]
    zero = jnp.zeros_like(store.evicted)
    return dataclasses.replace(store, mask=mask, evicted=jnp.where(rows, zero, store.evicted),
                               appended=jnp.where(rows, zero, store.appended))


def clear(store: MemoryStore) -> MemoryStore:
    """The store emptied: all rows reset (:func:`reset`) and the write pointer back at slot 0, i.e. the
    state of :func:`init_store` except for stale (never attended) keys/values in the buffers."""
    return dataclasses.replace(reset(store), write_pos=jnp.zeros((), jnp.int32), align=store.capacity)


def stores_for_model(batch_size: int, capacity: int, mem_layers, num_heads: int, head_dim: int, *,
                     dtype: Any = jnp.bfloat16, mesh: Mesh | None = None,
                     shard_length: bool = True) -> dict[int, MemoryStore]:
    """One empty store per memory layer ``{layer_idx: MemoryStore}`` (optionally sharded on ``mesh``)."""
    sharding = None
    if mesh is not None:
        sharding = store_sharding(mesh, (batch_size, capacity, num_heads, head_dim), shard_length=shard_length)
    return {int(i): init_store(batch_size, capacity, num_heads, head_dim, dtype=dtype, sharding=sharding)
            for i in mem_layers}


def would_evict(stores: dict[int, MemoryStore], n: int) -> bool:
    """Would appending ``n`` slots to every store overwrite a valid slot of some row (FIFO eviction)?
    Host-side: reads the write pointer and the masks (one device sync)."""
    s0 = next(iter(stores.values()))
    if n > s0.capacity:
        return True
    slots = (int(s0.write_pos) + np.arange(n)) % s0.capacity
    return any(bool(np.asarray(s.mask)[:, slots].any()) for s in stores.values())


def memory_views(stores: dict[int, MemoryStore]) -> dict[int, LayerMemory]:
    """``{layer: LayerMemory}`` for ``Decoder(memory=...)`` / ``fot.model.run_window``."""
    return {i: s.view() for i, s in stores.items()}


def overflow_report(stores: dict[int, MemoryStore]) -> dict[str, Any]:
    """Plain-Python summary: capacity, per-row valid size, per-row evicted count (first memory layer)."""
    if not stores:
        return {"capacity": 0, "size": [], "evicted": []}
    s = stores[min(stores)]
    return {"capacity": s.capacity, "size": np.asarray(s.size()).tolist(),
            "evicted": np.asarray(s.evicted).tolist()}
