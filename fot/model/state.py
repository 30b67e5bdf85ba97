"""What the Decoder reads besides tokens, typed per layer and checked in one place.

* :class:`LayerKV` — keys and values of one layer, ``[B, S, Hkv, Dh]`` each (``Hkv`` =
  ``ModelConfig.num_kv_heads``): a local cache (keys exactly as the layer's local attention consumes
  them) or a window's memory-view keys/values (what a memory store holds). See
  ``fot/model/attention.py`` for the two key encodings.
* :class:`LayerMemory` — the inference memory of one memory layer: keys, values ``[B, M, Hkv, Dh]``
  (any float dtype; fot.ops casts per chunk) and a valid-slot mask bool ``[B, M]``.
* :class:`FillMemory` — a memory layer's store during memory prefill, windows of a call as batch rows.
* :class:`LayerInputs` — positions, segment ids and crossbatch rows that every layer of one call reads.

Both are NamedTuples (pytrees; a plain ``(k, v)`` / ``(k, v, mask)`` tuple is accepted and converted).
:func:`check_inputs` validates one Decoder call and returns the typed per-layer maps.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fot.model.config import ModelConfig


class LayerKV(NamedTuple):
    """Keys and values of one layer, ``[B, S, Hkv, Dh]`` each."""

    keys: jax.Array
    values: jax.Array


class LayerMemory(NamedTuple):
    """Inference memory of one memory layer: keys, values ``[B, M, Hkv, Dh]``; mask bool ``[B, M]``
    (True = the slot holds a valid key of that row)."""

    keys: jax.Array
    values: jax.Array
    mask: jax.Array


class FillMemory(NamedTuple):
    """Memory prefill with a call's windows as the rows of one batch (``fot.inference.prefill``).

    Row ``b * C + t`` of the layer input ``[B*C, w, D]`` is window ``t`` of batch row ``b``. ``store`` is
    the layer's store (``[B, M, ...]``) *after* the memory-view keys/values of all C windows were
    appended at slots ``start .. start + C*w - 1`` (mod M, C*w <= M); ``overwritten`` (or None when the
    appends overwrote no valid slot) holds those slots' previous contents ``[B, C*w, ...]``. Window ``t``
    sees the valid store slots that windows ``t .. C-1`` did not write, plus the previous contents of the
    slots they did write — exactly the store it read when the windows streamed one by one.
    """

    store: LayerMemory
    start: jax.Array  # int32 scalar: the store's write position before the C windows were appended
    overwritten: LayerMemory | None = None

    def view(self) -> LayerMemory:
        """The memory windows read: the store, followed by ``overwritten`` when given ([B, M (+ C*w), ...])."""
        if self.overwritten is None:
            return self.store
        return LayerMemory(*(jnp.concatenate([a, b.astype(a.dtype)], axis=1)
                             for a, b in zip(self.store, self.overwritten)))

    def window_mask(self, t, c: int, w: int) -> jax.Array:
        """bool [B, M (+ C*w)] over :meth:`view`: the slots window ``t`` (int, may be traced) of ``c``
        windows of ``w`` tokens sees."""
        m = self.store.mask.shape[1]
        order = (jnp.arange(m, dtype=jnp.int32) - self.start) % m  # [M] write order within this call
        mask = self.store.mask & ~((order >= t * w) & (order < c * w))[None, :]
        if self.overwritten is None:
            return mask
        unwritten = jnp.arange(c * w, dtype=jnp.int32) >= t * w  # [C*w]: not yet overwritten for window t
        return jnp.concatenate([mask, self.overwritten.mask & unwritten[None, :]], axis=1)

    def counts(self, c: int, w: int) -> jax.Array:
        """float32 [B*C]: valid memory slots each row (window) sees (``window_mask`` summed)."""
        seen = jax.vmap(lambda t: self.window_mask(t, c, w).sum(-1))(jnp.arange(c, dtype=jnp.int32))  # [C, B]
        return seen.T.reshape(-1).astype(jnp.float32)


def memory_slots(memory: LayerMemory | FillMemory, rows: int, w: int) -> jax.Array:
    """float32 [rows]: the valid memory slots each row of a ``[rows, w]`` call sees (before top-k) —
    ``FillMemory.counts`` for a memory prefill (rows = windows), the mask total of a ``LayerMemory``."""
    if isinstance(memory, FillMemory):
        return memory.counts(rows // memory.store.mask.shape[0], w)
    return memory.mask.astype(jnp.float32).sum(-1)


def windows_first(x: jax.Array, b: int) -> jax.Array:
    """[B*C, ...] (row ``b * C + t`` = window t of batch row b, as in :class:`FillMemory`) → [C, B, ...]."""
    return jnp.swapaxes(x.reshape((b, x.shape[0] // b) + x.shape[1:]), 0, 1)


class LayerInputs(NamedTuple):
    """Per-call inputs every layer reads (memory layers alone read the crossbatch fields).

    positions int32 [B,T]; segment_ids int32 [B,T] or None (0 = padding); cache_segment_ids int32
    [B,C+T] with a cache (ids of the cached keys, then the window's); extra_rows int32 [B,d] training
    crossbatch rows (-1 = unused) or None; extra_key_mask bool [B,T] (valid keys of a source row).
    """

    positions: jax.Array
    segment_ids: jax.Array | None = None
    cache_segment_ids: jax.Array | None = None
    extra_rows: jax.Array | None = None
    extra_key_mask: jax.Array | None = None

    def for_layer(self, is_memory: bool) -> "LayerInputs":
        """These inputs as layer ``is_memory`` sees them: local layers never see crossbatch rows."""
        return self if is_memory else self._replace(extra_rows=None, extra_key_mask=None)


def _shape_error(name, got, want):
    return ValueError(f"{name} has shape {tuple(got)}, expected {want}")


def _concrete(x):
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError, TypeError):
        return None


def check_cache(cfg: ModelConfig, cache, batch: int) -> tuple[dict[int, LayerKV], int | None]:
    """``cache`` {layer: LayerKV | (k, v)} for every layer, one length C → (typed map, C); None → ({}, None)."""
    if cache is None:
        return {}, None
    if not isinstance(cache, Mapping) or set(cache) != set(range(cfg.num_layers)):
        raise ValueError(f"cache must map every layer 0..{cfg.num_layers - 1} to (k, v), got keys "
                         f"{sorted(cache) if isinstance(cache, Mapping) else type(cache)}")
    out, c = {}, None
    for i, kv in cache.items():
        if len(kv) != 2:
            raise ValueError(f"cache[{i}] must be a (k, v) pair")
        kv = LayerKV(*kv)
        if c is None:
            c = kv.keys.shape[1] if kv.keys.ndim == 4 else -1
        want = (batch, c, cfg.num_kv_heads, cfg.head_dim)
        if tuple(kv.keys.shape) != want or tuple(kv.values.shape) != want:
            raise ValueError(f"cache[{i}] k/v have shapes {tuple(kv.keys.shape)}/{tuple(kv.values.shape)}, "
                             f"expected {want} (same cache length in every layer)")
        out[i] = kv
    return out, c


def check_memory(cfg: ModelConfig, memory, batch: int) -> dict[int, LayerMemory]:
    """``memory`` {memory layer: LayerMemory | (k, v, mask)} → typed map (None → {})."""
    if memory is None:
        return {}
    if not isinstance(memory, Mapping):
        raise ValueError(f"memory must be a dict {{layer: (mem_k, mem_v, mem_mask)}}, got {type(memory)}")
    out = {}
    for i, entry in memory.items():
        if i not in cfg.mem_layers:
            raise ValueError(f"memory given for layer {i}, which is not in mem_layers={list(cfg.mem_layers)}")
        if isinstance(entry, FillMemory):
            nb = entry.store.mask.shape[0]
            if batch % nb:
                raise ValueError(f"memory[{i}] (prefill windows): {batch} rows are not windows of {nb} batch rows")
            out[i] = entry
            continue
        if len(entry) != 3:
            raise ValueError(f"memory[{i}] must be (mem_k, mem_v, mem_mask)")
        mem = LayerMemory(*entry)
        m = mem.keys.shape[1] if mem.keys.ndim == 4 else -1
        want = (batch, m, cfg.num_kv_heads, cfg.head_dim)
        if (tuple(mem.keys.shape) != want or tuple(mem.values.shape) != want
                or tuple(mem.mask.shape) != (batch, m)):
            raise ValueError(f"memory[{i}] shapes {tuple(mem.keys.shape)}, {tuple(mem.values.shape)}, "
                             f"{tuple(mem.mask.shape)}; expected {want}, {want}, {(batch, m)}")
        out[i] = mem
    return out


def _check_extra_rows(extra_rows, batch: int, has_memory: bool, has_cache: bool) -> None:
    if extra_rows.ndim != 2 or extra_rows.shape[0] != batch:
        raise _shape_error("extra_rows", extra_rows.shape, f"[batch={batch}, d]")
    if not jnp.issubdtype(extra_rows.dtype, jnp.integer):
        raise ValueError(f"extra_rows must be integer, got dtype {extra_rows.dtype}")
    rows = _concrete(extra_rows)
    if rows is not None and rows.size and (rows.min() < -1 or rows.max() >= batch):
        raise ValueError(f"extra_rows values must be in [-1, batch={batch}), got range "
                         f"[{rows.min()}, {rows.max()}] for shape {rows.shape}")
    if has_memory:
        raise ValueError("extra_rows (training crossbatch) and memory (inference) are exclusive")
    if has_cache:
        raise ValueError("extra_rows (training crossbatch) cannot be combined with a local cache")


def check_inputs(cfg: ModelConfig, tokens, *, positions=None, segment_ids=None, extra_rows=None,
                 extra_key_mask=None, memory=None, top_k=None, cache=None
                 ) -> tuple[dict[int, LayerMemory], dict[int, LayerKV], int | None]:
    """Validate one Decoder call (shapes in ``Decoder.__call__``); ValueError naming the bad input.

    Returns ``(memory, cache, C)``: typed per-layer maps ({} when absent) and the cache length (None)."""
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be rank 2 [batch, length], got shape {tuple(tokens.shape)}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be integer, got dtype {tokens.dtype}")
    b, t = tokens.shape
    if positions is not None and tuple(positions.shape) != (b, t):
        raise _shape_error("positions", positions.shape, f"tokens.shape {(b, t)}")
    cache, c = check_cache(cfg, cache, b)
    if segment_ids is not None:
        ok = [(b, t)] + ([(b, c + t)] if c else [])
        if tuple(segment_ids.shape) not in ok:
            raise _shape_error("segment_ids", segment_ids.shape,
                               f"tokens.shape {(b, t)}" + (f" or [B, C+T]={(b, c + t)}" if c else ""))
    if extra_key_mask is not None and tuple(extra_key_mask.shape) != (b, t):
        raise _shape_error("extra_key_mask", extra_key_mask.shape, f"tokens.shape {(b, t)}")
    if extra_rows is not None:
        _check_extra_rows(extra_rows, b, memory is not None, bool(cache))
    memory = check_memory(cfg, memory, b)
    if top_k is not None:
        if int(top_k) < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        if cfg.mem_gate:
            raise ValueError("top_k is not supported with mem_gate=True (the gated memory path is dense)")
    return memory, cache, c


def layer_inputs(tokens, c: int | None, positions=None, segment_ids=None, extra_rows=None,
                 extra_key_mask=None) -> LayerInputs:
    """Defaults and dtypes of checked inputs (see ``Decoder.__call__``) → :class:`LayerInputs`."""
    b, t = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) + (c or 0), (b, t))
    positions = positions.astype(jnp.int32)  # [B, T]
    cache_seg = None
    if segment_ids is not None:
        segment_ids = segment_ids.astype(jnp.int32)
        if c:
            if segment_ids.shape[1] == t:  # cached keys take the id of the row's first new token
                cache_seg = jnp.concatenate([jnp.broadcast_to(segment_ids[:, :1], (b, c)), segment_ids],
                                            axis=1)  # [B, C+T]
            else:
                cache_seg, segment_ids = segment_ids, segment_ids[:, c:]  # [B, C+T], [B, T]
    if extra_rows is not None:
        extra_rows = extra_rows.astype(jnp.int32)  # [B, d]
        if extra_key_mask is None:
            extra_key_mask = (segment_ids > 0) if segment_ids is not None else jnp.ones((b, t), bool)
        extra_key_mask = extra_key_mask.astype(bool)  # [B, T]
    return LayerInputs(positions, segment_ids, cache_seg, extra_rows, extra_key_mask)
