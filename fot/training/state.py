"""Train state (step, params, optimizer state, RNG) and its shardings on a mesh."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fot.parallel import param_shardings


@flax.struct.dataclass
class TrainState:
    """step: int32 scalar; params: float32 tree; opt_state: optax state; rng: uint32 [2] key data."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def _dummy_inputs(batch_size: int, seq_len: int):
    return jnp.zeros((batch_size, seq_len), jnp.int32)


def abstract_variables(model: nn.Module, seq_len: int):
    """Boxed abstract variables (with logical partitioning metadata) of ``model`` on [1, seq_len] tokens."""
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), _dummy_inputs(1, seq_len)))


def state_shardings(model: nn.Module, optimizer: optax.GradientTransformation, mesh: Mesh, seq_len: int,
                    rules=None) -> TrainState:
    """``TrainState`` of ``NamedSharding``: params by logical axis rules, optimizer state like its
    params where it mirrors them (Adam moments), everything else (counts, Adafactor's factored
    statistics, step, RNG) replicated."""
    boxed = abstract_variables(model, seq_len)
    p_shard = param_shardings(boxed, mesh, rules)["params"]
    params_abs = nn.meta.unbox(boxed)["params"]
    opt_abs = jax.eval_shape(optimizer.init, params_abs)
    replicated = NamedSharding(mesh, PartitionSpec())
    # Param-shaped leaves (Adam moments, Adafactor momentum) follow their param; param-derived leaves
    # of another shape (Adafactor's factored v_row / v_col) and non-param leaves are replicated.
    opt_shard = optax.tree_map_params(
        optimizer, lambda leaf, shard, p: shard if tuple(leaf.shape) == tuple(p.shape) else replicated,
        opt_abs, p_shard, params_abs, transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, params=p_shard, opt_state=opt_shard, rng=replicated)


def _state_key(seed: int):
    """(params init key, train-state RNG key) of a run's seed."""
    return jax.random.split(jax.random.PRNGKey(seed))


def abstract_params(model: nn.Module, seq_len: int, shardings: TrainState):
    """The params as a tree of ``jax.ShapeDtypeStruct`` with their shardings (a restore target)."""
    params = nn.meta.unbox(abstract_variables(model, seq_len))["params"]
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params, shardings.params)


def state_from_params(params, optimizer: optax.GradientTransformation, seed: int, shardings: TrainState) -> TrainState:
    """A fresh train state (step 0, new optimizer state and RNG) around existing ``params`` (already placed
    with ``shardings.params``; donated): ``train.init_from``."""
    def init(params):
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                          rng=jax.random.key_data(_state_key(seed)[1]))

    return jax.jit(init, in_shardings=(shardings.params,), out_shardings=shardings, donate_argnums=0)(params)


def create_train_state(model: nn.Module, optimizer: optax.GradientTransformation, mesh: Mesh, seq_len: int,
                       seed: int, shardings: TrainState | None = None) -> TrainState:
    """Initialise params (``init_std`` normal) and optimizer state directly on the mesh."""
    shardings = shardings or state_shardings(model, optimizer, mesh, seq_len)

    def init():
        init_key, state_key = _state_key(seed)
        params = nn.meta.unbox(model.init(init_key, _dummy_inputs(1, seq_len)))["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                          rng=jax.random.key_data(state_key))

    return jax.jit(init, out_shardings=shardings)()


def abstract_train_state(model: nn.Module, optimizer: optax.GradientTransformation, mesh: Mesh, seq_len: int,
                         shardings: TrainState | None = None) -> TrainState:
    """``TrainState`` of ``jax.ShapeDtypeStruct`` with shardings (the orbax restore target)."""
    shardings = shardings or state_shardings(model, optimizer, mesh, seq_len)
    abs_state = jax.eval_shape(lambda: _abstract(model, optimizer, seq_len))
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_state, shardings)


def _abstract(model, optimizer, seq_len):
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), _dummy_inputs(1, seq_len)))["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      rng=jax.random.key_data(jax.random.PRNGKey(0)))


def count_params(params) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))
