"""Multi-head attention (no biases) with the FoT memory-layer variants.

Layout ``[batch, length, heads, head_dim]``. Params: ``q`` kernel ``[D, H*Dh]``, ``k, v`` kernels
``[D, Hkv*Dh]`` (``Hkv = cfg.num_kv_heads``: grouped-query / multi-query attention; the ops group the queries
over the kv heads without repeating them), ``o`` kernel ``[H*Dh, D]``; memory layers with ``qk_norm`` add
``qk_scale`` [H] (or ``qk_log_scale`` [H], see ``ModelConfig.qk_scale_param``); with ``mem_gate``
``gate_bias`` [H]. Keys/values (caches, crossbatch extra keys, the inference memory) have Hkv heads.

Key encodings (what the caches hold):
* local keys (``aux["kv"]``, the generation cache): exactly what the layer's local attention consumes —
  RoPE-rotated at their positions, except memory layers with ``mem_positional="none"`` (raw keys);
  with ``qk_norm`` they are L2-normalised.
* memory-view keys (``aux["mem_kv"]``, crossbatch extra keys, inference memory): ``as_first`` ⇒
  un-rotated (RoPE at position 0 is the identity), ``none`` ⇒ raw (L2-normalised with ``qk_norm``).
With ``qk_norm`` the per-head temperature multiplies the queries, and the ops get ``scale=1``.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fot import ops
from fot.model.config import ModelConfig
from fot.model.layers import dense
from fot.parallel import with_logical_constraint

_HEADS = ("batch", "length", "heads", "head_dim")
_KV_HEADS = ("batch", "length", "kv_heads", "head_dim")


def _l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)


class Attention(nn.Module):
    """Self-attention of one decoder layer (local, crossbatch, or memory attention).

    Attributes: ``cfg``; ``is_memory`` (FoT memory layer); ``mesh`` (forwarded to fot.ops and used for
    activation constraints); ``top_k`` (inference memory top-k); ``collect_stats`` (ask the ops for
    ``mem_mass``).
    """

    cfg: ModelConfig
    is_memory: bool = False
    mesh: Any = None
    top_k: int | None = None
    collect_stats: bool = False

    def _constrain(self, x):
        return with_logical_constraint(x, _HEADS, self.mesh)

    @nn.compact
    def __call__(self, x, positions, segment_ids=None, extra_rows=None, extra_key_mask=None,
                 memory=None, cache=None, cache_segment_ids=None):
        """x [B,T,D]; positions int [B,T]; segment_ids int [B,T] or None; extra_rows int [B,n];
        extra_key_mask bool [B,T]; memory (mem_k, mem_v, mem_mask) [B,M,Hkv,Dh]x2,[B,M];
        cache (k, v) [B,C,Hkv,Dh]; cache_segment_ids int [B,C+T] (keys' ids with a cache).

        Returns (out [B,T,D], aux) with aux["kv"] = (k_local, v) [B,T,Hkv,Dh], and for memory layers
        aux["mem_kv"] = (k_memory_view, v); aux["mem_mass"] [B,T,H] when collected.
        """
        cfg = self.cfg
        b, t, _ = x.shape
        h, hkv, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        dt = cfg.compute_dtype

        def proj(name, heads, names):
            y = dense(heads * dh, ("embed", names[2]), cfg, name)(x).reshape(b, t, heads, dh)
            return with_logical_constraint(y, names, self.mesh)

        q = proj("q", h, _HEADS)
        k, v = proj("k", hkv, _KV_HEADS), proj("v", hkv, _KV_HEADS)
        scale = None
        if self.is_memory and cfg.qk_norm:
            tau = self._temperature()[None, None, :, None]  # [1, 1, H, 1]
            if cfg.qk_scale_n_ref is not None:
                n = keys_in_view(positions, extra_rows, extra_key_mask, memory)  # [B, T]
                tau = tau * (jnp.log(n) / math.log(cfg.qk_scale_n_ref))[:, :, None, None]
            q = (_l2_normalize(q) * tau).astype(dt)
            k = _l2_normalize(k).astype(dt)
            scale = 1.0
        use_rope = not (self.is_memory and cfg.mem_positional == "none")
        if use_rope:
            q_loc = ops.apply_rope(q, positions, theta=cfg.rope_theta)
            k_loc = ops.apply_rope(k, positions, theta=cfg.rope_theta)
        else:
            q_loc, k_loc = q, k
        k_mem = k  # memory view: as_first ⇒ rotation at position 0 = identity; none ⇒ raw

        if cache is not None:
            k_all = jnp.concatenate([cache[0].astype(dt), k_loc], axis=1)
            v_all = jnp.concatenate([cache[1].astype(dt), v], axis=1)
            seg_all = cache_segment_ids
        else:
            k_all, v_all, seg_all = k_loc, v, segment_ids

        aux: dict[str, Any] = {"kv": (k_loc, v)}
        if self.is_memory:
            aux["mem_kv"] = (k_mem, v)
        stats = None
        gate = None
        if self.is_memory and cfg.mem_gate:
            bias = self.param("gate_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("heads",)),
                              (h,), cfg.params_dtype)
            gate = jax.nn.sigmoid(bias.astype(jnp.float32))[:, None]  # [H, 1]; x has_memory[B,1,1,1] below

        if self.is_memory and extra_rows is not None:
            if gate is None:
                res = ops.crossbatch_attention(q_loc, k_loc, v, k_mem, v, extra_rows,
                                               extra_key_mask=extra_key_mask, segment_ids=segment_ids,
                                               scale=scale, mesh=self.mesh, return_stats=self.collect_stats,
                                               block_rows=cfg.crossbatch_block_rows)
                out, stats = res if self.collect_stats else (res, None)
            else:
                mem_only = ops.crossbatch_attention(q_loc, k_loc, v, k_mem, v, extra_rows,
                                                    extra_key_mask=extra_key_mask, segment_ids=segment_ids,
                                                    scale=scale, mesh=self.mesh, include_local=False,
                                                    block_rows=cfg.crossbatch_block_rows)
                local = ops.causal_attention(q_loc, k_loc, v, segment_ids=segment_ids, scale=scale,
                                             implementation=cfg.attention_impl)
                mask = jnp.ones(x.shape[:2], bool) if extra_key_mask is None else extra_key_mask
                rows_ok = jnp.take(mask.any(-1), jnp.clip(extra_rows, 0, b - 1), axis=0) & (extra_rows >= 0)
                gate = gate * rows_ok.any(-1)[:, None, None, None]
                out = self._mix(gate, mem_only, local)
        elif self.is_memory and memory is not None:
            mem_k, mem_v, mem_mask = memory  # any dtype (e.g. bf16 store): fot.ops casts per chunk
            if gate is None:
                res = ops.memory_attention(q_loc, k_all, v_all, mem_k, mem_v, mem_mask=mem_mask,
                                           top_k=self.top_k, segment_ids=seg_all, scale=scale,
                                           mesh=self.mesh, return_stats=self.collect_stats)
                out, stats = res if self.collect_stats else (res, None)
            else:
                own_row = jnp.arange(b, dtype=jnp.int32)[:, None]
                # Memory-only part: row b's memory as the one "extra row" of row b, no local keys.
                mem_only = ops.crossbatch_attention(q_loc, k_loc, v, mem_k, mem_v, own_row,
                                                    extra_key_mask=mem_mask, scale=scale, mesh=self.mesh,
                                                    include_local=False)
                local = ops.causal_attention(q_loc, k_all, v_all, segment_ids=seg_all, scale=scale,
                                             implementation=cfg.attention_impl)
                gate = gate * mem_mask.any(-1)[:, None, None, None]
                out = self._mix(gate, mem_only, local)
        else:
            out = ops.causal_attention(q_loc, k_all, v_all, segment_ids=seg_all, scale=scale,
                                       implementation=cfg.attention_impl)

        if self.collect_stats:
            if stats is not None:
                aux["mem_mass"] = stats["mem_mass"]
            elif gate is not None and (extra_rows is not None or memory is not None):
                aux["mem_mass"] = jnp.broadcast_to(gate[..., 0], (b, t, h)).astype(jnp.float32)
        out = self._constrain(out.astype(dt)).reshape(b, t, h * dh)
        return dense(cfg.d_model, ("heads", "embed"), cfg, "o")(out), aux

    def _temperature(self) -> jax.Array:
        """Per-head QK-norm temperature tau [H] (float32) from param ``qk_scale`` (tau) or
        ``qk_log_scale`` (log tau), see ``ModelConfig.qk_scale_param``."""
        cfg = self.cfg
        log = cfg.qk_scale_param == "log"
        init = math.log(cfg.qk_scale_default) if log else cfg.qk_scale_default
        p = self.param(temperature_param_name(cfg), nn.with_logical_partitioning(
            nn.initializers.constant(init), ("heads",)), (cfg.num_heads,), cfg.params_dtype)
        return _tau(cfg, p)

    @staticmethod
    def _mix(gate, mem_only, local):
        """MT gate: g * memory_only + (1 - g) * local_only, g [B, 1, H, 1] broadcast over [B, T, H, Dh].

        g is 0 for rows without any visible memory key (then the output is the local attention)."""
        mixed = gate * mem_only.astype(jnp.float32) + (1.0 - gate) * local.astype(jnp.float32)
        return mixed.astype(local.dtype)


def keys_in_view(positions, extra_rows=None, extra_key_mask=None, memory=None) -> jax.Array:
    """n [B, T] float32: keys a memory-layer query can attend to — its causal local keys
    (``positions + 1``) plus the valid keys of its crossbatch extra rows (training) or the valid
    memory slots (inference, counted before top-k). ``ModelConfig.qk_scale_n_ref`` scales the
    temperature by ``ln(n) / ln(n_ref)``."""
    n = positions.astype(jnp.float32) + 1.0
    if extra_rows is not None:
        b, t = positions.shape
        per_row = (jnp.full((b,), float(t)) if extra_key_mask is None
                   else extra_key_mask.astype(jnp.float32).sum(-1))  # [B] valid keys of each source row
        rows = extra_rows.astype(jnp.int32)
        extra = jnp.where(rows >= 0, jnp.take(per_row, jnp.clip(rows, 0, b - 1)), 0.0).sum(-1)  # [B]
        n = n + extra[:, None]
    elif memory is not None:
        n = n + memory[2].astype(jnp.float32).sum(-1)[:, None]
    return n


def temperature_param_name(cfg: ModelConfig) -> str:
    """Name of the memory layers' temperature param: ``qk_scale`` (tau) or ``qk_log_scale`` (log tau)."""
    return "qk_log_scale" if cfg.qk_scale_param == "log" else "qk_scale"


def _tau(cfg: ModelConfig, param) -> jax.Array:
    p = jnp.asarray(param).astype(jnp.float32)
    return jnp.exp(p) if cfg.qk_scale_param == "log" else p


def memory_temperatures(cfg: ModelConfig, params) -> dict[int, jax.Array]:
    """``{memory layer: tau [H]}`` (float32) of a ``Decoder(cfg)`` params tree with ``qk_norm`` (else ``{}``)."""
    if not cfg.qk_norm:
        return {}
    name = temperature_param_name(cfg)
    return {i: _tau(cfg, params[f"layers_{i}"]["attn"][name]) for i in cfg.mem_layers}


def scale_memory_temperatures(cfg: ModelConfig, params, factor: float):
    """A copy of ``params`` whose memory layers' QK-norm temperature tau is multiplied by ``factor``
    (evaluation-time sharpening; the input tree is not modified)."""
    name = temperature_param_name(cfg)
    out = dict(params)
    for i in cfg.mem_layers:
        layer = dict(out[f"layers_{i}"])
        attn = dict(layer["attn"])
        p = jnp.asarray(attn[name])
        attn[name] = (p + math.log(factor) if cfg.qk_scale_param == "log" else p * factor).astype(p.dtype)
        layer["attn"] = attn
        out[f"layers_{i}"] = layer
    return out
