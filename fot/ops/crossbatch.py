"""Crossbatch attention (FoT training): one joint softmax over local causal keys and the keys of other
batch rows, computed blockwise over the extra contexts (memory independent of their number).

d: the crossbatch size, the number of other rows each row attends to (``extra_rows`` is the int32 [B, d]
plan of which rows, ``fot.ops.crossbatch_plan``)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from fot.ops import _checks
from fot.ops.attention import blockwise_attention, query_positions, segments


ACCEL_KEYS_PER_BLOCK = 1024  # default extra keys per online-softmax block on GPU/TPU (see block_rows_for)


def block_rows_for(d, block_rows=None, seq_len=None):
    """(rows per block g, number of blocks). g = block_rows (capped at d); default (None): 1 on CPU, and on
    accelerators as many rows as fit ACCEL_KEYS_PER_BLOCK keys (g = 1024 // seq_len, at least 1), decided at
    trace time from jax.default_backend(). Measured (BUILD_NOTES "FoT ops", B=4, L=256, H=8, Dh=64, d=64):
    on CPU larger blocks are slower (score blocks fall out of cache); on an H100 g=1 runs each block as a
    few small kernels and the 37M train step's time ratio was 1.18x its FLOP ratio, g=4 1.09x, while the
    layer's memory at d=64 stayed 1.19-1.41x that of d=1."""
    if d == 0:
        return 1, 0
    if block_rows is not None:
        g = int(block_rows)
    elif seq_len is None or jax.default_backend() == "cpu":
        g = 1
    else:
        g = max(1, ACCEL_KEYS_PER_BLOCK // int(seq_len))
    g = min(g, d)
    return g, -(-d // g)


def check_block_rows(value, name="block_rows"):
    """ValueError unless `value` (rows per online-softmax block) is None or a positive int."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{name} must be None or a positive int, got {value!r}")


def _fetch_rows(g):
    """Block j of every row b = the keys of source rows extra_rows[b, j*g:(j+1)*g] concatenated, head-major:
    src = (extra_k, extra_v) as [B_src, H, S, Dh]; returns k, v [B, H, g*S, Dh], mask [B, g*S] (False for
    padding keys and unused (-1) rows)."""
    def rows_of(consts, j, num_src):
        rows = consts[0]
        r = lax.dynamic_slice_in_dim(rows, j * g, g, axis=1)  # [B, g]
        return r >= 0, jnp.clip(r, 0, num_src - 1)

    def gather(x, rc):  # [B_src, H, S, D] -> [B, H, g*S, D]
        b, (_, h, s, d) = rc.shape[0], x.shape
        return jnp.swapaxes(jnp.take(x, rc, axis=0), 1, 2).reshape(b, h, g * s, d)  # via [B, g, H, S, D]

    def fetch(src, consts, j):
        extra_k, extra_v = src
        used, rc = rows_of(consts, j, extra_k.shape[0])
        mask = (used[:, :, None] & jnp.take(consts[1], rc, axis=0)).reshape(rc.shape[0], -1)
        return gather(extra_k, rc), gather(extra_v, rc), mask

    def accumulate(dsrc, consts, j, dblock):
        """Transpose of fetch: scatter-add the block's cotangents into the source rows (unused rows: 0)."""
        used, rc = rows_of(consts, j, dsrc[0].shape[0])
        out = []
        for acc, gr in zip(dsrc, dblock):
            _, h, s, d = acc.shape
            gr = jnp.swapaxes(gr.reshape(rc.shape[0], h, g, s, d), 1, 2)  # [B, g, H, S, D]
            gr = jnp.where(used[:, :, None, None, None], gr, 0.0)
            out.append(acc.at[rc].add(gr.astype(acc.dtype)))
        return tuple(out)

    fetch.accumulate = accumulate
    fetch.head_major = True
    return fetch


def _crossbatch_local(q, k, v, extra_k, extra_v, extra_rows, key_mask, segment_ids, *, scale,
                      include_local, block_rows):
    q_pos = query_positions(q, k)
    seg_q, seg_k = segments(segment_ids, q_pos, k)
    d = extra_rows.shape[1]
    g, n_blocks = block_rows_for(d, block_rows, extra_k.shape[1])
    if n_blocks * g > d:  # pad with unused rows (fully masked) to [B, n_blocks * g]
        extra_rows = jnp.pad(extra_rows, ((0, 0), (0, n_blocks * g - d)), constant_values=-1)
    src = (jnp.swapaxes(extra_k, 1, 2), jnp.swapaxes(extra_v, 1, 2))  # head-major once, not per block
    return blockwise_attention(q, k, v, q_pos, seg_q, seg_k, src, (extra_rows, key_mask),
                               fetch=_fetch_rows(g), n_blocks=n_blocks, scale=scale,
                               include_local=include_local)


def crossbatch_attention(q, k, v, extra_k, extra_v, extra_rows, *, extra_key_mask=None, segment_ids=None,
                         scale=None, mesh=None, include_local=True, return_stats=False,
                         data_axis="data", model_axis="model", block_rows=None):
    """Joint-softmax attention over causal local keys and the keys of other rows of the batch.

    q: [B, T, H, Dh]; k, v: [B, T', Hkv, Dh] (k/v may be longer than q: END alignment as in causal_attention;
    Hkv divides H: grouped-query attention, query head h reads kv head h // (H / Hkv), without repeating K/V).
    extra_k, extra_v: [B, S, Hkv, Dh] source rows; extra_rows: int [B, d], row b attends to every unmasked
    key of source rows extra_rows[b, j] (-1 = unused); extra_key_mask: bool [B, S] (False = padding key);
    segment_ids: int [B, T] (local attention only within equal ids).
    include_local=False: attend to extra keys only (a query without any visible key returns 0).
    Computed with an online softmax over blocks of g extra contexts (lax.scan; one block = the keys of g
    rows, [B, H, T, g*S] scores) and a flash-style custom VJP: forward and backward memory grow with g,
    not with d. block_rows=g (default: 1 on CPU, 1024 // S on accelerators; see block_rows_for; d not divisible
    by g is padded with unused rows; exact for every g). Gradients flow into q, k, v, extra_k, extra_v.
    mesh: inputs sharded with batch over `data_axis` and heads over `model_axis`; the extra rows are
    fetched with an explicit all_gather over `data_axis` inside jax.shard_map (same result as unsharded).
    With fewer kv heads than model shards (e.g. multi-query), k/v/extra_k/extra_v are replicated over
    `model_axis` and each shard reads the one kv head its query heads use (the model axis size must then
    be a multiple of Hkv).
    Returns [B, T, H, Dh] in q.dtype; with return_stats also {"mem_mass": float32 [B, T, H]} (the total
    probability on extra keys; no gradient).
    """
    _checks.check_joint_inputs(q, k, v, segment_ids, "extra_k", extra_k, "extra_v", extra_v,
                               "extra_key_mask", extra_key_mask)
    _checks.check_rank("extra_rows", extra_rows, 2)
    if tuple(extra_rows.shape)[0] != q.shape[0]:
        raise ValueError(f"extra_rows must be [B, d] with B = {q.shape[0]} (q {q.shape}), got "
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
    check_block_rows(block_rows)
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
    kv, pick_kv = kv_head_sharding(mesh, max_, q.shape[2], k.shape[2], act)

    def body(q, k, v, extra_k, extra_v, extra_rows, key_mask, segment_ids):
        k, v, extra_k, extra_v = pick_kv(k, v, extra_k, extra_v)
        if dax is not None:  # explicit collective: every data shard sees all source rows (global row ids)
            extra_k = lax.all_gather(extra_k, dax, axis=0, tiled=True)
            extra_v = lax.all_gather(extra_v, dax, axis=0, tiled=True)
            key_mask = lax.all_gather(key_mask, dax, axis=0, tiled=True)
        o, _, mass = fn(q, k, v, extra_k, extra_v, extra_rows, key_mask, segment_ids)
        return o, mass

    args = (_checks.place(mesh, act, q) + _checks.place(mesh, kv, k, v, extra_k, extra_v)
            + _checks.place(mesh, row, extra_rows, key_mask, segment_ids))
    return jax.shard_map(body, mesh=mesh, in_specs=(act, kv, kv, kv, kv, row, row, row),
                         out_specs=(act, P(dax, None, max_)))(*args)


def kv_head_sharding(mesh, model_axis, num_heads, num_kv_heads, act):
    """(PartitionSpec of [B, S, Hkv, Dh] key/value inputs, pick(*kvs) for inside shard_map) when the query
    heads are split over `model_axis` (spec `act`). Hkv divisible by the axis size: kv heads split the same
    way (contiguous query heads use contiguous kv heads) and pick is the identity. Otherwise the kv heads
    are replicated and pick slices, on each shard, the single kv head that its query heads use."""
    n = _checks.axis_size(mesh, model_axis)
    if model_axis is None or num_kv_heads % n == 0:
        return act, lambda *xs: xs
    if n % num_kv_heads:
        raise ValueError(f"k: {num_kv_heads} key/value heads can be neither split over nor replicated across "
                         f"mesh axis '{model_axis}' ({n}): its size must divide or be a multiple of the kv heads")
    shards_per_kv = n // num_kv_heads

    def pick(*xs):
        start = lax.axis_index(model_axis) // shards_per_kv
        return tuple(lax.dynamic_slice_in_dim(x, start, 1, axis=2) for x in xs)

    return P(act[0], None, None, None), pick
