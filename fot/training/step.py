"""Loss, metrics and the jitted train / eval steps.

Loss: ``optax.softmax_cross_entropy_with_integer_labels`` in float32, weighted by ``loss_mask`` and
averaged per token over the whole (global) batch; accuracy = argmax hits on masked tokens / count.

Gradient accumulation: the batch is split into ``num_microbatches`` = m micro-batches of whole k-packs
(strided over packs, see ``split_microbatches``; ``B / m`` divisible by ``pack``), each with its own
crossbatch plan (the d extra rows of a row stay inside its micro-batch, as in the reference's sliced
micro-batches); per-micro-batch sums of loss and gradients are accumulated in a ``lax.scan`` and
divided by the global token count, so the update equals the un-accumulated one up to float rounding.

The crossbatch size is called d (the paper's word, as in ``fot.ops`` and ``fot.model``):
``extra_rows`` is the int32 ``[B/m, d]`` plan of which rows each row attends to.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fot.data.batch import Batch
from fot.model import memory_temperatures
from fot.ops import crossbatch_plan
from fot.parallel import DATA_AXIS, multihost
from fot.training.checks import check_batch
from fot.training.state import TrainState



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


def plan_rows(batch_size: int, d: int, pack: int, stepping: bool = True) -> np.ndarray | None:
    """int32 [batch_size, d]: ``fot.ops.crossbatch_plan`` for d extra contexts per row, or None for d = 0."""
    if d == 0:
        return None
    return np.asarray(crossbatch_plan(batch_size, d, pack=pack, stepping=stepping), np.int32)


def batch_sums(model, params, batch: Batch, extra_rows, mesh=None) -> dict[str, jax.Array]:
    """``token_sums`` of ``model`` on ``batch`` (float32 scalars ``loss``, ``correct``, ``tokens``)."""
    logits = model.apply({"params": params}, batch.inputs, positions=batch.positions,
                         segment_ids=batch.segment_ids, extra_rows=extra_rows, mesh=mesh)  # [B, L, V]
    return token_sums(logits, batch.targets, batch.loss_mask)


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

    batch: a ``Batch`` of [B, L] arrays; extra_rows: int32 [B/m, d] plan of ONE micro-batch
    (identical for every micro-batch) or None. metrics: dict of float32 scalars ``loss``,
    ``accuracy``, ``tokens``, ``grad_norm`` (of the gradients), ``param_norm`` (of the updated params), and
    ``qk_temperature`` (mean QK-norm temperature of the memory layers) when the model has ``qk_norm``.
    Each distinct extra_rows shape (i.e. each d) compiles once.
    """
    m = int(num_microbatches)

    def loss_fn(params, micro: Batch, extra_rows):
        sums = batch_sums(model, params, micro, extra_rows, mesh)
        return sums["loss"], sums

    grad_fn = jax.grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch: Batch, extra_rows):
        # scalar: masked tokens of the global batch (batch fields [B, L])
        total = jnp.maximum(jnp.sum(batch.loss_mask.astype(jnp.float32)), 1.0)
        if m == 1:
            grads, sums = grad_fn(state.params, batch, extra_rows)
        else:
            micro = batch.map(lambda x: split_microbatches(x, m, pack))  # fields [m, B/m, L]

            def body(carry, mb):  # mb: one micro-batch, fields [B/m, L]
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
    # ``jitted._cache_size()`` = number of compilations (one per distinct d)
    return jax.jit(step, in_shardings=(state_shardings, batch_sharding, replicated),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,))


def make_eval_step(model, *, mesh: Mesh | None = None, param_shardings=None,
                   batch_sharding: NamedSharding | None = None) -> Callable:
    """Returns ``eval_step(params, batch, extra_rows) -> sums`` (``loss``/``correct``/``tokens`` sums)."""

    def step(params, batch: Batch, extra_rows):
        return batch_sums(model, params, batch, extra_rows, mesh)

    if mesh is None:
        return jax.jit(step)
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = batch_sharding or NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    return jax.jit(step, in_shardings=(param_shardings, batch_sharding, replicated), out_shardings=replicated)


def evaluate(eval_fn, params, data, d: int, steps: int, sharding, stepping: bool = True,
             vocab_size: int | None = None) -> dict[str, float]:
    """Per-token loss/accuracy over the next ``steps`` batches of ``data`` with d crossbatch contexts."""
    totals = {"loss": 0.0, "correct": 0.0, "tokens": 0.0}
    extra_rows = plan_rows(data.batch_size, d, data.pack, stepping)  # int32 [B, d] or None
    for i in range(steps):
        host_batch = next(data)
        check_batch(host_batch, vocab_size, f"eval batch {i + 1}")
        sums = jax.device_get(eval_fn(params, put_batch(host_batch, sharding, data.batch_size), extra_rows))
        for k in totals:
            totals[k] += float(sums[k])
    n = max(totals["tokens"], 1.0)
    return {"loss": totals["loss"] / n, "accuracy": totals["correct"] / n, "tokens": totals["tokens"]}


def put_batch(batch: Batch, sharding: NamedSharding | None, global_rows: int | None = None) -> Batch:
    """Host numpy ``Batch`` → global jax arrays sharded over the data axis
    (``fot.parallel.multihost.make_global_batch``), or plain device arrays without a sharding.

    global_rows: rows of the global batch. With several processes, a batch of that many rows (a
    process-independent iterator) is cut to this process's rows (``fot.parallel.multihost.local_rows``);
    a process-sharded iterator's batch (its share of the rows) is used as it is."""
    if sharding is None:
        return batch.map(jnp.asarray)
    if global_rows is not None:
        batch = multihost.local_rows(batch, sharding, global_rows)
    return Batch(**multihost.make_global_batch(batch._asdict(), sharding))
