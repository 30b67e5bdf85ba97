"""Generation on top of windowed memory inference (LongLLaMA §3.4 semantics).

The prompt is split as in :meth:`MemoryInference.forward`: prefix windows go to memory, the last
``last_context_length`` tokens become the local KV cache. Each decode step feeds one token at local
position ``n`` (the cache length). When the cache is full (``n == window``) the whole cache is flushed
*before* attention: memory layers move its memory-view keys/values into memory, other layers drop it,
and local positions restart at 0 — exactly LongLLaMA's behaviour.

The cache is a fixed ``[B, window, H, Dh]`` buffer per layer whose unused slots are masked through
``segment_ids`` (0 = empty slot), so one compiled decode step serves every position.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fot import memory as fmem
from fot.inference.windowed import MemoryInference, WindowedConfig
from fot.model import LayerKV, check_token_ids, run_window


@dataclasses.dataclass
class GenerationState:
    """Decode state: memory stores {memory layer: MemoryStore}; cache {layer: LayerKV} buffers
    [B, window, Hkv, Dh]; pending {memory layer: LayerKV} memory-view buffers of the cached tokens
    (flushed into memory when the cache is full); ``n`` valid cache slots (same for all rows)."""

    stores: dict
    cache: dict
    pending: dict
    n: int


class Generator:
    """Greedy / temperature sampling with memory. See :func:`generate` for the one-call API."""

    def __init__(self, model, params, config: WindowedConfig, *, mesh=None):
        if config.last_context_length < 1:
            raise ValueError("generation needs last_context_length >= 1 (the local cache holds the last "
                             f"prompt tokens), got {config.last_context_length}")
        if model.config.smears_memory_keys:
            raise ValueError("generation does not support ModelConfig.mem_key_smear=True: smeared keys mix "
                             "each key with the previous token's inside a window, which one-token decode "
                             "steps do not have; evaluate such models window by window (fot.eval)")
        self.runner = MemoryInference(model, params, config, mesh=mesh)
        self.model, self.params, self.config, self.mesh = model, params, config, mesh
        self._decode = jax.jit(self._decode_impl, donate_argnums=(2, 3))
        self._flush = jax.jit(self._flush_impl, donate_argnums=(0,))

    # ---------------------------------------------------------------------------------------------
    def prefill(self, prompt, *, stores=None, max_new_tokens: int = 0) -> tuple[jax.Array, GenerationState]:
        """Run the prompt ``[B, T]``; returns (logits of the last prompt token [B, V], state).

        Without ``stores`` and with an unbounded config (``capacity=None``) the memory gets room for the
        prompt's prefix windows plus every cache flush that ``max_new_tokens`` can cause.
        """
        check_token_ids(prompt, self.model.config.vocab_size, "prompt")
        prompt = np.asarray(prompt, np.int32)
        if prompt.ndim != 2 or prompt.shape[1] < 1:
            raise ValueError(f"prompt must be int [batch, length >= 1], got shape {prompt.shape}")
        if stores is None and self.runner.mem_layers:
            w = self.config.window
            cap = self.config.capacity
            if cap is None:
                extra = min(prompt.shape[1], self.config.last_context_length) + max(int(max_new_tokens), 0)
                cap = self.runner.capacity_for(prompt.shape[1]) + w * (extra // w)
            stores = self.runner.init_memory(prompt.shape[0], cap)
        out = self.runner.forward(prompt, stores=stores)
        final = out["final_kv"]
        w = self.config.window
        b = prompt.shape[0]
        n = int(final.kv[0].keys.shape[1])

        def buf(x):  # x [B, n, Hkv, Dh] → [B, window, Hkv, Dh], x in the first n slots
            z = jnp.zeros((b, w) + tuple(x.shape[2:]), x.dtype)
            return jax.lax.dynamic_update_slice_in_dim(z, x, 0, axis=1)

        cache = {i: LayerKV(buf(k), buf(v)) for i, (k, v) in final.kv.items()}
        pending = {i: LayerKV(buf(k), buf(v)) for i, (k, v) in final.mem_kv.items()
                   if i in self.runner.mem_layers}
        return out["logits"][:, -1], GenerationState(out["stores"], cache, pending, n)

    def _decode_impl(self, params, stores, cache, pending, token, n):
        b = token.shape[0]
        w = self.config.window
        seg = jnp.concatenate([(jnp.arange(w) < n).astype(jnp.int32)[None].repeat(b, 0),
                               jnp.ones((b, 1), jnp.int32)], axis=1)  # [B, window + 1]: empty slots 0
        out = run_window(self.model, params, token[:, None], memory=fmem.memory_views(stores), cache=cache,
                         positions=jnp.full((b, 1), n, jnp.int32), segment_ids=seg, top_k=self.config.top_k,
                         mesh=self.mesh)

        def put(buf: LayerKV, x: LayerKV) -> LayerKV:  # write the new token's k/v at slot n
            return LayerKV(*(jax.lax.dynamic_update_slice_in_dim(a, z.astype(a.dtype), n, axis=1)
                             for a, z in zip(buf, x)))

        cache = {i: put(c, out.kv[i]) for i, c in cache.items()}
        pending = {i: put(p, out.mem_kv[i]) for i, p in pending.items()}
        return out.logits[:, 0], cache, pending

    def _flush_impl(self, stores, pending):
        return {i: fmem.append(s, *pending[i]) for i, s in stores.items()}

    def decode(self, state: GenerationState, token) -> tuple[jax.Array, GenerationState]:
        """Feed ``token [B]``; returns (next-token logits [B, V], new state). Flushes a full cache first."""
        stores, n = state.stores, state.n
        if n >= self.config.window:
            stores = self._flush(stores, state.pending) if stores else stores
            n = 0
        logits, cache, pending = self._decode(self.params, stores, state.cache, state.pending,
                                              jnp.asarray(token, jnp.int32), jnp.int32(n))
        return logits, GenerationState(stores, cache, pending, n + 1)

    def generate(self, prompt, max_new_tokens: int, *, temperature: float = 0.0, rng=None,
                 eos_id: int | None = None, stores=None) -> dict[str, Any]:
        """See :func:`generate` (this reuses the compiled prefill/decode functions across calls)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature > 0 and rng is None:
            rng = jax.random.PRNGKey(0)
        logits, state = self.prefill(prompt, stores=stores, max_new_tokens=max_new_tokens)
        out = []
        done = jnp.zeros((logits.shape[0],), bool)
        for step in range(max_new_tokens):
            key = None if temperature == 0 else jax.random.fold_in(rng, step)
            tok = sample(logits, temperature=temperature, rng=key)
            if eos_id is not None:
                tok = jnp.where(done, eos_id, tok)
                done = done | (tok == eos_id)
            out.append(tok)
            if step + 1 == max_new_tokens or (eos_id is not None and bool(done.all())):
                break
            logits, state = self.decode(state, tok)
        tokens = np.stack([np.asarray(t) for t in out], axis=1)
        if tokens.shape[1] < max_new_tokens:
            tokens = np.pad(tokens, [(0, 0), (0, max_new_tokens - tokens.shape[1])], constant_values=eos_id)
        return {"tokens": tokens, "stores": state.stores, "overflow": fmem.overflow_report(state.stores)}


def sample(logits, *, temperature: float = 0.0, rng: jax.Array | None = None) -> jax.Array:
    """Greedy (``temperature == 0``) or temperature sampling from ``logits [B, V]`` → int32 [B]."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if rng is None:
        raise ValueError("temperature sampling needs rng (a jax.random key)")
    return jax.random.categorical(rng, logits.astype(jnp.float32) / temperature, axis=-1).astype(jnp.int32)


def generate(model, params, prompt, max_new_tokens: int, *, config: WindowedConfig,
             temperature: float = 0.0, rng: jax.Array | None = None, eos_id: int | None = None,
             mesh=None, stores=None) -> dict[str, Any]:
    """Generate ``max_new_tokens`` tokens after ``prompt`` (int [B, T], equal-length rows).

    Returns ``{"tokens": int32 [B, max_new_tokens], "stores": memory after generation,
    "overflow": report}``. After ``eos_id`` a row keeps emitting ``eos_id``; generation stops early
    when every row has finished.
    """
    return Generator(model, params, config, mesh=mesh).generate(
        prompt, max_new_tokens, temperature=temperature, rng=rng, eos_id=eos_id, stores=stores)
