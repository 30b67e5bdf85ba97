"""Grouped-query / multi-query attention in the Decoder: a model with num_kv_heads < num_heads equals the
multi-head model whose k/v kernels repeat each kv head for its query heads (transformers' repeat_kv), in
training (crossbatch, forward and gradients; one device and the (4, 2) mesh with FSDP) and in memory
inference, whose stores hold the kv heads only."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from fot.inference import MemoryInference, WindowedConfig
from fot.model import Decoder, ModelConfig
from fot.ops import crossbatch_plan
from test_model_sharding import assert_sharded_equals

B, T, V = 8, 8, 48


def gqa_config(kv):
    return ModelConfig(vocab_size=V, d_model=32, num_layers=2, num_heads=4, num_kv_heads=kv, head_dim=8,
                       mlp_dim=64, mem_layers=(1,), rope_theta=1000.0, init_std=0.2)


def repeat_kv_params(params, cfg):
    """GQA params -> MHA params (k/v kernels [D, Hkv*Dh] -> [D, H*Dh], each kv head repeated G times)."""
    def fix(path, x):
        names = [getattr(p, "key", None) for p in path]
        if names[-2:] in (["k", "kernel"], ["v", "kernel"]):
            d = x.shape[0]
            x = jnp.repeat(x.reshape(d, cfg.num_kv_heads, cfg.head_dim), cfg.kv_groups, axis=1)
            return x.reshape(d, cfg.num_heads * cfg.head_dim)
        return x
    return jax.tree_util.tree_map_with_path(fix, params)


def inputs(rng):
    tokens = np.asarray(rng.integers(0, V, (B, T)), np.int32)
    seg = np.ones((B, T), np.int32)
    seg[3, 5:] = 2
    seg[6, 6:] = 0
    return tokens, seg, crossbatch_plan(B, 3, pack=4)


def test_config_num_kv_heads():
    assert gqa_config(None).num_kv_heads == 4 and gqa_config(None).kv_groups == 1
    assert gqa_config(1).kv_groups == 4
    with pytest.raises(ValueError, match="num_kv_heads=3"):
        gqa_config(3)
    with pytest.raises(ValueError, match="num_kv_heads=0"):
        gqa_config(0)
    assert gqa_config(None).replace(num_heads=8, head_dim=8).num_kv_heads == 8  # implicit MHA follows
    assert gqa_config(2).replace(num_heads=8, head_dim=8).num_kv_heads == 2


@pytest.mark.parametrize("kv", [2, 1])
def test_gqa_decoder_equals_repeated_mha(rng, kv):
    cfg = gqa_config(kv)
    tokens, seg, rows = inputs(rng)
    params = nn.meta.unbox(Decoder(cfg).init(jax.random.key(0), jnp.asarray(tokens)))["params"]
    assert params["layers_0"]["attn"]["k"]["kernel"].shape == (32, kv * 8)
    mha = cfg.replace(num_kv_heads=4)
    w = jnp.asarray(rng.standard_normal((B, T, V)), jnp.float32)

    def loss(p, c):
        logits = Decoder(c).apply({"params": p}, tokens, segment_ids=seg, extra_rows=rows)
        return jnp.sum(logits * w), logits

    (_, got), g = jax.value_and_grad(loss, has_aux=True)(params, cfg)
    (_, want), g_rep = jax.value_and_grad(lambda p: loss(repeat_kv_params(p, cfg), mha), has_aux=True)(params)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(g_rep)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max(), err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("kv", [2, 1])
def test_gqa_sharded_fsdp_equals_single_device(rng, kv):
    cfg = gqa_config(kv)
    tokens, seg, rows = inputs(rng)
    variables = Decoder(cfg).init(jax.random.key(0), jnp.asarray(tokens))
    w = jnp.asarray(rng.standard_normal((B, T, V)), jnp.float32)

    def loss(params, tokens, seg, rows, mesh):
        logits = Decoder(cfg).apply({"params": params}, tokens, segment_ids=seg, extra_rows=rows, mesh=mesh)
        return jnp.sum(logits * w), logits

    params = nn.meta.unbox(variables)["params"]
    (_, want), g_want = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=4)(params, tokens, seg, rows,
                                                                                           None)
    placed = assert_sharded_equals(loss, variables, (tokens, seg, rows), {"data": 4, "model": 2}, True, want, g_want)
    want_spec = P("data", "model") if kv * 8 % 2 == 0 else P("data")
    assert placed["layers_1"]["attn"]["k"]["kernel"].sharding.spec == want_spec


@pytest.mark.parametrize("top_k", [None, 3])
def test_gqa_memory_inference_stores_kv_heads_only(rng, top_k):
    cfg = gqa_config(1)
    params = nn.meta.unbox(Decoder(cfg).init(jax.random.key(1), jnp.zeros((1, T), jnp.int32)))["params"]
    tokens = np.asarray(rng.integers(0, V, (2, 4 * T)), np.int32)
    wc = WindowedConfig(window=T, top_k=top_k, mem_dtype="float32")
    out = MemoryInference(Decoder(cfg), params, wc).forward(tokens)
    store = out["stores"][1]
    assert store.keys.shape == (2, 4 * T, 1, cfg.head_dim) and store.values.shape == store.keys.shape
    mha = MemoryInference(Decoder(cfg.replace(num_kv_heads=4)), repeat_kv_params(params, cfg), wc).forward(tokens)
    assert mha["stores"][1].keys.shape == (2, 4 * T, 4, cfg.head_dim)  # 4x the memory per token
    np.testing.assert_allclose(out["logits"], mha["logits"], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.repeat(np.asarray(store.keys), 4, axis=2), mha["stores"][1].keys, atol=1e-5)
