"""LLaMA decoder with FoT memory layers (Linen).

Params: ``embed/embedding`` [V,D]; ``layers_{i}/{attn_norm,attn/{q,k,v,o},mlp_norm,mlp/{gate,up,down}}``;
``final_norm/scale``; ``lm_head/kernel`` [D,V] (absent with ``tie_embeddings``).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from fot.model.attention import Attention
from fot.model.config import ModelConfig
from fot.model.layers import RMSNorm, SwiGLU, dense, embed
from fot.model.state import LayerInputs, LayerKV, LayerMemory, check_inputs, layer_inputs
from fot.parallel import with_logical_constraint

_ACT = ("batch", "length", "act_embed")


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``+ mlp(norm(.))``. x [B,T,D] → ([B,T,D], aux)."""

    config: ModelConfig
    is_memory: bool = False
    mesh: Any = None
    top_k: int | None = None
    collect_stats: bool = False

    @nn.compact
    def __call__(self, x, inputs: LayerInputs, memory: LayerMemory | None = None,
                 cache: LayerKV | None = None):
        """x [B,T,D]; ``inputs`` as this layer sees them (``LayerInputs.for_layer``); memory / cache of
        this layer or None. Returns (x [B,T,D], aux of ``Attention``)."""
        cfg = self.config
        norm = lambda name: RMSNorm(cfg.norm_eps, cfg.compute_dtype, cfg.params_dtype, name=name)
        a, aux = Attention(cfg, self.is_memory, self.mesh, self.top_k, self.collect_stats, name="attn")(
            norm("attn_norm")(x), inputs, memory, cache)  # a [B, T, D]
        x = x + a
        x = x + SwiGLU(cfg, self.mesh, name="mlp")(norm("mlp_norm")(x))
        return with_logical_constraint(x, _ACT, self.mesh), aux


class Decoder(nn.Module):
    """Decoder-only LM. See ``__call__`` for the inputs (contract in ARCHITECTURE.md, types in
    ``fot.model.state``)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None, extra_rows=None, extra_key_mask=None,
                 memory=None, top_k=None, cache=None, return_kv=False, mesh=None, collect_mem_mass=False):
        """Forward pass.

        Args:
          tokens: int [B,T].
          positions: int [B,T]; default ``arange(T)`` per row (``C + arange(T)`` with a cache of length C).
          segment_ids: int [B,T] (0 = padding, docs >= 1); with a cache also [B,C+T] (ids of cached keys
            first). A [B,T] array with a cache gives the cached keys the id of each row's first token.
          extra_rows: int [B,d] training crossbatch rows for memory layers (-1 = unused).
          extra_key_mask: bool [B,T]; default ``segment_ids > 0`` with segment_ids, else all True.
          memory: {memory layer: LayerMemory(keys, values, mask)} [B,M,Hkv,Dh],[B,M,Hkv,Dh],[B,M] bool
            (Hkv = config.num_kv_heads; a plain (k, v, mask) tuple is accepted).
          top_k: exact top-k over memory (None = dense).
          cache: {layer: LayerKV(keys, values)} for every layer, [B,C,Hkv,Dh], keys as in ``aux["kv"]``.
          return_kv: return ``(logits, aux)``.
          mesh: forwarded to fot.ops and used for activation sharding constraints.
          collect_mem_mass: also return ``aux["mem_mass"] = {layer: [B,T,H]}`` for memory layers that
            had extra/memory keys (implies the ``(logits, aux)`` return).

        Returns:
          logits float32 [B,T,V]; or (logits, aux) with aux["kv"] = {layer: LayerKV} (local keys/values
          of this window, the next call's cache), aux["mem_kv"] = {memory layer: LayerKV} (memory-view
          keys/values, what memory stores) and aux["mem_mass"]. ``fot.model.run_window`` returns them typed.
        """
        cfg = self.config
        memory, cache, c = check_inputs(cfg, tokens, positions=positions, segment_ids=segment_ids,
                                        extra_rows=extra_rows, extra_key_mask=extra_key_mask, memory=memory,
                                        top_k=top_k, cache=cache)
        inputs = layer_inputs(tokens, c, positions, segment_ids, extra_rows, extra_key_mask)
        top_k = None if top_k is None else int(top_k)

        emb = embed(cfg)
        x = with_logical_constraint(emb(tokens.astype(jnp.int32)), _ACT, mesh)  # [B, T, D]
        kv, mem_kv, mem_mass = {}, {}, {}  # {layer: LayerKV}, {memory layer: LayerKV}, {layer: [B,T,H]}
        for i in range(cfg.num_layers):
            is_mem = cfg.is_memory_layer(i)
            cls = DecoderLayer
            if cfg.remat_layer(i):
                cls = nn.remat(DecoderLayer, policy=cfg.checkpoint_policy(), prevent_cse=True)
            layer = cls(cfg, is_mem, mesh, top_k, bool(collect_mem_mass) and is_mem, name=f"layers_{i}")
            x, layer_aux = layer(x, inputs.for_layer(is_mem), memory.get(i) if is_mem else None, cache.get(i))
            kv[i] = layer_aux["kv"]
            if is_mem:
                mem_kv[i] = layer_aux["mem_kv"]
                if "mem_mass" in layer_aux:
                    mem_mass[i] = layer_aux["mem_mass"]
        x = RMSNorm(cfg.norm_eps, cfg.compute_dtype, cfg.params_dtype, name="final_norm")(x)
        if cfg.tie_embeddings:
            logits = emb.attend(x)
        else:
            logits = dense(cfg.vocab_size, ("embed", "vocab"), cfg, "lm_head")(x)
        logits = with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"), mesh)
        if not (return_kv or collect_mem_mass):
            return logits
        aux = {"kv": kv, "mem_kv": mem_kv}
        if collect_mem_mass:
            aux["mem_mass"] = mem_mass
        return logits, aux
