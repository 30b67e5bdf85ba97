"""Metrics: clu metric writers (TensorBoard event files in the workdir) + a console progress line.

Progress line: ``step 1200/3000 | loss 0.4321 | acc 0.873 | d 4 | 31.2k tok/s | 7.6 step/s | ETA 3m57s``.
The run ends with one JSON object on stdout (also ``workdir/results.json``).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any



class _JsonlWriter:
    """``workdir/metrics.jsonl``: one JSON object ``{"step": s, name: value, ...}`` per write. Always
    written next to the TensorBoard events (easy to read back in tests and scripts); also the
    fallback when clu's TensorBoard writer cannot import (no tensorflow/tensorboard installed)."""

    def __init__(self, workdir: str):
        self._f = open(os.path.join(workdir, "metrics.jsonl"), "a")

    def write_scalars(self, step, scalars):
        self._f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n")

    def write_hparams(self, hparams):
        self._f.write(json.dumps({"hparams": hparams}) + "\n")

    def flush(self):
        self._f.flush()

    def close(self):
        self._f.close()


def _make_writer(workdir: str, tensorboard: bool):
    if tensorboard:
        try:
            from clu import metric_writers
        except ImportError as e:  # clu's SummaryWriter needs tensorflow + tensorboard
            print(f"note: TensorBoard writer unavailable ({e}); writing {workdir}/metrics.jsonl", file=sys.stderr)
        else:
            tb = metric_writers.create_default_writer(workdir, just_logging=False, asynchronous=True)
            return _Both(tb, _JsonlWriter(workdir))
    return _JsonlWriter(workdir)


class _NullWriter:
    """The writer of an inactive logger (a process other than 0): accepts every call, writes nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class _Both:
    def __init__(self, *writers):
        self.writers = writers

    def __getattr__(self, name):
        def call(*args, **kwargs):
            for w in self.writers:
                getattr(w, name)(*args, **kwargs)
        return call


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class MetricsLogger:
    """Writes scalars to TensorBoard (``workdir/``) and prints progress lines to ``stream``."""

    def __init__(self, workdir: str, total_steps: int, *, stream=None, tensorboard: bool = True,
                 active: bool = True):
        self.total_steps = int(total_steps)
        self.stream = stream or sys.stdout
        self.active = bool(active)  # False on processes other than 0 of a multi-process run: writes nothing
        self.writer = _make_writer(workdir, tensorboard) if self.active else _NullWriter()
        self._t_last = None
        self._step_last = None
        self._tokens = 0.0

    def write_hparams(self, hparams: dict[str, Any]) -> None:
        self.writer.write_hparams({k: v for k, v in hparams.items() if isinstance(v, (int, float, str, bool))})

    def add_tokens(self, n: float) -> None:
        self._tokens += float(n)

    def progress(self, step: int, scalars: dict[str, float], *, remaining_steps: int | None = None,
                 print_line: bool = True) -> dict[str, float]:
        """Log ``scalars`` at ``step`` (1-based count of finished steps); returns throughput figures."""
        now = time.perf_counter()
        rates = {}
        if self._t_last is not None and step > self._step_last:
            dt = max(now - self._t_last, 1e-9)
            rates = {"steps_per_sec": (step - self._step_last) / dt, "tokens_per_sec": self._tokens / dt}
        self._t_last, self._step_last, self._tokens = now, step, 0.0
        self.writer.write_scalars(step, {**scalars, **rates})
        if print_line and self.active:
            parts = [f"step {step}/{self.total_steps}"]
            if "loss" in scalars:
                parts.append(f"loss {scalars['loss']:.4f}")
            if "accuracy" in scalars:
                parts.append(f"acc {scalars['accuracy']:.3f}")
            if "d" in scalars:
                parts.append(f"d {int(scalars['d'])}")
            if rates:
                parts.append(f"{rates['tokens_per_sec'] / 1e3:.1f}k tok/s")
                parts.append(f"{rates['steps_per_sec']:.2f} step/s")
                rem = self.total_steps - step if remaining_steps is None else remaining_steps
                parts.append("ETA " + format_duration(rem / max(rates["steps_per_sec"], 1e-9)))
            print(" | ".join(parts), file=self.stream, flush=True)
        return rates

    def scalars(self, step: int, scalars: dict[str, float]) -> None:
        self.writer.write_scalars(step, scalars)

    def message(self, text: str) -> None:
        if self.active:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def write_results(workdir: str, results: dict[str, Any], stream=None) -> None:
    """Print ``results`` as one JSON line and write it to ``workdir/results.json``."""
    line = json.dumps(results, sort_keys=True)
    with open(os.path.join(workdir, "results.json"), "w") as f:
        f.write(line + "\n")
    print(line, file=stream or sys.stdout, flush=True)
