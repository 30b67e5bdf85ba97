"""Checkpointing with orbax ``CheckpointManager`` (new-style ``args`` API).

Layout (``workdir/checkpoints/<step>/``), one orbax item each:
  ``state``      ``StandardSave`` of ``TrainState``: {"step", "params", "opt_state", "rng"}
  ``cursor``     ``JsonSave`` of the data iterator's ``get_state()`` (exact data resume)
  ``curriculum`` ``JsonSave`` of the d-curriculum state
``workdir/config.gin`` holds the operative gin config of the run (written by ``fot.train``).

Saves are synchronous by default (``save`` returns once the checkpoint is committed: its directory
renamed from ``<step>.orbax-checkpoint-tmp*`` to ``<step>``); ``async_save=True`` lets the step loop go on
while orbax writes (committed later; a failure surfaces at the next ``save``/``wait``). Reading a run's
params without a train state (``load_params``, ``restore_params``, ``save_params``, ``damage``) is
``fot.training.checkpoint_params`` (re-exported here).

Good checkpoints only: the loop saves step s only after step s's loss, gradient norm and the norm of
the updated parameters passed its finiteness guard. The newest checkpoint stays *unverified* until the
loss computed with its parameters (the next step's) is known to be finite (``verify``); if that loss is
not finite the checkpoint is moved to ``workdir/rejected_checkpoints/<step>`` (``reject``). Retention
(``keep``) is applied by this class, not by orbax: the ``keep`` newest checkpoints plus the newest
verified one, so pruning never deletes the last checkpoint known to be good.

Damage and I/O: ``restore_latest`` tells a damaged checkpoint (a file truncated or missing: its items
cannot be read even without a target) from one that does not match the configured model/optimizer
(readable, but not into this train state) and, by default, moves damaged ones to
``rejected_checkpoints/<step>-damaged`` and resumes from the newest intact one. orbax/tensorstore keep
no checksums, so a same-size bit flip inside a data file is not detected. Write failures (disk full,
quota, read-only storage) surface as ``CheckpointIOError`` (an ``OSError`` with the errno) with one line.

Imported runs (``fot.convert.from_hf``) hold a params-only ``state`` item ({"step", "params"}: no
optimizer state) written by ``save_params``; ``restore_params(workdir, target)`` loads the params of any
run straight into the shardings of ``target`` (``train.init_from``), checking names, shapes and dtypes
(both in ``fot.training.checkpoint_params``).
"""
from __future__ import annotations

import errno
import os
import shutil
from typing import Any, Callable

import orbax.checkpoint as ocp

from fot.runtime import errno_of
from fot.training.checkpoint_errors import (CheckpointDamagedError, CheckpointIOError,  # noqa: F401
                                            CheckpointMismatchError, first_line)
