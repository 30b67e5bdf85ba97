"""Loss, metrics and the jitted train / eval steps.

Loss: ``optax.softmax_cross_entropy_with_integer_labels`` in float32, weighted by ``loss_mask`` and
averaged per token over the whole (global) batch; accuracy = argmax hits on masked tokens / count.

Gradient accumulation: the batch is split into ``num_microbatches`` micro-batches of whole k-packs
(strided over packs, see ``split_microbatches``) (``B / m`` divisible by ``pack``), each with its own crossbatch plan (extra rows stay
inside the micro-batch, as in the reference's sliced micro-batches); per-micro-batch sums of loss
and gradients are accumulated in a ``lax.scan`` and divided by the global token count, so the
update equals the un-accumulated one up to float rounding.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fot.data.pipeline import make_global_batch
from fot.model import memory_temperatures
from fot.ops import crossbatch_plan
from fot.parallel import DATA_AXIS, multihost
from fot.training.state import TrainState

BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def token_sums(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> dict[str, jax.Array]:
    """Sums over masked tokens: ``loss`` (CE), ``correct`` (argmax hits), ``tokens`` (mask total).

    logits float [B,T,V]; targets int [B,T]; loss_mask float [B,T].
    """
    mask = loss_mask.astype(jnp.float32)
    logits = logits.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return {"loss": jnp.sum(ce * mask), "correct": jnp.sum(argmax_hits(logits, targets) * mask),
            "tokens": jnp.sum(mask)}


def argmax_hits(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """float32 [B,T]: 1 where ``argmax(logits, -1) == targets`` (ties go to the first index, as argmax).

    The target is the argmax iff no logit is larger and no earlier index ties with it: a boolean
    any-reduction that XLA fuses with the loss's reductions over the vocabulary, instead of argmax's
    (value, index) pair reduction (measured ≈4% of the 37M CPU train step; BUILD_NOTES issue 14)."""
    label = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)
    iota = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    ahead = (logits > label) | ((logits == label) & (iota < targets[..., None]))
    return jnp.logical_not(ahead.any(-1)).astype(jnp.float32)


def plan_rows(batch_size: int, num_extra: int, pack: int, stepping: bool = True) -> np.ndarray | None:
    """``fot.ops.crossbatch_plan`` or None for d = 0 (no extra contexts)."""
    if num_extra == 0:
        return None
    return np.asarray(crossbatch_plan(batch_size, num_extra, pack=pack, stepping=stepping), np.int32)


def _apply(model, params, batch, extra_rows, mesh):
    return model.apply({"params": params}, batch["inputs"], positions=batch["positions"],
                       segment_ids=batch["segment_ids"], extra_rows=extra_rows, mesh=mesh)


def split_microbatches(x, m: int, pack: int):
    """[B, ...] → [m, B/m, ...]: micro-batch j holds packs j, j+m, j+2m, … (whole k-packs, in order).

    Strided over packs so that, with the batch sharded over ``data``, every device keeps a share of
    every micro-batch. Works on numpy and jax arrays.
    """
    b = x.shape[0]
    n_packs = b // pack
    y = x.reshape((n_packs // m, m, pack) + x.shape[1:])
    y = y.swapaxes(0, 1)
    return y.reshape((m, b // m) + x.shape[1:])


def make_train_step(model, optimizer: optax.GradientTransformation, *, mesh: Mesh | None = None,
                    num_microbatches: int = 1, pack: int = 1, state_shardings: TrainState | None = None,
                    batch_sharding: NamedSharding | None = None) -> Callable:
    """Returns ``step(state, batch, extra_rows) -> (state, metrics)``, jitted with shardings, state donated.

    batch: dict of [B, L] arrays (``BATCH_KEYS``); extra_rows: int32 [B/m, d] plan of ONE micro-batch
    (identical for every micro-batch) or None. metrics: dict of float32 scalars ``loss``,
    ``accuracy``, ``tokens``, ``grad_norm`` (of the gradients), ``param_norm`` (of the updated params), and
    ``qk_temperature`` (mean QK-norm temperature of the memory layers) when the model has ``qk_norm``.
    Each distinct extra_rows shape (i.e. each d) compiles once.
    """
    m = int(num_microbatches)

    def loss_fn(params, micro, rows):
        sums = token_sums(_apply(model, params, micro, rows, mesh), micro["targets"], micro["loss_mask"])
        return sums["loss"], sums

    grad_fn = jax.grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch: dict[str, jax.Array], extra_rows):
        batch = {k: batch[k] for k in BATCH_KEYS}
        total = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
        if m == 1:
            grads, sums = grad_fn(state.params, batch, extra_rows)
        else:
            micro = jax.tree.map(lambda x: split_microbatches(x, m, pack), batch)

            def body(carry, mb):
                g_acc, s_acc = carry
                g, s = grad_fn(state.params, mb, extra_rows)
                return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, s_acc, s)), None

            zeros_g = jax.tree.map(jnp.zeros_like, state.params)
            zeros_s = {"loss": jnp.zeros((), jnp.float32), "correct": jnp.zeros((), jnp.float32),
                       "tokens": jnp.zeros((), jnp.float32)}
            (grads, sums), _ = jax.lax.scan(body, (zeros_g, zeros_s), micro)
        grads = jax.tree.map(lambda g: g / total, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0])
        # param_norm: the NaN guard's check of the updated parameters (a float32 norm is inf once any
        # parameter is non-finite or exceeds ~1e19), read one step late with the other metrics.
        metrics = {"loss": sums["loss"] / total, "accuracy": sums["correct"] / total,
                   "tokens": sums["tokens"], "grad_norm": optax.global_norm(grads),
                   "param_norm": optax.global_norm(params)}
        temps = memory_temperatures(model.config, params)
        if temps:  # mean QK-norm temperature of the memory layers (after the update)
            metrics["qk_temperature"] = jnp.mean(jnp.stack([t.mean() for t in temps.values()]))
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
        return new_state, metrics

    if mesh is None:
        return jax.jit(step, donate_argnums=(0,))
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = batch_sharding or NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    in_shardings = (state_shardings, {k: batch_sharding for k in BATCH_KEYS}, replicated)
    out_shardings = (state_shardings, replicated)
    jitted = jax.jit(step, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=(0,))

    def call(state, batch, extra_rows):
        return jitted(state, {k: batch[k] for k in BATCH_KEYS}, extra_rows)

    call.jitted = jitted  # ``call.jitted._cache_size()`` = number of compilations (one per distinct d)
    return call


def make_eval_step(model, *, mesh: Mesh | None = None, param_shardings=None,
                   batch_sharding: NamedSharding | None = None) -> Callable:
    """Returns ``eval_step(params, batch, extra_rows) -> sums`` (``loss``/``correct``/``tokens`` sums)."""

    def step(params, batch, extra_rows):
        logits = _apply(model, params, batch, extra_rows, mesh)
        return token_sums(logits, batch["targets"], batch["loss_mask"])

    if mesh is None:
        return jax.jit(step)
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = batch_sharding or NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    jitted = jax.jit(step, in_shardings=(param_shardings, {k: batch_sharding for k in BATCH_KEYS}, replicated),
                     out_shardings=replicated)
    return lambda params, batch, extra_rows: jitted(params, {k: batch[k] for k in BATCH_KEYS}, extra_rows)


def put_batch(batch: dict[str, np.ndarray], sharding: NamedSharding | None,
              global_rows: int | None = None) -> dict[str, Any]:
    """Host numpy batch (``BATCH_KEYS``) → global jax arrays sharded over the data axis
    (``fot.data.pipeline.make_global_batch``), or plain device arrays without a sharding.

    global_rows: rows of the global batch. With several processes, a batch of that many rows (a
    process-independent iterator) is cut to this process's rows (``fot.parallel.multihost.local_rows``);
    a process-sharded iterator's batch (its share of the rows) is used as it is."""
    batch = {k: np.asarray(batch[k]) for k in BATCH_KEYS}
    if sharding is None:
        return {k: jnp.asarray(x) for k, x in batch.items()}
    if global_rows is not None:
        batch = multihost.local_rows(batch, sharding, global_rows)
    return make_global_batch(batch, sharding)
