"""fot.parallel: mesh construction and logical-axis rules."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from fot.parallel import (DEFAULT_RULES, axis_rules, logical_to_spec, make_mesh, mesh_shape_from_config,
                          param_partition_specs, param_shardings, shard_params, with_logical_constraint)


def test_make_mesh_fills_minus_one():
    mesh = make_mesh({"data": -1, "model": 2})
    assert mesh.axis_names == ("data", "model")
    assert mesh.devices.shape == (4, 2)
    assert make_mesh({"data": -1}).devices.shape == (8,)
    assert make_mesh().devices.shape == (8, 1)
    assert make_mesh([("model", 4), ("data", -1)]).devices.shape == (4, 2)
    sub = make_mesh({"data": 2, "model": -1}, devices=jax.devices()[:4])
    assert sub.devices.shape == (2, 2) and set(d.id for d in sub.devices.flat) == {d.id for d in jax.devices()[:4]}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize("config, msg", [
    ({"data": -1, "model": -1}, "at most one -1"),
    ({"data": 3, "model": -1}, "not divisible"),
    ({"data": 4, "model": 4}, "16 devices"),
    ({"data": 0}, ">= 1"),
    ({}, "at least one axis"),
])
def test_make_mesh_bad_config(config, msg):
    with pytest.raises(ValueError, match=msg):
        mesh_shape_from_config(config, 8)


def test_rules_table():
    rules = dict(DEFAULT_RULES)
    assert rules["batch"] == "data" and rules["heads"] == "model" and rules["mlp"] == "model"
    assert rules["vocab"] == "model" and rules["embed"] is None
    assert dict(axis_rules(fsdp=True))["embed"] == "data"
    assert dict(axis_rules(shard_memory_length=True))["mem_length"] == "model"
    assert logical_to_spec(("batch", "length", "heads", "head_dim")) == P("data", None, "model", None)
    assert logical_to_spec(("embed", "mlp"), axis_rules(fsdp=True)) == P("data", "model")
    mesh = make_mesh({"data": -1})  # no model axis: dropped
    assert logical_to_spec(("batch", "length", "heads", "head_dim"), mesh=mesh) == P("data")
    mesh2 = make_mesh({"data": 4, "model": 2})
    # vocab 7 not divisible by model=2 -> replicated on that dim
    assert logical_to_spec(("vocab", "embed"), mesh=mesh2, shape=(7, 4)) == P()
    assert logical_to_spec(("vocab", "embed"), mesh=mesh2, shape=(8, 4)) == P("model")
    with nn.logical_axis_rules(axis_rules(fsdp=True)):  # context rules are honoured
        assert logical_to_spec(("embed", "vocab")) == P("data", "model")


class _Toy(nn.Module):
    @nn.compact
    def __call__(self, x):
        k = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("embed", "mlp")),
                       (x.shape[-1], 6))
        s = self.param("scale", nn.initializers.ones, (6,))  # no metadata -> replicated
        return x @ k * s


def test_param_specs_and_shardings():
    x = jnp.ones((8, 4))
    abstract = jax.eval_shape(_Toy().init, jax.random.key(0), x)
    mesh = make_mesh({"data": 4, "model": 2})
    specs = param_partition_specs(abstract, axis_rules(fsdp=True), mesh)
    assert specs["params"]["kernel"] == P("data", "model")
    assert specs["params"]["scale"] == P()
    shard = param_shardings(abstract, mesh)
    assert shard["params"]["kernel"] == NamedSharding(mesh, P(None, "model"))
    variables = _Toy().init(jax.random.key(0), x)
    placed = shard_params(variables, mesh, axis_rules(fsdp=True))
    assert placed["params"]["kernel"].sharding.spec == P("data", "model")
    np.testing.assert_array_equal(np.asarray(placed["params"]["kernel"]),
                                  np.asarray(nn.meta.unbox(variables)["params"]["kernel"]))


def test_with_logical_constraint_applies_on_cpu(rng):
    mesh = make_mesh({"data": 4, "model": 2})
    x = jnp.asarray(rng.standard_normal((8, 6, 4, 2)), jnp.float32)

    @jax.jit
    def f(x):
        return with_logical_constraint(x * 2.0, ("batch", "length", "heads", "head_dim"), mesh)

    y = f(x)
    assert y.sharding.spec == P("data", None, "model")
    np.testing.assert_allclose(np.asarray(y), 2 * np.asarray(x))
    assert with_logical_constraint(x, ("batch", "length", "heads", "head_dim")) is x  # no mesh: identity
    with pytest.raises(ValueError, match="names"):
        with_logical_constraint(x, ("batch",), mesh)
