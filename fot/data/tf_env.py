"""Lazy TensorFlow / seqio import with a polite runtime configuration.

TensorFlow is only the data-reading engine here: it must never grab the accelerators JAX uses,
and on shared CPUs it should not spawn a thread pool per core. ``import_tf()`` imports it once,
hides every GPU/TPU from it and (optionally, env ``FOT_TF_THREADS``) caps its thread pools.
"""
from __future__ import annotations

import os

_CONFIGURED = False


def import_tf():
    """Returns the ``tensorflow`` module, configured for data-only use (no GPUs/TPUs)."""
    global _CONFIGURED
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    if not _CONFIGURED:
        _CONFIGURED = True
        for kind in ("GPU", "TPU"):
            try:
                tf.config.set_visible_devices([], kind)
            except (RuntimeError, ValueError):  # already initialised or kind unknown: nothing to hide
                pass
        threads = os.environ.get("FOT_TF_THREADS")
        if threads:
            try:
                tf.config.threading.set_inter_op_parallelism_threads(int(threads))
                tf.config.threading.set_intra_op_parallelism_threads(int(threads))
            except RuntimeError:
                pass
    return tf


def import_seqio():
    """Returns the ``seqio`` module (after ``import_tf()`` so TF is configured first)."""
    import_tf()
    import seqio  # pylint: disable=g-import-not-at-top

    return seqio
