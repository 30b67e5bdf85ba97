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

The functions run the Decoder's own submodules on the matching subtrees of its ``params`` through
``fot.model.run_layers`` / ``fot.model.embed_tokens``; ``tests/test_prefill.py`` checks the result
against a full forward.
"""
from __future__ import annotations

from typing import Mapping

import jax

from fot.model import LayerKV, LayerMemory, ModelConfig, embed_tokens, run_layers


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
