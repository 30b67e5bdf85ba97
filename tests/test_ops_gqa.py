"""Grouped-query / multi-query attention in fot.ops: crossbatch, memory (dense and exact top-k) and causal
attention with Hkv < H key/value heads equal the dense references run on K/V repeated to H heads
(transformers' repeat_kv: query head h reads kv head h // G), forward and gradients, on one device and
on the (4, 2) data x model mesh."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from fot.ops import causal_attention, crossbatch_attention, crossbatch_plan, memory_attention
from test_ops_crossbatch import dense_crossbatch, out_and_grads as cb_out_and_grads
from test_ops_memory import dense_memory, out_and_grads as mem_out_and_grads, topk_selection


def rep(x, g):
    """[B, S, Hkv, D] -> [B, S, Hkv*g, D] (jnp, so gradients sum back over each group)."""
    return jnp.repeat(x, g, axis=2)


def gqa_inputs(rng, b, t, h, hkv, d, n, s=None):
    s = t if s is None else s
    q = rng.normal(size=(b, t, h, d)).astype(np.float32)
    k, v = (rng.normal(size=(b, t, hkv, d)).astype(np.float32) for _ in range(2))
    ek, ev = (rng.normal(size=(b, s, hkv, d)).astype(np.float32) for _ in range(2))
    rows = rng.integers(-1, b, size=(b, n)).astype(np.int32)
    km = rng.random((b, s)) > 0.25
    seg = np.sort(rng.integers(1, 3, size=(b, t)), axis=1).astype(np.int32)
    return q, k, v, ek, ev, rows, km, seg


def _check(got, want, names):
    out, grads = got
    ref, ref_grads = want
    np.testing.assert_allclose(out, ref, atol=1e-5)
    for name, a, c in zip(names, grads, ref_grads):
        assert a.shape == c.shape, (name, a.shape, c.shape)
        np.testing.assert_allclose(a, c, atol=3e-5, err_msg=name)


@pytest.mark.parametrize("h,hkv", [(4, 2), (4, 1)])
@pytest.mark.parametrize("include_local", [True, False])
def test_crossbatch_gqa_matches_repeated_dense(rng, h, hkv, include_local):
    g = h // hkv
    q, k, v, ek, ev, rows, km, seg = gqa_inputs(rng, 4, 5, h, hkv, 8, 3, s=6)
    rows[0, 0] = -1
    w = rng.normal(size=q.shape).astype(np.float32)
    out, st, grads = cb_out_and_grads(lambda *a: crossbatch_attention(
        *a, rows, extra_key_mask=km, segment_ids=seg, include_local=include_local, return_stats=True),
        (q, k, v, ek, ev), w)
    ref, mass, ref_grads = cb_out_and_grads(lambda q, k, v, ek, ev: dense_crossbatch(
        q, rep(k, g), rep(v, g), rep(ek, g), rep(ev, g), rows, km, seg, include_local, stats=True),
        (q, k, v, ek, ev), w)
    _check((out, grads), (ref, ref_grads), "q k v extra_k extra_v".split())
    np.testing.assert_allclose(st, mass, atol=1e-5)


@pytest.mark.parametrize("h,hkv", [(4, 2), (4, 1), (8, 4)])
def test_crossbatch_gqa_sharded_on_4x2_mesh(rng, h, hkv):
    """kv heads split over `model` (Hkv = 2, 4) or replicated with each shard reading its one kv head
    (Hkv = 1: multi-query); equal to the dense reference with repeated K/V."""
    b, t, d, n = 8, 4, 8, 3
    g = h // hkv
    q, k, v, ek, ev, _, km, seg = gqa_inputs(rng, b, t, h, hkv, d, n)
    rows = crossbatch_plan(b, n, pack=2)
    rows[3, 1] = 7
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    act = NamedSharding(mesh, P("data", None, "model", None))
    kv_spec = NamedSharding(mesh, P("data", None, "model" if hkv % 2 == 0 else None, None))
    args = (jax.device_put(q, act),) + tuple(jax.device_put(x, kv_spec) for x in (k, v, ek, ev))
    rws, kms, segs = (jax.device_put(x, NamedSharding(mesh, P("data", None))) for x in (rows, km, seg))
    w = rng.normal(size=q.shape).astype(np.float32)
    out, _, grads = cb_out_and_grads(lambda *a: (crossbatch_attention(
        *a, rws, extra_key_mask=kms, segment_ids=segs, mesh=mesh), None), args, w)
    ref, _, ref_grads = cb_out_and_grads(lambda q, k, v, ek, ev: (dense_crossbatch(
        q, rep(k, g), rep(v, g), rep(ek, g), rep(ev, g), rows, km, seg), None), (q, k, v, ek, ev), w)
    _check((out, grads), (ref, ref_grads), "q k v extra_k extra_v".split())


def gqa_memory_inputs(rng, b, tq, tk, h, hkv, d, m):
    q = rng.normal(size=(b, tq, h, d)).astype(np.float32)
    k, v = (rng.normal(size=(b, tk, hkv, d)).astype(np.float32) for _ in range(2))
    mk, mv = (rng.normal(size=(b, m, hkv, d)).astype(np.float32) for _ in range(2))
    mm = rng.random((b, m)) > 0.3
    mm[-1] = False
    mm[-1, :2] = True  # fewer valid slots than top_k
    return q, k, v, mk, mv, mm


@pytest.mark.parametrize("h,hkv", [(4, 2), (4, 1)])
@pytest.mark.parametrize("top_k", [None, 3])
def test_memory_gqa_matches_repeated_dense(rng, h, hkv, top_k):
    """Top-k is chosen per QUERY head (heads of one group may pick different slots)."""
    g = h // hkv
    q, k, v, mk, mv, mm = gqa_memory_inputs(rng, 2, 3, 5, h, hkv, 8, 13)
    seg = np.sort(rng.integers(1, 3, size=(2, 5)), axis=1)
    w = rng.normal(size=q.shape).astype(np.float32)
    out, st, grads = mem_out_and_grads(lambda *a: memory_attention(
        *a, mem_mask=mm, top_k=top_k, chunk_size=4, segment_ids=seg, return_stats=True), (q, k, v, mk, mv), w)
    sel = topk_selection(q, np.repeat(mk, g, axis=2), mm, top_k)
    ref, mass, ref_grads = mem_out_and_grads(lambda q, k, v, mk, mv: dense_memory(
        q, rep(k, g), rep(v, g), rep(mk, g), rep(mv, g), mm, top_k, seg, stats=True, sel=sel),
        (q, k, v, mk, mv), w)
    _check((out, grads), (ref, ref_grads), "q k v mem_k mem_v".split())
    np.testing.assert_allclose(st["mem_mass"], mass, atol=1e-5)
    if top_k is not None:  # heads of a group do pick different slots here (else the test is weak)
        per_head = sel.reshape(2, h // g, g, 3, 13)
        assert not np.all(per_head == per_head[:, :, :1])


@pytest.mark.parametrize("h,hkv", [(4, 2), (4, 1)])
@pytest.mark.parametrize("top_k", [None, 3])
def test_memory_gqa_sharded_on_4x2_mesh(rng, h, hkv, top_k):
    """Memory length over `model`, batch over `data`, with Hkv < H."""
    g = h // hkv
    q, k, v, mk, mv, mm = gqa_memory_inputs(rng, 4, 3, 3, h, hkv, 8, 24)
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    qs, ks, vs = (jax.device_put(x, NamedSharding(mesh, P("data"))) for x in (q, k, v))
    mks, mvs, mms = (jax.device_put(x, NamedSharding(mesh, P("data", "model"))) for x in (mk, mv, mm))
    w = rng.normal(size=q.shape).astype(np.float32)
    out, _, grads = mem_out_and_grads(lambda *a: (memory_attention(
        *a, mem_mask=mms, top_k=top_k, chunk_size=2, mesh=mesh), None), (qs, ks, vs, mks, mvs), w)
    sel = topk_selection(q, np.repeat(mk, g, axis=2), mm, top_k)
    ref, _, ref_grads = mem_out_and_grads(lambda q, k, v, mk, mv: (dense_memory(
        q, rep(k, g), rep(v, g), rep(mk, g), rep(mv, g), mm, top_k, sel=sel), None), (q, k, v, mk, mv), w)
    _check((out, grads), (ref, ref_grads), "q k v mem_k mem_v".split())


def test_causal_gqa_matches_repeated(rng):
    q = rng.normal(size=(2, 4, 6, 8)).astype(np.float32)
    k, v = (rng.normal(size=(2, 7, 2, 8)).astype(np.float32) for _ in range(2))
    seg = np.sort(rng.integers(1, 3, size=(2, 7)), axis=1)
    np.testing.assert_allclose(causal_attention(q, k, v, segment_ids=seg),
                               causal_attention(q, rep(k, 3), rep(v, 3), segment_ids=seg), atol=1e-6)


def test_gqa_never_repeats_kv():
    """The compiled crossbatch train step holds no [.., H, ..]-headed copy of K/V: its temporaries are
    smaller than the multi-head op's with the same query heads (K/V repeated by the caller)."""
    b, t, h, hkv, d, n = 4, 32, 8, 1, 16, 4
    q = jax.ShapeDtypeStruct((b, t, h, d), jnp.float32)
    kv = jax.ShapeDtypeStruct((b, t, hkv, d), jnp.float32)
    rows = jax.ShapeDtypeStruct((b, n), jnp.int32)

    def temp(repeat):
        def loss(q, k, v, ek, ev, rows):
            if repeat:
                k, v, ek, ev = (rep(x, h // hkv) for x in (k, v, ek, ev))
            return jnp.sum(crossbatch_attention(q, k, v, ek, ev, rows) ** 2)
        c = jax.jit(jax.grad(loss, (0, 1, 2, 3, 4))).lower(q, kv, kv, kv, kv, rows).compile()
        return c.memory_analysis().temp_size_in_bytes

    assert temp(False) < temp(True)


def test_gqa_bad_heads_raise():
    q = jnp.ones((2, 4, 4, 8))
    k3 = jnp.ones((2, 4, 3, 8))
    k2 = jnp.ones((2, 4, 2, 8))
    rows = np.array([[1], [0]], np.int32)
    with pytest.raises(ValueError, match="multiple of the 3 key/value heads"):
        crossbatch_attention(q, k3, k3, k3, k3, rows)
    with pytest.raises(ValueError, match="key/value heads of k"):
        crossbatch_attention(q, k2, k2, jnp.ones((2, 4, 1, 8)), jnp.ones((2, 4, 1, 8)), rows)
    with pytest.raises(ValueError, match="multiple of the 3 key/value heads"):
        memory_attention(q, k2, k2, k3, k3)
    with pytest.raises(ValueError, match="multiple of the 3"):
        causal_attention(q, k3, k3)
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    k6 = jnp.ones((2, 4, 6, 8))
    with pytest.raises(ValueError, match="neither split over nor replicated"):
        crossbatch_attention(jnp.ones((2, 4, 12, 8)), k6, k6, k6, k6, rows, mesh=mesh)
