"""Metrics: clu metric writers (TensorBoard event files in the workdir) + a console progress line.

Progress line: ``step 1200/3000 | loss 0.4321 | acc 0.873 | d 4 | tau 12.3 | 31.2k tok/s | 7.6 step/s | ETA 3m57s``
(``tau``: mean QK-norm temperature of the memory layers, for models with ``qk_norm``).
The run ends with one JSON object on stdout (also ``workdir/results.json``).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

from fot.runtime import errno_of



class _JsonlWriter:
    """``workdir/metrics.jsonl``: one JSON object ``{"step": s, name: value, ...}`` per write. Always
    written next to the TensorBoard events (easy to read back in tests and scripts); also the
    fallback when clu's TensorBoard writer cannot import (no tensorflow/tensorboard installed).

    Every line reaches the OS as it is written (line buffering), so a killed process loses none;
    ``sync()`` (before each checkpoint) also fsyncs it, so lines up to a checkpoint survive a machine crash.
    """

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._f = open(self.path, "a", buffering=1)

    def _write(self, line: str) -> None:
        try:
            self._f.write(line + "\n")
        except OSError as e:  # name the file (disk full, quota, ...)
            raise OSError(e.errno, e.strerror, self.path) from None

    def write_scalars(self, step, scalars):
        self._write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}))

    def write_hparams(self, hparams):
        self._write(json.dumps({"hparams": hparams}))

    def flush(self):
        self._f.flush()

    def sync(self):
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
        except OSError as e:
            raise OSError(e.errno, e.strerror, self.path) from None

    def truncate_after(self, step: int) -> int:
        """Drop rows of steps > ``step`` (written after the checkpoint a resumed run starts from, or a
        partial last line of a killed process) so every step is logged once. Returns rows dropped."""
        self._f.close()
        kept, dropped = [], 0
        with open(self.path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    dropped += 1
                    continue
                if isinstance(row, dict) and row.get("step", -1) > step:
                    dropped += 1
                    continue
                kept.append(line if line.endswith("\n") else line + "\n")
        if dropped:
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(kept)
            os.replace(tmp, self.path)
        self._f = open(self.path, "a", buffering=1)
        return dropped

    def last_row(self, step: int, key: str = "loss") -> dict[str, Any]:
        """The last row at or before ``step`` that holds ``key`` ({} if none)."""
        self._f.flush()
        last: dict[str, Any] = {}
        with open(self.path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict) and key in row and row.get("step", -1) <= step:
                    last = row
        return last

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
            return _Both(tb, _JsonlWriter(workdir), workdir)
    return _JsonlWriter(workdir)


class _NullWriter:
    """The writer of an inactive logger (a process other than 0): the _JsonlWriter interface, writing
    nothing; read back, its metrics.jsonl is empty."""

    def write_scalars(self, step, scalars):
        pass

    def write_hparams(self, hparams):
        pass

    def flush(self):
        pass

    def sync(self):
        pass

    def truncate_after(self, step: int) -> int:
        return 0

    def last_row(self, step: int, key: str = "loss") -> dict[str, Any]:
        return {}

    def close(self):
        pass


class _Both:
    """clu's TensorBoard writer + the JSONL writer (``jsonl``, which also serves the read-back methods)."""

    def __init__(self, tb, jsonl: _JsonlWriter, workdir: str):
        self.writers = (tb, jsonl)
        self.jsonl = jsonl
        self.workdir = workdir

    def __getattr__(self, name):
        def call(*args, **kwargs):
            for w in self.writers:
                try:
                    getattr(w, name)(*args, **kwargs)
                except OSError:
                    raise
                except Exception as e:  # noqa: BLE001 - TF/clu errors of the events file (disk full, ...)
                    code = errno_of(e)
                    if code is None:
                        raise
                    raise OSError(code, f"cannot write TensorBoard events: {os.strerror(code)}",
                                  self.workdir) from None
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
            if "qk_temperature" in scalars:
                parts.append(f"tau {scalars['qk_temperature']:.1f}")
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

    @property
    def _jsonl(self) -> _JsonlWriter | _NullWriter:
        return self.writer.jsonl if isinstance(self.writer, _Both) else self.writer

    def sync(self) -> None:
        """Flush TensorBoard events and fsync metrics.jsonl (called before every checkpoint)."""
        self.writer.flush()
        self._jsonl.sync()

    def truncate_after(self, step: int) -> int:
        """Resume: drop metrics.jsonl rows of steps after the checkpoint ``step`` (they will be re-run)."""
        return self._jsonl.truncate_after(step)

    def last_row(self, step: int, key: str = "loss") -> dict[str, Any]:
        return self._jsonl.last_row(step, key)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def write_results(workdir: str | None, results: dict[str, Any], stream=None) -> None:
    """Print ``results`` as one JSON line and write it to ``workdir/results.json`` (atomically: a
    temporary file renamed into place; ``workdir=None`` only prints)."""
    line = json.dumps(results, sort_keys=True)
    if workdir is not None:
        path = os.path.join(workdir, "results.json")
        with open(path + ".tmp", "w") as f:
            f.write(line + "\n")
        os.replace(path + ".tmp", path)
    print(line, file=stream or sys.stdout, flush=True)


def finished_results(workdir: str, step: int) -> dict[str, Any] | None:
    """``workdir/results.json`` when it reports ``step`` (the run finished there), else None."""
    try:
        with open(os.path.join(workdir, "results.json")) as f:
            results = json.load(f)
    except (OSError, ValueError):
        return None
    return results if isinstance(results, dict) and results.get("step") == step else None


def final_eval_summary(result: dict[str, Any]) -> str:
    """One console line for a final-eval result: its ``sizes`` with the ``*accuracy`` lists, else its keys."""
    sizes = result.get("sizes")
    curves = {k: v for k, v in result.items() if k.endswith("accuracy") and isinstance(v, (list, tuple))}
    if sizes is None or not curves:
        return ", ".join(sorted(result))
    return "; ".join(f"{k} " + " ".join(f"{n}: {a:.3f}" for n, a in zip(sizes, v)) for k, v in curves.items())


def data_metrics(data) -> dict[str, float]:
    """The iterator's own counters (``metrics()``: documents, tokens, skipped short documents), if any."""
    fn = getattr(data, "metrics", None)
    return {k: float(v) for k, v in fn().items()} if callable(fn) else {}
