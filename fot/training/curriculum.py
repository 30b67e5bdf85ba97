"""Crossbatch curricula: which d (number of extra contexts per memory layer) each training step uses.

The paper's schedules (App. "Schedule of d"):
* ``ConstantD(d)``;
* ``SwitchAtStep(before=2, after=64, step=450_000)``;
* ``SwitchOnAccuracy(before=1, after=128, threshold=0.98)`` (dictionary lookup: d = 1 until the
  training accuracy reaches 98 %, then 128);
* ``RandomD(values=(2, 128), seed)`` (184M fine-tuning: d drawn per step).

Every curriculum is deterministic given its state, and ``get_state``/``set_state`` make a resumed run
choose exactly the same d sequence. ``values`` lists every d the curriculum can emit (each distinct
d has its own static ``extra_rows`` shape, hence one compilation).

``SwitchOnAccuracy`` sees metrics one step late (the loop reads step s's metrics after dispatching
step s+1, keeping host and device busy), so an observation at step s takes effect at step s + 2
regardless of when it is made; that keeps interrupted and uninterrupted runs identical.
"""
from __future__ import annotations

import abc
from typing import Any, Sequence

import numpy as np


def _check_d(name: str, d: int) -> int:
    d = int(d)
    if d < 0:
        raise ValueError(f"{name} must be >= 0 extra contexts, got {d}")
    return d


class Curriculum(abc.ABC):
    """Base class: ``d_at(step)``, ``observe(step, metrics)``, ``values``, ``get_state``/``set_state``."""

    values: tuple[int, ...] = ()

    @abc.abstractmethod
    def d_at(self, step: int) -> int:
        """The number of extra contexts d for training step ``step``."""

    def observe(self, step: int, metrics: dict[str, float]) -> None:
        """Training metrics of ``step`` (e.g. ``{"accuracy": 0.97, "loss": 0.1}``); default: ignored."""

    def get_state(self) -> dict[str, Any]:
        return {}

    def set_state(self, state: dict[str, Any]) -> None:
        del state

    def describe(self) -> str:
        return type(self).__name__


class ConstantD(Curriculum):
    def __init__(self, d: int = 1):
        self.d = _check_d("d", d)
        self.values = (self.d,)

    def d_at(self, step: int) -> int:
        return self.d

    def describe(self) -> str:
        return f"constant d={self.d}"


class SwitchAtStep(Curriculum):
    """d = ``before`` for steps < ``step``, then ``after``."""

    def __init__(self, before: int = 2, after: int = 64, step: int = 1000):
        self.before, self.after = _check_d("before", before), _check_d("after", after)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        self.step = int(step)
        self.values = tuple(sorted({self.before, self.after}))

    def d_at(self, step: int) -> int:
        return self.before if step < self.step else self.after

    def describe(self) -> str:
        return f"d={self.before} until step {self.step}, then d={self.after}"


class SwitchOnAccuracy(Curriculum):
    """d = ``before`` until the training accuracy reaches ``threshold``, then ``after`` for good.

    ``window``: the mean accuracy over the last ``window`` observed steps is compared (1 = the step's
    own accuracy). The metric key is ``metric`` (default ``accuracy``).
    """

    LAG = 2  # observation at step s takes effect at step s + LAG (see module docstring)

    def __init__(self, before: int = 1, after: int = 128, threshold: float = 0.98, window: int = 1,
                 metric: str = "accuracy"):
        self.before, self.after = _check_d("before", before), _check_d("after", after)
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.threshold, self.window, self.metric = float(threshold), int(window), metric
        self.values = tuple(sorted({self.before, self.after}))
        self.switch_step: int | None = None
        self._recent: list[float] = []

    def d_at(self, step: int) -> int:
        return self.after if self.switch_step is not None and step >= self.switch_step else self.before

    def observe(self, step: int, metrics: dict[str, float]) -> None:
        if self.switch_step is not None or self.metric not in metrics:
            return
        self._recent = (self._recent + [float(metrics[self.metric])])[-self.window:]
        if len(self._recent) == self.window and float(np.mean(self._recent)) >= self.threshold:
            self.switch_step = int(step) + self.LAG

    def get_state(self) -> dict[str, Any]:
        return {"switch_step": self.switch_step, "recent": list(self._recent)}

    def set_state(self, state: dict[str, Any]) -> None:
        self.switch_step = None if state.get("switch_step") is None else int(state["switch_step"])
        self._recent = [float(x) for x in state.get("recent", [])]

    def describe(self) -> str:
        where = "" if self.switch_step is None else f" (switched at step {self.switch_step})"
        return f"d={self.before} until train {self.metric} >= {self.threshold}, then d={self.after}{where}"


class RandomD(Curriculum):
    """d drawn per step from ``values`` (with optional ``probs``), a pure function of (seed, step)."""

    def __init__(self, values: Sequence[int] = (2, 128), seed: int = 0, probs: Sequence[float] | None = None):
        vals = [_check_d("values", v) for v in values]
        if not vals:
            raise ValueError("values must not be empty")
        if probs is not None:
            probs = np.asarray(probs, np.float64)
            if probs.shape != (len(vals),) or np.any(probs < 0) or probs.sum() <= 0:
                raise ValueError(f"probs must be {len(vals)} non-negative numbers, got {probs}")
            probs = probs / probs.sum()
        self._choices, self._probs, self.seed = vals, probs, int(seed)
        self.values = tuple(sorted(set(vals)))

    def d_at(self, step: int) -> int:
        rng = np.random.default_rng([self.seed, 0x5EED, int(step)])
        return int(self._choices[int(rng.choice(len(self._choices), p=self._probs))])

    def describe(self) -> str:
        return f"d drawn per step from {self._choices}"
