"""fot.ops RoPE and causal attention vs independent numpy / dense references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fot.ops import apply_rope, causal_attention, rope_tables


def np_rope(x, pos, theta):
    d = x.shape[-1]
    x = x.astype(np.float64)
    out = np.empty_like(x)
    pos = np.broadcast_to(pos, x.shape[:2]).astype(np.float64)
    for i in range(d // 2):
        ang = pos * theta ** (-2.0 * i / d)
        c, s = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
        a, b = x[..., i], x[..., i + d // 2]
        out[..., i] = a * c - b * s
        out[..., i + d // 2] = b * c + a * s
    return out


@pytest.mark.parametrize("theta", [10000.0, 1e6])
def test_rope_matches_numpy(rng, theta):
    x = rng.normal(size=(2, 7, 3, 16)).astype(np.float32)
    pos = rng.integers(0, 5000, size=(2, 7))
    np.testing.assert_allclose(apply_rope(x, pos, theta=theta), np_rope(x, pos, theta), atol=2e-3, rtol=1e-3)
    pos1 = rng.integers(0, 100, size=(7,))
    np.testing.assert_allclose(apply_rope(x, pos1, theta=theta), np_rope(x, pos1[None], theta), atol=1e-4)


def test_rope_dtype_position_zero_and_tables(rng):
    x = jnp.asarray(rng.normal(size=(1, 4, 2, 8)), jnp.bfloat16)
    y = apply_rope(x, jnp.zeros((4,), jnp.int32))
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(x, np.float32))  # identity at 0
    cos, sin = rope_tables(jnp.array([[0, 3_000_000]]), 8)  # no table length limit
    assert cos.dtype == jnp.float32 and cos.shape == (1, 2, 8)
    np.testing.assert_allclose(cos[0, 1, 0], np.cos(3_000_000.0), atol=1e-3)
    # relative property: <R(p)q, R(p')k> depends only on p - p'
    q, k = rng.normal(size=(2, 1, 1, 1, 16)).astype(np.float32)
    d1 = np.sum(apply_rope(q, np.array([7])) * apply_rope(k, np.array([3])))
    d2 = np.sum(apply_rope(q, np.array([104])) * apply_rope(k, np.array([100])))
    np.testing.assert_allclose(d1, d2, rtol=1e-4, atol=1e-4)


def test_rope_bad_input():
    with pytest.raises(ValueError, match="positions"):
        apply_rope(jnp.ones((2, 4, 1, 8)), jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="head_dim"):
        apply_rope(jnp.ones((2, 4, 1, 7)), jnp.zeros((4,), jnp.int32))


def dense_causal(q, k, v, seg=None, offset=None):
    """Materialise all scores, mask (causal with END alignment, same segment), softmax (jnp, for grads)."""
    b, tq, h, d = q.shape
    tk = k.shape[1]
    off = np.full((b,), tk - tq) if offset is None else np.broadcast_to(offset, (b,))
    qpos = off[:, None] + np.arange(tq)[None]
    mask = np.arange(tk)[None, None, :] <= qpos[:, :, None]
    if seg is not None:
        segq = np.take_along_axis(seg, np.clip(qpos, 0, tk - 1), axis=1)
        mask &= segq[:, :, None] == seg[:, None, :]
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
    s = jnp.where(mask[:, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    p = jnp.where(mask[:, None].any(-1, keepdims=True), p, 0.0)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize("b,tq,tk,h,d", [(2, 6, 6, 2, 8), (3, 2, 9, 1, 4), (1, 1, 5, 3, 8)])
def test_causal_attention_matches_dense(rng, b, tq, tk, h, d):
    q = rng.normal(size=(b, tq, h, d)).astype(np.float32)
    k, v = rng.normal(size=(2, b, tk, h, d)).astype(np.float32)
    seg = np.sort(rng.integers(1, 3, size=(b, tk)), axis=1)
    for segs in (None, seg):
        w = rng.normal(size=(b, tq, h, d)).astype(np.float32)

        def loss(fn, *a):
            out, st = fn(*a)
            return jnp.sum(out * w), (out, st)

        op = lambda *a: causal_attention(*a, segment_ids=segs, return_stats=True)
        ref = lambda *a: (dense_causal(*a, segs), None)
        g1, (out, st) = jax.jit(jax.grad(lambda *a: loss(op, *a), (0, 1, 2), has_aux=True))(q, k, v)
        g2, (want, _) = jax.jit(jax.grad(lambda *a: loss(ref, *a), (0, 1, 2), has_aux=True))(q, k, v)
        np.testing.assert_allclose(out, want, atol=1e-5)
        assert st["mem_mass"].shape == (b, tq, h) and float(jnp.abs(st["mem_mass"]).max()) == 0.0
        for a, c in zip(g1, g2):
            np.testing.assert_allclose(a, c, atol=2e-5)


def test_causal_attention_q_offset_and_dtype(rng):
    q = rng.normal(size=(2, 3, 2, 8)).astype(np.float32)
    k, v = rng.normal(size=(2, 2, 7, 2, 8)).astype(np.float32)
    off = np.array([1, 4])
    np.testing.assert_allclose(causal_attention(q, k, v, q_offset=off), dense_causal(q, k, v, None, off),
                               atol=1e-5)
    out = causal_attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k[:, :3], v[:, :3])))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), dense_causal(q, k[:, :3], v[:, :3]), atol=5e-2)


def test_causal_attention_bad_input():
    x = jnp.ones((2, 4, 2, 8))
    with pytest.raises(ValueError, match="head-dim"):
        causal_attention(x, jnp.ones((2, 4, 2, 4)), jnp.ones((2, 4, 2, 4)))
    with pytest.raises(ValueError, match="rank 4"):
        causal_attention(jnp.ones((2, 4, 8)), x, x)
    with pytest.raises(ValueError, match="segment_ids"):
        causal_attention(x, x, x, segment_ids=jnp.ones((2, 3), jnp.int32))
    with pytest.raises(ValueError, match="at least as many keys"):
        causal_attention(x, x[:, :2], x[:, :2])
