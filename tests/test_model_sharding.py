"""Decoder on 8 fake CPU devices: ('data',)=8 and ('data','model')=(4,2) meshes equal one device."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from fot.model import Decoder, ModelConfig
from fot.ops import crossbatch_plan
from fot.parallel import axis_rules, make_mesh, param_shardings, shard_params

B, T = 8, 8


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(1234)
    cfg = ModelConfig(vocab_size=48, d_model=32, num_layers=2, num_heads=4, head_dim=8, mlp_dim=64,
                      mem_layers=(1,), rope_theta=1000.0)
    tokens = np.asarray(rng.integers(0, cfg.vocab_size, (B, T)), np.int32)
    seg = np.ones((B, T), np.int32)
    seg[3, 5:] = 2  # a document boundary inside a row
    seg[6, 6:] = 0  # padding (also masked as extra keys)
    rows = crossbatch_plan(B, 3, pack=4)  # rows reach across device boundaries on the 8-way mesh
    variables = Decoder(cfg).init(jax.random.key(0), jnp.asarray(tokens))
    w = jnp.asarray(rng.standard_normal((B, T, cfg.vocab_size)), jnp.float32)

    def loss_and_logits(params, tokens, seg, rows, mesh):
        logits = Decoder(cfg).apply({"params": params}, tokens, segment_ids=seg, extra_rows=rows, mesh=mesh)
        return jnp.sum(logits * w), logits

    params = nn.meta.unbox(variables)["params"]
    (_, logits), grads = jax.jit(jax.value_and_grad(loss_and_logits, has_aux=True),
                                 static_argnums=4)(params, tokens, seg, rows, None)
    return cfg, variables, tokens, seg, rows, loss_and_logits, logits, grads


def assert_sharded_equals(loss_and_logits, variables, batch_args, mesh_cfg, fsdp, logits, grads):
    """``loss_and_logits(params, *batch_args, mesh) -> (loss, logits [B, T, V])`` run on ``mesh_cfg`` (params
    placed by the rules, batch over the data axis) gives the single-device ``logits`` and ``grads``.
    Returns the placed params."""
    mesh = make_mesh(mesh_cfg)
    rules = axis_rules(fsdp=fsdp)
    placed = shard_params(variables, mesh, rules)["params"]
    batch = NamedSharding(mesh, P("data"))
    args = [jax.device_put(x, batch) for x in batch_args]
    f = jax.jit(jax.value_and_grad(loss_and_logits, has_aux=True), static_argnums=len(batch_args) + 1,
                out_shardings=((None, batch), param_shardings(variables, mesh, rules)["params"]))
    (_, out), g = f(placed, *args, mesh)
    np.testing.assert_allclose(np.asarray(out), np.asarray(logits), rtol=1e-5, atol=1e-5)
    for (path, a), b_ in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(grads)):
        b_ = np.asarray(b_)
        np.testing.assert_allclose(np.asarray(a), b_, rtol=1e-4, atol=1e-5 * np.abs(b_).max(),
                                   err_msg=jax.tree_util.keystr(path))
    return placed


@pytest.mark.parametrize("mesh_cfg, fsdp", [({"data": -1}, False), ({"data": 4, "model": 2}, True)])
def test_sharded_forward_and_grads_equal_single_device(setup, mesh_cfg, fsdp):
    cfg, variables, tokens, seg, rows, loss_and_logits, logits, grads = setup
    placed = assert_sharded_equals(loss_and_logits, variables, (tokens, seg, rows), mesh_cfg, fsdp, logits, grads)
    if fsdp:  # params really are sharded as the rules say
        assert placed["layers_0"]["mlp"]["gate"]["kernel"].sharding.spec == P("data", "model")
        assert placed["embed"]["embedding"].sharding.spec == P("model", "data")


@pytest.mark.parametrize("top_k", [None, 5])
def test_sharded_memory_inference_equals_single_device(setup, top_k):
    cfg, variables, tokens, *_ = setup
    rng = np.random.default_rng(7)
    m = 16
    memory = {1: (jnp.asarray(rng.standard_normal((B, m, 4, 8)), jnp.float32),
                  jnp.asarray(rng.standard_normal((B, m, 4, 8)), jnp.float32),
                  jnp.asarray(rng.random((B, m)) < 0.7))}
    cache = {i: (jnp.asarray(rng.standard_normal((B, 3, 4, 8)), jnp.float32),
                 jnp.asarray(rng.standard_normal((B, 3, 4, 8)), jnp.float32)) for i in range(2)}

    def run(params, tokens, memory, cache, mesh):
        return Decoder(cfg).apply({"params": params}, tokens, memory=memory, cache=cache, top_k=top_k, mesh=mesh)

    f = jax.jit(run, static_argnums=4)
    want = f(nn.meta.unbox(variables)["params"], tokens, memory, cache, None)
    mesh = make_mesh({"data": 4, "model": 2})
    act = NamedSharding(mesh, P("data", None, "model"))
    memory_s = {1: (jax.device_put(memory[1][0], act), jax.device_put(memory[1][1], act),
                    jax.device_put(memory[1][2], NamedSharding(mesh, P("data"))))}
    cache_s = jax.tree.map(lambda x: jax.device_put(x, act), cache)
    got = f(shard_params(variables, mesh)["params"], jax.device_put(tokens, NamedSharding(mesh, P("data"))),
            memory_s, cache_s, mesh)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
