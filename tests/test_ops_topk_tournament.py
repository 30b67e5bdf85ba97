"""The tournament top-k (fot.ops.tournament.tournament_topk, the CPU default of memory_attention's top-k) against a
numpy sort, ties and masks included, and against the running lax.top_k merge inside memory_attention."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fot.ops import memory_attention
from fot.ops.memory_topk import choose_topk_method
from fot.ops.tournament import first_argmax, tournament_plan, tournament_topk


@pytest.mark.parametrize("keep,key_dtype,kernel", [(False, jnp.float32, True), (True, jnp.float32, True),
                                                   (True, jnp.float32, False), (True, jnp.bfloat16, True)])
@pytest.mark.parametrize("m,tile,group,k", [(96, 32, 8, 5), (64, 64, 4, 40), (48, 16, 16, 7), (7, 1, 1, 3),
                                           (128, 64, 32, 9), (128, 64, 32, 1)])
def test_tournament_equals_numpy_sort_with_ties_and_masks(rng, monkeypatch, m, tile, group, k, keep, key_dtype,
                                                          kernel):
    """Integer-valued scores (many exact ties), masked keys, rows with fewer valid keys than k: the values are
    those of a numpy sort, best first; the indices are distinct valid keys whose scores are those values.
    keep: the rounds read the first pass's scores back (small memories) instead of re-scoring keys; keys in
    the queries' dtype are then scored in one matmul (and selected by the CPU kernel of fot.ops.topk_ffi where
    it is available; kernel=False: FOT_TOPK_FFI=0, the XLA rounds), a bf16 store tile by tile (integers are
    exact in bf16)."""
    if not kernel:
        monkeypatch.setenv("FOT_TOPK_FFI", "0")
    b, hk, q, d = 2, 2, 5, 4
    qh = rng.integers(-2, 3, size=(b, hk, q, d)).astype(np.float32)
    keys = rng.integers(-2, 3, size=(b, m, hk, d)).astype(np.float32)
    mask = rng.random((b, m)) > 0.3
    mask[1, : max(m - k // 2, 0)] = False  # row 1: fewer valid keys than k
    mask[1, -1] = True
    vals, idx = tournament_topk(jnp.asarray(qh), jnp.asarray(keys, key_dtype), jnp.asarray(mask), k, tile=tile,
                                group=group, keep_scores=keep)
    vals, idx = np.asarray(vals), np.asarray(idx)
    full = np.einsum("bhqd,bmhd->bhqm", qh, keys)
    for bi in range(b):
        nv = min(k, int(mask[bi].sum()))
        ref = np.sort(full[bi][..., mask[bi]], axis=-1)[..., ::-1][..., :nv]
        np.testing.assert_array_equal(vals[bi, ..., :nv], ref)
        assert np.all(vals[bi, ..., nv:] <= -1e29)
        sel = idx[bi, ..., :nv]
        assert np.all(mask[bi][sel])
        assert all(len(set(r)) == nv for r in sel.reshape(-1, nv)) if nv else True
        np.testing.assert_array_equal(np.take_along_axis(full[bi], sel, -1), vals[bi, ..., :nv])


@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("h,hkv", [(2, 2), (4, 2)])
def test_memory_attention_tournament_equals_merge(rng, monkeypatch, h, hkv, keep):
    """Same outputs and gradients with either selection (M = 384: 3 tiles of 128; small enough for the
    kept-scores rounds, groups of 32; keep=False forces the re-scoring rounds, groups of 8)."""
    import fot.ops.tournament as tournament_mod
    if not keep:
        monkeypatch.setattr(tournament_mod, "CPU_KEEP_ELEMS", 0)
    b, tq, d, m = 2, 4, 8, 384
    q = rng.normal(size=(b, tq, h, d)).astype(np.float32)
    k, v = (rng.normal(size=(b, tq, hkv, d)).astype(np.float32) for _ in range(2))
    mk, mv = (rng.normal(size=(b, m, hkv, d)).astype(np.float32) for _ in range(2))
    mm = rng.random((b, m)) > 0.2
    w = rng.normal(size=q.shape).astype(np.float32)

    def run(method):
        loss = lambda *a: jnp.sum(memory_attention(*a, mem_mask=mm, top_k=6, topk_method=method) * w)  # noqa
        return jax.jit(jax.value_and_grad(loss, tuple(range(5))))(q, k, v, mk, mv)

    (l1, g1), (l2, g2) = run("merge"), run("tournament")
    np.testing.assert_allclose(float(l2), float(l1), rtol=1e-5)
    for name, a, c in zip("q k v mem_k mem_v".split(), g2, g1):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-5, err_msg=name)


def test_method_choice_and_plan():
    assert choose_topk_method("auto", 65536, 1024, 32, "cpu") == ("tournament", (512, 16, False))
    assert choose_topk_method("auto", 4096, 1024, 32, "cpu") == ("tournament", (512, 32, True))  # scores kept
    assert choose_topk_method("auto", 65536, 1024, 32, "gpu") == ("merge", None)
    assert choose_topk_method("tournament", 1001, 16, 4, "gpu") == ("merge", None)  # no power-of-two tile
    assert choose_topk_method("merge", 4096, 16, 4, "cpu") == ("merge", None)
    with pytest.raises(ValueError, match="topk_method"):
        choose_topk_method("sort", 4096, 16, 4, "cpu")
    tile, group, keep = tournament_plan(262144, 1024, 32)
    assert not keep
    assert 262144 % tile == 0 and tile % group == 0 and 1024 * 262144 // group <= 2 ** 22
    x = jnp.asarray([[1.0, 3.0, 3.0, 2.0], [-jnp.inf] * 4])
    mx, i = first_argmax(x)
    np.testing.assert_array_equal(np.asarray(i), [1, 0])
    assert float(mx[0]) == 3.0


@pytest.mark.parametrize("keep,key_dtype", [(False, jnp.float32), (True, jnp.bfloat16)])
def test_tournament_skips_empty_tiles_bit_identically(rng, keep, key_dtype):
    """CPU default: first-pass tiles without a valid key in any row are skipped (lax.cond) and get the score
    a masked key gets; the selection (values and indices) is bit for bit that of scoring every tile, and the
    values are those of a numpy sort. (With kept scores the tiled pass runs for keys in another dtype than
    the queries, e.g. a bf16 store; keys in the queries' dtype are scored in one matmul, no tiles.)"""
    b, hk, q, d, m, tile, k = 2, 2, 5, 4, 128, 16, 6
    qh = jnp.asarray(rng.normal(size=(b, hk, q, d)), jnp.float32)
    keys = jnp.asarray(rng.normal(size=(b, m, hk, d)), key_dtype)
    mask = np.zeros((b, m), bool)
    mask[0, 20:27] = mask[0, 100] = mask[1, 21] = True  # only tiles 1 and 6 hold keys; row 1 has fewer than k
    kw = dict(tile=tile, group=4, keep_scores=keep)
    skip = tournament_topk(qh, keys, jnp.asarray(mask), k, **kw)  # default on CPU
    full = tournament_topk(qh, keys, jnp.asarray(mask), k, skip_empty=False, **kw)
    for a, c in zip(skip, full):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
    scores = np.einsum("bhqd,bmhd->bhqm", np.asarray(qh), np.asarray(keys, np.float32))
    ref = np.sort(scores[0][..., mask[0]], axis=-1)[..., ::-1][..., :k]
    np.testing.assert_allclose(np.asarray(skip[0])[0], ref, rtol=1e-6, atol=1e-6)  # float32 summation order
    assert np.all(np.asarray(skip[0])[1, ..., 1:] <= -1e29)
    hlo = jax.jit(lambda *a: tournament_topk(*a, k, **kw)).lower(qh, keys, jnp.asarray(mask)).as_text()
    assert "conditional" in hlo or "case" in hlo
