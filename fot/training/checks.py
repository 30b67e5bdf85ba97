"""Checks of the training settings, batches and metrics: ``ConfigError`` (one line, exit 2 in ``fot.train``) and
the NaN guard (``TrainingDivergedError``, exit 3)."""
from __future__ import annotations

import math

import numpy as np

from fot.model import check_token_ids


class ConfigError(ValueError):
    """A user-facing configuration problem (reported by ``fot.train`` as one line, no traceback)."""


def check_int(name: str, value, low: int, none_ok: bool = False) -> None:
    """``train.<name>`` must be an integer >= ``low`` (a string or a float such as 5.5 is an error, not
    something to convert: TOTAL_STEPS = 5.5 used to train 6 steps)."""
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ConfigError(f"train.{name} must be an integer >= {low}{' or None' if none_ok else ''}, got "
                          f"{value!r} ({type(value).__name__})")


def check_layout(name: str, batch_size: int, pack: int, data_size: int, microbatches: int) -> None:
    if pack < 1 or batch_size % pack:
        raise ConfigError(f"{name}: batch_size={batch_size} is not divisible by pack={pack}")
    if batch_size % data_size:
        raise ConfigError(f"{name}: batch_size={batch_size} is not divisible by the mesh data axis "
                          f"({data_size} devices)")
    if batch_size % (microbatches * pack):
        raise ConfigError(f"{name}: batch_size={batch_size} cannot be split into num_microbatches="
                          f"{microbatches} micro-batches of whole packs (pack={pack})")


def check_batch(batch, vocab_size: int | None, what: str) -> None:
    """Token ids of a host ``Batch`` must lie in [0, vocab_size) (else the embedding gives NaN or another
    token's row silently); a cheap host-side check, no device sync."""
    if vocab_size is None:
        return
    for key in ("inputs", "targets"):
        try:
            check_token_ids(getattr(batch, key), vocab_size, f"{what} ({key})")
        except ValueError as e:
            raise ConfigError(str(e)) from None


class TrainingDivergedError(RuntimeError):
    """Loss, gradient norm or parameter norm became NaN/inf; the last good checkpoint is named and kept."""


def nan_guard(ckpt, step: int, m: dict[str, float]) -> None:
    """The NaN guard for the metrics of ``step`` (``ckpt``: the loop's ``Checkpointer``): loss and gradient
    norm come from the parameters of step ``step - 1``, ``param_norm`` from the parameters after the update.
    A finite loss verifies a checkpoint at ``step - 1``; a non-finite one rejects it (its parameters produced
    the loss). A non-finite ``param_norm`` means the update itself diverged (the loop saves step ``step``
    only after this guard)."""
    loss_ok = math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])
    if loss_ok and ckpt.unverified == step - 1:
        ckpt.verify(step - 1)
    if loss_ok and math.isfinite(m["param_norm"]):
        return
    rejected = ""
    if not loss_ok and ckpt.unverified == step - 1:
        path = ckpt.reject(step - 1, "diverged")
        rejected = (f" Checkpoint step {step - 1} (whose parameters produced this loss) was moved to {path}."
                    if path else f" Checkpoint step {step - 1} (whose parameters produced this loss) was deleted.")
    good = ckpt.last_good()
    where = (f"Last good checkpoint: step {good} under {ckpt.directory}" if good is not None
             else "No good checkpoint was saved")
    what = (f"loss {m['loss']} (grad norm {m['grad_norm']})" if not loss_ok else
            f"parameter norm {m['param_norm']} after the update (loss {m['loss']:.4g}, "
            f"grad norm {m['grad_norm']:.4g})")
    raise TrainingDivergedError(f"training diverged at step {step}: {what}; stopping. {where}.{rejected}")
