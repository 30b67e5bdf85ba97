"""fot.ops.memory_attention (dense and exact top-k) and topk_scores vs independent dense references,
on one device and with the memory length sharded over `model`."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from fot.ops import memory_attention, topk_scores


def topk_selection(q, mk, mm, top_k):
    """bool [B,H,Tq,M]: the top_k valid memory slots per (b, h, q) by a full numpy argsort (float64)."""
    sm = np.einsum("bqhd,bkhd->bhqk", q.astype(np.float64), mk.astype(np.float64))
    sm = np.where(mm[:, None, None, :], sm, -np.inf)
    sel = np.zeros(sm.shape, bool)
    if top_k is None:
        return np.broadcast_to(mm[:, None, None, :], sm.shape)
    np.put_along_axis(sel, np.argsort(-sm, axis=-1, kind="stable")[..., :top_k], True, axis=-1)
    return sel & mm[:, None, None, :]


def dense_memory(q, k, v, mk, mv, mm, top_k=None, seg=None, include_local=True, stats=False, sel=None):
    """Reference: all local + memory scores materialised and masked (top-k: the `sel` slots), one softmax."""
    b, tq, h, d = q.shape
    tk, m = k.shape[1], mk.shape[1]
    qpos = tk - tq + np.arange(tq)
    local = np.broadcast_to(np.arange(tk)[None, :] <= qpos[:, None], (b, tq, tk)).copy()
    if seg is not None:
        local &= seg[:, tk - tq:, None] == seg[:, None, :]
    local &= include_local
    sl = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
    sm = jnp.einsum("bqhd,bkhd->bhqk", q, mk) / np.sqrt(d)
    mmask = topk_selection(np.asarray(q), np.asarray(mk), mm, top_k) if sel is None else sel
    mask = np.concatenate([np.broadcast_to(local[:, None], sl.shape), mmask], axis=-1)
    s = jnp.where(mask, jnp.concatenate([sl, sm], -1), -jnp.inf)
    p = jax.nn.softmax(s, -1)
    p = jnp.where(mask.any(-1, keepdims=True), p, 0.0)
    out = jnp.einsum("bhqk,bkhd->bqhd", p, jnp.concatenate([v, mv], 1))
    if stats:
        return out, jnp.transpose(p[..., tk:].sum(-1), (0, 2, 1))
    return out


def make(rng, b, tq, tk, h, d, m):
    q = rng.normal(size=(b, tq, h, d)).astype(np.float32)
    k, v = (rng.normal(size=(b, tk, h, d)).astype(np.float32) for _ in range(2))
    mk, mv = (rng.normal(size=(b, m, h, d)).astype(np.float32) for _ in range(2))
    mm = rng.random((b, m)) > 0.3
    mm[-1] = False
    mm[-1, : min(2, m)] = True  # last row: fewer valid slots than top_k
    return q, k, v, mk, mv, mm


def out_and_grads(fn, args, w):
    """jit once: (output, stats, grads of sum(output * w) w.r.t. the first five args q, k, v, mem_k, mem_v)."""
    def loss(*a):
        out, st = fn(*a)
        return jnp.sum(out * w), (out, st)
    grads, (out, st) = jax.jit(jax.grad(loss, tuple(range(5)), has_aux=True))(*args)
    return out, st, grads


@pytest.mark.parametrize("top_k,include_local", [(None, True), (3, True), (40, True), (None, False),
                                                 (3, False)])
@pytest.mark.parametrize("b,tq,tk,h,d,m,chunk", [(2, 3, 5, 2, 8, 13, 4), (2, 4, 4, 1, 8, 9, 64)])
def test_matches_dense(rng, top_k, include_local, b, tq, tk, h, d, m, chunk):
    q, k, v, mk, mv, mm = make(rng, b, tq, tk, h, d, m)
    seg = np.sort(rng.integers(1, 3, size=(b, tk)), axis=1)
    w = rng.normal(size=q.shape).astype(np.float32)
    kw = dict(mem_mask=mm, top_k=top_k, chunk_size=chunk, include_local=include_local, segment_ids=seg)
    out, st, g1 = out_and_grads(lambda *a: memory_attention(*a, return_stats=True, **kw), (q, k, v, mk, mv), w)
    sel = topk_selection(q, mk, mm, top_k)
    ref, mass, g2 = out_and_grads(lambda *a: dense_memory(*a, mm, top_k, seg, include_local, stats=True, sel=sel),
                                  (q, k, v, mk, mv), w)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    np.testing.assert_allclose(st["mem_mass"], mass, atol=1e-5)
    for name, a, c in zip("q k v mem_k mem_v".split(), g1, g2):
        np.testing.assert_allclose(a, c, atol=3e-5, err_msg=name)
    if top_k is not None:  # only the selected slots get gradient
        nsel = sel.any(axis=(1, 2))  # [B, M]
        assert np.all(np.asarray(g1[3])[~nsel] == 0) and float(np.abs(np.asarray(g1[3])[nsel]).sum()) > 0


def test_empty_memory_equals_local(rng):
    q, k, v, mk, mv, mm = make(rng, 2, 3, 5, 2, 8, 0)
    for top_k in (None, 2):
        np.testing.assert_allclose(memory_attention(q, k, v, mk, mv, mem_mask=mm, top_k=top_k),
                                   dense_memory(q, k, v, mk, mv, mm, sel=np.zeros((2, 2, 3, 0), bool)),
                                   atol=1e-5)


@pytest.mark.parametrize("top_k", [None, 3])
@pytest.mark.parametrize("shape,axes", [((2, 4), ("data", "model")), ((1, 8), ("data", "model")),
                                        ((8,), ("data",))])
def test_memory_sharded_over_model_equals_single(rng, top_k, shape, axes):
    b, tq, h, d, m = 8 if shape == (8,) else 2, 3, 2, 8, 24
    q, k, v, mk, mv, mm = make(rng, b, tq, tq, h, d, m)
    mesh = jax.make_mesh(shape, axes)
    model = "model" if "model" in axes else None
    qs, ks, vs = (jax.device_put(x, NamedSharding(mesh, P("data"))) for x in (q, k, v))
    mks, mvs = (jax.device_put(x, NamedSharding(mesh, P("data", model))) for x in (mk, mv))
    mms = jax.device_put(mm, NamedSharding(mesh, P("data", model)))
    f = lambda q, k, v, mk, mv, mm: (memory_attention(q, k, v, mk, mv, mem_mask=mm, top_k=top_k, chunk_size=2,
                                                      mesh=mesh), None)
    w = rng.normal(size=q.shape).astype(np.float32)
    out, _, gs = out_and_grads(f, (qs, ks, vs, mks, mvs, mms), w)
    single = jax.jit(lambda *a: memory_attention(*a, mem_mask=mm, top_k=top_k, chunk_size=2))(q, k, v, mk, mv)
    np.testing.assert_allclose(out, single, atol=1e-5)
    sel = topk_selection(q, mk, mm, top_k)
    ref, _, g1 = out_and_grads(lambda *a: (dense_memory(*a, mm, top_k, sel=sel), None), (q, k, v, mk, mv), w)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    for name, a, c in zip("q k v mem_k mem_v".split(), gs, g1):
        np.testing.assert_allclose(a, c, atol=3e-5, err_msg=name)


@pytest.mark.parametrize("m,chunk,k", [(1000, 128, 7), (50, 7, 50), (30, 1000, 5)])
def test_topk_scores_exact(rng, m, chunk, k):
    qs = rng.normal(size=(9, 16)).astype(np.float32)
    keys = rng.normal(size=(m, 16)).astype(np.float32)
    scores, idx = topk_scores(qs, keys, k, chunk_size=chunk)
    full = qs @ keys.T
    ref_idx = np.argsort(-full, axis=1)[:, :k]
    np.testing.assert_allclose(scores, np.take_along_axis(full, ref_idx, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.sort(np.asarray(idx), 1), np.sort(ref_idx, 1))
    mask = rng.random(m) > 0.5
    scores, idx = topk_scores(qs, keys, k, chunk_size=chunk, key_mask=mask)
    nvalid = min(k, int(mask.sum()))
    ref = np.sort(np.where(mask[None], full, -np.inf), axis=1)[:, ::-1][:, :nvalid]
    np.testing.assert_allclose(np.asarray(scores)[:, :nvalid], ref, rtol=1e-5, atol=1e-5)
    assert np.all(mask[np.asarray(idx)[:, :nvalid]])
    assert np.all(np.asarray(scores)[:, nvalid:] < -1e29)


def test_topk_scores_prefilter_ties_masks_ragged(rng):
    """Grouped-maxima prefilter (forced group sizes; M not a multiple of the group): heavy ties (integer
    scores), masked keys, fewer valid keys than k in a chunk. Values must equal a numpy sort; indices must
    be distinct valid keys whose scores are the returned values."""
    m, k = 203, 6
    qs = rng.integers(-2, 3, size=(5, 4)).astype(np.float32)
    keys = rng.integers(-2, 3, size=(m, 4)).astype(np.float32)
    mask = rng.random(m) > 0.3
    mask[:60] = False  # with chunk 64: fewer valid keys than k in the first chunk
    mask[5] = True
    full = qs @ keys.T
    for group in (0, 4, 8, 32, None):
        for chunk in (64, 1000):
            scores, idx = topk_scores(qs, keys, k, chunk_size=chunk, key_mask=mask, group=group)
            scores, idx = np.asarray(scores), np.asarray(idx)
            ref = np.sort(np.where(mask[None], full, -np.inf), axis=1)[:, ::-1][:, :k]
            np.testing.assert_array_equal(scores, ref, err_msg=f"group {group} chunk {chunk}")
            assert np.all(mask[idx]) and all(len(set(r)) == k for r in idx)
            np.testing.assert_array_equal(np.take_along_axis(full, idx, 1), scores)


def test_topk_prefilter_in_memory_attention(rng):
    """A memory large enough for the prefilter (M=300 in one default chunk: groups of 8, ragged last
    group) equals the dense reference restricted to the numpy top-k, forward and gradients."""
    q, k, v, mk, mv, mm = make(rng, 1, 3, 4, 2, 8, 300)
    w = rng.normal(size=q.shape).astype(np.float32)
    out, _, g1 = out_and_grads(lambda *a: (memory_attention(*a, mem_mask=mm, top_k=3), None), (q, k, v, mk, mv), w)
    sel = topk_selection(q, mk, mm, 3)
    ref, _, g2 = out_and_grads(lambda *a: (dense_memory(*a, mm, 3, sel=sel), None), (q, k, v, mk, mv), w)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    for name, a, c in zip("q k v mem_k mem_v".split(), g1, g2):
        np.testing.assert_allclose(a, c, atol=3e-5, err_msg=name)


@pytest.mark.parametrize("top_k", [None, 3])
def test_bf16_memory_with_float32_queries_equals_casting_first(rng, top_k):
    """mem_k/mem_v in bf16 with float32 q are cast per chunk inside the op: same output and gradients as
    casting the whole memory to float32 first (and the memory cotangents come back in bf16)."""
    q, k, v, mk, mv, mm = make(rng, 2, 3, 5, 2, 8, 13)
    mk16, mv16 = jnp.asarray(mk, jnp.bfloat16), jnp.asarray(mv, jnp.bfloat16)
    w = rng.normal(size=q.shape).astype(np.float32)
    kw = dict(mem_mask=mm, top_k=top_k, chunk_size=4, return_stats=True)
    out, st, g1 = out_and_grads(lambda *a: memory_attention(*a, **kw), (q, k, v, mk16, mv16), w)
    ref, st2, g2 = out_and_grads(lambda *a: memory_attention(*a[:3], a[3].astype(jnp.float32),
                                                             a[4].astype(jnp.float32), **kw),
                                 (q, k, v, mk16, mv16), w)
    assert out.dtype == jnp.float32 and g1[3].dtype == jnp.bfloat16
    np.testing.assert_allclose(out, ref, atol=1e-6)
    np.testing.assert_allclose(st["mem_mass"], st2["mem_mass"], atol=1e-6)
    for name, a, c in zip("q k v mem_k mem_v".split(), g1, g2):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(c, np.float32), atol=1e-5, err_msg=name)
    # and against the independent dense reference on the bf16-rounded memory
    mkf, mvf = np.asarray(mk16, np.float32), np.asarray(mv16, np.float32)
    dense = dense_memory(q, k, v, mkf, mvf, mm, top_k, sel=topk_selection(q, mkf, mm, top_k))
    np.testing.assert_allclose(out, dense, atol=1e-5)


def test_bad_inputs_raise():
    x = jnp.ones((2, 4, 2, 8))
    mem = jnp.ones((2, 6, 2, 8))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="top_k"):
            memory_attention(x, x, x, mem, mem, top_k=bad)
    with pytest.raises(ValueError, match="head-dim"):
        memory_attention(x, x, x, jnp.ones((2, 6, 2, 4)), jnp.ones((2, 6, 2, 4)))
    with pytest.raises(ValueError, match="mem_mask"):
        memory_attention(x, x, x, mem, mem, mem_mask=jnp.ones((2, 5), bool))
    with pytest.raises(ValueError, match="mem_k"):
        memory_attention(x, x, x, jnp.ones((3, 6, 2, 8)), jnp.ones((3, 6, 2, 8)))
    with pytest.raises(ValueError, match="memory length"):
        memory_attention(x, x, x, jnp.ones((2, 5, 2, 8)), jnp.ones((2, 5, 2, 8)),
                         mesh=jax.make_mesh((2, 4), ("data", "model")))
    with pytest.raises(ValueError, match="queries"):
        topk_scores(jnp.ones((3, 4)), jnp.ones((5, 6)), 2)
    with pytest.raises(ValueError, match="k must"):
        topk_scores(jnp.ones((3, 4)), jnp.ones((5, 4)), 0)
    with pytest.raises(ValueError, match="group"):
        topk_scores(jnp.ones((3, 4)), jnp.ones((5, 4)), 2, group=-1)


def test_dense_skips_empty_chunks_bit_identically(rng):
    """CPU default: dense chunks with no valid slot in any row are skipped (lax.cond); the result equals the
    dense reference and, bit for bit, the same kernel computing every chunk."""
    from fot.ops.attention import combine
    from fot.ops.memory import _dense_memory_parts, _local_part
    q, k, v, mk, mv, _ = make(rng, 2, 3, 5, 2, 8, 40)
    mm = np.zeros((2, 40), bool)
    mm[0, 9:12] = mm[0, 30] = mm[1, 10] = True  # chunks of 4: only chunks 2 and 7 hold valid slots
    scale = 8 ** -0.5

    def attend(q, k, v, mk, mv, mask, skip):
        parts = _dense_memory_parts(q, mk, mv, mask, scale, 4, skip)
        return combine([_local_part(q, k, v, None, scale)] + parts)[0], parts

    for mask in (mm, np.zeros_like(mm)):  # some chunks valid; none (then: local attention only)
        args = (q, k, v, mk, mv, mask)
        skip = jax.jit(lambda *a: attend(*a, None))(*args)  # default on CPU: skip
        full = jax.jit(lambda *a: attend(*a, False))(*args)
        for a, c in zip(jax.tree.leaves(skip), jax.tree.leaves(full)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
        np.testing.assert_allclose(skip[0], dense_memory(q, k, v, mk, mv, mask), atol=1e-5)
        hlo = jax.jit(lambda *a: attend(*a, None)).lower(*args).as_text()
        assert "conditional" in hlo or "case" in hlo  # the skip is in the program
