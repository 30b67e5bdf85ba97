"""LLaMA decoder with FoT memory layers (Linen).

Params: ``embed/embedding`` [V,D]; ``layers_{i}/{attn_norm,attn/{q,k,v,o},mlp_norm,mlp/{gate,up,down}}``;
``final_norm/scale``; ``lm_head/kernel`` [D,V] (absent with ``tie_embeddings``).
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fot.model.attention import Attention
from fot.model.config import ModelConfig
from fot.model.layers import RMSNorm, SwiGLU, dense, embed
from fot.parallel import with_logical_constraint

_ACT = ("batch", "length", "act_embed")


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``+ mlp(norm(.))``. x [B,T,D] → ([B,T,D], aux)."""

    cfg: ModelConfig
    is_memory: bool = False
    mesh: Any = None
    top_k: int | None = None
    collect_stats: bool = False

    @nn.compact
    def __call__(self, x, positions, segment_ids, extra_rows, extra_key_mask, memory, cache,
                 cache_segment_ids):
        cfg = self.cfg
        norm = lambda name: RMSNorm(cfg.norm_eps, cfg.compute_dtype, cfg.params_dtype, name=name)
        a, aux = Attention(cfg, self.is_memory, self.mesh, self.top_k, self.collect_stats, name="attn")(
            norm("attn_norm")(x), positions, segment_ids, extra_rows, extra_key_mask, memory, cache,
            cache_segment_ids)
        x = x + a
        x = x + SwiGLU(cfg, self.mesh, name="mlp")(norm("mlp_norm")(x))
        return with_logical_constraint(x, _ACT, self.mesh), aux


def _shape_error(name, got, want):
    return ValueError(f"{name} has shape {tuple(got)}, expected {want}")


def _concrete(x):
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError, TypeError):
        return None


