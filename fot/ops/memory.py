"""Memory attention (FoT inference): one joint softmax over causal local keys and external memory keys,
dense (all valid memory keys, streamed in chunks with an online softmax) or exact top-k (running
lax.top_k over memory chunks, then the selected keys join the local keys in one softmax; the top-k
selection and its softmax part live in fot.ops.memory_topk).

Sharded use (mesh=...): batch over `data_axis`, memory length M over `model_axis` (heads are not split
inside this op; q/k/v are replicated over `model_axis`). Each model shard works on its slice of the
memory: dense -> partial (output, log-sum-exp) merged exactly with psum; top-k -> local top-k per shard,
all_gather of the K candidates' scores/keys/values over `model_axis`, exact top-k of the union.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from fot.ops import _checks, bits
from fot.ops.attention import F32, NEG, blockwise_attention, combine, no_blocks, query_positions, segments
from fot.ops.memory_topk import TOPK_METHODS, _gather_slots, _select_topk, _selected_part, _selected_scores

DEFAULT_CHUNK = 2048
TOPK_CHUNK_MAX = 8192  # default top-k selection chunk grows up to this while a score block stays small
TOPK_BLOCK_ELEMS = 2 ** 23  # (32 MiB float32 per [B,H,T,chunk] score block)
# XLA:CPU: score blocks beyond a few MiB run several times slower (fresh large temporaries page-fault on
# every call, and the dot writes them out of cache): at 1024 queries x 64K memory keys, dense memory
# attention took 1.9 s with 2048-key chunks (8 MiB blocks) and 0.13 s with 512-key chunks (2 MiB), one run
# (BUILD_NOTES "Speed where users feel it"). On CPU, default chunks keep blocks at or below these sizes.
CPU_DENSE_BLOCK_ELEMS = 2 ** 19  # 2 MiB float32
CPU_TOPK_BLOCK_ELEMS = 2 ** 20  # 4 MiB: the top-k merge costs per chunk, so its chunks stay a bit larger
CPU_MIN_CHUNK = 128


def _pow2_chunk(queries, block_elems, lo, hi):
    """Largest power of two in [lo, hi] with queries * chunk <= block_elems (lo if none)."""
    chunk = lo
    while chunk * 2 <= hi and queries * chunk * 2 <= block_elems:
        chunk *= 2
    return chunk


def dense_chunk(b, h, t, platform=None):
    """Default dense memory chunk for b*h*t queries: DEFAULT_CHUNK on accelerators; on CPU the largest power
    of two in [CPU_MIN_CHUNK, DEFAULT_CHUNK] whose [B,H,T,chunk] score block has <= CPU_DENSE_BLOCK_ELEMS."""
    if (jax.default_backend() if platform is None else platform) != "cpu":
        return DEFAULT_CHUNK
    return _pow2_chunk(b * h * t, CPU_DENSE_BLOCK_ELEMS, CPU_MIN_CHUNK, DEFAULT_CHUNK)


def topk_chunk(chunk_size, b, h, t, platform=None):
    """Selection chunk for top-k: chunk_size if given; else on accelerators the largest power-of-two
    multiple of DEFAULT_CHUNK up to TOPK_CHUNK_MAX whose [B,H,T,chunk] float32 score block has <=
    TOPK_BLOCK_ELEMS elements (larger chunks let the grouped-maxima prefilter of fot.ops.topk pay off); on
    CPU the largest power of two in [8 * CPU_MIN_CHUNK, TOPK_CHUNK_MAX] with <= CPU_TOPK_BLOCK_ELEMS."""
    if chunk_size is not None:
        return chunk_size
    if (jax.default_backend() if platform is None else platform) == "cpu":
        return _pow2_chunk(b * h * t, CPU_TOPK_BLOCK_ELEMS, 8 * CPU_MIN_CHUNK, TOPK_CHUNK_MAX)
    return _pow2_chunk(b * h * t, TOPK_BLOCK_ELEMS, DEFAULT_CHUNK, TOPK_CHUNK_MAX)


def _fetch_chunk(chunk):
    def fetch(src, consts, j):
        mem_k, mem_v = src
        (mask,) = consts
        start = j * chunk
        cut = lambda x: lax.dynamic_slice_in_dim(x, start, chunk, axis=1)  # noqa: E731
        return bits.move(cut, mem_k), bits.move(cut, mem_v), cut(mask)

    def accumulate(dsrc, consts, j, dblock):  # transpose of fetch: add the chunk's cotangents in place
        start = j * chunk
        return tuple(lax.dynamic_update_slice_in_dim(
            acc, lax.dynamic_slice_in_dim(acc, start, chunk, axis=1) + g.astype(acc.dtype), start, axis=1)
            for acc, g in zip(dsrc, dblock))

    fetch.accumulate = accumulate
    return fetch


def _fetch_tail(start):
    def fetch(src, consts, j):
        mem_k, mem_v = src
        (mask,) = consts
        cut = lambda x: x[:, start:]  # noqa: E731
        return bits.move(cut, mem_k), bits.move(cut, mem_v), cut(mask)

    def accumulate(dsrc, consts, j, dblock):  # transpose of fetch (the bit-pattern slice has no derivative)
        return tuple(acc.at[:, start:].add(g.astype(acc.dtype)) for acc, g in zip(dsrc, dblock))

    fetch.accumulate = accumulate
    return fetch


def _local_part(q, k, v, segment_ids, scale):
    q_pos = query_positions(q, k)
    seg_q, seg_k = segments(segment_ids, q_pos, k)
    return blockwise_attention(q, k, v, q_pos, seg_q, seg_k, (), (), fetch=no_blocks, n_blocks=0,
                               scale=scale)


def _dense_memory_parts(q, mem_k, mem_v, mem_mask, scale, chunk, skip_empty=None):
    """Partial softmax results over all valid memory keys (online softmax over chunks). skip_empty (default:
    on CPU, where a conditional is cheap): chunks without a valid slot in any row are skipped, bit-identically
    (see blockwise_attention) — a store that is still filling, e.g. memory prefill, reads only its valid part."""
    if skip_empty is None:
        skip_empty = jax.default_backend() == "cpu"
    m = mem_k.shape[1]
    if m == 0:
        return []
    chunk = max(1, min(chunk, m))
    n_full, rem = divmod(m, chunk)
    dummy_pos = jnp.zeros(q.shape[:2], jnp.int32)
    dummy_seg = jnp.zeros(q.shape[:2], jnp.int32)
    g = q.shape[2] // mem_k.shape[2]  # query heads per memory kv head
    parts = []
    if n_full:
        parts.append(blockwise_attention(q, q, q, dummy_pos, dummy_seg, dummy_seg, (mem_k, mem_v),
                                         (mem_mask,), fetch=_fetch_chunk(chunk), n_blocks=n_full,
                                         scale=scale, include_local=False, groups=g, skip_empty=skip_empty))
    if rem:
        parts.append(blockwise_attention(q, q, q, dummy_pos, dummy_seg, dummy_seg, (mem_k, mem_v),
                                         (mem_mask,), fetch=_fetch_tail(n_full * chunk), n_blocks=1,
                                         scale=scale, include_local=False, groups=g))
    return parts


def _memory_unsharded(q, k, v, mem_k, mem_v, mem_mask, segment_ids, *, top_k, scale, chunk,
                      include_local, topk_method="auto"):
    parts = [_local_part(q, k, v, segment_ids, scale)] if include_local else []
    if top_k is None:
        parts += _dense_memory_parts(q, mem_k, mem_v, mem_mask, scale, chunk)
    elif mem_k.shape[1]:
        valid, idx, vals = _select_topk(q, mem_k, mem_mask, top_k, scale, chunk, topk_method)
        s = _selected_scores(q, mem_k, idx, vals, scale)  # the selection's own scores: no gather of keys
        parts.append(_selected_part(s, _gather_slots(mem_v, idx, q.dtype), valid))
    if not parts:
        z = jnp.zeros(q.shape[:3], F32)
        return jnp.zeros(q.shape, F32), z
    o, _, mass = combine(parts)
    return o, mass


def _memory_shard_body(q, k, v, mem_k, mem_v, mem_mask, segment_ids, *, top_k, scale, chunk, include_local,
                       model_axis, topk_method="auto"):
    local = [_local_part(q, k, v, segment_ids, scale)] if include_local else []
    if top_k is None:
        mem_parts = _dense_memory_parts(q, mem_k, mem_v, mem_mask, scale, chunk)
        if not mem_parts:
            return _memory_unsharded(q, k, v, mem_k, mem_v, mem_mask, segment_ids, top_k=None, scale=scale,
                                     chunk=chunk, include_local=include_local)
        o_m, lse_m, mass_m = combine(mem_parts)
        # exact merge of the per-shard partial softmaxes over the model axis
        mx = lax.stop_gradient(lax.pmax(lax.stop_gradient(lse_m), model_axis))
        w = jnp.exp(lse_m - mx)
        tot = lax.psum(w, model_axis)
        safe = jnp.where(tot > 0, tot, 1.0)
        o_m = lax.psum(w[..., None] * o_m, model_axis) / safe[..., None]
        mass_m = lax.psum(w * mass_m, model_axis) / safe
        lse_m = mx + jnp.log(safe)
        mem_part = (o_m, lse_m, mass_m)
    else:
        valid, idx, _ = _select_topk(q, mem_k, mem_mask, top_k, scale, chunk, topk_method)
        sel_k, sel_v = _gather_slots(mem_k, idx, q.dtype), _gather_slots(mem_v, idx, q.dtype)  # [B,T,H,K,D]
        vals = jnp.where(valid, jnp.einsum("bthd,bthkd->bthk", lax.stop_gradient(q), lax.stop_gradient(sel_k),
                                           preferred_element_type=F32) * scale, NEG)
        # candidates of every shard (K each), then the exact top-k of their union
        vals = lax.all_gather(vals, model_axis, axis=3, tiled=True, to="invarying")
        sel_k = lax.all_gather(sel_k, model_axis, axis=3, tiled=True, to="invarying")
        sel_v = lax.all_gather(sel_v, model_axis, axis=3, tiled=True, to="invarying")
        best, pos = lax.top_k(vals, top_k)
        sel_k = jnp.take_along_axis(sel_k, pos[..., None], axis=3)
        sel_v = jnp.take_along_axis(sel_v, pos[..., None], axis=3)
        s = jnp.einsum("bthd,bthkd->bthk", q, sel_k, preferred_element_type=F32) * scale
        mem_part = _selected_part(s, sel_v, best > NEG / 2)
    o, _, mass = combine(local + [mem_part])
    return o, mass


def memory_attention(q, k, v, mem_k, mem_v, *, mem_mask=None, top_k=None, segment_ids=None, scale=None,
                     mesh=None, chunk_size=None, include_local=True, return_stats=False, data_axis="data",
                     model_axis="model", topk_method="auto"):
    """Joint softmax over causal local keys and external memory keys.

    q [B,Tq,H,Dh]; k, v [B,Tk,Hkv,Dh] (Tk >= Tq, queries aligned to the END of the keys); mem_k, mem_v
    [B,M,Hkv,Dh] (fully visible, no causal mask); Hkv divides H (grouped-query attention: query head h reads
    kv head h // (H / Hkv); K/V are never repeated, top-k is chosen per query head); mem_mask bool [B,M] (valid slots); segment_ids int [B,Tk].
    mem_k/mem_v may have another dtype than q (e.g. a bf16 memory with float32 queries): they are cast to
    q.dtype one chunk (or one gathered selection) at a time, never as a whole; same result as casting first.
    top_k=None: all valid memory keys (streamed in chunks of `chunk_size`, default `dense_chunk`: 2048 on
    accelerators, 128..2048 keys on CPU so a score block stays in cache; with an online
    softmax; on CPU, chunks with no valid slot in any row are skipped). top_k=K: per (b,t,h) the K valid
    memory keys with the largest <q, mem_k> (exact; fewer valid
    -> all valid), found with a chunked running lax.top_k with the exact grouped-maxima prefilter of
    fot.ops.topk (no [B,T,H,M] tensor; default chunk: `topk_chunk`, 2048..8192; 1024..8192 on CPU), then one softmax with the
    local keys. Gradients reach q and the selected mem_k/mem_v (their scores are recomputed from gathered keys).
    topk_method: "auto" (CPU: the tournament of fot.ops.tournament.tournament_topk, k rounds of max reductions
    after one matmul pass, because XLA:CPU runs lax.top_k as a sort; elsewhere the running lax.top_k merge),
    "merge" or "tournament" (same slots; choose_topk_method falls back to the merge for memory lengths
    without a power-of-two tile). include_local=False: memory keys only. mesh: see module docstring (memory length over `model_axis`,
    batch over `data_axis`; M and B must divide the axis sizes).
    Returns [B,Tq,H,Dh] in q.dtype; with return_stats also {"mem_mass": float32 [B,Tq,H]}.
    """
    _checks.check_joint_inputs(q, k, v, segment_ids, "mem_k", mem_k, "mem_v", mem_v, "mem_mask", mem_mask)
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k <= 0):
        raise ValueError(f"top_k must be None or a positive int, got {top_k!r} (mem_k {mem_k.shape})")
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if chunk_size is not None:
        chunk = int(chunk_size)
    elif top_k is not None:
        chunk = topk_chunk(None, q.shape[0], q.shape[2], q.shape[1])
    else:
        chunk = dense_chunk(q.shape[0], q.shape[2], q.shape[1])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if mem_mask is None:
        mem_mask = jnp.ones(mem_k.shape[:2], bool)
    if segment_ids is None:
        segment_ids = jnp.zeros(k.shape[:2], jnp.int32)
    if topk_method not in TOPK_METHODS:
        raise ValueError(f"topk_method must be one of {TOPK_METHODS}, got {topk_method!r}")
    kw = dict(top_k=top_k, scale=scale, chunk=chunk, include_local=include_local, topk_method=topk_method)
    args = (q, k, v, mem_k, mem_v, mem_mask, segment_ids)
    if mesh is None or _checks.mesh_axis(mesh, model_axis) is None:
        if mesh is not None:
            o, mass = _memory_sharded(functools.partial(_memory_unsharded, **kw), mesh, data_axis, None, args)
        else:
            o, mass = _memory_unsharded(*args, **kw)
    else:
        o, mass = _memory_sharded(functools.partial(_memory_shard_body, model_axis=model_axis, **kw), mesh,
                                  data_axis, model_axis, args)
    o = o.astype(q.dtype)
    return (o, {"mem_mass": mass}) if return_stats else o


def _memory_sharded(body, mesh, data_axis, model_axis, args):
    q, k, v, mem_k, mem_v, mem_mask, segment_ids = args
    dax = _checks.mesh_axis(mesh, data_axis)
    _checks.check_divisible("q", q.shape[0], mesh, dax, "batch size")
    if model_axis is not None:
        _checks.check_divisible("mem_k", mem_k.shape[1], mesh, model_axis, "memory length M")
    act = P(dax, None, None, None)
    mem = P(dax, model_axis, None, None)
    placed = (_checks.place(mesh, act, q, k, v) + _checks.place(mesh, mem, mem_k, mem_v)
              + _checks.place(mesh, P(dax, model_axis), mem_mask) + _checks.place(mesh, P(dax, None), segment_ids))
    return jax.shard_map(body, mesh=mesh, in_specs=(act, act, act, mem, mem, P(dax, model_axis), P(dax, None)),
                         out_specs=(act, P(dax, None, None)))(*placed)
