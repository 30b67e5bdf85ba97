"""Fused (jax.nn.dot_product_attention) vs blockwise local attention: same outputs and gradients on every
path the fused kernel is used (plain causal, segments, END-aligned keys of a cache, q_offset, bf16), at the
op and at the model level; the implementation choice per platform; cuDNN's trace-time fallback."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fot import ops
from fot.ops import fused


def _qkv(rng, b, tq, tk, h, d, dtype=jnp.float32, hkv=None):
    mk = lambda t, n: jnp.asarray(rng.normal(size=(b, t, n, d)), dtype)  # noqa: E731
    hkv = hkv or h
    return mk(tq, h), mk(tk, hkv), mk(tk, hkv), mk(tq, h)


def _out_and_grads(impl, q, k, v, do, **kw):
    f = lambda q, k, v: ops.causal_attention(q, k, v, implementation=impl, **kw)  # noqa: E731
    o, pull = jax.vjp(f, q, k, v)
    return (o,) + pull(do)


CASES = {
    "causal": dict(tq=32, tk=32, seg=False, off=None),
    "segments": dict(tq=32, tk=32, seg=True, off=None),
    "cache_end_aligned": dict(tq=8, tk=40, seg=True, off=None),
    "q_offset": dict(tq=8, tk=40, seg=False, off="rows"),
    "gqa_segments": dict(tq=32, tk=32, seg=True, off=None, hkv=2),  # 4 query heads on 2 kv heads
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_equals_blockwise_outputs_and_gradients(rng, case, dtype):
    c = CASES[case]
    b, h, d = 3, 4, 16
    q, k, v, do = _qkv(rng, b, c["tq"], c["tk"], h, d, jnp.dtype(dtype), c.get("hkv"))
    kw = {}
    if c["seg"]:  # two or three documents per row, as packed training rows
        kw["segment_ids"] = jnp.asarray(np.sort(rng.integers(1, 4, size=(b, c["tk"])), axis=1), jnp.int32)
    if c["off"] == "rows":
        kw["q_offset"] = jnp.asarray(rng.integers(0, c["tk"] - c["tq"] + 1, size=(b,)), jnp.int32)
    ref = _out_and_grads("blockwise", q, k, v, do, **kw)
    got = _out_and_grads("xla", q, k, v, do, **kw)
    tol = 1e-5 if dtype == "float32" else 3e-2
    for name, a, r in zip(("out", "dq", "dk", "dv"), got, ref):
        assert a.dtype == r.dtype, name
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(r, np.float32), atol=tol, rtol=tol,
                                   err_msg=name)


def test_fused_matches_a_dense_numpy_reference(rng):
    """Independent reference: softmax over causal, same-segment keys (END alignment) in numpy."""
    b, tq, tk, h, d = 2, 6, 10, 2, 8
    q, k, v, _ = _qkv(rng, b, tq, tk, h, d)
    seg = np.sort(rng.integers(1, 3, size=(b, tk)), axis=1)
    out = np.asarray(ops.causal_attention(q, k, v, segment_ids=jnp.asarray(seg), implementation="xla"))
    qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
    ref = np.zeros_like(qn)
    for bi in range(b):
        for i in range(tq):
            pos = tk - tq + i
            vis = (np.arange(tk) <= pos) & (seg[bi] == seg[bi, pos])
            for hi in range(h):
                s = kn[bi, :, hi] @ qn[bi, i, hi] / np.sqrt(d)
                p = np.where(vis, np.exp(s - s[vis].max()), 0.0)
                ref[bi, i, hi] = (p / p.sum()) @ vn[bi, :, hi]
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_resolve_per_platform_and_validation():
    assert fused.resolve("auto", jnp.float32, "cpu") == "blockwise"
    assert fused.resolve("auto", jnp.bfloat16, "cpu") == "blockwise"
    assert fused.resolve("auto", jnp.bfloat16, "gpu") == "cudnn"
    assert fused.resolve("auto", jnp.float16, "gpu") == "cudnn"
    assert fused.resolve("auto", jnp.float32, "gpu") == "blockwise"  # cuDNN flash needs half precision
    assert fused.resolve("auto", jnp.bfloat16, "tpu") == "blockwise"
    assert fused.resolve("xla", jnp.float32, "cpu") == "xla"
    with pytest.raises(ValueError, match="implementation must be one of"):
        fused.resolve("flash", jnp.float32, "cpu")
    from fot.model import ModelConfig
    with pytest.raises(ValueError, match="ModelConfig.attention_impl"):
        ModelConfig(vocab_size=8, d_model=8, num_layers=1, num_heads=2, mlp_dim=8, attention_impl="fast")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="on a GPU cuDNN may accept the inputs")
def test_cudnn_request_without_cudnn_falls_back_to_blockwise(rng):
    q, k, v, do = _qkv(rng, 2, 16, 16, 2, 16, jnp.bfloat16)
    ref = _out_and_grads("blockwise", q, k, v, do)
    got = _out_and_grads("cudnn", q, k, v, do)
    for a, r in zip(got, ref):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(r, np.float32))


def test_decoder_fused_equals_blockwise_training_and_cached_generation(rng):
    """A GQA decoder (4 query heads on 2 kv heads) with a memory layer trained with crossbatch rows (memory layer: blockwise joint softmax;
    other layers: the chosen kernel) and a decode step against a local cache: same logits and gradients."""
    from fot.model import Decoder, ModelConfig

    base = ModelConfig(vocab_size=64, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2, mlp_dim=64,
                       mem_layers=(1,))
    b, t = 4, 16
    tok = jnp.asarray(rng.integers(0, 64, size=(b, t)), jnp.int32)
    seg = jnp.asarray(np.sort(rng.integers(1, 3, size=(b, t)), axis=1), jnp.int32)
    rows = jnp.asarray([[-1], [0], [-1], [2]], jnp.int32)
    params = Decoder(base).init(jax.random.PRNGKey(0), tok)["params"]

    def run(impl):
        model = Decoder(base.replace(attention_impl=impl))
        loss = lambda p: jnp.mean(model.apply({"params": p}, tok, segment_ids=seg, extra_rows=rows) ** 2)  # noqa
        val, grads = jax.value_and_grad(loss)(params)
        _, aux = model.apply({"params": params}, tok[:, :-1], return_kv=True)
        cache = aux["kv"]
        step = model.apply({"params": params}, tok[:, -1:], cache=cache)
        return val, grads, step

    (v1, g1, s1), (v2, g2, s2) = run("blockwise"), run("xla")
    np.testing.assert_allclose(float(v2), float(v1), rtol=1e-5)
    jax.tree.map(lambda a, r: np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=1e-6, rtol=1e-4), g2, g1)
    np.testing.assert_allclose(np.asarray(s2), np.asarray(s1), atol=1e-5, rtol=1e-5)
