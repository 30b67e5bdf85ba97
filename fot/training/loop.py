"""The training loop: ``train(...)`` (gin-free; ``fot.train`` binds it from gin files as ``train.*``).

``train`` takes the Trainer's settings (``fot.training.settings``: run, checkpointing, evaluation,
logging) as flat keyword arguments (``fot.keyword_api``) and runs ``fot.training.trainer.Trainer``
(restore → step → evaluate → finish).

One step: d from the curriculum → ``extra_rows = crossbatch_plan(B/m, d, pack=k)`` (a static shape
per d, so each distinct d compiles once) → jitted, donated train step on the mesh. Metrics of step
s are read after step s+1 is dispatched (host and device stay busy); they feed the curriculum, the
NaN guard, TensorBoard and the console. Checkpoints (orbax; synchronous unless ``async_checkpointing``)
every N steps, at the end, and on SIGTERM; a run restarted on the same workdir resumes from the latest
checkpoint exactly (params, optimizer, step, RNG, data cursor, curriculum). A time budget
(``max_train_seconds``) ends training early and still evaluates and saves.

``init_from=W`` starts a new run from the params of run ``W`` (its latest checkpoint, or ``init_from_step``;
a trained run or one imported by ``fot.convert.from_hf``) with a fresh optimizer state at step 0: the
params are restored straight into their shardings (no gather on one host) after a name/shape/dtype check
against the model, and the first evaluation runs at step 0, before any update. Once the new run has
checkpoints of its own, restarting it resumes from them (``init_from`` is then ignored).
"""
from __future__ import annotations

import signal
from typing import Any, Callable, Sequence

import optax

from fot.keyword_api import keyword_api
from fot.model import ModelConfig
from fot.training.checks import ConfigError, TrainingDivergedError  # noqa: F401  (raised by train)
from fot.training.settings import CheckpointSettings, EvalSettings, LogSettings, RunSettings
from fot.training.trainer import Trainer


class StopSignal:
    """Sets ``requested`` on SIGTERM (TPU VM preemption): the loop saves a checkpoint and exits cleanly."""

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM,)):
        self.requested = False
        self.signum = None
        self._previous = {}
        for s in signals:
            self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        del frame
        self.requested, self.signum = True, signum

    def __call__(self) -> bool:
        return self.requested

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)


def run_training(*, workdir: str, model_config: ModelConfig, train_data, optimizer: optax.GradientTransformation,
                 run: RunSettings, checkpointing: CheckpointSettings, evaluation: EvalSettings, logging: LogSettings,
                 should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Train ``Decoder(model_config)`` on ``train_data`` (a ``Batch`` iterator or a factory of one).

    :func:`train` is this function with the fields of the four settings groups as flat keyword arguments:
    the ``train.*`` bindings of gin/*.gin (``RunSettings``: total_steps, curriculum, mesh_config, fsdp,
    num_microbatches, stepping, seed, max_train_seconds; ``CheckpointSettings``: checkpoint_every,
    keep_checkpoints, async_checkpointing, restore_fallback, init_from, init_from_step; ``EvalSettings``:
    eval_data, eval_every, eval_steps, eval_num_extra (the d values evaluated), final_eval;
    ``LogSettings``: log_every, stream, config_writer).

    ``final_eval(model, params) -> dict``: run once after training (not after a stop signal), e.g. the
    dictionary-lookup accuracy vs tokens in memory (``fot.eval.dictionary.evaluate`` bound in gin); its
    result goes to ``results["final_eval"]`` (console, ``results.json``).

    Returns the results dict (also printed as the final JSON line and written to workdir/results.json).
    Raises ``ConfigError`` for bad settings, ``TrainingDivergedError`` on a NaN/inf loss, gradient or
    parameter norm, and ``OSError`` (``CheckpointIOError``) for I/O failures and damaged checkpoints.
    ``async_checkpointing``: False (default) = each checkpoint is committed before the next step (a kill
    loses at most ``checkpoint_every`` steps); True = orbax writes in the background (a kill also loses the
    steps trained during the save in flight). ``restore_fallback``: resume from the newest intact checkpoint
    when newer ones are damaged (moved to ``workdir/rejected_checkpoints``); False refuses with the damaged
    step named.
    """
    return Trainer(workdir, model_config, train_data, optimizer, run, checkpointing, evaluation, logging,
                   should_stop).run()


train = keyword_api(run_training, "train", run=RunSettings, checkpointing=CheckpointSettings,
                    evaluation=EvalSettings, logging=LogSettings)