from fot.training.checkpoint_params import (ITEMS, check_params_match, checkpoint_dir, damage,  # noqa: F401
                                            is_params_only, load_params, restore_params, save_params)


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` for the train loop.

    every: save when ``step % every == 0`` (plus explicit ``force`` saves at the end / on SIGTERM).
    keep: number of most recent checkpoints kept (None = all), plus the newest verified one.
    async_save: False = ``save`` blocks until the checkpoint is committed; True = it returns once orbax
    has a copy of the arrays and commits in the background.
    """

    def __init__(self, workdir: str, *, every: int = 1000, keep: int | None = 3, async_save: bool = False):
        if every < 1:
            raise ValueError(f"checkpoint every must be >= 1, got {every}")
        if keep is not None and keep < 1:
            raise ValueError(f"keep_checkpoints must be >= 1 or None, got {keep}")
        self.every = int(every)
        self.keep = keep
        self.workdir = os.path.abspath(workdir)
        # cleanup_tmp_directories: a save interrupted by a kill leaves ``<step>.orbax-checkpoint-tmp*``;
        # the run holding the workdir lock is the only writer, so it may remove them.
        options = ocp.CheckpointManagerOptions(max_to_keep=None, save_interval_steps=1,
                                               enable_async_checkpointing=async_save, create=True,
                                               cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)
        self._saving: int | None = None  # step of the save in flight (for error messages)
        # Every checkpoint but the newest was verified before a newer one was saved (the loop processes
        # all metrics before saving), so only the newest can be unverified: the one found at start-up.
        self.unverified = self.manager.latest_step()

    @property
    def directory(self) -> str:
        return str(self.manager.directory)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def last_good(self) -> int | None:
        """Newest checkpoint whose parameters produced a finite loss (verified), or None."""
        steps = [s for s in self.all_steps() if s != self.unverified]
        return max(steps) if steps else None

    def verify(self, step: int) -> None:
        """The loss computed with the parameters of checkpoint ``step`` was finite: it is good. Prunes."""
        if self.unverified == step:
            self.unverified = None
            self.prune()

    def reject(self, step: int, reason: str) -> str:
        """Move checkpoint ``step`` out of the checkpoint directory (to ``workdir/rejected_checkpoints/
        <step>-<reason>``) after any write finished; returns the new path ("" if it was deleted)."""
        self.wait()
        if self.unverified == step:
            self.unverified = None
        src = os.path.join(self.directory, str(step))
        dst = os.path.join(self.workdir, "rejected_checkpoints", f"{step}-{reason}")
        if "://" not in src and os.path.isdir(src):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if os.path.exists(dst):
                shutil.rmtree(dst)
            os.rename(src, dst)
            self.manager.reload()
            return dst
        self.manager.delete(step)
        return ""

    def prune(self) -> None:
        """Delete all but the ``keep`` newest checkpoints and the newest verified one."""
        if self.keep is None:
            return
        steps = sorted(self.all_steps())
        keep = set(steps[-self.keep:])
        good = self.last_good()
        if good is not None:
            keep.add(good)
        for s in steps:
            if s not in keep:
                self._io("delete", s, lambda: self.manager.delete(s))

    def _io(self, what: str, step: int | None, fn: Callable[[], Any]):
        """Run an orbax call; an I/O failure becomes one ``CheckpointIOError`` line naming the step."""
        try:
            return fn()
        except CheckpointIOError:
            raise
        except Exception as e:  # noqa: BLE001 - orbax wraps tensorstore's errors in ValueError/RuntimeError
            code = errno_of(e)
            if code is None:
                raise
            where = f"checkpoint step {step}" if step is not None else "checkpoint"
            raise CheckpointIOError(code, f"cannot {what} {where} under {self.directory}: "
                                          f"{os.strerror(code)} ({errno.errorcode.get(code, code)})") from e

    def save(self, step: int, state, cursor: dict[str, Any], curriculum: dict[str, Any]) -> bool:
        if step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), cursor=ocp.args.JsonSave(cursor),
                                  curriculum=ocp.args.JsonSave(curriculum))
        # An async save's failure surfaces at the next save or wait: name the step that was being written.
        saved = self._io("write", self._saving or step, lambda: self.manager.save(step, args=args, force=True))
        if saved:
            self._saving = step
            self.unverified = step
        return saved

    def restore(self, abstract_state, step: int | None = None):
        """Restore (state, cursor, curriculum) at ``step`` (default latest); state arrives sharded as
        ``abstract_state``'s ``ShapeDtypeStruct.sharding``."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {self.directory}")
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), cursor=ocp.args.JsonRestore(),
                                  curriculum=ocp.args.JsonRestore())
        out = self.manager.restore(step, args=args)
        return out["state"], out["cursor"], out["curriculum"]

    def restore_latest(self, abstract_state, *, fallback: bool = True, log: Callable[[str], None] = print):
        """(step, state, cursor, curriculum) of the newest intact checkpoint, or None when there is none.

        A checkpoint that cannot be restored is diagnosed with :func:`damage`: readable without a target →
        ``CheckpointMismatchError`` (the configuration changed); unreadable → damaged: with ``fallback``
        it is moved to ``rejected_checkpoints/`` (once an intact one restored) and the next older one is
        tried, else ``CheckpointDamagedError``. All damaged → ``CheckpointDamagedError``, nothing moved.
        """
        damaged: list[tuple[int, str]] = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                state, cursor, cur = self.restore(abstract_state, step)
            except Exception as e:  # noqa: BLE001 - classified below
                why = damage(self.workdir, step)
                if why is None:
                    raise CheckpointMismatchError(
                        f"checkpoint step {step} under {self.directory} does not fit the configured model/"
                        f"optimizer ({first_line(e, 160)}); the run's own config is "
                        f"{os.path.join(self.workdir, 'config.gin')}") from None
                damaged.append((step, why))
                if not fallback:
                    older = [s for s in self.all_steps() if s < step]
                    raise CheckpointDamagedError(
                        f"checkpoint step {step} under {self.directory} is damaged ({why}); "
                        + (f"set train.restore_fallback = True to resume from the newest intact older one "
                           f"(steps {sorted(older)})" if older else "no older checkpoint exists")) from None
                continue
            for bad, why in damaged:
                path = self.reject(bad, "damaged")
                log(f"warning: checkpoint step {bad} under {self.directory} is damaged ({why}); moved to "
                    f"{path or '(deleted)'}; resuming from step {step}")
            self.unverified = step
            return step, state, cursor, cur
        if damaged:
            raise CheckpointDamagedError(
                f"every checkpoint under {self.directory} is damaged: "
                + "; ".join(f"step {s}: {why}" for s, why in damaged))
        return None

    def wait(self) -> None:
        self._io("write", self._saving, self.manager.wait_until_finished)
        self._saving = None

    def close(self) -> None:
        self.wait()
        self.prune()
        self.manager.close()
