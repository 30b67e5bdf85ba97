"""The CPU top-k kernel (fot.ops.topk_ffi, an XLA FFI custom call built on first use) against a numpy sort, against
the XLA tournament it replaces (bit for bit), inside memory_attention, and its fallback when it cannot be built."""
import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fot.ops import memory_attention, topk_ffi
from fot.ops.topk import NEG
from fot.ops.tournament import tournament_topk

needs_compiler = pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler: the kernel cannot be built")


def numpy_topk(scores, bias, k):
    """Reference: per row the k largest float32 scores + bias, best first, ties to the smaller position; slots
    beyond M hold (-inf, 0). scores [N, R, M], bias [N, M]."""
    v = (scores + bias[:, None, :]).astype(np.float32)
    n, r, m = v.shape
    vals, idx = np.full((n, r, k), -np.inf, np.float32), np.zeros((n, r, k), np.int32)
    for a in range(n):
        for b in range(r):
            order = np.lexsort((np.arange(m), -v[a, b]))[:k]
            vals[a, b, :len(order)], idx[a, b, :len(order)] = v[a, b, order], order
    return vals, idx


@needs_compiler
@pytest.mark.parametrize("n,r,m,k", [(2, 5, 96, 7), (1, 3, 40, 1), (2, 4, 33, 33), (3, 2, 64, 64), (1, 2, 5, 9),
                                     (2, 6, 300, 32), (1, 70, 1000, 40)])
