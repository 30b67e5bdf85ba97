"""Copy probe: does a trained stdlib LM copy a repeated span from its window or from its memory?

    python -m benchmarks.copy_probe --workdir=RUN [--step=S] [--span=real|random] [--top_k=32]

A memory helps perplexity only if the model retrieves by content: it finds the earlier occurrence of
what it is reading and continues it (an induction/copy circuit). This measures that directly on a
checkpoint of a ``--seqio_task=stdlib`` run (issue 9 item 4), before any long evaluation.

Rows: 8 held-out stdlib documents (validation split, > 20K tokens). A span S of 48 tokens (``real``:
tokens 5000.. of the row's document; ``random``: uniform ids >= 10) appears twice; reported is the
mean NLL (nats) of S[1:] at its second occurrence:
  * ``inwin_copy``: both copies inside one 128-token window (32 filler tokens, S, S; memory off);
    ``inwin_ctrl``: the first copy replaced by another span C (tokens 9000.. / other random ids).
  * ``memG_copy``: memory holds 208 filler tokens, S, then G filler tokens (G = 0, 1024, 8192); the
    scored window starts with S (no earlier copy in the window: only memory can supply it);
    ``memG_ctrl``: the same with C in memory instead of S. ``nomem``: the scored window, memory off.
A copy circuit shows as ``*_copy`` well below ``*_ctrl`` (a model that copies predicts the second copy
almost perfectly); equal values mean nothing is copied. One JSON line on stdout.
"""
from __future__ import annotations

import argparse
import json

import jax.numpy as jnp
import numpy as np

from fot.training.step import token_sums

W, L, B = 128, 48, 8


def _nll(logits, targets):
    """Mean NLL (nats) of targets int [n, k] under logits [n, k, V]: the training loss (``token_sums``)."""
    sums = token_sums(jnp.asarray(logits), jnp.asarray(targets), jnp.ones(np.shape(targets), jnp.float32))
    return float(sums["loss"] / sums["tokens"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--step", type=int, default=None)
    ap.add_argument("--span", choices=("real", "random"), default="real")
    ap.add_argument("--top_k", type=int, default=None)
    a = ap.parse_args(argv)

    from fot.data.tasks import register_stdlib_task
    from fot.data.vocab import stdlib_vocabulary
    from fot.eval import perplexity
    from fot.eval.restore import load_model
    from fot.inference.windowed import MemoryInference, WindowedConfig

    model, params, step = load_model(a.workdir, a.step)
    vocab = model.config.vocab_size
    register_stdlib_task("stdlib", vocabulary=stdlib_vocabulary(vocab))
    docs = [d for d in perplexity.task_documents("stdlib", "validation") if len(d) > 20000][:B]
    rng = np.random.default_rng(0)
    if a.span == "real":
        s = np.stack([d[5000:5000 + L] for d in docs])
        c = np.stack([d[9000:9000 + L] for d in docs])
    else:
        s, c = rng.integers(10, vocab, (len(docs), L)), rng.integers(10, vocab, (len(docs), L))
    n = len(docs)
    win = np.stack([np.concatenate([x, d[15000:15000 + W - L]]) for d, x in zip(docs, s)])  # [n, W]

    def in_memory(first, gap, use_memory=True):
        ctx = np.stack([np.concatenate([d[1000:1256 - L], f, d[2000:2000 + gap]]) for d, f in zip(docs, first)])
        runner = MemoryInference(model, params, WindowedConfig(window=W, top_k=a.top_k, mem_dtype="float32",
                                                               use_memory=use_memory))
        stores = {}
        if use_memory:
            stores = runner.fill(runner.init_memory(n, ctx.shape[1]), ctx, np.ones(ctx.shape, bool))
        logits, _, _ = runner.step(stores, win)  # [n, W, V]
        return _nll(logits[:, :L - 1], win[:, 1:L])

    def in_window(first):
        w = np.stack([np.concatenate([d[15000:15032], f, x]) for d, f, x in zip(docs, first, s)])  # [n, W]
        logits, _, _ = MemoryInference(model, params, WindowedConfig(window=W, use_memory=False)).step({}, w)
        return _nll(logits[:, 32 + L:W - 1], w[:, 33 + L:])

    out = {"workdir": a.workdir, "step": step, "span": a.span, "top_k": a.top_k,
           "inwin_copy": in_window(s), "inwin_ctrl": in_window(c), "nomem": in_memory(s, 0, use_memory=False)}
    for gap in (0, 1024, 8192):
        out[f"mem{gap}_copy"], out[f"mem{gap}_ctrl"] = in_memory(s, gap), in_memory(c, gap)
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == "__main__":
    main()
