"""The Trainer's settings, grouped (t5x style): what to run, checkpointing, evaluation, logging.

``fot.training.loop.train`` (the function gin binds as ``train.*``) takes their fields as flat keyword
arguments (``fot.keyword_api``; a field's ``train.*`` name, where it differs, is its ``KEYWORD`` metadata);
library callers may build them directly and run a ``fot.training.trainer.Trainer``.
``check_settings`` raises ``ConfigError`` (one line naming the ``train.<name>`` binding, exit 2).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax

from fot.keyword_api import KEYWORD
from fot.training.checks import ConfigError, check_int
from fot.training.curriculum import Curriculum


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """What to run. ``curriculum``: d (crossbatch contexts per row) by step (None = constant d = 1);
    ``mesh_config``: axis name → size (``fot.parallel.make_mesh``); ``num_microbatches``: gradient
    accumulation (whole k-packs per micro-batch); ``stepping``: the k-packing plan's stepping variant;
    ``max_train_seconds``: time budget (training ends early, still evaluates and saves)."""

    total_steps: int
    curriculum: Curriculum | None = None
    mesh_config: Any = None
    fsdp: bool = False
    num_microbatches: int = 1
    stepping: bool = True
    seed: int = 0
    max_train_seconds: float | None = None


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
    """Orbax checkpoints every ``every`` steps (and at the end / on SIGTERM), the last ``keep`` kept;
    ``async_save``: False (default, as t5x) = the step loop waits until each checkpoint is committed, so a
    kill loses at most ``every`` steps; True = orbax writes while training continues (for models whose save
    stalls the step loop for long), and a kill during a save also loses the steps trained while it was
    being written (the newest committed checkpoint is then the previous one); ``restore_fallback``: resume
    from the newest intact checkpoint when newer ones are damaged;
    ``init_from`` / ``init_from_step``: a new run starts from that run's params (fresh optimizer)."""

    every: int = dataclasses.field(default=1000, metadata={KEYWORD: "checkpoint_every"})
    keep: int | None = dataclasses.field(default=3, metadata={KEYWORD: "keep_checkpoints"})
    async_save: bool = dataclasses.field(default=False, metadata={KEYWORD: "async_checkpointing"})
    restore_fallback: bool = True
    init_from: str | None = None
    init_from_step: int | None = None


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """Held-out loss/accuracy on ``data`` (an iterator, rewound before every evaluation) every ``every``
    steps (0 = only at the end) over ``steps`` batches, for each d of ``d_values`` (None = the
    curriculum's current d and 0); ``final_eval(model, params) -> dict`` once after training."""

    data: Any = dataclasses.field(default=None, metadata={KEYWORD: "eval_data"})
    every: int = dataclasses.field(default=0, metadata={KEYWORD: "eval_every"})
    steps: int = dataclasses.field(default=4, metadata={KEYWORD: "eval_steps"})
    d_values: Sequence[int] | None = dataclasses.field(default=None, metadata={KEYWORD: "eval_num_extra"})
    final_eval: Callable[[Any, Any], dict[str, Any]] | None = None


@dataclasses.dataclass(frozen=True)
class LogSettings:
    """Console / TensorBoard / metrics.jsonl every ``every`` steps; ``stream``: where the console lines and
    the final JSON line go (None = stdout); ``config_writer(workdir)``: writes the operative config."""

    every: int = dataclasses.field(default=50, metadata={KEYWORD: "log_every"})
    stream: Any = None
    config_writer: Callable[[str], None] | None = None


def check_settings(run: RunSettings, checkpointing: CheckpointSettings, evaluation: EvalSettings,
                   logging: LogSettings) -> None:
    """``ConfigError`` for a setting of the wrong type or range (named as its ``train.*`` binding)."""
    for name, value, low, none_ok in (
            ("total_steps", run.total_steps, 1, False), ("num_microbatches", run.num_microbatches, 1, False),
            ("checkpoint_every", checkpointing.every, 1, False), ("keep_checkpoints", checkpointing.keep, 1, True),
            ("log_every", logging.every, 1, False), ("eval_every", evaluation.every, 0, False),
            ("eval_steps", evaluation.steps, 1, False), ("seed", run.seed, 0, False)):
        check_int(name, value, low, none_ok)
    if checkpointing.init_from_step is not None and not checkpointing.init_from:
        raise ConfigError("train.init_from_step is set but train.init_from is not")
    budget = run.max_train_seconds
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0):
        raise ConfigError(f"train.max_train_seconds must be a number > 0 or None, got {budget!r}")


def mesh_devices(mesh_config) -> list:
    """All devices, or the first prod(sizes) when every axis size is given and fewer are asked for
    (so ``{"data": 1}`` runs on one device of a multi-device host)."""
    devices = jax.devices()
    sizes = list(mesh_config.values()) if isinstance(mesh_config, dict) else [s for _, s in (mesh_config or [])]
    if sizes and all(int(s) > 0 for s in sizes) and math.prod(int(s) for s in sizes) < len(devices):
        if jax.process_count() > 1:
            raise ConfigError(f"mesh_config {dict(mesh_config)} uses {math.prod(int(s) for s in sizes)} of the "
                              f"{len(devices)} devices of this {jax.process_count()}-process run; a multi-process "
                              f"mesh spans every device (use -1 for one axis)")
        return devices[:math.prod(int(s) for s in sizes)]
    return devices
