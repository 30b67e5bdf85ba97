"""The Trainer: restore → step … → evaluate → finish (t5x style), gin-free.

``Trainer(...).run()`` trains ``Decoder(model_config)``; the settings come grouped
(``fot.training.settings``). One step: d from the curriculum → ``extra_rows = plan_rows(B/m, d, k)``
(a static shape per d, so each distinct d compiles once) → the jitted, donated train step on the mesh.
Metrics of step s are read after step s+1 is dispatched (host and device stay busy); they feed the
curriculum, the NaN guard, TensorBoard and the console. Several processes: every process runs the
same program, the stop vote makes all of them stop at the same step, each saves its data cursor in the
checkpoint (``multihost.gather_cursor``), and process 0 alone holds the workdir lock and writes logs,
config and results.
"""
from __future__ import annotations

import os
import time
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from fot.model import Decoder
from fot.parallel import DATA_AXIS, axis_rules, make_mesh, mesh_axis_sizes, multihost
from fot.parallel.multihost import StopVote
from fot.training.checkpoint import CheckpointMismatchError, Checkpointer
from fot.training.checkpoint_params import is_params_only, restore_params
from fot.training.checks import ConfigError, check_batch, check_layout, nan_guard
from fot.training.curriculum import ConstantD
from fot.training.lock import WorkdirLock
from fot.training.metrics import MetricsLogger, data_metrics, final_eval_summary, finished_results, write_results
from fot.training.settings import (CheckpointSettings, EvalSettings, LogSettings, RunSettings, check_settings,
                                   mesh_devices)
from fot.training.state import (abstract_params, abstract_train_state, count_params, create_train_state,
                                state_from_params, state_shardings)
from fot.training.step import evaluate, make_eval_step, make_train_step, plan_rows, put_batch


