"""Optimizers and learning-rate schedules, built from optax pieces (gin-free factories).

* ``adafactor`` + inverse-square-root schedule with linear warm-up: the paper's small models
  (App.: AdaFactor, β1 = 0.9, warm-up 1000, max lr 2e-2 / min lr 1e-2 for 37M).
* ``adamw`` + warm-up-cosine or constant lr: LongLLaMA fine-tuning (b2 = 0.95, constant 2e-5,
  weight decay 0.01); weight decay optionally masked off norms and embeddings.
* Global-norm clipping in front of either. Gradient accumulation lives in ``fot.training.step``
  (micro-batches are whole k-packs, accumulated inside one jitted step), so one optimizer update is
  one training step and the curriculum / checkpoint step counters need no translation.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[Any], Any]


def inverse_sqrt_schedule(peak_lr: float, warmup_steps: int, min_lr: float = 0.0) -> optax.Schedule:
    """Linear warm-up 0 → ``peak_lr`` over ``warmup_steps``, then ``peak_lr·sqrt(warmup/step)``, floored at ``min_lr``."""
    if peak_lr <= 0 or warmup_steps < 0 or min_lr < 0:
        raise ValueError(f"inverse_sqrt_schedule: need peak_lr > 0, warmup_steps >= 0, min_lr >= 0; got "
                         f"{peak_lr}, {warmup_steps}, {min_lr}")
    warm = max(int(warmup_steps), 1)

    def decay(count):
        count = jnp.asarray(count, jnp.float32) + warm  # join_schedules restarts the count at 0
        return jnp.maximum(peak_lr * jnp.sqrt(warm / count), min_lr)

    if warmup_steps == 0:
        return lambda count: jnp.maximum(peak_lr * jnp.sqrt(1.0 / jnp.maximum(jnp.asarray(count, jnp.float32), 1.0)),
                                         min_lr)
    return optax.join_schedules([optax.linear_schedule(0.0, peak_lr, warm), decay], [warm])


def make_schedule(kind: str = "constant", *, peak_lr: float = 1e-3, warmup_steps: int = 0,
                  decay_steps: int | None = None, end_lr: float = 0.0, min_lr: float = 0.0,
                  decay_start: int | None = None) -> optax.Schedule:
    """Learning-rate schedule by name.

    kind: ``constant`` (optional linear warm-up from 0), ``inverse_sqrt`` (warm-up then 1/sqrt,
    floored at ``min_lr``), ``warmup_cosine`` (``optax.warmup_cosine_decay_schedule`` to ``end_lr``
    at ``decay_steps``, which counts the warm-up as in optax), ``warmup_stable_decay`` (warm-up,
    ``peak_lr`` held until step ``decay_start``, then a cosine to ``end_lr`` at step ``decay_steps``;
    before ``decay_start`` it equals ``constant`` step for step, so a constant-lr run can be resumed
    into its decay phase).
    """
    if kind == "warmup_stable_decay":
        return _warmup_stable_decay(peak_lr, warmup_steps, decay_start, decay_steps, end_lr)
    if kind == "constant":
        if warmup_steps > 0:
            return optax.join_schedules([optax.linear_schedule(0.0, peak_lr, warmup_steps),
                                         optax.constant_schedule(peak_lr)], [warmup_steps])
        return optax.constant_schedule(peak_lr)
    if kind == "inverse_sqrt":
        return inverse_sqrt_schedule(peak_lr, warmup_steps, min_lr)
    if kind == "warmup_cosine":
        if decay_steps is None or decay_steps <= warmup_steps:
            raise ValueError(f"warmup_cosine needs decay_steps > warmup_steps, got decay_steps={decay_steps}, "
                             f"warmup_steps={warmup_steps}")
        return optax.warmup_cosine_decay_schedule(0.0, peak_lr, warmup_steps, decay_steps, end_lr)
    raise ValueError(f"unknown schedule kind {kind!r}; expected constant, inverse_sqrt, warmup_cosine or "
                     "warmup_stable_decay")


def _warmup_stable_decay(peak_lr: float, warmup_steps: int, decay_start: int | None, decay_steps: int | None,
                         end_lr: float) -> optax.Schedule:
    """Linear warm-up to ``peak_lr``, constant until ``decay_start``, cosine to ``end_lr`` at ``decay_steps``."""
    if decay_start is None or decay_steps is None or not warmup_steps <= decay_start < decay_steps:
        raise ValueError(f"warmup_stable_decay needs warmup_steps <= decay_start < decay_steps, got warmup_steps="
                         f"{warmup_steps}, decay_start={decay_start}, decay_steps={decay_steps}")
    if not 0 <= end_lr <= peak_lr:
        raise ValueError(f"warmup_stable_decay needs 0 <= end_lr <= peak_lr, got end_lr={end_lr}, peak_lr={peak_lr}")
    decay = optax.cosine_decay_schedule(peak_lr, decay_steps - decay_start, alpha=end_lr / peak_lr)
    stable = make_schedule("constant", peak_lr=peak_lr, warmup_steps=warmup_steps)
    return optax.join_schedules([stable, decay], [decay_start])


def _path_names(path) -> list[str]:
    out = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                out.append(str(getattr(entry, attr)))
                break
    return out


def decay_mask(params, exclude: tuple[str, ...] = ("norm", "embed")):
    """Pytree of bools: True where weight decay applies (not 1-D params, no path part containing ``exclude``)."""
    def keep(path, leaf):
        names = [n.lower() for n in _path_names(path)]
        if getattr(leaf, "ndim", 0) <= 1:
            return False
        return not any(word in n for n in names for word in exclude)
    return jax.tree_util.tree_map_with_path(keep, params)


def name_mask(params, names) -> Any:
    """Pytree of bools: True for leaves whose path contains one of ``names`` (exact key match)."""
    names = set(names)
    return jax.tree_util.tree_map_with_path(lambda path, _: bool(names & set(_path_names(path))), params)


def make_optimizer(name: str = "adamw", learning_rate: float | optax.Schedule = 1e-3, *, b1: float = 0.9,
                   b2: float = 0.95, eps: float = 1e-8, weight_decay: float = 0.0,
                   decay_norms_and_embeddings: bool = True, clip_norm: float | None = 1.0,
                   adafactor_decay_rate: float = 0.8,
                   adafactor_param_scale: bool = True,
                   lr_multipliers: dict[str, float] | None = None) -> optax.GradientTransformation:
    """Optimizer factory.

    name: ``adamw`` or ``adafactor``. ``learning_rate``: float or optax schedule (see ``make_schedule``).
    ``decay_norms_and_embeddings=False`` masks weight decay off norms, embeddings and 1-D params.
    ``clip_norm``: global-norm clipping threshold (None or <= 0 disables).
    Adafactor uses ``b1`` as momentum (paper: 0.9; None disables) and optax's factored second moments.
    ``lr_multipliers``: ``{param name: factor}``; the updates of every param whose path holds that
    name (e.g. ``"qk_log_scale"``, the memory layers' log-temperature) are multiplied by ``factor``.
    """
    if isinstance(learning_rate, (int, float)) and learning_rate <= 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
    if name == "adamw":
        mask = None if decay_norms_and_embeddings else decay_mask
        opt = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask)
    elif name == "adafactor":
        opt = optax.adafactor(learning_rate, decay_rate=adafactor_decay_rate, momentum=b1,
                              multiply_by_parameter_scale=adafactor_param_scale,
                              weight_decay_rate=weight_decay or None,
                              weight_decay_mask=None if decay_norms_and_embeddings else decay_mask)
    else:
        raise ValueError(f"unknown optimizer {name!r}; expected adamw or adafactor")
    for pname, factor in sorted((lr_multipliers or {}).items()):
        if not factor > 0:
            raise ValueError(f"lr_multipliers[{pname!r}] must be > 0, got {factor}")
        opt = optax.chain(opt, optax.masked(optax.scale(float(factor)),
                                            lambda params, n=pname: name_mask(params, (n,))))
    if clip_norm is not None and clip_norm > 0:
        opt = optax.chain(optax.clip_by_global_norm(clip_norm), opt)
    return opt