class Decoder(nn.Module):
    """Decoder-only LM. See ``__call__`` for the inputs (contract in COMMON.md / ARCHITECTURE.md)."""

    config: ModelConfig

    def _validate(self, tokens, positions, segment_ids, extra_rows, extra_key_mask, memory, top_k, cache):
        cfg = self.config
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be rank 2 [batch, length], got shape {tuple(tokens.shape)}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be integer, got dtype {tokens.dtype}")
        b, t = tokens.shape
        if positions is not None and tuple(positions.shape) != (b, t):
            raise _shape_error("positions", positions.shape, f"tokens.shape {(b, t)}")
        c = None
        if cache is not None:
            if not isinstance(cache, Mapping) or set(cache) != set(range(cfg.num_layers)):
                raise ValueError(f"cache must map every layer 0..{cfg.num_layers - 1} to (k, v), got keys "
                                 f"{sorted(cache) if isinstance(cache, Mapping) else type(cache)}")
            for i, kv in cache.items():
                if len(kv) != 2:
                    raise ValueError(f"cache[{i}] must be a (k, v) pair")
                ck, cv = kv
                if c is None:
                    c = ck.shape[1] if ck.ndim == 4 else -1
                want = (b, c, cfg.num_kv_heads, cfg.head_dim)
                if tuple(ck.shape) != want or tuple(cv.shape) != want:
                    raise ValueError(f"cache[{i}] k/v have shapes {tuple(ck.shape)}/{tuple(cv.shape)}, "
                                     f"expected {want} (same cache length in every layer)")
        if segment_ids is not None:
            ok = [(b, t)] + ([(b, c + t)] if c else [])
            if tuple(segment_ids.shape) not in ok:
                raise _shape_error("segment_ids", segment_ids.shape,
                                   f"tokens.shape {(b, t)}" + (f" or [B, C+T]={(b, c + t)}" if c else ""))
        if extra_key_mask is not None and tuple(extra_key_mask.shape) != (b, t):
            raise _shape_error("extra_key_mask", extra_key_mask.shape, f"tokens.shape {(b, t)}")
        if extra_rows is not None:
            if extra_rows.ndim != 2 or extra_rows.shape[0] != b:
                raise _shape_error("extra_rows", extra_rows.shape, f"[batch={b}, num_extra]")
            if not jnp.issubdtype(extra_rows.dtype, jnp.integer):
                raise ValueError(f"extra_rows must be integer, got dtype {extra_rows.dtype}")
            rows = _concrete(extra_rows)
            if rows is not None and rows.size and (rows.min() < -1 or rows.max() >= b):
                raise ValueError(f"extra_rows values must be in [-1, batch={b}), got range "
                                 f"[{rows.min()}, {rows.max()}] for shape {rows.shape}")
            if memory is not None:
                raise ValueError("extra_rows (training crossbatch) and memory (inference) are exclusive")
            if cache is not None:
                raise ValueError("extra_rows (training crossbatch) cannot be combined with a local cache")
        if memory is not None:
            if not isinstance(memory, Mapping):
                raise ValueError(f"memory must be a dict {{layer: (mem_k, mem_v, mem_mask)}}, got {type(memory)}")
            for i, entry in memory.items():
                if i not in cfg.mem_layers:
                    raise ValueError(f"memory given for layer {i}, which is not in mem_layers={list(cfg.mem_layers)}")
                if len(entry) != 3:
                    raise ValueError(f"memory[{i}] must be (mem_k, mem_v, mem_mask)")
                mk, mv, mm = entry
                m = mk.shape[1] if mk.ndim == 4 else -1
                want = (b, m, cfg.num_kv_heads, cfg.head_dim)
                if tuple(mk.shape) != want or tuple(mv.shape) != want or tuple(mm.shape) != (b, m):
                    raise ValueError(f"memory[{i}] shapes {tuple(mk.shape)}, {tuple(mv.shape)}, {tuple(mm.shape)}; "
                                     f"expected {want}, {want}, {(b, m)}")
        if top_k is not None:
            if int(top_k) < 1:
                raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
            if cfg.mem_gate:
                raise ValueError("top_k is not supported with mem_gate=True (the gated memory path is dense)")
        return c

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None, extra_rows=None, extra_key_mask=None,
                 memory=None, top_k=None, cache=None, return_kv=False, mesh=None, collect_mem_mass=False):
        """Forward pass.

        Args:
          tokens: int [B,T].
          positions: int [B,T]; default ``arange(T)`` per row (``C + arange(T)`` with a cache of length C).
          segment_ids: int [B,T] (0 = padding, docs >= 1); with a cache also [B,C+T] (ids of cached keys
            first). A [B,T] array with a cache gives the cached keys the id of each row's first token.
          extra_rows: int [B,n] training crossbatch rows for memory layers (-1 = unused).
          extra_key_mask: bool [B,T]; default ``segment_ids > 0`` with segment_ids, else all True.
          memory: {layer: (mem_k, mem_v, mem_mask)} [B,M,Hkv,Dh],[B,M,Hkv,Dh],[B,M] bool (memory layers only;
            Hkv = config.num_kv_heads).
          top_k: exact top-k over memory (None = dense).
          cache: {layer: (k, v)} for every layer, [B,C,Hkv,Dh], keys as in ``aux["kv"]``.
          return_kv: return ``(logits, aux)``.
          mesh: forwarded to fot.ops and used for activation sharding constraints.
          collect_mem_mass: also return ``aux["mem_mass"] = {layer: [B,T,H]}`` for memory layers that
            had extra/memory keys (implies the ``(logits, aux)`` return).

        Returns:
          logits float32 [B,T,V]; or (logits, aux) with aux["kv"], aux["mem_kv"], aux["mem_mass"].
        """
        cfg = self.config
        c = self._validate(tokens, positions, segment_ids, extra_rows, extra_key_mask, memory, top_k, cache)
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) + (c or 0), (b, t))
        positions = positions.astype(jnp.int32)
        cache_seg = None
        if segment_ids is not None:
            segment_ids = segment_ids.astype(jnp.int32)
            if c:
                if segment_ids.shape[1] == t:
                    cache_seg = jnp.concatenate(
                        [jnp.broadcast_to(segment_ids[:, :1], (b, c)), segment_ids], axis=1)
                else:
                    cache_seg, segment_ids = segment_ids, segment_ids[:, c:]
        if extra_rows is not None:
            extra_rows = extra_rows.astype(jnp.int32)
            if extra_key_mask is None:
                extra_key_mask = (segment_ids > 0) if segment_ids is not None else jnp.ones((b, t), bool)
            extra_key_mask = extra_key_mask.astype(bool)
        memory = dict(memory or {})
        cache = dict(cache or {})

        emb = embed(cfg)
        x = with_logical_constraint(emb(tokens.astype(jnp.int32)), _ACT, mesh)
        aux_kv, aux_mem, aux_mass = {}, {}, {}
        for i in range(cfg.num_layers):
            is_mem = cfg.is_memory_layer(i)
            cls = DecoderLayer
            if cfg.remat_layer(i):
                cls = nn.remat(DecoderLayer, policy=cfg.checkpoint_policy(), prevent_cse=True)
            layer = cls(cfg, is_mem, mesh, None if top_k is None else int(top_k),
                        bool(collect_mem_mass) and is_mem, name=f"layers_{i}")
            x, aux = layer(x, positions, segment_ids, extra_rows if is_mem else None,
                           extra_key_mask if is_mem else None, memory.get(i) if is_mem else None,
                           cache.get(i), cache_seg)
            aux_kv[i] = aux["kv"]
            if is_mem:
                aux_mem[i] = aux["mem_kv"]
                if "mem_mass" in aux:
                    aux_mass[i] = aux["mem_mass"]
        x = RMSNorm(cfg.norm_eps, cfg.compute_dtype, cfg.params_dtype, name="final_norm")(x)
        if cfg.tie_embeddings:
            logits = emb.attend(x)
        else:
            logits = dense(cfg.vocab_size, ("embed", "vocab"), cfg, "lm_head")(x)
        logits = with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"), mesh)
        if not (return_kv or collect_mem_mass):
            return logits
        aux_out = {"kv": aux_kv, "mem_kv": aux_mem}
        if collect_mem_mass:
            aux_out["mem_mass"] = aux_mass
        return logits, aux_out
