"""Checkpointing with orbax ``CheckpointManager`` (new-style ``args`` API).

Layout (``workdir/checkpoints/<step>/``), one orbax item each:
  ``state``      ``StandardSave`` of ``TrainState``: {"step", "params", "opt_state", "rng"}
  ``cursor``     ``JsonSave`` of the data iterator's ``get_state()`` (exact data resume)
  ``curriculum`` ``JsonSave`` of the d-curriculum state
``workdir/config.gin`` holds the operative gin config of the run (written by ``fot.train``).

Saves are asynchronous (the step loop continues while orbax writes); ``keep`` bounds the number
of step directories kept. ``load_params(workdir)`` restores only what inference needs.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

ITEMS = ("state", "cursor", "curriculum")


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` for the train loop.

    every: save when ``step % every == 0`` (plus explicit ``force`` saves at the end / on SIGTERM).
    keep: number of most recent checkpoints kept (None = all).
    """

    def __init__(self, workdir: str, *, every: int = 1000, keep: int | None = 3, async_save: bool = True):
        if every < 1:
            raise ValueError(f"checkpoint every must be >= 1, got {every}")
        self.every = int(every)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=1,
                                               enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def save(self, step: int, state, cursor: dict[str, Any], curriculum: dict[str, Any]) -> bool:
        if step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), cursor=ocp.args.JsonSave(cursor),
                                  curriculum=ocp.args.JsonSave(curriculum))
        return self.manager.save(step, args=args, force=True)

    def restore(self, abstract_state, step: int | None = None):
        """Restore (state, cursor, curriculum) at ``step`` (default latest); state arrives sharded as
        ``abstract_state``'s ``ShapeDtypeStruct.sharding``."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {self.manager.directory}")
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), cursor=ocp.args.JsonRestore(),
                                  curriculum=ocp.args.JsonRestore())
        out = self.manager.restore(step, args=args)
        return out["state"], out["cursor"], out["curriculum"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def load_params(workdir: str, step: int | None = None) -> tuple[Any, int]:
    """Params of the checkpoint at ``step`` (default latest) under ``workdir`` as numpy arrays.

    Restores the ``state`` item without a target (host arrays), so no model or optimizer is needed.
    Returns (params, step).
    """
    # Handlers for every item, so that orbax reads the metadata without warning about the items it
    # does not restore here (the data cursor and the curriculum).
    handlers = {name: ocp.StandardCheckpointHandler() if name == "state" else ocp.JsonCheckpointHandler()
                for name in ITEMS}
    mngr = ocp.CheckpointManager(checkpoint_dir(workdir), item_handlers=handlers,
                                 options=ocp.CheckpointManagerOptions(read_only=True, create=False))
    try:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {checkpoint_dir(workdir)}")
        meta = mngr.item_metadata(step)["state"]
        target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), meta.tree if hasattr(meta, "tree") else meta)
        restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        return jax.tree.map(np.asarray, restored["state"]["params"]), int(step)
    finally:
        mngr.close()
