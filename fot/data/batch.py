"""The one training batch: what the segmenter emits and the train / eval steps consume.

A ``NamedTuple`` (a JAX pytree without registration: it crosses ``jax.jit`` as it is, and one
``NamedSharding`` shards every field). Shapes, for ``B`` rows of ``L`` tokens (k-packing: rows
``j*k … j*k+k-1`` are ``k`` consecutive windows of one lane's document stream)::

    inputs       int32   [B, L]  token ids (0 = padding)
    targets      int32   [B, L]  the next token of the same document (0 on padding)
    loss_mask    float32 [B, L]  weight of each prediction: 1 on document positions (or the document's
                                 ``loss_weights`` of the target token), 0 on padding
    segment_ids  int32   [B, L]  0 = padding; one id >= 1 per document, unique in the global batch;
                                 local attention stays inside equal ids, crossbatch keys need id > 0
    positions    int32   [B, L]  position of each token inside its window: ``arange(L)`` per row

On the host the fields are numpy arrays (``fot.data.segmenter.Segmenter``); ``fot.training.step.put_batch``
turns them into global ``jax.Array``s sharded over the mesh's data axis.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import numpy as np


class Batch(NamedTuple):
    """One step's rows (shapes in the module docstring); numpy on the host, ``jax.Array`` on devices."""

    inputs: Any
    targets: Any
    loss_mask: Any
    segment_ids: Any
    positions: Any

    def map(self, fn: Callable[[Any], Any]) -> "Batch":
        """``fn`` applied to every field (e.g. a row slice)."""
        return Batch(*(fn(x) for x in self))

    @property
    def num_rows(self) -> int:
        return int(np.shape(self.inputs)[0])


def concatenate(batches: Sequence[Batch]) -> Batch:
    """The rows of ``batches`` one after another (numpy), e.g. the batches of several data shards."""
    return Batch(*(np.concatenate(fields) for fields in zip(*batches)))
