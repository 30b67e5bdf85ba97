"""Run directories' params in orbax checkpoints, without a train state: read, write, check, diagnose.

``workdir/checkpoints/<step>/`` holds the items ``ITEMS`` (see ``fot.training.checkpoint``). This module
reads them read-only (no ``Checkpointer``, no lock): ``load_params`` (numpy params of any run, saved
shapes as the target: inference, export), ``restore_params`` (params straight into a model's shardings
after a name/shape/dtype check: ``train.init_from``), ``is_params_only`` (an imported run), ``damage``
(why a checkpoint cannot be read); ``save_params`` writes the params-only checkpoint of an imported run
(``fot.convert.from_hf``).
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from fot.training.checkpoint_errors import CheckpointDamagedError, first_line

ITEMS = ("state", "cursor", "curriculum")
OCDBT_FILE_BYTES = 64 << 20  # save_params: target size of each OCDBT data file


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")

def _read_only_manager(workdir: str):
    # Handlers for every item, so that orbax reads the metadata without warning about the items it
    # does not restore (the data cursor and the curriculum).
    handlers = {name: ocp.PyTreeCheckpointHandler() if name == "state" else ocp.JsonCheckpointHandler()
                for name in ITEMS}
    return ocp.CheckpointManager(checkpoint_dir(workdir), item_handlers=handlers,
                                 options=ocp.CheckpointManagerOptions(read_only=True, create=False))


def _step_or_latest(mngr, workdir: str, step: int | None) -> int:
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {checkpoint_dir(workdir)}")
    if step not in mngr.all_steps():
        raise FileNotFoundError(f"no checkpoint at step {step} under {checkpoint_dir(workdir)} (steps: "
                                f"{list(mngr.all_steps())})")
    return int(step)


def _state_tree(meta):
    return meta.tree if hasattr(meta, "tree") else meta


def damage(workdir: str, step: int) -> str | None:
    """Why checkpoint ``step`` of ``workdir`` cannot be read (one line), or None if every item reads
    (read without a target: the saved shapes and dtypes are the target)."""
    mngr = _read_only_manager(workdir)
    try:
        meta = _state_tree(mngr.item_metadata(step)["state"])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), meta)
        state = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))
        mngr.restore(step, args=ocp.args.Composite(state=state, cursor=ocp.args.JsonRestore(),
                                                   curriculum=ocp.args.JsonRestore()))
        return None
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types for damaged files
        return first_line(e)
    finally:
        mngr.close()


def is_params_only(workdir: str, step: int | None = None) -> bool:
    """True when the checkpoint at ``step`` (default latest) holds params without optimizer state (an
    imported run, see ``save_params``)."""
    mngr = _read_only_manager(workdir)
    try:
        step = _step_or_latest(mngr, workdir, step)
        return "opt_state" not in _state_tree(mngr.item_metadata(step)["state"])
    finally:
        mngr.close()


def save_params(workdir: str, params, step: int = 0) -> None:
    """Write a params-only checkpoint ``workdir/checkpoints/<step>`` (state = {"step", "params"}; empty
    cursor and curriculum items), the layout of an imported run. ``params``: tree of numpy arrays (written
    as they are, no copy; jax arrays are fetched to host first)."""
    # Synchronous save, so orbax may write the caller's numpy arrays as they are (no defensive copy of host
    # arrays), and OCDBT data files of at most OCDBT_FILE_BYTES (by default tensorstore keeps the
    # compressed data of the whole checkpoint in memory until one file is written): the peak memory is the
    # params once plus little (benchmarks/convert.py).
    th = ocp.type_handlers
    registry = th.create_type_handler_registry((np.ndarray, th.NumpyHandler(deepcopy_host_arrays=False)),
                                               (np.number, th.ScalarHandler()), (int, th.ScalarHandler()))
    handlers = {name: ocp.PyTreeCheckpointHandler(type_handler_registry=registry) if name == "state"
                else ocp.JsonCheckpointHandler() for name in ITEMS}
    mngr = ocp.CheckpointManager(checkpoint_dir(workdir), item_handlers=handlers,
                                 options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False))
    try:
        state = {"step": np.asarray(step, np.int32), "params": jax.tree.map(np.asarray, params)}
        args = ocp.args.PyTreeSave(state, ocdbt_target_data_file_size=OCDBT_FILE_BYTES)
        mngr.save(step, args=ocp.args.Composite(state=args, cursor=ocp.args.JsonSave({}),
                                                curriculum=ocp.args.JsonSave({})), force=True)
        mngr.wait_until_finished()
    finally:
        mngr.close()


def _flat(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, prefix + (str(k),)))
        else:
            out[prefix + (str(k),)] = v
    return out


def _describe(x) -> str:
    return f"{tuple(x.shape)} {np.dtype(x.dtype).name}"


def check_params_match(saved, target, where: str) -> None:
    """ValueError naming the first param (in ``target``'s order) that ``saved`` lacks or holds with another
    shape or dtype, or the first saved param that ``target`` lacks. Both: nested dicts of arrays or
    ShapeDtypeStruct/metadata with ``shape`` and ``dtype``."""
    s, t = _flat(saved), _flat(target)
    for path, want in t.items():
        name = "/".join(path)
        if path not in s:
            raise ValueError(f"param {name} ({_describe(want)}) is missing from {where}")
        got = s[path]
        if tuple(got.shape) != tuple(want.shape) or np.dtype(got.dtype) != np.dtype(want.dtype):
            raise ValueError(f"param {name} is {_describe(got)} in {where}, but the model expects {_describe(want)}")
    extra = [p for p in s if p not in t]
    if extra:
        raise ValueError(f"{where} has param {'/'.join(extra[0])} ({_describe(s[extra[0]])}) that the model does not "
                         "have" + (f" (+{len(extra) - 1} more)" if len(extra) > 1 else ""))


def _restore_params_item(mngr, step: int, target):
    """Restore only state["params"] (orbax partial restore: the optimizer state is never read)."""
    item = {"params": target}
    args = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                  partial_restore=True)
    return mngr.restore(step, args=ocp.args.Composite(state=args))["state"]["params"]


def restore_params(workdir: str, target, step: int | None = None) -> tuple[Any, int]:
    """The params of ``workdir``'s checkpoint at ``step`` (default latest; a trained or an imported run),
    restored straight into ``target``'s shardings: ``target`` is a tree of ``jax.ShapeDtypeStruct`` with
    ``sharding`` (each process reads only its shards; nothing is gathered on one host). Names, shapes
    and dtypes are checked first (``check_params_match``). Returns (params, step)."""
    mngr = _read_only_manager(workdir)
    try:
        step = _step_or_latest(mngr, workdir, step)
        meta = _state_tree(mngr.item_metadata(step)["state"])
        if "params" not in meta:
            raise ValueError(f"the checkpoint at step {step} under {checkpoint_dir(workdir)} has no params")
        check_params_match(meta["params"], target, f"{workdir}'s checkpoint (step {step})")
        return _restore_params_item(mngr, step, target), step
    finally:
        mngr.close()


def load_params(workdir: str, step: int | None = None) -> tuple[Any, int]:
    """Params of the checkpoint at ``step`` (default latest) under ``workdir`` as numpy arrays.

    Restores only the params of the ``state`` item (no optimizer state is read), without a model:
    the saved shapes and dtypes are the target. Returns (params, step). A checkpoint that cannot be read
    raises ``CheckpointDamagedError`` naming it.
    """
    mngr = _read_only_manager(workdir)
    try:
        step = _step_or_latest(mngr, workdir, step)
        try:
            meta = _state_tree(mngr.item_metadata(step)["state"])
            target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), meta["params"])
            params = _restore_params_item(mngr, step, target)
        except Exception as e:  # noqa: BLE001 - no model target: any failure is a damaged checkpoint
            others = sorted(int(s) for s in mngr.all_steps() if s != step)
            raise CheckpointDamagedError(f"checkpoint step {step} under {checkpoint_dir(workdir)} is damaged "
                                         f"({first_line(e)})" + (f"; other checkpoints: steps {others}" if others
                                                                  else "")) from None
        return jax.tree.map(np.asarray, params), step
    finally:
        mngr.close()