class Trainer:
    """One training run in ``workdir``; ``run()`` returns the results dict (also the last JSON line and
    ``workdir/results.json``). Raises ``ConfigError`` for bad settings, ``TrainingDivergedError`` on a
    NaN/inf loss, gradient or parameter norm, ``OSError`` for I/O failures and damaged checkpoints."""

    def __init__(self, workdir: str, model_config, data, optimizer, run: RunSettings,
                 checkpointing: CheckpointSettings, evaluation: EvalSettings, logging: LogSettings,
                 should_stop=None):
        self.t_start = time.perf_counter()
        check_settings(run, checkpointing, evaluation, logging)
        self.workdir = os.path.abspath(workdir)
        if not os.path.isdir(os.path.dirname(self.workdir)):
            raise ConfigError(f"workdir parent directory does not exist: {os.path.dirname(self.workdir)}")
        os.makedirs(self.workdir, exist_ok=True)
        self.model_config, self.optimizer, self.settings = model_config, optimizer, run
        self.checkpointing, self.evaluation, self.logging = checkpointing, evaluation, logging
        self.should_stop = should_stop or (lambda: False)
        self.curriculum = run.curriculum or ConstantD(1)
        self.data = _as_iterator(data)
        self.eval_data = _as_iterator(evaluation.data) if evaluation.data is not None else None
        self.mesh = make_mesh(run.mesh_config, devices=mesh_devices(run.mesh_config))
        self.batch_size, self.seq_len = int(self.data.batch_size), int(self.data.seq_len)
        self.pack = int(getattr(self.data, "pack", 1))
        self.micro_batch = self.batch_size // run.num_microbatches
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))
        self._check_data()
        self.model = Decoder(model_config)
        self.shardings = state_shardings(self.model, optimizer, self.mesh, self.seq_len,
                                         rules=axis_rules(fsdp=run.fsdp))
        self.primary = multihost.is_primary()  # the only process that writes console lines, metrics, config, results
        self.ckpt = self.log = self.lock = self.state = None
        self.pending = None  # (step, d, metrics, stop vote) of the last dispatched step, read one step late
        self.last: dict[str, float] = {}
        self.curve: list[dict[str, float]] = []
        self.plans: dict[int, Any] = {}  # d → int32 [B/m, d] crossbatch plan of one micro-batch
        self.vote, self.agreed_stop = StopVote(self.batch_sharding, self.batch_size), 0

    def _check_data(self) -> None:
        """Batch layout vs mesh and micro-batches, vocabulary size, d vs rows, whole k-packs per process."""
        data_size = mesh_axis_sizes(self.mesh).get(DATA_AXIS, 1)
        check_layout("train_data", self.batch_size, self.pack, data_size, self.settings.num_microbatches)
        ev = self.eval_data
        if ev is not None:
            check_layout("eval_data", int(ev.batch_size), int(getattr(ev, "pack", 1)), data_size, 1)
        vocab = getattr(self.data, "vocab_size", None)
        if vocab is not None and vocab > self.model_config.vocab_size:
            raise ConfigError(f"data vocab_size={vocab} exceeds model_config.vocab_size={self.model_config.vocab_size}")
        for d in self.curriculum.values:
            if d >= self.micro_batch:
                raise ConfigError(f"curriculum d={d} needs at least d+1={d + 1} rows per (micro-)batch, got "
                                  f"{self.micro_batch}")
        if ev is not None:
            for d in list(self.evaluation.d_values or ()) + list(self.curriculum.values):
                if int(d) >= int(ev.batch_size):
                    raise ConfigError(f"eval with d={d} needs at least {int(d) + 1} rows, eval_data has "
                                      f"batch_size={ev.batch_size}")
        for name, it in (("train_data", self.data), ("eval_data", ev)):
            if it is not None and int(getattr(it, "local_batch_size", it.batch_size)) < int(it.batch_size):
                try:  # a process-sharded pipeline emits whole k-packs; they must stay whole on the mesh
                    multihost.check_whole_packs(self.batch_sharding, int(it.batch_size), int(getattr(it, "pack", 1)))
                except ValueError as e:
                    raise ConfigError(f"{name}: {e}") from None
        self.sharded = int(getattr(self.data, "local_batch_size", self.batch_size)) < self.batch_size

    # ------------------------------------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        """restore → steps (evaluating and saving as due) → finish; every resource released on an error."""
        # One writer per workdir (process 0 of a multi-process run); released when this process exits anyway.
        self.lock = WorkdirLock(self.workdir).acquire() if self.primary else WorkdirLock(self.workdir)
        try:
            done = self.restore()
            if done is not None:
                return done
            self.n_params = count_params(self.state.params)
            mesh_shape = mesh_axis_sizes(self.mesh)
            self.log.message(f"model: {self.n_params:,} params | mesh {mesh_shape} | "
                             f"batch {self.batch_size}x{self.seq_len} pack {self.pack} | curriculum: "
                             f"{self.curriculum.describe()}")
            self.train_step = make_train_step(self.model, self.optimizer, mesh=self.mesh,
                                              num_microbatches=self.settings.num_microbatches, pack=self.pack,
                                              state_shardings=self.shardings, batch_sharding=self.batch_sharding)
            self.eval_step = make_eval_step(self.model, mesh=self.mesh, param_shardings=self.shardings.params,
                                            batch_sharding=self.batch_sharding)
            self.step = self.start_step = int(self.state.step)
            if self.checkpointing.init_from and not self.resumed and self.eval_data is not None:
                self.curve.append({"step": 0, **self.evaluate()})  # the starting model's own quality
                self.log.message("eval @ step 0 (init_from): " + ", ".join(
                    f"{k} {v:.4f}" for k, v in self.curve[-1].items() if k != "step"))
            return self.finish(self.train())
        except BaseException:
            _abort(self.ckpt, self.log, self.data, self.eval_data, self.lock)
            raise

    def restore(self) -> dict[str, Any] | None:
        """Checkpointer, logger and config; the state from the latest checkpoint, ``init_from`` or a fresh
        init. Returns the results of a workdir that already finished (then nothing else is done)."""
        c = self.checkpointing
        self.ckpt = Checkpointer(self.workdir, every=c.every, keep=c.keep, async_save=c.async_save)
        self.log = MetricsLogger(self.workdir, self.settings.total_steps, stream=self.logging.stream,
                                 active=self.primary)
        if self.logging.config_writer is not None and self.primary:
            self.logging.config_writer(self.workdir)
        self.eval_start = self.eval_data.get_state() if self.eval_data is not None else None
        latest = self.ckpt.latest_step()
        if latest is not None and _params_only(self.workdir, latest):
            raise ConfigError(f"{self.workdir} holds imported parameters without optimizer state "
                              f"(fot.convert.from_hf): "
                              f"train from them in a new run directory with train.init_from = '{self.workdir}'")
        abstract = abstract_train_state(self.model, self.optimizer, self.mesh, self.seq_len, self.shardings)
        try:
            restored = self.ckpt.restore_latest(abstract, fallback=c.restore_fallback, log=self.log.message)
        except CheckpointMismatchError as e:
            raise ConfigError(str(e)) from None
        self.resumed = restored is not None
        if restored is not None:
            return self._resume(*restored)
        if c.init_from:
            self.state = self._init_from(c.init_from, c.init_from_step)
        else:
            self.state = create_train_state(self.model, self.optimizer, self.mesh, self.seq_len, self.settings.seed,
                                            self.shardings)
            self.log.truncate_after(0)  # rows of an attempt killed before its first checkpoint
        return None

    def _resume(self, latest: int, state, cursor, curriculum_state) -> dict[str, Any] | None:
        try:
            self.data.set_state(multihost.local_cursor(cursor))
        except ValueError as e:
            raise ConfigError(f"cannot resume the data cursor of {self.ckpt.directory}/{latest}: {e}") from None
        self.curriculum.set_state(curriculum_state)
        self.state, step = state, int(state.step)
        self.log.message(f"resumed from {self.ckpt.directory}/{latest} (step {step})")
        self.log.truncate_after(step)
        if step < self.settings.total_steps:
            return None
        done = finished_results(self.workdir, step)
        if done is not None:  # re-run of a finished workdir: report, change nothing
            self.log.message(f"{self.workdir} already finished at step {step} (total_steps="
                             f"{self.settings.total_steps}); results.json left unchanged")
            self.ckpt.close()
            self.log.close()
            self.lock.close()
            write_results(None, done, self.logging.stream)
        return done

    def _init_from(self, init_from: str, init_from_step: int | None):
        if not os.path.isdir(os.path.join(init_from, "checkpoints")):
            raise ConfigError(f"train.init_from = {init_from!r}: no checkpoints/ directory there (expected a "
                              "run directory of fot.train or fot.convert.from_hf)")
        try:
            params, src_step = restore_params(init_from, abstract_params(self.model, self.seq_len, self.shardings),
                                              init_from_step)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"train.init_from = {init_from!r}: {e}") from None
        state = state_from_params(params, self.optimizer, self.settings.seed, self.shardings)
        self.log.truncate_after(0)  # rows of an attempt killed before its first checkpoint
        self.log.message(f"initialised from {init_from} (step {src_step}): its params, a fresh optimizer state, "
                         "step 0")
        return state

    # ----------------------------------------------------------------------------------------- steps
    def train(self) -> str:
        """Steps until ``total_steps``, a stop signal ("preempted") or the time budget ("time_budget")."""
        ev = self.evaluation
        while self.step < self.settings.total_steps:
            # 2 = stop signal, 1 = time budget spent. Several processes act on the vote of all of them
            # (read with a step's metrics), so every process stops at the same step.
            budget = self.settings.max_train_seconds
            reason = (2 if self.should_stop() else
                      1 if budget is not None and time.perf_counter() - self.t_start > budget else 0)
            stop = self.agreed_stop if self.vote.multi else reason
            if stop:
                return "preempted" if stop == 2 else "time_budget"
            self.train_one_step(reason)
            if self.eval_data is not None and ev.every and self.step % ev.every == 0:
                self.read_metrics()
                r = self.evaluate()
                self.curve.append({"step": self.step, **r})
                self.log.message(f"eval @ step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in r.items()))
            if self.ckpt.due(self.step):
                self.read_metrics()
                self.save()
        return "completed"

    def train_one_step(self, stop_reason: int) -> None:
        """Dispatches one train step (its metrics are read after the next one is dispatched)."""
        d = self.curriculum.d_at(self.step)
        if d not in self.plans:
            self.plans[d] = plan_rows(self.micro_batch, d, self.pack, self.settings.stepping)
        host_batch = next(self.data)
        check_batch(host_batch, self.model_config.vocab_size, f"training batch of step {self.step + 1}")
        batch = put_batch(host_batch, self.batch_sharding, self.batch_size)
        self.state, metrics = self.train_step(self.state, batch, self.plans[d])
        self.log.add_tokens(self.batch_size * self.seq_len)
        self.step += 1
        self.read_metrics()
        self.pending = (self.step, d, metrics, self.vote.cast(stop_reason))

    def read_metrics(self) -> None:
        """Metrics of the pending step: stop vote, NaN guard, curriculum, console / TensorBoard lines."""
        if self.pending is None:
            return
        s, d, metrics, stop_vote = self.pending
        self.pending = None
        self.agreed_stop = max(self.agreed_stop, StopVote.result(stop_vote))
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        nan_guard(self.ckpt, s, m)
        self.curriculum.observe(s, m)
        m["d"] = d
        self.last = m
        if s % self.logging.every == 0 or s == self.settings.total_steps:
            self.log.progress(s, m)
            counters = data_metrics(self.data)
            if counters:  # documents/tokens read, documents skipped as too short (seqio pipeline)
                self.log.scalars(s, counters)

    def save(self) -> None:
        """Metrics flushed, then a checkpoint: state, every process's data cursor, curriculum."""
        self.log.sync()
        cursor = multihost.gather_cursor(self.data.get_state(), sharded=self.sharded)
        self.ckpt.save(self.step, self.state, cursor, self.curriculum.get_state())

    def evaluate(self) -> dict[str, float]:
        """``eval_accuracy_d{d}`` / ``eval_loss_d{d}`` for each eval d, on the same batches every time."""
        if self.evaluation.d_values is not None:
            ds = [int(x) for x in self.evaluation.d_values]
        else:
            final_d = self.curriculum.d_at(self.step)
            ds = [final_d, 0] if final_d else [0]
        out = {}
        for d in ds:
            self.eval_data.set_state(self.eval_start)
            r = evaluate(self.eval_step, self.state.params, self.eval_data, d, self.evaluation.steps,
                         self.batch_sharding, self.settings.stepping, self.model_config.vocab_size)
            out[f"eval_accuracy_d{d}"], out[f"eval_loss_d{d}"] = r["accuracy"], r["loss"]
        self.log.scalars(self.step, out)
        return out

    # ---------------------------------------------------------------------------------------- finish
    def finish(self, stopped: str) -> dict[str, Any]:
        """Last checkpoint, final evaluations (not after a stop signal), results written by process 0."""
        self.read_metrics()
        self.save()
        if self.step == self.start_step:  # nothing trained in this process: report the last logged step's figures
            self.last = {**self.log.last_row(self.step), "d": self.curriculum.d_at(self.step)}
        if stopped == "preempted":
            self.ckpt.wait()
            self.log.message(f"stop signal received: saved checkpoint at step {self.step}, exiting")
        results = self._results(stopped)
        if self.eval_data is not None and stopped != "preempted":
            r = self.evaluate()
            if not self.curve or self.curve[-1]["step"] != self.step:
                self.curve.append({"step": self.step, **r})
            results.update(r)
            results["curve"] = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in c.items()
                                 if k == "step" or k.startswith("eval_accuracy")} for c in self.curve]
        if self.evaluation.final_eval is not None and stopped != "preempted":
            t_eval = time.perf_counter()
            results["final_eval"] = self.evaluation.final_eval(self.model, self.state.params)
            results["final_eval_seconds"] = round(time.perf_counter() - t_eval, 2)
            self.log.message(f"final eval ({results['final_eval_seconds']:.0f}s): "
                             + final_eval_summary(results["final_eval"]))
        counters = data_metrics(self.data)
        if counters:
            results["data"] = counters
        results["wall_seconds"] = round(time.perf_counter() - self.t_start, 2)
        self.ckpt.close()
        self.log.close()
        if self.primary:
            write_results(self.workdir, results, self.logging.stream)
        self.lock.close()
        return results

    def _results(self, stopped: str) -> dict[str, Any]:
        train_seconds = time.perf_counter() - self.t_start
        trained = self.step - self.start_step
        return {"step": self.step, "stopped": stopped, "params": self.n_params,
                "train_loss": self.last.get("loss"), "train_accuracy": self.last.get("accuracy"),
                "d": self.last.get("d", self.curriculum.d_at(self.step)), "train_seconds": round(train_seconds, 2),
                "steps_per_sec": round(trained / max(train_seconds, 1e-9), 3) if trained else None,
                "tokens_per_step": self.batch_size * self.seq_len}


def _as_iterator(data):
    return data() if callable(data) and not hasattr(data, "__next__") else data


def _params_only(workdir: str, step: int) -> bool:
    """``is_params_only`` of an imported run's checkpoint; False when it cannot be read (restore_latest then
    names the damage)."""
    try:
        return is_params_only(workdir, step)
    except Exception:  # noqa: BLE001 - a damaged checkpoint: diagnosed by restore_latest
        return False


def _abort(*closeables) -> None:
    """Error path: finish or abandon in-flight checkpoint writes, flush metrics, stop data threads, release
    the workdir lock; never raises (the original error is what gets reported)."""
    for fn in (getattr(c, "close", None) for c in closeables):
        if fn is None:
            continue
        try:
            fn()
        except Exception:  # noqa: BLE001 - secondary failure while handling the first
            pass
