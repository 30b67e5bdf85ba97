"""Exact chunked inner-product top-k (streams keys in chunks with a running lax.top_k merge)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

NEG = -1e30
DEFAULT_CHUNK = 8192


def _merge(best, s, base):
    """best = (vals [..., K], idx [..., K]); s [..., C] scores of keys base..base+C-1 -> merged best."""
    vals, idx = best
    k = vals.shape[-1]
    cand = jnp.concatenate([vals, s], axis=-1)
    cidx = jnp.concatenate([idx, jnp.broadcast_to(base + jnp.arange(s.shape[-1], dtype=jnp.int32),
                                                  s.shape)], axis=-1)
    v, pos = lax.top_k(cand, k)
    return v, jnp.take_along_axis(cidx, pos, axis=-1)


def running_topk(score_fn, n_keys, k, chunk, batch_shape, vma=frozenset()):
    """Exact top-k over n_keys keys whose scores come chunk by chunk from score_fn(start, size) ->
    float32 [*batch_shape, size] (invalid keys already NEG). Returns (vals, idx) [*batch_shape, k];
    slots beyond the number of valid keys hold NEG (and an arbitrary index). Never materialises more
    than one [*batch_shape, chunk] score block."""
    from fot.ops.attention import full
    vals = full(tuple(batch_shape) + (k,), NEG, vma)
    idx = jnp.zeros(tuple(batch_shape) + (k,), jnp.int32)
    if vma:
        idx = lax.pcast(idx, tuple(sorted(vma)), to="varying")
    best = (vals, idx)
    chunk = max(1, min(chunk, n_keys)) if n_keys else 1
    n_full, rem = divmod(n_keys, chunk)
    if n_full:
        def body(best, c):
            start = c * chunk
            return _merge(best, score_fn(start, chunk), start), None
        best, _ = lax.scan(body, best, jnp.arange(n_full, dtype=jnp.int32))
    if rem:
        best = _merge(best, score_fn(n_full * chunk, rem), jnp.int32(n_full * chunk))
    return best


@functools.partial(jax.jit, static_argnames=("k", "chunk_size"))
def _topk_scores(queries, keys, key_mask, k, chunk_size):
    qf = queries.astype(jnp.float32)

    def score_fn(start, size):
        kc = lax.dynamic_slice_in_dim(keys, start, size, axis=0).astype(jnp.float32)
        s = qf @ kc.T
        if key_mask is not None:
            s = jnp.where(lax.dynamic_slice_in_dim(key_mask, start, size, axis=0)[None, :], s, NEG)
        return s

    return running_topk(score_fn, keys.shape[0], k, chunk_size, (queries.shape[0],))


def topk_scores(queries, keys, k, *, chunk_size=DEFAULT_CHUNK, key_mask=None):
    """Exact maximum-inner-product search (as FAISS IndexFlatIP): queries [N, D], keys [M, D] ->
    (scores float32 [N, k], indices int32 [N, k]), best first. key_mask bool [M] excludes keys; slots
    beyond the number of valid keys get score -1e30 (index arbitrary). Keys are streamed in chunks of
    `chunk_size` with a running lax.top_k merge, so extra memory is O(N * chunk_size)."""
    qs, ks = jnp.shape(queries), jnp.shape(keys)
    if len(qs) != 2 or len(ks) != 2 or qs[1] != ks[1]:
        raise ValueError(f"queries must be [N, D] and keys [M, D] with equal D, got queries {qs}, keys {ks}")
    if not isinstance(k, int) or k <= 0:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if key_mask is not None and jnp.shape(key_mask) != (ks[0],):
        raise ValueError(f"key_mask must have shape [M] = ({ks[0]},), got {jnp.shape(key_mask)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _topk_scores(queries, keys, key_mask, k, int(chunk_size))
