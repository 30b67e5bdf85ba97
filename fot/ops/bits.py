"""Data movement on narrow floats through their bit pattern.

XLA:CPU has no native bfloat16/float16 slicing, gathering or update-slice: its float-normalisation pass
converts the *whole* operand to float32, moves the data and converts back. On a memory store of M
slots that is a full-size copy for every read of one chunk or write of one window (measured: a 4K-token
append to a 4M-slot bf16 store took 120 ms instead of < 1 ms; the hoisted float32 copy also doubles
peak memory). Moving the same bits as unsigned integers is exact and stays in place; on GPU/TPU the
bitcasts are free.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax


def _narrow(dtype) -> bool:
    dtype = jnp.dtype(dtype)
    return jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4


def as_bits(x: jax.Array) -> jax.Array:
    """``x`` as the unsigned integer of its width when it is a narrow float (bf16/f16), else ``x``."""
    return lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}")) if _narrow(x.dtype) else x


def move(fn: Callable[..., jax.Array], x: jax.Array, *args) -> jax.Array:
    """``fn(x, *args)`` for a pure data-movement ``fn`` (slice, gather, update) applied to the bit
    pattern of ``x`` (array arguments in ``args`` with ``x``'s dtype are moved as bits too).
    Not differentiable for narrow floats: callers use it on inference memory or in custom VJPs."""
    if not _narrow(x.dtype):
        return fn(x, *args)
    args = tuple(as_bits(a) if isinstance(a, jax.Array) and a.dtype == x.dtype else a for a in args)
    return lax.bitcast_convert_type(fn(as_bits(x), *args), x.dtype)
