"""The top-k half of fot.ops.memory_attention: which memory slots each query reads (exact top-k by
<q, key>: the tournament of fot.ops.tournament on CPU, the running lax.top_k merge of fot.ops.topk
elsewhere), the gather of the selected slots, and their softmax part.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from fot.ops import bits
from fot.ops.attention import F32, NEG, fold_groups, full, unfold_groups, _cotangent, _vma
from fot.ops.topk import running_topk
from fot.ops.tournament import tournament_plan, tournament_topk


TOPK_METHODS = ("auto", "merge", "tournament")


def choose_topk_method(method, m, queries, k, platform=None):
    """("merge", None) or ("tournament", (tile, group, keep_scores)) for a top-k over m memory slots: "auto" is the
    tournament on CPU (fot.ops.tournament.tournament_topk: no lax.top_k, which XLA:CPU runs as a sort) when
    fot.ops.tournament.tournament_plan finds a tile, the running lax.top_k merge elsewhere."""
    if method not in TOPK_METHODS:
        raise ValueError(f"topk_method must be one of {TOPK_METHODS}, got {method!r}")
    if method == "auto":
        method = "tournament" if (jax.default_backend() if platform is None else platform) == "cpu" else "merge"
    plan = tournament_plan(m, queries, k) if method == "tournament" else None
    return ("tournament", plan) if plan is not None else ("merge", None)


def _select_topk(q, mem_k, mem_mask, top_k, scale, chunk, method="auto"):
    """Exact top-k memory slots per (b, t, h) by <q, mem_k>: (valid bool, idx int32, scale * score float32)
    [B,T,H,K] (the score of a slot as the selection computed it; <= NEG/2 where not valid).
    mem_k [B,M,Hkv,D]: the G = H / Hkv query heads of a kv head are scored together (folded into T).
    method: see :func:`choose_topk_method` (both give the same slots, ties aside)."""
    g = q.shape[2] // mem_k.shape[2]
    qh = fold_groups(jnp.swapaxes(lax.stop_gradient(q), 1, 2), g)  # [B,Hkv,G*T,D]
    mk = lax.stop_gradient(mem_k)
    how, plan = choose_topk_method(method, mem_k.shape[1], qh.shape[0] * qh.shape[1] * qh.shape[2], top_k)
    if how == "tournament" and scale > 0:  # ranking by <q, k> = ranking by scale * <q, k>
        vals, idx = tournament_topk(qh, mk, mem_mask, top_k, tile=plan[0], group=plan[1], keep_scores=plan[2],
                                    vma=_vma(q, mem_k, mem_mask))
        vals, idx = unfold_groups(vals, g), unfold_groups(idx, g)  # [B,H,T,K]
        valid = vals > NEG / 2
        return jnp.swapaxes(valid, 1, 2), jnp.swapaxes(idx, 1, 2), jnp.swapaxes(jnp.where(valid, vals * scale, NEG), 1, 2)

    def score_fn(start, size):
        kc = bits.move(lambda x: lax.dynamic_slice_in_dim(x, start, size, axis=1), mk).astype(q.dtype)  # [B,C,H,D]
        mc = lax.dynamic_slice_in_dim(mem_mask, start, size, axis=1)
        s = jnp.einsum("bhtd,bchd->bhtc", qh, kc, preferred_element_type=F32) * scale
        return jnp.where(mc[:, None, None, :], s, NEG)

    vals, idx = running_topk(score_fn, mem_k.shape[1], top_k, chunk, qh.shape[:3], vma=_vma(q, mem_k, mem_mask))
    vals, idx = unfold_groups(vals, g), unfold_groups(idx, g)  # [B,H,T,K]
    return jnp.swapaxes(vals > NEG / 2, 1, 2), jnp.swapaxes(idx, 1, 2), jnp.swapaxes(vals, 1, 2)


def _slot_index(x, idx):
    """Index arrays selecting x[b, idx[b,t,h,k], h // G] for x [B,M,Hkv,D], idx [B,T,H,K] (G = H / Hkv)."""
    b, _, h, _ = idx.shape
    return jnp.arange(b)[:, None, None, None], idx, (jnp.arange(h) // (h // x.shape[2]))[None, None, :, None]


def _take_slots(x, idx):
    return x[_slot_index(x, idx)]


@jax.custom_vjp
def _gather_cast(x, idx, like):
    return bits.move(_take_slots, x, idx).astype(like.dtype)


def _gather_cast_fwd(x, idx, like):
    return _gather_cast(x, idx, like), (x, idx, like)


def _gather_cast_bwd(res, ct):
    """Scatter-add of the slots' cotangents in float32, cast to x.dtype once (as if x had been cast to
    float32 before the gather: no per-slot rounding to a low-precision x.dtype)."""
    x, idx, like = res
    acc = full(x.shape, 0.0, _vma(x, idx, ct))
    acc = acc.at[_slot_index(x, idx)].add(ct.astype(F32))
    return _cotangent(acc, x), None, jnp.zeros_like(like)


_gather_cast.defvjp(_gather_cast_fwd, _gather_cast_bwd)


def _gather_slots(x, idx, dtype):
    """x [B,M,Hkv,D], idx [B,T,H,K] -> x[b, idx[b,t,h,k], h // G] as [B,T,H,K,D] in `dtype` (no copy of the
    memory; only the gathered slots are cast; gradients accumulate in float32)."""
    if x.dtype == dtype:
        return _take_slots(x, idx)
    return _gather_cast(x, idx, jnp.zeros((), dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _selected_scores(q, mem_k, idx, vals, scale):
    """scale * <q[b,t,h], mem_k[b, idx[b,t,h,k], h // G]> float32 [B,T,H,K] for the selected slots. The value
    is `vals`, the scores the selection computed (so the forward pass gathers no keys: at 256 queries x 4 heads
    x top-32 that is a [B,T,H,K,D] gather the size of 32 windows); the derivatives are those of the gathered
    keys' scores (gradients reach q and the selected mem_k slots, accumulated in float32 as _gather_slots)."""
    return vals


def _selected_scores_fwd(q, mem_k, idx, vals, scale):
    return vals, (q, mem_k, idx)


def _selected_scores_bwd(scale, res, ct):
    q, mem_k, idx = res
    sel_k, pull = jax.vjp(lambda mk: _gather_slots(mk, idx, q.dtype), mem_k)  # [B,T,H,K,D]
    ct = ct * scale
    dq = jnp.einsum("bthk,bthkd->bthd", ct, sel_k, preferred_element_type=F32).astype(q.dtype)
    (dmk,) = pull((ct[..., None] * q.astype(F32)[..., None, :]).astype(sel_k.dtype))
    return dq, dmk, None, None


_selected_scores.defvjp(_selected_scores_fwd, _selected_scores_bwd)


def _selected_part(s, sel_v, valid):
    """Softmax part over selected keys: s float32 [B,T,H,K] scores (scaled), sel_v [B,T,H,K,D], valid [B,T,H,K]."""
    s = jnp.where(valid, s, NEG)
    mx = lax.stop_gradient(s.max(-1))
    e = jnp.where(valid, jnp.exp(s - mx[..., None]), 0.0)
    l = e.sum(-1)
    safe = jnp.where(l > 0, l, 1.0)
    o = jnp.einsum("bthk,bthkd->bthd", e, sel_v.astype(F32)) / safe[..., None]
    lse = jnp.where(l > 0, mx + jnp.log(safe), NEG)
    return o, lse, (l > 0).astype(F32)
