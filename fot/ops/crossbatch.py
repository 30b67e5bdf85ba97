"""Crossbatch attention (FoT training): one joint softmax over local causal keys and the keys of other
batch rows, computed blockwise over the extra contexts (memory independent of their number)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from fot.ops import _checks
from fot.ops.attention import blockwise_attention, query_positions, segments


def block_rows_for(num_extra, block_rows=None):
    """(rows per block g, number of blocks): g = block_rows (capped at n), default 1. Grouping rows into
    [B,H,T,g*S] blocks was measured NOT faster on CPU (B=4, L=256, H=8, Dh=64 and L=64, n=64: g=1 fastest,
    the larger score blocks fall out of cache); it is exact and kept for accelerators."""
    if num_extra == 0:
        return 1, 0
    g = 1 if block_rows is None else min(int(block_rows), num_extra)
    return g, -(-num_extra // g)


def _fetch_rows(g):
    """Block j of every row b = the keys of source rows extra_rows[b, j*g:(j+1)*g] concatenated:
    k, v [B, g*S, H, Dh], mask [B, g*S] (False for padding keys and unused (-1) rows)."""
    def rows_of(aux, j, num_src):
        rows = aux[0]
        r = lax.dynamic_slice_in_dim(rows, j * g, g, axis=1)  # [B, g]
        return r >= 0, jnp.clip(r, 0, num_src - 1)

    def fetch(src, aux, j):
        extra_k, extra_v = src
        used, rc = rows_of(aux, j, extra_k.shape[0])
        b, s = rc.shape[0], extra_k.shape[1]
        mask = (used[:, :, None] & jnp.take(aux[1], rc, axis=0)).reshape(b, g * s)
        kb = jnp.take(extra_k, rc, axis=0).reshape((b, g * s) + extra_k.shape[2:])
        vb = jnp.take(extra_v, rc, axis=0).reshape((b, g * s) + extra_v.shape[2:])
        return kb, vb, mask

    def accumulate(dsrc, aux, j, dblock):
        """Transpose of fetch: scatter-add the block's cotangents into the source rows (unused rows: 0)."""
        used, rc = rows_of(aux, j, dsrc[0].shape[0])
        out = []
        for acc, gr in zip(dsrc, dblock):
            gr = gr.reshape((rc.shape[0], g, acc.shape[1]) + acc.shape[2:])
            gr = jnp.where(used[:, :, None, None, None], gr, 0.0)
            out.append(acc.at[rc].add(gr.astype(acc.dtype)))
        return tuple(out)

    fetch.accumulate = accumulate
    return fetch


def _crossbatch_local(q, k, v, extra_k, extra_v, extra_rows, key_mask, segment_ids, *, scale,
                      include_local, block_rows):
    q_pos = query_positions(q, k)
    seg_q, seg_k = segments(segment_ids, q_pos, k)
    n = extra_rows.shape[1]
    g, n_blocks = block_rows_for(n, block_rows)
    if n_blocks * g > n:  # pad with unused rows (fully masked)
        extra_rows = jnp.pad(extra_rows, ((0, 0), (0, n_blocks * g - n)), constant_values=-1)
    return blockwise_attention(q, k, v, q_pos, seg_q, seg_k, (extra_k, extra_v), (extra_rows, key_mask),
                               fetch=_fetch_rows(g), n_blocks=n_blocks, scale=scale,
                               include_local=include_local)


