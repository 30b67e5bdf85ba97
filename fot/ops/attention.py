"""Blockwise joint-softmax attention kernel (online softmax, flash-style custom VJP) and causal attention.

One softmax over (a) causal local keys of the same segment and (b) `n_blocks` blocks of extra keys that
are fetched one at a time by a `fetch(src, consts, j) -> (k_j [B,S,H,Dh], v_j [B,S,H,Dh], mask_j bool [B,S])`
function. Forward: lax.scan over blocks keeping (running max, sum, memory sum, accumulator).
Backward: a custom VJP that saves only inputs, output and log-sum-exp and recomputes each block's scores
(flash-attention backward), so neither forward nor backward memory grows with the number of blocks.
A fetch function with attribute `head_major = True` returns k_j, v_j as [B,H,S,Dh] (and takes head-major
cotangents in `accumulate`), which saves two transposes per block and direction.
Gradients of the fetched blocks reach `src` through `fetch.accumulate(dsrc, consts, j, (dk_j, dv_j))` when the
fetch function defines it (in-place scatter-add into the float32 cotangent carry), else through jax.vjp of
`fetch`. Fetched blocks are cast to q.dtype one block at a time, so `src` may have another dtype (e.g. a
bf16 memory with float32 queries) without a full-size converted copy; the result equals casting first.

Grouped-query / multi-query attention: k, v (and the fetched blocks) may have fewer heads Hkv than q
(H = G * Hkv, query head h uses kv head h // G, as transformers' ``repeat_kv``). The kernel folds the G
query heads of a kv head into the query-length axis ([B,H,T,D] -> [B,Hkv,G*T,D], a reshape), so every
matmul runs against the Hkv key/value heads as they are: repeated K/V are never materialised, and the
key/value gradients are summed over the group by the same matmuls.

All scores, softmax statistics and accumulators are float32.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from fot.ops import _checks, fused

F32 = jnp.float32
NEG = -1e30  # finite "minus infinity": masked logits; log-sum-exp of a query with no visible key


def local_mask(q_pos, seg_q, seg_k):
    """Causal + same-segment mask [B,T,1,Tk]: key j visible to query i iff j <= q_pos[b,i], same segment."""
    kpos = jnp.arange(seg_k.shape[1])
    causal = kpos[None, None, :] <= q_pos[:, :, None]
    same = seg_q[:, :, None] == seg_k[:, None, :]
    return (causal & same)[:, :, None, :]


def _vma(*refs):
    out = frozenset()
    for r in jax.tree.leaves(refs):
        aval = jax.typeof(r)
        mat = getattr(aval, "manual_axis_type", None)
        out |= frozenset(mat.varying) if mat is not None else frozenset(getattr(aval, "vma", ()))
    return out


def full(shape, value, vma):
    """jnp.full float32, marked varying over the manual mesh axes `vma` (for scan carries in shard_map)."""
    z = jnp.full(shape, value, F32)
    return lax.pcast(z, tuple(sorted(vma)), to="varying") if vma else z


def _t(x):
    """[B,T,H,...] <-> [B,H,T,...] (the kernel works head-major so every matmul is a plain batched dot)."""
    return jnp.swapaxes(x, 1, 2)


def _scores_h(qh, kh, scale):
    return jnp.einsum("bhtd,bhsd->bhts", qh, kh, preferred_element_type=F32) * scale


def _pv_h(p, vh):
    if vh.dtype != F32:
        p = p.astype(vh.dtype)
    return jnp.einsum("bhts,bhsd->bhtd", p, vh, preferred_element_type=F32)


def _local_mask_h(q_pos, seg_q, seg_k):
    return jnp.swapaxes(local_mask(q_pos, seg_q, seg_k), 1, 2)  # [B,1,T,Tk]


def fold_groups(xh, g):
    """[B,H,T,...] -> [B,H/g,g*T,...]: the g query heads sharing a kv head side by side along T."""
    b, h, t = xh.shape[:3]
    return xh.reshape((b, h // g, g * t) + xh.shape[3:])


def unfold_groups(xh, g):
    """Inverse of :func:`fold_groups`: [B,Hkv,g*T,...] -> [B,Hkv*g,T,...]."""
    b, hk, gt = xh.shape[:3]
    return xh.reshape((b, hk * g, gt // g) + xh.shape[3:])


def _init_state(qh, vma):
    b, h, t, d = qh.shape
    z = full((b, h, t), 0.0, vma)
    return (full((b, h, t), NEG, vma), z, z, full((b, h, t, d), 0.0, vma))


def _accumulate(state, s, mask, vh, is_extra):
    m, l, lm, acc = state
    s = jnp.where(mask, s, NEG)
    m_new = jnp.maximum(m, s.max(-1))
    p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
    alpha = jnp.exp(m - m_new)
    ps = p.sum(-1)
    l = l * alpha + ps
    lm = lm * alpha + (ps if is_extra else 0.0)
    acc = acc * alpha[..., None] + _pv_h(p, vh)
    return m_new, l, lm, acc


def _block_grads(qh, kh, vh, mask, lse, doh, delta, dlse, scale):
    """Flash-attention backward for one key block (head-major): dq [B,H,T,D], dk, dv [B,H,S,D] float32."""
    p = jnp.where(mask, jnp.exp(_scores_h(qh, kh, scale) - lse[..., None]), 0.0)
    dv = jnp.einsum("bhts,bhtd->bhsd", p, doh)
    dp = jnp.einsum("bhtd,bhsd->bhts", doh, vh.astype(F32))
    ds = p * (dp - delta[..., None] + dlse[..., None])
    dq = jnp.einsum("bhts,bhsd->bhtd", ds, kh.astype(F32)) * scale
    dk = jnp.einsum("bhts,bhtd->bhsd", ds, qh.astype(F32)) * scale
    return dq, dk, dv


class _Blocks(NamedTuple):
    """Static settings of one :func:`blockwise_attention` call (closed over by its custom VJP)."""

    fetch: Any
    n_blocks: int
    scale: Any
    include_local: bool
    g: int  # query heads per kv head
    skip_empty: bool = False  # forward: a block without a visible key is skipped (lax.cond), not computed

    def to_h(self, x):
        """fetch's layout <-> head-major [B,H,S,D]."""
        return x if getattr(self.fetch, "head_major", False) else _t(x)

    def local_mask(self, q_pos, seg_q, seg_k):
        """[B,1,g*T,Tk]: the mask of query t repeated for each group member."""
        m = _local_mask_h(q_pos, seg_q, seg_k)
        return m if self.g == 1 else jnp.tile(m, (1, 1, self.g, 1))