def test_kernel_equals_numpy_sort(rng, n, r, m, k):
    """Integer scores (exact ties, +0.0 and -0.0 among them), masked keys (value score + NEG, after every valid
    key), a batch row with fewer valid keys than k, k = 1, k = M, k > M, M not a multiple of the kernel's groups
    of 32; values and indices equal to a numpy sort's."""
    assert topk_ffi.available()
    scores = rng.integers(-3, 4, size=(n, r, m)).astype(np.float32)
    scores[scores == 0] *= np.where(rng.random(int((scores == 0).sum())) < 0.5, -1.0, 1.0).astype(np.float32)
    mask = rng.random((n, m)) > 0.3
    mask[0, : max(m - k // 2, 0)] = False  # row 0: fewer valid keys than k
    mask[0, -1] = True
    bias = np.where(mask, 0.0, NEG).astype(np.float32)
    vals, idx = jax.jit(lambda s, b: topk_ffi.topk_select(s, b, k))(scores, bias)
    ref_v, ref_i = numpy_topk(scores, bias, k)
    np.testing.assert_array_equal(np.asarray(vals), ref_v)
    np.testing.assert_array_equal(np.asarray(idx), ref_i)


@needs_compiler
def test_kernel_under_vmap_and_random_scores(rng):
    """Random normal scores (few ties) of several leading dims, and the call under jax.vmap (broadcast_all)."""
    scores = rng.normal(size=(3, 2, 16, 513)).astype(np.float32)
    bias = np.where(rng.random((3, 2, 513)) > 0.1, 0.0, NEG).astype(np.float32)
    vals, idx = jax.jit(jax.vmap(lambda s, b: topk_ffi.topk_select(s, b, 24)))(scores, bias)
    ref_v, ref_i = numpy_topk(scores.reshape(6, 16, 513), bias.reshape(6, 513), 24)
    np.testing.assert_array_equal(np.asarray(vals).reshape(6, 16, 24), ref_v)
    np.testing.assert_array_equal(np.asarray(idx).reshape(6, 16, 24), ref_i)


def _scores(qh, keys):
    return np.einsum("bhqd,bmhd->bhqm", qh.astype(np.float64), keys.astype(np.float64)).astype(np.float32)


@needs_compiler
@pytest.mark.parametrize("b,h,q,d,m,k", [(2, 3, 7, 8, 64, 5), (1, 2, 5, 3, 16, 1), (2, 1, 9, 33, 48, 48),
                                         (1, 2, 4, 1, 32, 40), (1, 1, 13, 16, 512, 32)])
def test_score_select_equals_numpy_sort(rng, b, h, q, d, m, k):
    """The kernel that scores as well (float32 keys, M % 16 == 0): integer queries and keys (exact scores, many
    ties), masks, a batch row with fewer valid keys than k, k = 1, k = M, k > M, Q not a multiple of its 4-row
    blocks, D = 1 and 33; values and indices equal to a numpy sort's; also under jax.vmap."""
    assert topk_ffi.available()
    qh = rng.integers(-2, 3, size=(b, h, q, d)).astype(np.float32)
    keys = rng.integers(-2, 3, size=(b, m, h, d)).astype(np.float32)
    mask = rng.random((b, m)) > 0.3
    mask[0, : max(m - k // 2, 0)] = False
    mask[0, -1] = True
    bias = np.where(mask, 0.0, NEG).astype(np.float32)
    vals, idx = jax.jit(lambda *a: topk_ffi.score_select(*a, k))(qh, keys, bias)
    ref_v, ref_i = numpy_topk(_scores(qh, keys).reshape(b, h * q, m), bias, k)
    np.testing.assert_array_equal(np.asarray(vals).reshape(b, h * q, k), ref_v)
    np.testing.assert_array_equal(np.asarray(idx).reshape(b, h * q, k), ref_i)
    vv, vi = jax.jit(jax.vmap(lambda *a: topk_ffi.score_select(*a, k)))(qh[None], keys[None], bias[None])
    np.testing.assert_array_equal(np.asarray(vi)[0], np.asarray(idx))


@needs_compiler
@pytest.mark.parametrize("integer", [True, False])
@pytest.mark.parametrize("dtype,m", [(jnp.float32, 512), (jnp.float32, 40), (jnp.bfloat16, 512)])
def test_kernel_equals_xla_tournament(rng, monkeypatch, integer, dtype, m):
    """tournament_topk with kept scores through the kernel (float32 and M % 16 == 0: scored in the kernel; M = 40
    or bf16 queries and keys: XLA's matmul, then the kernel's selection) against the XLA rounds (FOT_TOPK_FFI=0):
    the same indices, and values bit for bit with integer scores (ties), to float32 rounding with random ones;
    masks and a row with fewer valid keys than k."""
    b, hk, q, d, k = 2, 2, 6, 8, 20
    draw = (lambda s: rng.integers(-2, 3, size=s)) if integer else (lambda s: rng.normal(size=s))
    qh, keys = jnp.asarray(draw((b, hk, q, d)), dtype), jnp.asarray(draw((b, m, hk, d)), dtype)
    mask = rng.random((b, m)) > 0.2
    mask[1, 10:] = False
    tile = 512 if m == 512 else 8
    run = jax.jit(lambda *a: tournament_topk(*a, k, tile=tile, group=8, keep_scores=True))
    hlo = run.lower(qh, keys, jnp.asarray(mask)).as_text()
    kv, ki = run(qh, keys, jnp.asarray(mask))
    monkeypatch.setenv("FOT_TOPK_FFI", "0")
    run = jax.jit(lambda *a: tournament_topk(*a, k, tile=tile, group=8, keep_scores=True))
    xv, xi = run(qh, keys, jnp.asarray(mask))
    fused = dtype == jnp.float32 and m % 16 == 0
    assert f"@{topk_ffi.SCORE_TARGET if fused else topk_ffi.TARGET}" in hlo
    assert "fot_topk" not in run.lower(qh, keys, jnp.asarray(mask)).as_text()
    np.testing.assert_array_equal(np.asarray(ki), np.asarray(xi))
    if integer:
        np.testing.assert_array_equal(np.asarray(kv), np.asarray(xv))
    else:
        np.testing.assert_allclose(np.asarray(kv), np.asarray(xv), rtol=1e-6, atol=1e-6)


def _attention_case(rng, kernel, monkeypatch):
    if not kernel:
        monkeypatch.setenv("FOT_TOPK_FFI", "0")
    b, t, h, d, m, top_k = 2, 8, 4, 16, 256, 12
    q, k, v = (rng.normal(size=(b, t, h, d)).astype(np.float32) for _ in range(3))
    mk, mv = (rng.normal(size=(b, m, h, d)).astype(np.float32) for _ in range(2))
    mm = rng.random((b, m)) > 0.25
    mm[1, 5:] = False  # fewer valid slots than top_k
    w = rng.normal(size=q.shape).astype(np.float32)
    return (q, k, v, mk, mv), mm, w, top_k


@pytest.mark.parametrize("kernel", [pytest.param(True, marks=needs_compiler), False])
def test_memory_attention_topk_equals_numpy(rng, monkeypatch, kernel):
    """memory_attention top-k (the CPU kernel, or FOT_TOPK_FFI=0: the XLA rounds) against a numpy reference: the
    local keys plus each query's top-k valid memory keys (numpy sort) in one softmax; gradients vs the merge path."""
    args, mm, w, top_k = _attention_case(rng, kernel, monkeypatch)
    q, k, v, mk, mv = args
    scale = q.shape[-1] ** -0.5
    ref = np.zeros(q.shape, np.float64)
    for bi in range(q.shape[0]):
        for ti in range(q.shape[1]):
            for hi in range(q.shape[2]):
                ms = mk[bi, :, hi] @ q[bi, ti, hi]
                sel = [j for j in np.lexsort((np.arange(len(ms)), -ms)) if mm[bi, j]][:top_k]
                s = np.concatenate([k[bi, : ti + 1, hi] @ q[bi, ti, hi], ms[sel]]) * scale
                p = np.exp(s - s.max())
                ref[bi, ti, hi] = (p / p.sum()) @ np.concatenate([v[bi, : ti + 1, hi], mv[bi, sel, hi]])
    fn = jax.jit(lambda *a: memory_attention(*a, mem_mask=mm, top_k=top_k))
    np.testing.assert_allclose(np.asarray(fn(*args)), ref, atol=2e-5)
    assert ("fot_topk" in fn.lower(*args).as_text()) == kernel
    grads = {}
    for method in ("merge", "tournament"):
        loss = lambda *a: jnp.sum(memory_attention(*a, mem_mask=mm, top_k=top_k, topk_method=method) * w)  # noqa
        grads[method] = jax.jit(jax.grad(loss, tuple(range(5))))(*args)
    for name, a, c in zip("q k v mem_k mem_v".split(), grads["tournament"], grads["merge"]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-5, err_msg=name)


def test_build_failure_falls_back_with_one_log_line(rng, monkeypatch, tmp_path, caplog):
    """No compiler (CXX not on PATH, fresh cache): available() is False with one warning, and tournament_topk
    keeps the XLA rounds (still a numpy sort's values)."""
    monkeypatch.setenv("CXX", "fot-no-such-compiler")
    monkeypatch.setenv("FOT_FFI_CACHE", str(tmp_path))
    monkeypatch.setattr(topk_ffi, "_state", {})
    with caplog.at_level(logging.WARNING, logger="fot.ops.topk_ffi"):
        assert not topk_ffi.available() and not topk_ffi.available()
    assert len([r for r in caplog.records if "unavailable" in r.getMessage()]) == 1
    qh, keys = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((1, 2, 3, 4), (1, 64, 2, 4)))
    vals, idx = tournament_topk(qh, keys, jnp.ones((1, 64), bool), 5, tile=64, group=32, keep_scores=True)
    scores = np.einsum("bhqd,bmhd->bhqm", np.asarray(qh), np.asarray(keys))
    np.testing.assert_allclose(np.asarray(vals), -np.sort(-scores, -1)[..., :5], rtol=1e-6, atol=1e-6)
    assert not list(tmp_path.iterdir())  # nothing half-written left behind
