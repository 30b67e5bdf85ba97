"""A model read over a long sequence as ONE causal local context (the paper's baseline for the dictionary
task: a standard transformer given the whole document), at bounded memory.

The sequence is processed in chunks of ``chunk`` tokens; every layer keeps a key/value cache of all
earlier tokens (``Decoder(cache=...)``: keys rotated at their own positions, so attention is exactly
the full causal attention of the whole sequence). The cache is a fixed buffer of ``round_up(T,
chunk)`` slots whose unfilled slots carry segment id 0 (invisible), so one program serves every
chunk. Per chunk the attention holds ``[B, H, chunk, T + chunk]`` scores instead of the whole
sequence's ``[B, H, T, T]``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fot.model import LayerKV, run_window


class FullContext:
    """``logits(tokens, start)`` of ``model`` (no memory) reading ``tokens [B, T]`` as one context."""

    def __init__(self, model, params, *, chunk: int = 512):
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.model, self.params, self.chunk = model, params, int(chunk)
        self._run = jax.jit(self._run_impl)
        self._write = jax.jit(self._write_impl, donate_argnums=(0,))

    def _run_impl(self, params, cache, seg, tokens, positions):
        out = run_window(self.model, params, tokens, cache=cache, positions=positions, segment_ids=seg)
        return out.logits, out.kv

    @staticmethod
    def _write_impl(cache, kv, start):
        """Write each layer's chunk ``kv[i]`` [B, chunk, Hkv, Dh] into its cache buffer at ``start``."""
        return {i: LayerKV(*(jax.lax.dynamic_update_slice_in_dim(c, x.astype(c.dtype), start, axis=1)
                             for c, x in zip(cache[i], kv[i]))) for i in cache}

    def logits(self, tokens, start: int = 0) -> np.ndarray:
        """float32 ``[B, T - start, V]``: the logits at positions ``start ..`` of ``tokens`` int [B, T]."""
        tokens = np.asarray(tokens, np.int32)
        b, t = tokens.shape
        c = self.chunk
        slots = -(-t // c) * c
        cfg = self.model.config
        shape = (b, slots, cfg.num_kv_heads, cfg.head_dim)
        cache = {i: LayerKV(jnp.zeros(shape, cfg.compute_dtype), jnp.zeros(shape, cfg.compute_dtype))
                 for i in range(cfg.num_layers)}
        out = []
        for s in range(0, t, c):
            e = min(s + c, t)
            tok = np.zeros((b, c), np.int32)
            tok[:, :e - s] = tokens[:, s:e]
            seg = np.concatenate([np.broadcast_to(np.arange(slots) < s, (b, slots)), np.ones((b, c), bool)], 1)
            pos = np.broadcast_to(np.arange(s, s + c, dtype=np.int32), (b, c))
            logits, kv = self._run(self.params, cache, jnp.asarray(seg, jnp.int32), jnp.asarray(tok), jnp.asarray(pos))
            if e > start:
                out.append(np.asarray(logits[:, max(start - s, 0):e - s]))
            if e < t:
                cache = self._write(cache, kv, s)
        return np.concatenate(out, axis=1)
