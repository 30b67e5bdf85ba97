"""Memory prefill: the memory a long prompt leaves behind, computed only by the layers that produce it.

Memory layer ``i`` stores the memory-view keys/values computed from its *input* hidden state, before
its attention (``aux["mem_kv"]`` of the Decoder). Hence, for a prompt cut into windows:

* layers below the first memory layer ``m0`` never see memory: every window runs through them as an
  independent row of a large batch (the no-memory forward's speed, and fewer layers);
* with one memory layer, its keys/values come straight from those hidden states — the whole fill is
  parallel and exact;
* with several memory layers, layers ``m0 .. m_last`` run layer by layer over all windows of a call at
  once (:func:`fill_memory_layers`): a memory layer's keys/values are computed for every window and
  appended first; then its attention runs with a window-granular causal memory
  (``fot.model.state.FillMemory``: window t sees the store without the slots of windows t..C-1, exactly
  what it read streaming; slots the call overwrites keep their previous contents for the windows before
  the overwrite) — exact; the caller streams window by window (:func:`memory_layers_kv`) only when the
  store's write pointer is not aligned to the window;
* layers above the last memory layer and the output head never run.

The functions run the Decoder's own submodules on the matching subtrees of its ``params`` through
``fot.model.run_layers`` / ``fot.model.embed_tokens``; ``tests/test_prefill.py`` checks the result
against a full forward.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from fot import memory as fmem
from fot.model import LayerKV, LayerMemory, ModelConfig, embed_tokens, run_layers
from fot.model.state import FillMemory, windows_first
from fot.ops import bits


def hidden_below(cfg: ModelConfig, params, tokens: jax.Array, positions: jax.Array, stop: int,
                 mesh=None) -> jax.Array:
    """Embedding and layers ``[0, stop)`` without memory: ``tokens`` int [R, L] → hidden [R, L, D]
    (the input of layer ``stop``)."""
    x = embed_tokens(cfg, params, tokens, mesh)  # [R, L, D]
    return run_layers(cfg, params, x, positions, range(stop), mesh=mesh)[0]


def first_memory_kv(cfg: ModelConfig, params, x: jax.Array, positions: jax.Array, mesh=None) -> LayerKV:
    """Memory-view ``LayerKV`` [R, L, Hkv, Dh] of the first memory layer from its input ``x [R, L, D]``
    (its attention and MLP outputs are unused, so XLA drops them)."""
    m0 = cfg.mem_layers[0]
    return run_layers(cfg, params, x, positions, range(m0, m0 + 1), mesh=mesh)[1][m0]


def memory_layers_kv(cfg: ModelConfig, params, x: jax.Array, positions: jax.Array,
                     memory: Mapping[int, LayerMemory], top_k: int | None, mesh=None) -> dict[int, LayerKV]:
    """Layers ``m0 .. m_last`` on ``x [B, L, D]`` (the input of the first memory layer) with
    ``memory = {layer: LayerMemory}`` → ``{layer: LayerKV}`` memory-view keys/values of every memory
    layer for this window (the layers above the last memory layer are not run)."""
    layers = range(cfg.mem_layers[0], cfg.mem_layers[-1] + 1)
    return run_layers(cfg, params, x, positions, layers, memory=memory, top_k=top_k, mesh=mesh)[1]


def fill_memory_layers(cfg: ModelConfig, params, stores: Mapping[int, fmem.MemoryStore], rows: jax.Array,
                       key_mask: jax.Array, top_k: int | None, mesh=None, evicts: bool = False
                       ) -> dict[int, fmem.MemoryStore]:
    """Append C windows to every memory layer's store, layer by layer, all windows at once.

    rows int [B*C, w]: row ``b * C + t`` = window t of batch row b (local positions 0..w-1); key_mask bool
    [B, C*w]. The layers below the first memory layer run on all rows; then each memory layer's
    memory-view keys/values of all windows are appended to its store, the layer runs (below the last
    memory layer) with :class:`FillMemory` over that store, and the layers up to the next memory layer
    follow. Returns the new stores. ``evicts`` (``fot.memory.would_evict``): the appends may overwrite
    valid slots; their previous contents are kept for the windows that still saw them
    (``FillMemory.overwritten``). The caller guarantees C*w <= capacity; the appends of ``w`` slots write
    slots ``start + t*w ..`` (mod capacity): one in-place update each when the capacity and the stores'
    static ``align`` are multiples of w (``MemoryInference`` streams window by window when only the
    capacity is), a scatter when the capacity is not.
    """
    positions = jnp.broadcast_to(jnp.arange(rows.shape[1], dtype=jnp.int32), rows.shape)  # [B*C, w]
    x = hidden_below(cfg, params, rows, positions, cfg.mem_layers[0], mesh)  # [B*C, w, D]
    out = dict(stores)
    last = cfg.mem_layers[-1]
    for i in range(cfg.mem_layers[0], last + 1):
        memory = None
        if cfg.is_memory_layer(i):
            k, v = run_layers(cfg, params, x, positions, range(i, i + 1), mesh=mesh)[1][i]  # [B*C, w, Hkv, Dh]
            start, old = out[i].write_pos, None
            if evicts and i != last:  # the previous contents of the slots this call writes [B, C*w, ...]
                slots = (start + jnp.arange(key_mask.shape[1], dtype=jnp.int32)) % out[i].capacity
                cut = lambda x: x[:, slots]  # noqa: E731
                old = LayerMemory(bits.move(cut, out[i].keys), bits.move(cut, out[i].values), cut(out[i].mask))
            out[i] = _append_windows(out[i], k, v, key_mask)
            if i == last:
                break
            memory = {i: FillMemory(out[i].view(), start, old)}
        x = run_layers(cfg, params, x, positions, range(i, i + 1), memory=memory, top_k=top_k, mesh=mesh)[0]
    return out


def _append_windows(store: fmem.MemoryStore, k: jax.Array, v: jax.Array, key_mask: jax.Array) -> fmem.MemoryStore:
    """Append the windows of k, v [B*C, w, Hkv, Dh] (row b*C + t = window t of row b; key_mask bool
    [B, C*w]) one window at a time in a scan, as streaming appends them (same slots, same code path of
    ``fot.memory.append``), in place."""
    b = key_mask.shape[0]
    c, w = k.shape[0] // b, k.shape[1]
    xs = (windows_first(k, b), windows_first(v, b), jnp.swapaxes(key_mask.reshape(b, c, w), 0, 1))  # [C, B, w, ...]
    store = fmem.for_appends(store, w)  # the carry keeps one static alignment through the scan
    return jax.lax.scan(lambda st, x: (fmem.append(st, *x), None), store, xs)[0]
