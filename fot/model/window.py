"""Run the decoder on one window with these memories and caches: the one path every caller uses.

:func:`run_window` is the whole model (windowed inference, generation, the full-context baseline,
the distraction eval); :func:`run_layers` runs a range of layers on hidden states (memory prefill,
``fot.inference.prefill``) with the same per-layer inputs and types. Memory and caches are typed per
layer (``fot.model.state``) and validated by the Decoder.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp

from fot.model.config import ModelConfig
from fot.model.decoder import _ACT, Decoder, DecoderLayer
from fot.model.layers import embed
from fot.model.state import LayerInputs, LayerKV, LayerMemory, check_memory
from fot.parallel import with_logical_constraint


class WindowOutput(NamedTuple):
    """What one window leaves behind.

    logits float32 [B,T,V]; kv {layer: LayerKV} local keys/values of every layer (the next call's
    cache) [B,T,Hkv,Dh]; mem_kv {memory layer: LayerKV} memory-view keys/values (what a memory store
    appends); mem_mass {memory layer: [B,T,H]} softmax mass on memory keys (``collect_mem_mass``; only
    layers that had memory), else {}.
    """

    logits: jax.Array
    kv: dict[int, LayerKV]
    mem_kv: dict[int, LayerKV]
    mem_mass: dict[int, jax.Array]


def run_window(model: Decoder, params, tokens, *, memory: Mapping[int, LayerMemory] | None = None,
               cache: Mapping[int, LayerKV] | None = None, positions=None, segment_ids=None,
               top_k: int | None = None, mesh=None, collect_mem_mass: bool = False) -> WindowOutput:
    """``model`` on ``tokens`` int [B,T] attending to ``memory`` {memory layer: LayerMemory} (none or
    empty: no memory; ``top_k`` applies only with memory) and ``cache`` {layer: LayerKV} [B,C,Hkv,Dh].
    ``positions`` / ``segment_ids`` as ``Decoder.__call__`` (defaults: C + arange(T); no segments)."""
    memory = dict(memory) if memory else None
    logits, aux = model.apply(
        {"params": params}, tokens, positions=positions, segment_ids=segment_ids, memory=memory,
        top_k=top_k if memory else None, cache=cache, return_kv=True, mesh=mesh,
        collect_mem_mass=collect_mem_mass)
    return WindowOutput(logits, aux["kv"], aux["mem_kv"], aux.get("mem_mass", {}))


def embed_tokens(cfg: ModelConfig, params, tokens, mesh=None) -> jax.Array:
    """The Decoder's embedding of ``tokens`` int [R,L] → hidden [R,L,D] (the input of layer 0)."""
    x = embed(cfg).apply({"params": params["embed"]}, tokens.astype(jnp.int32))
    return with_logical_constraint(x, _ACT, mesh)


def run_layers(cfg: ModelConfig, params, x, positions, layers: range, *,
               memory: Mapping[int, LayerMemory] | None = None, top_k: int | None = None,
               mesh=None) -> tuple[jax.Array, dict[int, LayerKV]]:
    """Decoder layers ``layers`` (consecutive) of ``Decoder(cfg)``'s ``params`` on hidden ``x`` [B,L,D]
    at ``positions`` int [B,L], memory layers attending to ``memory`` → (hidden after the last layer
    [B,L,D], {memory layer in range: memory-view LayerKV}). No segments, crossbatch rows or cache."""
    b = x.shape[0]
    memory = check_memory(cfg, memory, b)
    inputs = LayerInputs(positions.astype(jnp.int32))
    mem_kv = {}
    for i in layers:
        mem = memory.get(i)
        mod = DecoderLayer(cfg, cfg.is_memory_layer(i), mesh, None if mem is None else top_k, False)
        x, aux = mod.apply({"params": params[f"layers_{i}"]}, x, inputs, mem, None)  # x [B, L, D]
        if cfg.is_memory_layer(i):
            mem_kv[i] = aux["mem_kv"]
    return x, mem_kv
