"""Crossbatch row plans (LongLLaMA k-packing with stepping), vectorised.

d (the paper's word, as in ``fot.training`` and the curriculum): the crossbatch size, the number of other
rows of the batch each row attends to (d = 0: local attention only); ARCHITECTURE.md's ops contract calls
it ``num_extra``, the gin key ``train.eval_num_extra`` keeps that name for the d values evaluated."""
from __future__ import annotations

import numpy as np


def crossbatch_plan(batch_size, d, *, pack=1, stepping=True):
    """Rows of the same batch each row attends to, int32 [batch_size, d] (-1 = unused).

    A = d + 1; in_pack = b mod pack;
    contexts(b) = A if pack == 1 or not stepping else min(in_pack * ceil(A / max(pack - 1, 1)) + 1, A);
    contexts(b) = min(contexts(b), b + 1); row b uses rows b-1, ..., b-(contexts(b)-1), then -1.
    Never refers to a row < 0 (no wrap-around).
    """
    if batch_size < 1 or d < 0 or pack < 1:
        raise ValueError(f"need batch_size >= 1, d >= 0, pack >= 1; got batch_size={batch_size}, d={d}, "
                         f"pack={pack}")
    if batch_size % pack:
        raise ValueError(f"batch_size ({batch_size}) must be divisible by pack ({pack})")
    a = d + 1
    b = np.arange(batch_size)
    if pack == 1 or not stepping:
        ctx = np.full(batch_size, a)
    else:
        step = -(-a // max(pack - 1, 1))
        ctx = np.minimum((b % pack) * step + 1, a)
    ctx = np.minimum(ctx, b + 1)
    c = np.arange(1, d + 1)
    rows = np.where(c[None, :] < ctx[:, None], b[:, None] - c[None, :], -1)
    return rows.astype(np.int32).reshape(batch_size, d)  # [B, d]
