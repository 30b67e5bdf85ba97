"""Perplexity vs memory size, single-document and multi-document memory.

Input: a list of documents (1-D int token arrays): from ``--tokens_file=F.npy`` (split at
``doc_separator`` ids when given, else one document) or from a seqio task through the data
pipeline (``fot.data.pipeline.make_provider``, imported lazily).

* single-doc (paper §5 "memory cleared per document"): every document is cut into contexts of
  ``size + window`` tokens; each context starts from an empty memory, streams ``size`` tokens into
  memory window by window and is scored on all its tokens. A context that needs more memory than the
  store's ``capacity`` is an error (the result would silently reflect a truncated memory).
* multi-doc: all documents are concatenated into one stream processed with a FIFO memory of ``size``
  slots that is never reset (other documents stay in memory as distractors).

Every token after the first of its context/stream is predicted; the JSON reports the mean next-token
NLL (nats) and perplexity per size.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fot.inference.windowed import MemoryInference, WindowedConfig
from fot.eval.plotting import line_plot


def load_tokens_file(path: str, doc_separator: int | None = None, min_doc_len: int = 2) -> list[np.ndarray]:
    """Documents from a 1-D ``.npy`` of token ids (split after each ``doc_separator`` id if given)."""
    import os
    if not os.path.isfile(path):
        raise ValueError(f"tokens_file {path!r} does not exist")
    arr = np.load(path, allow_pickle=False)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"tokens_file must hold a 1-D integer array, got shape {arr.shape} dtype {arr.dtype}")
    arr = arr.astype(np.int32)
    if doc_separator is None:
        docs = [arr]
    else:
        cuts = np.nonzero(arr == doc_separator)[0] + 1
        docs = np.split(arr, cuts)
    docs = [d for d in docs if len(d) >= min_doc_len]
    if not docs:
        raise ValueError(f"tokens_file {path!r} holds no document of >= {min_doc_len} tokens")
    return docs


def task_documents(task: str, split: str = "validation", max_docs: int = 64, seed: int = 0) -> list[np.ndarray]:
    """Documents of a registered seqio task/mixture via the data pipeline (lazy import of seqio)."""
    from fot.data import pipeline  # pylint: disable=import-outside-toplevel
    provider = pipeline.make_provider(task, split=split, seed=seed, shuffle=False, num_epochs=1)
    docs = []
    while len(docs) < max_docs:
        doc = provider.next_document()
        if doc is None:
            break
        docs.append(np.asarray(doc.tokens, np.int32))
    if not docs:
        raise ValueError(f"seqio task {task!r} split {split!r} yielded no documents")
    return docs


@jax.jit
def _token_nll(logits, targets):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def _nll_rows(runner: MemoryInference, rows: np.ndarray, mask: np.ndarray, capacity: int,
              reset_every: int | None) -> tuple[float, int]:
    """Sum of NLL and count over valid next-token predictions of ``rows [B, T]`` streamed window by window.

    ``reset_every``: empty the memory every that many tokens (single-doc contexts), None = never.
    """
    b, t = rows.shape
    w = runner.config.window
    stores = runner.init_memory(b, capacity)
    total, count = 0.0, 0
    for s in range(0, t, w):
        e = min(s + w, t)
        tok = np.pad(rows[:, s:e], [(0, 0), (0, w - (e - s))])
        km = np.pad(mask[:, s:e], [(0, 0), (0, w - (e - s))])
        reset = None
        if reset_every is not None and s % reset_every == 0 and s > 0:
            reset = np.ones((b,), bool)
        logits, stores, _ = runner.step(stores, tok, key_mask=km, reset_rows=reset)
        # predict token j+1 from position j, inside this window and across into the next one
        tgt = np.pad(rows[:, s + 1:e + 1], [(0, 0), (0, w - (min(e + 1, t) - (s + 1)))])
        valid = np.pad(mask[:, s + 1:e + 1] & mask[:, s:min(e, t - 1)], [(0, 0), (0, w - (min(e + 1, t) - (s + 1)))])
        if reset_every is not None:
            last = ((np.arange(s, s + w) + 1) % reset_every) == 0  # next token starts a new context
            valid = valid & ~last[None, :]
        nll = np.asarray(_token_nll(logits, jnp.asarray(tgt)))
        total += float(np.sum(nll * valid))
        count += int(valid.sum())
    return total, count


def evaluate(model, params, docs: Sequence[np.ndarray], *, window: int, sizes: Sequence[int],
             modes: Sequence[str] = ("single_doc", "multi_doc"), top_k: int | None = None,
             capacity: int | None = None, max_tokens: int | None = 1 << 16, rows: int = 8,
             mem_dtype: str = "float32", mesh=None) -> dict[str, Any]:
    """Mean NLL / perplexity per memory size and mode. ``sizes``: memory tokens (multiples of
    ``window`` after rounding up). ``capacity`` bounds the single-doc store (default: largest size);
    ``max_tokens`` caps the evaluated tokens per mode."""
    if not sizes:
        raise ValueError("sizes must name at least one memory size")
    bad = [m for m in modes if m not in ("single_doc", "multi_doc")]
    if bad or not modes:
        raise ValueError(f"modes must be a non-empty subset of ('single_doc', 'multi_doc'), got {list(modes)}")
    sizes = [int(-(-int(s) // window) * window) for s in sizes]
    if min(sizes) < 0:
        raise ValueError(f"sizes must be >= 0, got {sizes}")
    cap_single = max(sizes) if capacity is None else int(capacity)
    if "single_doc" in modes and max(sizes) > cap_single:
        raise ValueError(f"single-doc context of {max(sizes)} memory tokens (+ a window of {window}) is longer "
                         f"than the memory capacity {cap_single}; raise capacity or lower sizes")
    result: dict[str, Any] = {"task": "perplexity", "sizes": sizes, "window": window, "top_k": top_k,
                              "num_docs": len(docs)}
    for mode in modes:
        nlls, counts = [], []
        for size in sizes:
            runner = MemoryInference(model, params, WindowedConfig(
                window=window, top_k=top_k, mem_dtype=mem_dtype, use_memory=size > 0), mesh=mesh)
            if mode == "single_doc":
                ctx = size + window
                chunks = []
                for d in docs:
                    chunks += [d[i:i + ctx] for i in range(0, len(d) - 1, ctx)]
                chunks = [c for c in chunks if len(c) >= 2]
                if max_tokens:
                    kept, n = [], 0
                    for c in chunks:
                        if n >= max_tokens:
                            break
                        kept.append(c)
                        n += len(c)
                    chunks = kept
                tot, cnt = 0.0, 0
                for r in range(0, len(chunks), rows):
                    group = chunks[r:r + rows]
                    arr = np.zeros((len(group), ctx), np.int32)
                    msk = np.zeros((len(group), ctx), bool)
                    for i, c in enumerate(group):
                        arr[i, :len(c)], msk[i, :len(c)] = c, True
                    a, c = _nll_rows(runner, arr, msk, max(size, window), None)
                    tot, cnt = tot + a, cnt + c
            else:
                stream = np.concatenate(list(docs))
                if max_tokens:
                    stream = stream[:max_tokens]
                tot, cnt = _nll_rows(runner, stream[None], np.ones((1, len(stream)), bool),
                                     max(size, window), None)
            nlls.append(tot / max(cnt, 1))
            counts.append(cnt)
        result[mode] = {"mean_nll": nlls, "perplexity": [float(np.exp(x)) for x in nlls], "tokens": counts}
    first = result[modes[0]]
    result["mean_nll"] = first["mean_nll"][-1]
    return result


def plot(result: dict[str, Any], path: str) -> None:
    """Perplexity vs memory size, single-doc and multi-doc."""
    xs = [max(s, 1) for s in result["sizes"]]
    line_plot(path, [(xs, result[mode]["perplexity"], "o-", mode.replace("_", "-"))
                     for mode in ("single_doc", "multi_doc") if mode in result],
              xlabel="memory tokens (0 plotted at 1 = no memory)", ylabel="perplexity",
              title=f"Perplexity vs memory (window {result['window']}, top-k {result['top_k']})")
