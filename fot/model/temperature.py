"""QK-norm temperature of the memory layers: the per-head param, its ln(n) scaling, eval-time sharpening.

With ``ModelConfig.qk_norm`` a memory layer L2-normalises queries and keys and multiplies the queries by
a learned per-head temperature tau [H], stored as ``qk_scale`` (tau) or ``qk_log_scale`` (log tau)
(``ModelConfig.qk_scale_param``); ``qk_scale_n_ref`` scales it by ``ln(n) / ln(n_ref)`` with n the
keys a query can see (:func:`keys_in_view`); ``qk_scale_extrapolation`` sharpens it by a power law beyond
the keys in view of training (:func:`n_scaling`).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fot.model.config import ModelConfig


def keys_in_view(positions, extra_rows=None, extra_key_mask=None, slots=None) -> jax.Array:
    """n [B, T] float32: keys a memory-layer query can attend to — its causal local keys
    (``positions + 1``) plus the valid keys of its crossbatch extra rows (training) or the valid
    memory slots (inference, counted before top-k). ``ModelConfig.qk_scale_n_ref`` scales the
    temperature by ``ln(n) / ln(n_ref)``. ``slots``: float32 [B], the valid memory slots each row sees
    (``fot.model.state.memory_slots``; inference and memory prefill) or None."""
    n = positions.astype(jnp.float32) + 1.0
    if extra_rows is not None:
        b, t = positions.shape
        per_row = (jnp.full((b,), float(t)) if extra_key_mask is None
                   else extra_key_mask.astype(jnp.float32).sum(-1))  # [B] valid keys of each source row
        rows = extra_rows.astype(jnp.int32)
        extra = jnp.where(rows >= 0, jnp.take(per_row, jnp.clip(rows, 0, b - 1)), 0.0).sum(-1)  # [B]
        n = n + extra[:, None]
    elif slots is not None:
        n = n + slots[:, None]
    return n


def n_scaling(cfg: ModelConfig, n: jax.Array) -> jax.Array:
    """Multiplier [B, T] (float32) of the temperature for ``n`` [B, T] keys in view (:func:`keys_in_view`):
    ``ln(n) / ln(qk_scale_n_ref)`` (when set) times ``max(1, n / qk_scale_n_train) ** qk_scale_extrapolation``
    (when beta > 0; 1 up to the keys in view of training)."""
    f = jnp.ones_like(n)
    if cfg.qk_scale_n_ref is not None:
        f = f * jnp.log(n) / math.log(cfg.qk_scale_n_ref)
    if cfg.qk_scale_extrapolation > 0:
        f = f * jnp.maximum(n / float(cfg.qk_scale_n_train), 1.0) ** float(cfg.qk_scale_extrapolation)
    return f


def temperature_param_name(cfg: ModelConfig) -> str:
    """Name of the memory layers' temperature param: ``qk_scale`` (tau) or ``qk_log_scale`` (log tau)."""
    return "qk_log_scale" if cfg.qk_scale_param == "log" else "qk_scale"


def temperature_from_param(cfg: ModelConfig, param) -> jax.Array:
    """tau [H] float32 from the stored param (tau, or log tau with ``qk_scale_param="log"``)."""
    p = jnp.asarray(param).astype(jnp.float32)
    return jnp.exp(p) if cfg.qk_scale_param == "log" else p


def memory_temperatures(cfg: ModelConfig, params) -> dict[int, jax.Array]:
    """``{memory layer: tau [H]}`` (float32) of a ``Decoder(cfg)`` params tree with ``qk_norm`` (else ``{}``)."""
    if not cfg.qk_norm:
        return {}
    name = temperature_param_name(cfg)
    return {i: temperature_from_param(cfg, params[f"layers_{i}"]["attn"][name]) for i in cfg.mem_layers}


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