def blockwise_attention(q, k, v, q_pos, seg_q, seg_k, src, consts, *, fetch, n_blocks, scale,
                        include_local=True, groups=None, skip_empty=False):
    """Joint softmax over local causal keys and `n_blocks` fetched extra blocks.

    q [B,T,H,D]; k, v [B,Tk,Hkv,D] (H = groups * Hkv; fetched blocks also have Hkv heads); q_pos int [B,T]
    (key position of each query); seg_q [B,T], seg_k [B,Tk]; groups: query heads per kv head (default
    H // Hkv of q and k; give it when k is a placeholder, include_local=False);
    src: pytree of differentiable arrays the blocks are fetched from; consts: tuple of integer/bool arrays
    (non-differentiable block inputs: masks, row plans).
    skip_empty: the forward skips (``lax.cond``) every fetched block whose mask has no True entry in any
    row: such a block changes nothing (its probabilities are 0 and the running max stays), so the result
    is bit-identical; worth it where a conditional is cheap (CPU) and many blocks are empty (a memory
    store that is still filling). The backward computes every block either way.
    Returns (o float32 [B,T,H,D], lse float32 [B,T,H] (NEG if no visible key), mem_mass float32 [B,T,H]).
    `o` and `lse` are differentiable (lse's cotangent is handled, so partial results can be combined);
    mem_mass carries no gradient.
    """
    consts = tuple(consts)
    g = int(groups) if groups is not None else q.shape[2] // k.shape[2]
    if q.shape[2] % g or (include_local and k.shape[2] * g != q.shape[2]):
        raise ValueError(f"{q.shape[2]} query heads cannot be grouped {g} per kv head (k {k.shape})")
    spec = _Blocks(fetch, n_blocks, scale, include_local, g, bool(skip_empty))

    def public(oh, lse, mass):
        return tuple(_t(unfold_groups(x, g)) for x in (oh, lse, mass))

    @jax.custom_vjp
    def attend(q, k, v, q_pos, seg_q, seg_k, src, consts):
        return public(*_blockwise_forward(spec, q, k, v, q_pos, seg_q, seg_k, src, consts))

    def attend_fwd(q, k, v, q_pos, seg_q, seg_k, src, consts):
        oh, lse, mass = _blockwise_forward(spec, q, k, v, q_pos, seg_q, seg_k, src, consts)
        return public(oh, lse, mass), (q, k, v, q_pos, seg_q, seg_k, src, consts, oh, lse)

    attend.defvjp(attend_fwd, functools.partial(_blockwise_backward, spec))
    return attend(q, k, v, q_pos, seg_q, seg_k, src, consts)


