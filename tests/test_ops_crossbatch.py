"""fot.ops.crossbatch_attention / crossbatch_plan vs an independent dense (materialised) reference,
on one device and on 8-device meshes, plus the memory-vs-n property."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from fot.ops import crossbatch_attention, crossbatch_plan


def dense_crossbatch(q, k, v, ek, ev, rows, key_mask, seg, include_local=True, stats=False):
    """Reference: per row, concatenate own keys and the keys of every extra row (the reference's
    [B,H,T,(n+1)S] logits), mask, one softmax (jnp so jax.grad works)."""
    b, t, h, d = q.shape
    n = rows.shape[1]
    rc = np.maximum(rows, 0)
    keys = jnp.concatenate([k] + [ek[rc[:, j]] for j in range(n)], axis=1)  # [B, T+nS, H, D]
    vals = jnp.concatenate([v] + [ev[rc[:, j]] for j in range(n)], axis=1)
    local = np.tril(np.ones((t, t), bool))[None] & (seg[:, :, None] == seg[:, None, :])
    local &= include_local
    extra = [np.broadcast_to(((rows[:, j] >= 0)[:, None] & key_mask[rc[:, j]])[:, None, :], (b, t, ek.shape[1]))
             for j in range(n)]
    mask = np.concatenate([local] + extra, axis=2)  # [B, T, T+nS]
    s = jnp.einsum("bqhd,bkhd->bhqk", q, keys) / np.sqrt(d)
    s = jnp.where(mask[:, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    p = jnp.where(mask[:, None].any(-1, keepdims=True), p, 0.0)
    out = jnp.einsum("bhqk,bkhd->bqhd", p, vals)
    if stats:
        return out, jnp.transpose(p[..., t:].sum(-1), (0, 2, 1))
    return out


def out_and_grads(fn, args, w):
    """jit once: (output, stats, grads of sum(output * w) w.r.t. every arg)."""
    def loss(*a):
        out, st = fn(*a)
        return jnp.sum(out * w), (out, st)
    grads, (out, st) = jax.jit(jax.grad(loss, tuple(range(len(args))), has_aux=True))(*args)
    return out, (st["mem_mass"] if isinstance(st, dict) else st), grads


def make_inputs(rng, b, t, h, d, n, s=None):
    s = t if s is None else s
    q, k, v = (rng.normal(size=(b, t, h, d)).astype(np.float32) for _ in range(3))
    ek, ev = (rng.normal(size=(b, s, h, d)).astype(np.float32) for _ in range(2))
    rows = rng.integers(-1, b, size=(b, n)).astype(np.int32)
    key_mask = rng.random((b, s)) > 0.25
    seg = np.sort(rng.integers(1, 3, size=(b, t)), axis=1).astype(np.int32)
    return q, k, v, ek, ev, rows, key_mask, seg


@pytest.mark.parametrize("b,t,s,h,d,n", [(4, 6, 6, 2, 8, 3), (3, 5, 7, 1, 4, 0), (2, 4, 3, 3, 8, 5)])
def test_matches_dense_forward_and_grad(rng, b, t, s, h, d, n):
    q, k, v, ek, ev, rows, km, seg = make_inputs(rng, b, t, h, d, n, s)
    if n:
        rows[0, 0] = -1  # an unused slot
    for include_local in (True, False):
        w = rng.normal(size=q.shape).astype(np.float32)
        out, st, g1 = out_and_grads(lambda *a: crossbatch_attention(
            *a, rows, extra_key_mask=km, segment_ids=seg, include_local=include_local, return_stats=True),
            (q, k, v, ek, ev), w)
        ref, ref_mass, g2 = out_and_grads(lambda *a: dense_crossbatch(
            *a, rows, km, seg, include_local, stats=True), (q, k, v, ek, ev), w)
        np.testing.assert_allclose(out, ref, atol=1e-5)
        np.testing.assert_allclose(st, ref_mass, atol=1e-5)
        for name, a, c in zip("q k v extra_k extra_v".split(), g1, g2):
            np.testing.assert_allclose(a, c, atol=3e-5, err_msg=name)
    if n:  # gradients really reach the extra rows
        used = np.unique(rows[rows >= 0])
        assert float(jnp.abs(g1[3][used]).sum()) > 0


@pytest.mark.parametrize("block_rows", [2, 3, 5])
def test_grouped_blocks_match_dense(rng, block_rows):
    """g rows per online-softmax block (n=5 not divisible by 2 or 3: padded with unused rows)."""
    q, k, v, ek, ev, rows, km, seg = make_inputs(rng, 3, 4, 2, 8, 5, 6)
    rows[1, 2] = -1
    rows[2, :2] = rows[2, 3]  # the same source row several times in one block
    w = rng.normal(size=q.shape).astype(np.float32)
    out, st, g1 = out_and_grads(lambda *a: crossbatch_attention(
        *a, rows, extra_key_mask=km, segment_ids=seg, return_stats=True, block_rows=block_rows), (q, k, v, ek, ev), w)
    ref, ref_mass, g2 = out_and_grads(lambda *a: dense_crossbatch(*a, rows, km, seg, stats=True), (q, k, v, ek, ev), w)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    np.testing.assert_allclose(st, ref_mass, atol=1e-5)
    for name, a, c in zip("q k v extra_k extra_v".split(), g1, g2):
        np.testing.assert_allclose(a, c, atol=3e-5, err_msg=name)


def test_default_block_rows_per_platform(monkeypatch):
    """Default rows per block: 1 on CPU; on accelerators as many as fit 1024 keys; explicit values win."""
    from fot.ops import crossbatch as cb
    assert cb.block_rows_for(64, None, 256) == (1, 64)
    assert cb.block_rows_for(0, None, 256) == (1, 0)
    monkeypatch.setattr(cb.jax, "default_backend", lambda: "gpu")
    assert cb.block_rows_for(64, None, 256) == (4, 16)
    assert cb.block_rows_for(3, None, 256) == (3, 1)  # capped at n
    assert cb.block_rows_for(7, None, 300) == (3, 3)  # 1024 // 300 = 3 rows; 7 rows -> 3 blocks (padded)
    assert cb.block_rows_for(8, None, 4096) == (1, 8)
    assert cb.block_rows_for(8, 2, 256) == (2, 4)


def test_plan_rows_and_no_extra_equals_causal(rng):
    q, k, v, ek, ev, _, km, seg = make_inputs(rng, 4, 5, 2, 8, 0)
    rows = crossbatch_plan(4, 2)
    cb = jax.jit(crossbatch_attention, static_argnames=("include_local", "return_stats"))
    np.testing.assert_allclose(cb(q, k, v, ek, ev, rows, extra_key_mask=km),
                               dense_crossbatch(q, k, v, ek, ev, rows, km, np.zeros((4, 5), int)), atol=1e-5)
    all_unused = -np.ones((4, 3), np.int32)
    np.testing.assert_allclose(cb(q, k, v, ek, ev, all_unused, segment_ids=seg),
                               dense_crossbatch(q, k, v, ek, ev, rows[:, :0], km, seg), atol=1e-5)


def test_crossbatch_plan_schedules():
    # README example: B=8, d=6, k=4 -> per-row number of extra contexts 0,1,2,3,0,3,6,6
    plan = crossbatch_plan(8, 6, pack=4)
    np.testing.assert_array_equal((plan >= 0).sum(1), [0, 1, 2, 3, 0, 3, 6, 6])
    np.testing.assert_array_equal(plan[5], [4, 3, 2, -1, -1, -1])
    # paper 3B: k=4, d=3 -> 1/4 (0,0), 1/4 (1,1), 1/4 (2,1), 1/4 (3,0) (#positives, #negatives)
    b, pack = 16, 4
    plan = crossbatch_plan(b, 3, pack=pack)
    assert plan.dtype == np.int32 and plan.shape == (b, 3) and plan.min() >= -1
    counts = {}
    for r in range(b):
        used = plan[r][plan[r] >= 0]
        pos = int(np.sum(used // pack == r // pack))
        counts.setdefault(r % pack, set()).add((pos, len(used) - pos)) if r >= pack else None
        assert np.all(used < r) and np.all(used >= 0)
    assert counts == {0: {(0, 0)}, 1: {(1, 1)}, 2: {(2, 1)}, 3: {(3, 0)}}
    # pack=1 or stepping off: full range clipped to b+1 rows
    np.testing.assert_array_equal(crossbatch_plan(4, 2), [[-1, -1], [0, -1], [1, 0], [2, 1]])
    np.testing.assert_array_equal(crossbatch_plan(4, 2, pack=2, stepping=False), crossbatch_plan(4, 2))
    assert crossbatch_plan(4, 0).shape == (4, 0)
    with pytest.raises(ValueError, match="pack"):
        crossbatch_plan(6, 2, pack=4)


def _put(mesh, spec, *xs):
    return [jax.device_put(x, NamedSharding(mesh, spec)) for x in xs]


@pytest.mark.parametrize("shape,axes,auto", [((8,), ("data",), False), ((4, 2), ("data", "model"), False),
                                             ((4, 2), ("data", "model"), True)])
def test_sharded_equals_single_device(rng, shape, axes, auto):
    b, t, h, d, n = 8, 4, 4, 8, 3
    q, k, v, ek, ev, _, km, seg = make_inputs(rng, b, t, h, d, n)
    rows = crossbatch_plan(b, n, pack=2)
    rows[3, 1] = 7  # a row from another data shard, "later" in the batch
    if auto:  # jax.sharding.Mesh: Auto axes (jax.make_mesh gives Explicit axes)
        mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(shape), axes)
    else:
        mesh = jax.make_mesh(shape, axes)
    act = P("data", None, "model" if "model" in axes else None, None)
    qs, ks, vs, eks, evs = _put(mesh, act, q, k, v, ek, ev)
    rws, kms, segs = _put(mesh, P("data", None), rows, km, seg)

    def f(q, k, v, ek, ev, rows, km, seg):
        return crossbatch_attention(q, k, v, ek, ev, rows, extra_key_mask=km, segment_ids=seg, mesh=mesh)

    w = rng.normal(size=q.shape).astype(np.float32)
    out, _, gs = out_and_grads(lambda *a: (f(*a, rws, kms, segs), None), (qs, ks, vs, eks, evs), w)
    ref, _, g1 = out_and_grads(lambda *a: (dense_crossbatch(*a, rows, km, seg), None), (q, k, v, ek, ev), w)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    for name, a, c in zip("q k v extra_k extra_v".split(), gs, g1):
        np.testing.assert_allclose(a, c, atol=3e-5, err_msg=name)
    text = jax.jit(f).lower(qs, ks, vs, eks, evs, rws, kms, segs).as_text()
    assert "all_gather" in text or "all-gather" in text  # explicit collective along `data`


def _temp_bytes(n, b=4, t=32, h=2, d=16, block_rows=None):
    x = jax.ShapeDtypeStruct((b, t, h, d), jnp.float32)
    rows = jax.ShapeDtypeStruct((b, n), jnp.int32)

    def loss(q, k, v, ek, ev, rows):
        return jnp.sum(crossbatch_attention(q, k, v, ek, ev, rows, block_rows=block_rows) ** 2)

    c = jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3, 4))).lower(x, x, x, x, x, rows).compile()
    return c.memory_analysis().temp_size_in_bytes


def test_memory_does_not_grow_with_n():
    m1, m16 = _temp_bytes(1), _temp_bytes(16)
    assert m16 <= 1.5 * m1, (m1, m16)
    # 8 rows per block: memory grows with g, not with n
    m8, m64 = _temp_bytes(8, block_rows=8), _temp_bytes(64, block_rows=8)
    assert m64 <= 1.5 * m8, (m8, m64)


def test_bad_inputs_raise():
    x = jnp.ones((2, 4, 2, 8))
    rows = np.array([[1], [0]], np.int32)
    with pytest.raises(ValueError, match="extra_rows"):
        crossbatch_attention(x, x, x, x, x, np.array([[2], [0]], np.int32))
    with pytest.raises(ValueError, match="extra_rows"):
        crossbatch_attention(x, x, x, x, x, np.array([[-2], [0]], np.int32))
    with pytest.raises(ValueError, match="extra_rows"):
        crossbatch_attention(x, x, x, x, x, np.array([1, 0], np.int32))
    with pytest.raises(ValueError, match="head-dim"):
        crossbatch_attention(x, x, x, jnp.ones((2, 4, 2, 4)), jnp.ones((2, 4, 2, 4)), rows)
    with pytest.raises(ValueError, match="extra_key_mask"):
        crossbatch_attention(x, x, x, x, x, rows, extra_key_mask=jnp.ones((2, 3), bool))
    with pytest.raises(ValueError, match="rank 4"):
        crossbatch_attention(x, x, x, jnp.ones((2, 4, 16)), x, rows)
    with pytest.raises(ValueError, match="divisible"):
        crossbatch_attention(x, x, x, x, x, rows, mesh=jax.make_mesh((8,), ("data",)))
    with pytest.raises(ValueError, match="block_rows"):
        crossbatch_attention(x, x, x, x, x, rows, block_rows=0)
