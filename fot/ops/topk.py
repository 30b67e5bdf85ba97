"""Exact chunked inner-product top-k (streams keys in chunks with a running lax.top_k merge).

Each chunk's scores can first be reduced exactly by a grouped-maxima prefilter: split the chunk into
groups of `group` keys, keep the k groups with the largest maxima, and run the exact top-k only on those
k * group candidates. Exact: if a key of an unselected group were among the chunk's top-k, the k selected
groups would each hold a key (its maximum) >= it, i.e. k keys >= it, so it can only tie with the k-th
value — the top-k VALUES are always those of the full chunk (ties may pick other indices, as any top-k).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


NEG = -1e30
DEFAULT_CHUNK = 8192


def _iota(shape, base):
    """int32 positions base + [0, shape[-1]) broadcast to `shape` (an iota op, not a folded constant)."""
    return lax.broadcasted_iota(jnp.int32, shape, len(shape) - 1) + jnp.asarray(base, jnp.int32)


def auto_group(size, k):
    """Group size for a chunk of `size` keys and top-k (0 = no prefilter): the power of two nearest
    sqrt(size / k) in [4, 64], which minimises the size/g maxima + k*g candidates that lax.top_k sees;
    the prefilter is used only when that at least halves what lax.top_k sees."""
    g = 4
    while g < 64 and (2 * g) * (2 * g) * k <= 2 * size:  # next power of two is nearer sqrt(size/k)
        g *= 2
    work = -(-size // g) + k * g
    return g if (size // g >= k and 2 * work <= size + k) else 0


def _prefilter(s, base, k, group):
    """s [..., C] scores of keys base..base+C-1 -> exact candidates (vals, idx) [..., k*group] that
    contain the top-k values of s (C need not be a multiple of group: the last group is padded with -inf,
    which never reaches the top-k because the k selected groups hold >= k real keys)."""
    c = s.shape[-1]
    ng = -(-c // group)
    if ng * group != c:
        s = jnp.pad(s, [(0, 0)] * (s.ndim - 1) + [(0, ng * group - c)], constant_values=-jnp.inf)
    sg = s.reshape(s.shape[:-1] + (ng, group))
    _, gi = lax.top_k(sg.max(-1), k)  # [..., k] the k groups with the largest maxima
    cand = jnp.take_along_axis(sg, gi[..., None], axis=-2).reshape(s.shape[:-1] + (k * group,))
    pos = (gi[..., None] * group + _iota(gi.shape + (group,), 0)).reshape(cand.shape)
    return cand, jnp.minimum(pos, c - 1) + jnp.asarray(base, jnp.int32)


def _merge(best, s, base, group=None):
    """best = (vals [..., K], idx [..., K]); s [..., C] scores of keys base..base+C-1 -> merged best.
    group: prefilter group size (None: auto_group; 0: off)."""
    vals, idx = best
    k = vals.shape[-1]
    group = auto_group(s.shape[-1], k) if group is None else group
    if group and -(-s.shape[-1] // group) >= k:
        s, sidx = _prefilter(s, base, k, group)
    else:
        sidx = _iota(s.shape, base)
    v, pos = lax.top_k(jnp.concatenate([vals, s], axis=-1), k)
    return v, jnp.take_along_axis(jnp.concatenate([idx, sidx], axis=-1), pos, axis=-1)


def running_topk(score_fn, n_keys, k, chunk, batch_shape, vma=frozenset(), group=None):
    """Exact top-k over n_keys keys whose scores come chunk by chunk from score_fn(start, size) ->
    float32 [*batch_shape, size] (invalid keys already NEG). Returns (vals, idx) [*batch_shape, k];
    slots beyond the number of valid keys hold NEG (and an arbitrary index). Never materialises more
    than one [*batch_shape, chunk] score block. group: grouped-maxima prefilter group size per chunk
    (None: auto_group, 0: off) — the result is the same either way."""
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
            return _merge(best, score_fn(start, chunk), start, group), None
        best, _ = lax.scan(body, best, jnp.arange(n_full, dtype=jnp.int32))
    if rem:
        best = _merge(best, score_fn(n_full * chunk, rem), n_full * chunk, group)
    return best


@functools.partial(jax.jit, static_argnames=("k", "chunk_size", "group"))
def _topk_scores(queries, keys, key_mask, k, chunk_size, group):
    qf = queries.astype(jnp.float32)

    def score_fn(start, size):
        kc = lax.dynamic_slice_in_dim(keys, start, size, axis=0).astype(jnp.float32)
        s = qf @ kc.T
        if key_mask is not None:
            s = jnp.where(lax.dynamic_slice_in_dim(key_mask, start, size, axis=0)[None, :], s, NEG)
        return s

    return running_topk(score_fn, keys.shape[0], k, chunk_size, (queries.shape[0],), group=group)


def topk_scores(queries, keys, k, *, chunk_size=DEFAULT_CHUNK, key_mask=None, group=None):
    """Exact maximum-inner-product search (as FAISS IndexFlatIP): queries [N, D], keys [M, D] ->
    (scores float32 [N, k], indices int32 [N, k]), best first. key_mask bool [M] excludes keys; slots
    beyond the number of valid keys get score -1e30 (index arbitrary). Keys are streamed in chunks of
    `chunk_size` with a running lax.top_k merge, so extra memory is O(N * chunk_size); each chunk is
    first reduced exactly by the grouped-maxima prefilter (group: keys per group; None = automatic,
    0 = off)."""
    qs, ks = jnp.shape(queries), jnp.shape(keys)
    if len(qs) != 2 or len(ks) != 2 or qs[1] != ks[1]:
        raise ValueError(f"queries must be [N, D] and keys [M, D] with equal D, got queries {qs}, keys {ks}")
    if not isinstance(k, int) or k <= 0:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if key_mask is not None and jnp.shape(key_mask) != (ks[0],):
        raise ValueError(f"key_mask must have shape [M] = ({ks[0]},), got {jnp.shape(key_mask)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if group is not None and (not isinstance(group, int) or group < 0):
        raise ValueError(f"group must be None or an int >= 0, got {group!r}")
    return _topk_scores(queries, keys, key_mask, k, int(chunk_size), group)