def _blockwise_forward(spec: _Blocks, q, k, v, q_pos, seg_q, seg_k, src, consts):
    """Online softmax over the local keys and the fetched blocks → head-major, groups folded:
    (o [B,Hkv,G*T,D], lse [B,Hkv,G*T], mem_mass [B,Hkv,G*T]) float32."""
    qh = fold_groups(_t(q), spec.g)  # [B,Hkv,G*T,D]
    state = _init_state(qh, _vma(q, k, v, q_pos, seg_q, seg_k, src, consts))
    if spec.include_local:
        state = _accumulate(state, _scores_h(qh, _t(k), spec.scale), spec.local_mask(q_pos, seg_q, seg_k),
                            _t(v), False)
    if spec.n_blocks:
        def block(state, j):
            kb, vb, mb = spec.fetch(src, consts, j)  # [B,S,Hkv,D] x2 (fetch's layout), bool [B,S]
            kb, vb = kb.astype(qh.dtype), vb.astype(qh.dtype)  # per-block cast (src may be e.g. bf16)
            return _accumulate(state, _scores_h(qh, spec.to_h(kb), spec.scale), mb[:, None, None, :],
                               spec.to_h(vb), True)

        def body(state, j):
            if not spec.skip_empty:
                return block(state, j), None
            visible = spec.fetch(src, consts, j)[2].any()  # (the keys fetched here are dead code)
            return lax.cond(visible, block, lambda st, _: st, state, j), None
        state, _ = lax.scan(body, state, jnp.arange(spec.n_blocks))
    m, l, lm, acc = state
    safe = jnp.where(l > 0, l, 1.0)
    oh = acc / safe[..., None]
    lse = jnp.where(l > 0, m + jnp.log(safe), NEG)
    return oh, lse, lm / safe


def _blockwise_backward(spec: _Blocks, res, cts):
    """Custom VJP backward of :func:`blockwise_attention` (flash-attention style, block by block)."""
    q, k, v, q_pos, seg_q, seg_k, src, consts, oh, lse = res
    do, dlse, _ = cts
    g, fetch = spec.g, spec.fetch
    doh = fold_groups(_t(do.astype(F32)), g)  # [B,Hkv,G*T,D]
    dlse = fold_groups(_t(dlse.astype(F32)), g)  # [B,Hkv,G*T]
    qh = fold_groups(_t(q), g)
    delta = jnp.sum(doh * oh, axis=-1)  # [B,Hkv,G*T]
    vma = _vma(q, k, v, q_pos, seg_q, seg_k, src, consts, do, dlse, oh, lse)
    dq = full(qh.shape, 0.0, vma)
    dk = full(k.shape, 0.0, vma)
    dv = full(v.shape, 0.0, vma)
    if spec.include_local:
        dq, dkh, dvh = _block_grads(qh, _t(k), _t(v), spec.local_mask(q_pos, seg_q, seg_k), lse, doh, delta,
                                    dlse, spec.scale)
        dk, dv = _t(dkh), _t(dvh)
    dsrc = jax.tree.map(lambda x: full(x.shape, 0.0, vma), src)
    if spec.n_blocks:
        def body(carry, j):
            dq, dsrc = carry
            kb, vb, mb = fetch(src, consts, j)
            dqj, dkb, dvb = _block_grads(qh, spec.to_h(kb.astype(qh.dtype)), spec.to_h(vb.astype(qh.dtype)),
                                         mb[:, None, None, :], lse, doh, delta, dlse, spec.scale)
            dkb, dvb = spec.to_h(dkb), spec.to_h(dvb)  # back to fetch's layout
            if hasattr(fetch, "accumulate"):  # in-place scatter-add of the block's cotangents
                dsrc = fetch.accumulate(dsrc, consts, j, (dkb, dvb))
            else:  # generic: transpose of `fetch` (a full-size cotangent per block)
                _, pullback = jax.vjp(lambda s_: fetch(s_, consts, j)[:2], src)
                (dsj,) = pullback((dkb.astype(kb.dtype), dvb.astype(vb.dtype)))
                dsrc = jax.tree.map(lambda a, b: a + b.astype(F32), dsrc, dsj)
            return (dq + dqj, dsrc), None
        (dq, dsrc), _ = lax.scan(body, (dq, dsrc), jnp.arange(spec.n_blocks))
    dsrc = jax.tree.map(_cotangent, dsrc, src)
    none_consts = tuple(None for _ in consts)
    dq = _t(unfold_groups(dq, g))
    return (_cotangent(dq, q), _cotangent(dk, k), _cotangent(dv, v), None, None, None, dsrc, none_consts)


