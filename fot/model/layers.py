"""Basic Linen layers with logical axis names: RMSNorm, SwiGLU MLP, Embed, Dense without bias."""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fot.model.config import ModelConfig
from fot.parallel import with_logical_constraint


def normal_init(std: float, names: Sequence[str]):
    """Normal(0, std) initializer carrying logical axis names."""
    return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), tuple(names))


def dense(features: int, names: Sequence[str], cfg: ModelConfig, name: str) -> nn.Dense:
    """Bias-free Dense, kernel ``[in, out]`` ~ Normal(0, init_std), computed in ``cfg.dtype``."""
    return nn.Dense(features, use_bias=False, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
                    kernel_init=normal_init(cfg.init_std, names), name=name)


class RMSNorm(nn.Module):
    """``y = scale * x / sqrt(mean(x^2) + eps)``; normalisation in float32, output in ``dtype``.

    Param ``scale`` [D] (init ones, logical axis ``norm``). Input ``[..., D]``.
    """

    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return y.astype(self.dtype) * scale.astype(self.dtype)


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``; x ``[B, T, D]`` → ``[B, T, D]``; params gate/up [D, F], down [F, D]."""

    config: ModelConfig
    mesh: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        g = dense(cfg.mlp_dim, ("embed", "mlp"), cfg, "gate")(x)
        u = dense(cfg.mlp_dim, ("embed", "mlp"), cfg, "up")(x)
        h = nn.silu(g) * u
        h = with_logical_constraint(h, ("batch", "length", "mlp"), self.mesh)
        return dense(cfg.d_model, ("mlp", "embed"), cfg, "down")(h)


def embed(cfg: ModelConfig, name: str = "embed") -> nn.Embed:
    """Token embedding ``[V, D]`` ~ Normal(0, init_std), logical axes (vocab, embed)."""
    return nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
                    embedding_init=normal_init(cfg.init_std, ("vocab", "embed")), name=name)
