"""Exact top-k on XLA:CPU without lax.top_k: the tournament selection (the CPU default of
fot.ops.memory_attention's top-k).

XLA:CPU lowers lax.top_k to a comparator sort: ~40 ns per input element on the shared 2-core test machine
while a whole dense memory-attention step costs ~2 ns per (query, key) at head_dim 32, so any selection
that feeds every chunk through lax.top_k is slower than dense. The tournament below uses only max
reductions over small arrays: one matmul pass, then k rounds, each taking the largest remaining score of
every query (BUILD_NOTES "Speed where users feel it").
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from fot.ops import bits, topk_ffi
from fot.ops.topk import NEG

CPU_TILE_ELEMS = 2 ** 19  # [queries, tile] score tile of the first pass (2 MiB float32, in cache)
CPU_GROUP_ELEMS = 2 ** 22  # [queries, M / group] group maxima kept between the passes (16 MiB)
# Small memories: every [queries, M] score is kept from the first pass (at most 16 MiB float32) and each round
# reads its group's scores back (group values, not group x D key values re-scored): at 1024 queries x 4096
# keys x 32 dims, k = 32, 11.0 -> 7.7 ms per selection; scored in one matmul, ~6 (BUILD_NOTES issue 14).
CPU_KEEP_ELEMS = 2 ** 22
KEEP_MAX_GROUP = 32  # taken keys of a group are one int32 bit mask


def first_argmax(x):
    """(max, first index of the max) over the last axis, as two plain reductions (XLA:CPU runs argmax's
    (value, index) pair reduction several times slower)."""
    mx = x.max(-1)
    it = lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return mx, jnp.min(jnp.where(x == mx[..., None], it, x.shape[-1]), -1)


def tournament_plan(m, queries, k):
    """(tile, group, keep_scores) for :func:`tournament_topk` over m keys and `queries` queries, or None when
    the tournament would be slow (m has no power-of-two tile of at least 16 keys while m > 256). tile: the
    largest power of two dividing m with a [queries, tile] score tile of at most CPU_TILE_ELEMS (>= 128
    keys when m allows). keep_scores: all [queries, m] scores fit in CPU_KEEP_ELEMS (small memories), so
    the rounds read them back instead of re-scoring gathered keys; group is then min(32, tile) (fewer
    groups per round). Otherwise group is a power of two dividing tile with [queries, m / group] maxima of
    at most CPU_GROUP_ELEMS elements (8..tile)."""
    target = 128
    while target * 2 <= 4096 and queries * target * 2 <= CPU_TILE_ELEMS:
        target *= 2
    tile = 1
    while tile * 2 <= target and m % (tile * 2) == 0:
        tile *= 2
    if tile < 16 and m > 256:
        return None
    if queries * m <= CPU_KEEP_ELEMS:
        return tile, min(KEEP_MAX_GROUP, tile), True
    group = min(8, tile)
    while group * 2 <= tile and queries * (m // group) > CPU_GROUP_ELEMS:
        group *= 2
    return tile, group, False


def use_kernel(qh, keys, vma) -> bool:
    """Whether the kept-scores selection runs as fot.ops.topk_ffi's CPU kernel: default backend CPU, keys in
    the queries' dtype (one matmul, float32 scores), no shard_map axes (vma), and the kernel built and loaded
    (not with FOT_TOPK_FFI=0; a failed build logs one line and keeps the rounds)."""
    return (jax.default_backend() == "cpu" and keys.dtype == qh.dtype and not vma and topk_ffi.available())


def tournament_topk(qh, keys, key_mask, k, *, tile, group, keep_scores=False, vma=frozenset(), skip_empty=None):
    """Exact top-k keys per query by inner product <q, key>, best first, without lax.top_k.

    qh [B,Hk,Q,D] queries (each head's queries score its own keys); keys [B,M,Hk,D] (any float dtype, cast
    per tile to qh.dtype); key_mask bool [B,M]; tile | M, group | tile. Returns (vals float32, idx int32)
    [B,Hk,Q,k]; slots beyond the number of valid keys hold vals <= NEG/2.

    Pass 1 streams tiles of `tile` keys through one matmul each (the mask enters as an extra bias column)
    and keeps only the maximum of every group of `group` keys and of every tile. Then k rounds: per query
    the tile with the largest remaining maximum, its group with the largest remaining maximum, the group's
    keys re-scored from a gather (group x D values per query), the best key not yet taken; the group's and
    tile's maxima are updated. A key is taken once (positions are checked against the keys already taken),
    so ties are handled; the two evaluations of a score (tile matmul, re-score) may differ in the last
    float32 bits, so keys whose scores tie to within that rounding may be taken in either order.
    keep_scores (group <= 32, small memories): every [Q_total, M] float32 score is kept from pass 1 and a
    round reads its group's `group` scores back, marking taken keys in a per-group bit mask, instead of
    gathering group x D key values and re-scoring them (same selection; the values are the pass-1 scores);
    see :func:`_tournament_kept`. Where :func:`use_kernel` (CPU, keys in qh.dtype, unsharded, the compiled
    kernel available) fot.ops.topk_ffi's CPU kernel replaces pass 1 and the rounds (:func:`topk_ffi.kept_topk`:
    float32 keys scored inside the kernel, other dtypes by one XLA matmul): the same order and indices; values
    are float32 dot products (XLA's matmul may sum them in another order: last-bit differences).
    skip_empty (default: on CPU): pass 1 skips (``lax.cond``) the tiles without a valid key in any row and
    gives them the score every masked key gets (<q, k> + NEG rounds to NEG): bit-identical, and a store that
    is still filling (memory prefill) is scored only where it holds keys. Not used by the kept-scores pass
    over keys already in qh.dtype, which scores all M keys in one matmul (at most CPU_KEEP_ELEMS scores).
    """
    b, hk, q, _ = qh.shape
    m = keys.shape[1]
    nt, gpt = m // tile, tile // group
    qt = b * hk * q
    bias = jnp.where(key_mask, 0.0, NEG).astype(jnp.float32)  # [B, M]
    skip = jax.default_backend() == "cpu" if skip_empty is None else skip_empty
    if keep_scores:
        if group > KEEP_MAX_GROUP:
            raise ValueError(f"keep_scores needs group <= {KEEP_MAX_GROUP}, got {group}")
        if use_kernel(qh, keys, vma):
            return topk_ffi.kept_topk(qh, keys, bias, k)
        vals, idx = _tournament_kept(qh, keys, bias, key_mask, k, tile, group, skip, vma)
        return vals.reshape(b, hk, q, k), idx.reshape(b, hk, q, k)
    qb = jnp.concatenate([qh, jnp.ones(qh.shape[:-1] + (1,), qh.dtype)], -1)  # [B,Hk,Q,D+1]

    def scored(i):  # tile i: (group maxima [Qt, gpt], tile maxima [Qt])
        # bit-pattern slice: XLA:CPU would otherwise hoist a whole-store float32 copy of a bf16 store
        kc = bits.move(lambda x: lax.dynamic_slice_in_dim(x, i * tile, tile, axis=1), keys).astype(qh.dtype)
        bc = lax.dynamic_slice_in_dim(bias, i * tile, tile, axis=1).astype(qh.dtype)
        kb = jnp.concatenate([jnp.swapaxes(kc, 1, 2), jnp.broadcast_to(bc[:, None, :, None], (b, hk, tile, 1))], -1)
        s = jnp.einsum("bhqd,bhcd->bhqc", qb, kb, preferred_element_type=jnp.float32)  # [B,Hk,Q,C]
        gmax = s.reshape(qt, gpt, group).max(-1)
        return gmax, gmax.max(-1)

    masked = jnp.asarray(NEG, jnp.float32).astype(qh.dtype).astype(jnp.float32)  # a masked key's pass-1 score

    def empty(i):
        from fot.ops.attention import full
        return full((qt, gpt), masked, vma), full((qt,), masked, vma)

    def step(_, i):
        if not skip:
            return None, scored(i)
        return None, lax.cond(lax.dynamic_slice_in_dim(key_mask, i * tile, tile, axis=1).any(), scored, empty, i)

    _, (gm, tm) = lax.scan(step, None, jnp.arange(nt, dtype=jnp.int32))  # [nt, Qt, gpt], [nt, Qt]
    vals, idx = _rounds_rescored(qh, keys, bias, gm, tm.T, k, tile, group, vma)  # [Qt, k]
    return vals.reshape(b, hk, q, k), idx.reshape(b, hk, q, k)


def _rounds_rescored(qh, keys, bias, gm, tm, k, tile, group, vma):
    """:func:`tournament_topk`'s k rounds without kept scores: each round re-scores the keys of the chosen
    group from a gather. qh [B,Hk,Q,D]; keys [B,M,Hk,D]; bias float32 [B,M]; gm [nt, Qt, gpt] group maxima;
    tm [Qt, nt] tile maxima. Returns (vals float32, idx int32) [Qt, k]."""
    b, hk, q, d = qh.shape
    qt, gpt = b * hk * q, tile // group
    bi = jnp.repeat(jnp.arange(b, dtype=jnp.int32), hk * q)[:, None]
    hi = jnp.tile(jnp.repeat(jnp.arange(hk, dtype=jnp.int32), q), b)[:, None]
    qf = qh.reshape(qt, d)
    qi = jnp.arange(qt, dtype=jnp.int32)
    in_group = jnp.arange(group, dtype=jnp.int32)
    in_tile = jnp.arange(gpt, dtype=jnp.int32)
    slots = jnp.arange(k, dtype=jnp.int32)[None, :, None]

    def rnd(state, r):
        gm, tm, vals, idx = state
        _, ti = first_argmax(tm)  # [Qt] tile
        cand = gm[ti, qi]  # [Qt, gpt]
        _, w = first_argmax(cand)
        pos = (ti * tile + w * group)[:, None] + in_group  # [Qt, group] key positions
        kg = keys[bi, pos, hi].astype(qh.dtype)  # [Qt, group, D]
        s = jnp.einsum("qd,qgd->qg", qf, kg, preferred_element_type=jnp.float32) + bias[bi, pos]
        taken = ((idx[:, :, None] == pos[:, None, :]) & (slots < r)).any(1)
        s = jnp.where(taken, -jnp.inf, s)
        v, p = first_argmax(s)
        rest = jnp.where(in_group == p[:, None], -jnp.inf, s).max(-1)
        gm = gm.at[ti, qi, w].set(rest)
        tm = tm.at[qi, ti].set(jnp.where(in_tile == w[:, None], rest[:, None], cand).max(-1))
        return (gm, tm, vals.at[:, r].set(v), idx.at[:, r].set(pos[qi, p])), None

    from fot.ops.attention import full
    vals = full((qt, k), NEG, vma)
    idx = jnp.full((qt, k), -1, jnp.int32)
    if vma:
        idx = lax.pcast(idx, tuple(sorted(vma)), to="varying")
    (_, _, vals, idx), _ = lax.scan(rnd, (gm, tm, vals, idx), jnp.arange(k, dtype=jnp.int32))
    return vals, idx


def _first_index(x, mx, iota):
    """First position along the last axis where x == mx[..., None] (x.shape[-1] if none): one fused
    select-reduce (float32 positions: XLA:CPU fuses it, the int32 min becomes a reduce-window pair)."""
    n = x.shape[-1]
    return jnp.min(jnp.where(x == mx[..., None], iota.astype(jnp.float32), float(n)), -1).astype(jnp.int32)


def _kept_pass(qh, keys, bias, key_mask, tile, group, skip, vma):
    """Pass 1 of :func:`_tournament_kept`: (read, gm) with gm [Qt, nt, gpt] the maxima of scores + bias of
    every group and read(ti, rows, w) -> [Qt, group] the raw scores of group (ti, w) of each row."""
    from fot.ops.attention import full
    b, hk, q, _ = qh.shape
    nt, gpt = keys.shape[1] // tile, tile // group
    qt = b * hk * q

    def scored(i):  # tile i: raw scores [Qt, gpt, group], group maxima of scores + bias [Qt, gpt]
        # bit-pattern slice: XLA:CPU would otherwise hoist a whole-store float32 copy of a bf16 store
        kc = bits.move(lambda x: lax.dynamic_slice_in_dim(x, i * tile, tile, axis=1), keys).astype(qh.dtype)
        bc = lax.dynamic_slice_in_dim(bias, i * tile, tile, axis=1)  # [B, C]
        s = jnp.einsum("bhqd,bchd->bhqc", qh, kc, preferred_element_type=jnp.float32)  # [B,Hk,Q,C]
        s = s.reshape(b, hk * q, gpt, group)  # (adding the bias to the dot's own output shape runs ~4x slower)
        gmax = (s + bc.reshape(b, 1, gpt, group)).max(-1).reshape(qt, gpt)
        return s.reshape(qt, gpt, group), gmax

    def empty(i):  # a tile without valid keys: every score + bias is NEG, as scoring would give
        return full((qt, gpt, group), 0.0, vma), full((qt, gpt), NEG, vma)

    def step(_, i):
        if not skip:
            return None, scored(i)
        return None, lax.cond(lax.dynamic_slice_in_dim(key_mask, i * tile, tile, axis=1).any(), scored, empty, i)

    if keys.dtype == qh.dtype:  # one matmul: no per-tile cast needed, no stacking of tile outputs
        s = jnp.einsum("bhqd,bchd->bhqc", qh, keys, preferred_element_type=jnp.float32)  # [B,Hk,Q,M]
        s = s.reshape(b, hk * q, nt * gpt, group)
        gm = (s + bias.reshape(b, 1, nt * gpt, group)).max(-1).reshape(qt, nt, gpt)
        # the barrier keeps the dot out of the rounds' fusions (with k = 1 XLA fused them: ~5x slower)
        s, gm = lax.optimization_barrier((s.reshape(qt, nt, gpt, group), gm))
        return (lambda ti, rows, w: s[rows, ti, w]), gm
    _, (scores, gm) = lax.scan(step, None, jnp.arange(nt, dtype=jnp.int32))  # [nt,Qt,gpt,group], [nt,Qt,gpt]
    return (lambda ti, rows, w: scores[ti, rows, w]), jnp.transpose(gm, (1, 0, 2))  # gm [Qt, nt, gpt]


def _tournament_kept(qh, keys, bias, key_mask, k, tile, group, skip, vma):
    """:func:`tournament_topk` with the pass-1 scores kept (small memories). qh [B,Hk,Q,D]; keys [B,M,Hk,D];
    bias float32 [B,M] (0 valid, NEG masked). Returns (vals, idx) [Qt, k], Qt = B*Hk*Q.

    Pass 1 keeps the raw scores and the maxima of scores + bias of every group of `group` keys: keys already in
    qh.dtype go through one matmul over all M keys ([Qt, M] scores; at 1024 queries x 4096 keys x 32 dims this
    pass takes ~3 ms where a scan of tiles took ~4.5, BUILD_NOTES issue 14 "top-k at 4K"); other key
    dtypes (a bf16 store) through a scan of per-tile matmuls, each tile cast on its own (no whole-store
    copy; empty tiles skipped when `skip`). Rounds (one key per query each): the tile with the largest
    remaining maximum (tile maxima [Qt, nt]), its group (the [Qt, gpt] maxima of that tile, gathered), the
    group's `group` scores read back (+ their bias) without the keys already taken (a per-group bit mask),
    the first position of the maximum; the group's and the tile's maxima are updated. Every round operand has
    the queries as its leading axis (one gather of gpt and one of `group` values per query)."""
    b, hk, q, _ = qh.shape
    m = keys.shape[1]
    nt, gpt = m // tile, tile // group
    qt = b * hk * q
    bidx = jnp.repeat(jnp.arange(b, dtype=jnp.int32), hk * q)  # [Qt] batch row of each query

    read, gm = _kept_pass(qh, keys, bias, key_mask, tile, group, skip, vma)
    tm = gm.max(-1)  # [Qt, nt]
    bg = bias.reshape(b, nt, gpt, group)
    rows = jnp.arange(qt, dtype=jnp.int32)
    i_t, i_w, i_g = (lax.broadcasted_iota(jnp.int32, (1, n), 1) for n in (nt, gpt, group))

    def rnd(state, _):
        gm, taken, tm = state
        mx = tm.max(-1)  # [Qt] the largest remaining score
        ti = _first_index(tm, mx, i_t)  # its tile
        cand = gm[rows, ti]  # [Qt, gpt]
        w = _first_index(cand, mx, i_w)  # its group
        tb = taken[rows, ti, w]  # [Qt] keys of the group already taken
        s = read(ti, rows, w) + bg[bidx, ti, w]  # [Qt, group]
        s = jnp.where((tb[:, None] >> i_g) & 1 == 1, -jnp.inf, s)
        p = _first_index(s, mx, i_g)
        rest = jnp.where(i_g == p[:, None], -jnp.inf, s).max(-1)
        gm = gm.at[rows, ti, w].set(rest)
        taken = taken.at[rows, ti, w].set(tb | (1 << p))
        tm = tm.at[rows, ti].set(jnp.where(i_w == w[:, None], rest[:, None], cand).max(-1))
        return (gm, taken, tm), (mx, (ti * gpt + w) * group + p)

    taken = jnp.zeros(gm.shape, jnp.int32)
    if vma:
        taken = lax.pcast(taken, tuple(sorted(vma)), to="varying")
    _, (vals, idx) = lax.scan(rnd, (gm, taken, tm), None, length=k)  # [k, Qt]
    return vals.T, idx.T
