"""Rotary position embeddings, rotate-half layout (HF LLaMA), float32 tables.

Frequencies inv_freq[i] = theta^(-2i/Dh), i < Dh/2; angle = position * inv_freq. Pairs (x[i], x[i+Dh/2]).
Tables are computed from the positions themselves (no fixed table length, no out-of-range take).
"""
from __future__ import annotations

import jax.numpy as jnp

from fot.ops._checks import shape_of


def rope_tables(positions, head_dim, *, theta=10000.0):
    """cos/sin tables for `positions` (int, any shape P) -> (cos, sin), each float32 [*P, head_dim]."""
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    inv_freq = theta ** (-jnp.arange(0, head_dim // 2, dtype=jnp.float32) * 2.0 / head_dim)
    ang = jnp.asarray(positions).astype(jnp.float32)[..., None] * inv_freq  # [*P, Dh/2]
    ang = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(ang), jnp.sin(ang)


def _rotate_half(x):
    h = x.shape[-1] // 2
    return jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def apply_rope(x, positions, *, theta=10000.0):
    """Rotate x [B,T,H,Dh] at positions int [B,T] or [T]; computed in float32, returned in x.dtype."""
    xs, ps = shape_of(x), shape_of(positions)
    if len(xs) != 4:
        raise ValueError(f"x must be [B, T, H, Dh], got shape {xs}")
    if ps not in ((xs[1],), (xs[0], xs[1])):
        raise ValueError(f"positions must be [T] or [B, T] matching x {xs}, got {ps}")
    cos, sin = rope_tables(positions, xs[-1], theta=theta)
    if cos.ndim == 2:  # [T, Dh]
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    else:  # [B, T, Dh]
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    xf = x.astype(jnp.float32)
    return (xf * cos + _rotate_half(xf) * sin).astype(x.dtype)