def _cotangent(ct, primal):
    """Cast a cotangent to the primal's dtype and manual-axis variance: a primal replicated over a mesh
    axis that its cotangent varies over (implicitly broadcast in the forward) gets the psum over it."""
    extra = _vma(ct) - _vma(primal)
    if extra:
        ct = lax.psum(ct, tuple(sorted(extra)))
    missing = _vma(primal) - _vma(ct)
    if missing:
        ct = lax.pcast(ct, tuple(sorted(missing)), to="varying")
    return ct.astype(primal.dtype)


def no_blocks(src, consts, j):  # pragma: no cover - never called (n_blocks=0)
    raise AssertionError("no extra blocks")


def combine(parts):
    """Merge partial softmax results [(o, lse, mass), ...] over disjoint key sets into one joint softmax.

    Differentiable in o and lse (the stabilising max is stop-gradient: the result does not depend on it).
    """
    lses = jnp.stack([p[1] for p in parts])
    mx = lax.stop_gradient(lses.max(0))
    w = jnp.exp(lses - mx)
    tot = w.sum(0)
    wn = w / tot
    o = sum(wn[i][..., None] * p[0] for i, p in enumerate(parts))
    mass = sum(wn[i] * p[2] for i, p in enumerate(parts))
    return o, mx + jnp.log(tot), mass


def query_positions(q, k, q_offset=None):
    """Key position of every query: Tk - Tq + i by default (END alignment), q_offset + i if given."""
    b, tq = q.shape[:2]
    tk = k.shape[1]
    off = jnp.asarray((tk - tq) if q_offset is None else q_offset, jnp.int32)
    off = jnp.broadcast_to(off.reshape(-1, 1), (b, 1))
    return off + jnp.arange(tq, dtype=jnp.int32)[None, :]


def segments(segment_ids, q_pos, k):
    """(seg_q [B,Tq], seg_k [B,Tk]); queries take the ids of their own key position."""
    b, tk = k.shape[:2]
    if segment_ids is None:
        return jnp.zeros(q_pos.shape, jnp.int32), jnp.zeros((b, tk), jnp.int32)
    seg_k = jnp.asarray(segment_ids).astype(jnp.int32)
    seg_q = jnp.take_along_axis(seg_k, jnp.clip(q_pos, 0, tk - 1), axis=1)
    return seg_q, seg_k


def _default_scale(q, scale):
    return q.shape[-1] ** -0.5 if scale is None else scale


def causal_attention(q, k, v, *, segment_ids=None, scale=None, q_offset=None, return_stats=False,
                     implementation="auto"):
    """Causal local attention (non-memory layers).

    q [B,Tq,H,Dh], k/v [B,Tk,Hkv,Dh] with Tk >= Tq and H a multiple of Hkv (grouped-query attention: query
    head h uses kv head h // (H / Hkv)); query i sits at key position Tk - Tq + i (END alignment,
    as with a KV cache) or q_offset + i (q_offset: int or int [B]). segment_ids int [B,Tk] (keys; queries
    use the ids at their own positions): attention only within equal ids. Softmax in float32.
    implementation: "auto" | "blockwise" | "xla" | "cudnn" (fot.ops.fused: a fused kernel where it is
    faster, i.e. cuDNN on GPU for bf16/f16 inputs; the blockwise kernel otherwise; same results).
    Returns [B,Tq,H,Dh] in q.dtype (and {"mem_mass": zeros [B,Tq,H]} with return_stats).
    """
    _checks.check_qkv(q, k, v)
    _checks.check_segments(segment_ids, k)
    if q_offset is None and k.shape[1] < q.shape[1]:
        raise ValueError(f"k must have at least as many keys as q has queries, got q {q.shape}, k {k.shape}")
    q_pos = query_positions(q, k, q_offset)
    seg_q, seg_k = segments(segment_ids, q_pos, k)
    impl = fused.resolve(implementation, q.dtype)
    o = None
    if impl != "blockwise":
        o = fused.fused_attention(q, k, v, _local_mask_h(q_pos, seg_q, seg_k), scale=_default_scale(q, scale),
                                  implementation=impl, causal=q_offset is None and k.shape[1] == q.shape[1])
        mass = jnp.zeros(q.shape[:3], F32)
    if o is None:
        o, _, mass = blockwise_attention(q, k, v, q_pos, seg_q, seg_k, (), (), fetch=no_blocks, n_blocks=0,
                                         scale=_default_scale(q, scale))
    o = o.astype(q.dtype)
    return (o, {"mem_mass": mass}) if return_stats else o
