"""Local causal attention through a fused kernel (``jax.nn.dot_product_attention``) where it is faster.

``implementation`` of :func:`fot.ops.causal_attention` (and ``ModelConfig.attention_impl``):

* ``"blockwise"``: fot's kernel (fot/ops/attention.py: float32 online softmax, flash-style custom VJP);
* ``"xla"``: ``jax.nn.dot_product_attention(implementation="xla")`` (materialised scores, autodiff);
* ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")``, cuDNN flash attention (GPU,
  bfloat16/float16 inputs, head_dim a multiple of 8 up to 128 or 256 from Hopper on); inputs cuDNN does
  not support fall back to the blockwise kernel (decided at trace time, warned once);
* ``"auto"`` (default): ``cudnn`` on GPU for bfloat16/float16 inputs, ``blockwise`` otherwise.

Measured (BUILD_NOTES "Speed where users feel it", issue 14): on CPU the blockwise kernel is 2.7x faster
than ``implementation="xla"`` for fwd+bwd at the 37M shape (B=4, L=256, 8 heads x 64), so CPU stays
blockwise. jax 0.10.2's ``implementation=None`` means XLA, never cuDNN, hence the explicit choice here.
TPU (splash attention) is not wired: ``auto`` keeps the blockwise kernel there.

The fused call builds the same mask as the blockwise kernel (causal with queries aligned to the END of
the keys, or at ``q_offset``; equal segment ids), so both paths agree to the dtype's tolerance (tests).
It returns only the output: ``return_residual`` gives the log-sum-exp rounded to the input dtype and
without a gradient, which is not enough to merge partial softmaxes exactly (memory layers), so the
joint-softmax ops (crossbatch, memory) keep the blockwise kernel for their local part.
"""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "blockwise", "xla", "cudnn")
_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_warned = set()


def check_implementation(value, name="implementation"):
    if value not in IMPLEMENTATIONS:
        raise ValueError(f"{name} must be one of {IMPLEMENTATIONS}, got {value!r}")


def resolve(implementation, dtype, platform=None):
    """The implementation ``auto`` stands for on ``platform`` (default: jax.default_backend()) for
    inputs of ``dtype``; other values are returned unchanged."""
    check_implementation(implementation)
    if implementation != "auto":
        return implementation
    platform = jax.default_backend() if platform is None else platform
    if platform in ("gpu", "cuda") and jnp.dtype(dtype) in _HALF:
        return "cudnn"
    return "blockwise"


def fused_attention(q, k, v, mask, *, scale, implementation, causal):
    """``jax.nn.dot_product_attention`` with a boolean ``mask`` [B,1,Tq,Tk] (True = visible);
    ``causal``: the mask is also plain causal (Tq == Tk), which lets cuDNN skip the upper triangle.
    Returns the output [B,Tq,H,Dh] in q.dtype, or None when cuDNN rejects the inputs (trace time)."""
    try:
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=causal,
                                            implementation=implementation)
    except (NotImplementedError, RuntimeError, ValueError) as e:
        if implementation != "cudnn":
            raise
        key = (q.shape, q.dtype, str(e))
        if key not in _warned:
            _warned.add(key)
            logging.getLogger(__name__).warning("cuDNN attention unavailable for q %s %s (%s); using the "
                                                "blockwise kernel", q.shape, q.dtype, e)
        return None