def crossbatch_attention(q, k, v, extra_k, extra_v, extra_rows, *, extra_key_mask=None, segment_ids=None,
                         scale=None, mesh=None, include_local=True, return_stats=False,
                         data_axis="data", model_axis="model", block_rows=None):
    """Joint-softmax attention over causal local keys and the keys of other rows of the batch.

    q, k, v: [B, T, H, Dh] (k/v may be longer than q: END alignment as in causal_attention).
    extra_k, extra_v: [B, S, H, Dh] source rows; extra_rows: int [B, n], row b attends to every unmasked
    key of source rows extra_rows[b, j] (-1 = unused); extra_key_mask: bool [B, S] (False = padding key);
    segment_ids: int [B, T] (local attention only within equal ids).
    include_local=False: attend to extra keys only (a query without any visible key returns 0).
    Computed with an online softmax over blocks of g extra contexts (lax.scan; one block = the keys of g
    rows, [B, H, T, g*S] scores) and a flash-style custom VJP: forward and backward memory grow with g,
    not with n. block_rows=g (default 1, the fastest on CPU; n not divisible by g is padded with unused
    rows). Gradients flow into q, k, v, extra_k, extra_v.
    mesh: inputs sharded with batch over `data_axis` and heads over `model_axis`; the extra rows are
    fetched with an explicit all_gather over `data_axis` inside jax.shard_map (same result as unsharded).
    Returns [B, T, H, Dh] in q.dtype; with return_stats also {"mem_mass": float32 [B, T, H]} (the total
    probability on extra keys; no gradient).
    """
    _checks.check_joint_inputs(q, k, v, segment_ids, "extra_k", extra_k, "extra_v", extra_v,
                               "extra_key_mask", extra_key_mask)
    _checks.check_rank("extra_rows", extra_rows, 2)
    if tuple(extra_rows.shape)[0] != q.shape[0]:
        raise ValueError(f"extra_rows must be [B, n] with B = {q.shape[0]} (q {q.shape}), got "
                         f"{tuple(extra_rows.shape)}")
    rows_np = _checks.concrete_or_none(extra_rows)
    if rows_np is not None and rows_np.size and (rows_np.min() < -1 or rows_np.max() >= extra_k.shape[0]):
        raise ValueError(f"extra_rows must lie in [-1, {extra_k.shape[0]}) (extra_k {extra_k.shape}), got "
                         f"values in [{rows_np.min()}, {rows_np.max()}]")
    if not jnp.issubdtype(jnp.asarray(extra_rows).dtype, jnp.integer):
        raise ValueError(f"extra_rows must be an integer array, got dtype {jnp.asarray(extra_rows).dtype}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    extra_rows = jnp.asarray(extra_rows, jnp.int32)
    if extra_key_mask is None:
        extra_key_mask = jnp.ones(extra_k.shape[:2], bool)
    if segment_ids is None:
        segment_ids = jnp.zeros(k.shape[:2], jnp.int32)
    if block_rows is not None and (not isinstance(block_rows, int) or isinstance(block_rows, bool)
                                   or block_rows < 1):
        raise ValueError(f"block_rows must be None or a positive int, got {block_rows!r}")
    fn = functools.partial(_crossbatch_local, scale=scale, include_local=include_local, block_rows=block_rows)
    if mesh is None:
        o, _, mass = fn(q, k, v, extra_k, extra_v, extra_rows, extra_key_mask, segment_ids)
    else:
        o, mass = _crossbatch_sharded(fn, mesh, data_axis, model_axis, q, k, v, extra_k, extra_v,
                                      extra_rows, extra_key_mask, segment_ids)
    o = o.astype(q.dtype)
    return (o, {"mem_mass": mass}) if return_stats else o


def _crossbatch_sharded(fn, mesh, data_axis, model_axis, q, k, v, extra_k, extra_v, extra_rows, key_mask,
                        segment_ids):
    dax, max_ = _checks.mesh_axis(mesh, data_axis), _checks.mesh_axis(mesh, model_axis)
    _checks.check_divisible("q", q.shape[0], mesh, dax, "batch size")
    _checks.check_divisible("q", q.shape[2], mesh, max_, "number of heads")
    act = P(dax, None, max_, None)
    row = P(dax, None)

    def body(q, k, v, extra_k, extra_v, extra_rows, key_mask, segment_ids):
        if dax is not None:  # explicit collective: every data shard sees all source rows (global row ids)
            extra_k = lax.all_gather(extra_k, dax, axis=0, tiled=True)
            extra_v = lax.all_gather(extra_v, dax, axis=0, tiled=True)
            key_mask = lax.all_gather(key_mask, dax, axis=0, tiled=True)
        o, _, mass = fn(q, k, v, extra_k, extra_v, extra_rows, key_mask, segment_ids)
        return o, mass

    args = _checks.place(mesh, act, q, k, v, extra_k, extra_v) + _checks.place(
        mesh, row, extra_rows, key_mask, segment_ids)
    return jax.shard_map(body, mesh=mesh, in_specs=(act, act, act, act, act, row, row, row),
                         out_specs=(act, P(dax, None, max_)))(*args)
