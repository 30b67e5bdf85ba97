"""Memory prefill: the memory a long prompt leaves behind, computed only by the layers that produce it.

Memory layer ``i`` stores the memory-view keys/values computed from its *input* hidden state, before
its attention (``aux["mem_kv"]`` of the Decoder). Hence, for a prompt cut into windows:

* layers below the first memory layer ``m0`` never see memory: every window runs through them as an
  independent row of a large batch (the no-memory forward's speed, and fewer layers);
* with one memory layer, its keys/values come straight from those hidden states — the whole fill is
  parallel and exact;
* with several memory layers, layers ``m0 .. m_last`` stream window by window with memory (a window's
  memory-layer outputs depend on the memory the earlier windows filled);
* layers above the last memory layer and the output head never run.

The functions apply the Decoder's own submodules (``DecoderLayer``, the embedding) to the matching
subtrees of its ``params``; ``tests/test_prefill.py`` checks the result against a full forward.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from fot.model.config import ModelConfig
from fot.model.decoder import _ACT, DecoderLayer
from fot.model.layers import embed
from fot.parallel import with_logical_constraint


def _layer(cfg: ModelConfig, params, i: int, x, positions, memory=None, top_k=None, mesh=None):
    """Decoder layer ``i`` on ``x [B, L, D]`` → ``(x [B, L, D], aux)`` (see ``DecoderLayer``)."""
    mod = DecoderLayer(cfg, cfg.is_memory_layer(i), mesh, None if memory is None else top_k, False)
    return mod.apply({"params": params[f"layers_{i}"]}, x, positions, None, None, None, memory, None, None)


def hidden_below(cfg: ModelConfig, params, tokens: jax.Array, positions: jax.Array, stop: int,
                 mesh=None) -> jax.Array:
    """Embedding and layers ``[0, stop)`` without memory: ``tokens`` int [R, L] → hidden [R, L, D]
    (the input of layer ``stop``)."""
    x = embed(cfg).apply({"params": params["embed"]}, tokens.astype(jnp.int32))
    x = with_logical_constraint(x, _ACT, mesh)
    for i in range(stop):
        x, _ = _layer(cfg, params, i, x, positions, mesh=mesh)
    return x


def first_memory_kv(cfg: ModelConfig, params, x: jax.Array, positions: jax.Array, mesh=None):
    """Memory-view ``(k, v)`` [R, L, H, Dh] of the first memory layer from its input ``x [R, L, D]``
    (its attention and MLP outputs are unused, so XLA drops them)."""
    _, aux = _layer(cfg, params, cfg.mem_layers[0], x, positions, mesh=mesh)
    return aux["mem_kv"]


def memory_layers_kv(cfg: ModelConfig, params, x: jax.Array, positions: jax.Array,
                     memory: Mapping[int, Any], top_k: int | None, mesh=None) -> dict[int, Any]:
    """Layers ``m0 .. m_last`` on ``x [B, L, D]`` (the input of the first memory layer) with
    ``memory = {layer: (mem_k, mem_v, mem_mask)}`` → ``{layer: (k, v)}`` memory-view keys/values of
    every memory layer for this window (the layers above the last memory layer are not run)."""
    out = {}
    for i in range(cfg.mem_layers[0], cfg.mem_layers[-1] + 1):
        x, aux = _layer(cfg, params, i, x, positions, memory.get(i), top_k, mesh)
        if cfg.is_memory_layer(i):
            out[i] = aux["mem_kv"]
    return out
