"""Perplexity vs memory size, single-document and multi-document memory.

Input: a list of documents (1-D int token arrays): from ``--tokens_file=F.npy`` (split at
``doc_separator`` ids when given, else one document) or from a seqio task through the data
pipeline (``fot.data.pipeline.make_provider``, imported lazily).

Every size scores the SAME next-token predictions; only what the memory holds changes. The memory of
size ``m`` is a FIFO of ``m`` slots (``min(size, capacity)`` when ``capacity`` is given; 0 = no memory):

* single-doc (paper §5: memory cleared per document): in every document longer than ``score_from``
  (default: the largest memory), the predictions at positions ``score_from ..`` are scored (at most
  ``max_tokens`` in all, spread evenly over the documents). For memory ``m`` the ``min(m, score_from)``
  tokens before ``score_from`` are prefilled into an empty memory (:meth:`MemoryInference.fill`), then
  the scored windows stream through the model, each appended to memory after it is scored — so every
  scored window sees the up to ``m`` tokens of its own document right before it.
* multi-doc: one stream of many documents (each cut to its first ``ceil((warm-up + max_tokens) /
  num_docs)`` tokens so that the stream holds them all; whole documents when ``max_tokens`` is None).
  The first ``warm-up`` = largest memory tokens of the stream are context only; the ``max_tokens``
  predictions after them are scored, with a memory of the ``m`` stream tokens before each window —
  other documents included (distractors), never reset.

The JSON reports per mode and size the mean next-token NLL (nats), perplexity, scored tokens
(identical across sizes), tokens processed per second and the memory tokens held.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fot.eval import resources
from fot.eval.plotting import line_plot
from fot.inference.windowed import MemoryInference, WindowedConfig
from fot.keyword_api import keyword_api
from fot.training.step import token_sums


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


_token_sums = jax.jit(token_sums)  # loss / correct / tokens sums, as in training


def _round_up(x: int, m: int) -> int:
    return -(-int(x) // m) * m


def plan_single_doc(docs: Sequence[np.ndarray], score_from: int, max_tokens: int | None) -> list[tuple[int, int]]:
    """``[(doc index, scored predictions)]`` for the documents longer than ``score_from + 1``: predictions
    at positions ``score_from .. score_from + n - 1`` (of the next token), at most ``max_tokens`` in all,
    spread evenly (every document gets ``ceil(max_tokens / eligible)`` at most)."""
    eligible = [i for i, d in enumerate(docs) if len(d) - 1 > score_from]
    if not eligible:
        return []
    cap = None if not max_tokens else -(-int(max_tokens) // len(eligible))
    out = []
    for i in eligible:
        n = len(docs[i]) - 1 - score_from
        out.append((i, n if cap is None else min(n, cap)))
    return out


def multi_doc_stream(docs: Sequence[np.ndarray], need: int | None) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens, doc_index)`` int32 [T]: the documents in order, each cut to its first
    ``ceil(need / num_docs)`` tokens (at least 2) so that a stream of ``need`` tokens holds all of them
    (``need`` None: whole documents). Short documents leave their share to the ones after them."""
    parts, ids, have = [], [], 0
    for i, d in enumerate(docs):
        if need is not None:
            if have >= need:
                break
            left = len(docs) - i
            d = d[:max(2, -(-(need - have) // left))]
        parts.append(np.asarray(d, np.int32))
        ids.append(np.full(len(d), i, np.int32))
        have += len(d)
    return np.concatenate(parts), np.concatenate(ids)


def _score_rows(runner: MemoryInference, rows: np.ndarray, mask: np.ndarray, memory: int, prefill: int,
                tick=None) -> tuple[float, int]:
    """Sum of NLL and count of the predictions at positions ``>= prefill`` of ``rows [B, T]`` (padding
    where ``mask`` is False). Tokens ``[0, prefill)`` are prefilled into a FIFO memory of ``memory``
    slots (0: no memory), then windows of ``runner.config.window`` stream from ``prefill`` on, each
    scored, then appended."""
    b, t = rows.shape
    w = runner.config.window
    stores = {}
    if memory:
        stores = runner.init_memory(b, memory)
        if prefill:
            stores = runner.fill(stores, rows[:, :prefill], mask[:, :prefill])
    if tick is not None:
        tick(b * prefill)
    total, count = 0.0, 0
    for s in range(prefill, t - 1, w):
        e = min(s + w, t)
        pad = [(0, 0), (0, w - (e - s))]
        tok = np.pad(rows[:, s:e], pad)
        logits, stores, _ = runner.step(stores, tok, key_mask=np.pad(mask[:, s:e], pad))
        nxt = min(e + 1, t)  # predict token j+1 from position j, across into the next window
        tgt = np.pad(rows[:, s + 1:nxt], [(0, 0), (0, w - (nxt - s - 1))])
        valid = np.pad(mask[:, s + 1:nxt] & mask[:, s:nxt - 1], [(0, 0), (0, w - (nxt - s - 1))])
        sums = _token_sums(logits, jnp.asarray(tgt), jnp.asarray(valid, jnp.float32))  # logits [B, w, V]
        total += float(sums["loss"])
        count += int(valid.sum())
        if tick is not None:
            tick(b * (e - s))
    return total, count


@dataclasses.dataclass(frozen=True)
class PerplexitySettings:
    """What :func:`evaluate` scores (its docstring): ``window``, memory ``sizes``, ``modes``, top-k,
    FIFO ``capacity``, ``max_tokens`` scored per mode, single-doc ``rows`` per batch and ``score_from``."""

    window: int
    sizes: Sequence[int]
    modes: Sequence[str] = ("single_doc", "multi_doc")
    top_k: int | None = None
    capacity: int | None = None
    max_tokens: int | None = 1 << 16
    rows: int = 8
    mem_dtype: str = "float32"
    score_from: int | None = None
    progress: bool = True


def _check(settings: PerplexitySettings) -> tuple[list[int], list[int]]:
    """(sizes rounded up to windows, memory tokens held at each size); ValueError naming the bad setting."""
    sizes, window, modes, top_k, capacity = (settings.sizes, settings.window, settings.modes, settings.top_k,
                                             settings.capacity)
    if not sizes:
        raise ValueError("perplexity_eval.sizes must name at least one memory size")
    bad = [m for m in modes if m not in ("single_doc", "multi_doc")]
    if bad or not modes:
        raise ValueError(f"perplexity_eval.modes must be a non-empty subset of ('single_doc', 'multi_doc'), "
                         f"got {list(modes)}")
    if min(int(s) for s in sizes) < 0:
        raise ValueError(f"perplexity_eval.sizes must be >= 0, got {list(sizes)}")
    if capacity is not None and int(capacity) < 1:
        raise ValueError(f"perplexity_eval.capacity must be >= 1 (or None), got {capacity}")
    sizes = [_round_up(s, window) for s in sizes]
    mem = [s if capacity is None else min(s, _round_up(capacity, window)) for s in sizes]
    pos = [m for m in mem if m > 0]
    if top_k is not None and pos and top_k > min(pos):
        raise ValueError(f"top_k={top_k} is larger than the memory at size {min(pos)} ({min(pos)} tokens); "
                         "lower top_k or drop the smaller sizes")
    return sizes, mem


class _ModePlan(NamedTuple):
    """One mode's scoring: ``work[i]`` tokens processed at memory ``mem[i]``, result fields ``extra``, and
    ``score(m, runner, tick) -> (NLL sum, count)`` with a memory of ``m`` tokens."""

    work: list[int]
    extra: dict[str, Any]
    score: Callable[[int, MemoryInference, Callable[[int], None]], tuple[float, int]]


def _single_doc_plan(docs: Sequence[np.ndarray], mem: list[int], warm: int, settings: PerplexitySettings) -> _ModePlan:
    """Single-doc: each memory prefilled from the ``min(m, warm)`` tokens before ``warm`` of its document."""
    plan = plan_single_doc(docs, warm, settings.max_tokens)
    if not plan:
        raise ValueError(f"single-doc: no document is longer than score_from={warm} + 1 tokens "
                         f"(longest: {max(len(d) for d in docs)}); lower perplexity_eval.score_from "
                         "or the sizes, or evaluate modes=['multi_doc']")

    def score(m, runner, tick):
        pre = min(m, warm)
        tot, cnt = 0.0, 0
        for r in range(0, len(plan), settings.rows):
            group = plan[r:r + settings.rows]
            length = pre + max(n for _, n in group) + 1
            arr = np.zeros((len(group), length), np.int32)  # [rows, pre + scored + 1] tokens
            msk = np.zeros((len(group), length), bool)
            for j, (i, n) in enumerate(group):
                piece = docs[i][warm - pre:warm + n + 1]
                arr[j, :len(piece)], msk[j, :len(piece)] = piece, True
            a, c = _score_rows(runner, arr, msk, m, pre, tick)
            tot, cnt = tot + a, cnt + c
        return tot, cnt

    work = [sum(min(m, warm) + n for _, n in plan) for m in mem]
    return _ModePlan(work, {"score_from": warm, "scored_docs": len(plan)}, score)


def _multi_doc_plan(docs: Sequence[np.ndarray], mem: list[int], settings: PerplexitySettings) -> _ModePlan:
    """Multi-doc: one stream; its first largest-memory tokens are warm-up, the ``max_tokens`` after are scored."""
    max_tokens = settings.max_tokens
    warm_m = _round_up(max(mem), settings.window)
    stream, ids = multi_doc_stream(docs, None if not max_tokens else warm_m + int(max_tokens) + 1)  # [T]
    if len(stream) - 1 <= warm_m:
        raise ValueError(f"multi-doc: the documents hold {len(stream)} tokens, not more than the "
                         f"{warm_m}-token warm-up (the largest memory); pass more documents or lower sizes")
    n_scored = len(stream) - 1 - warm_m if not max_tokens else min(int(max_tokens), len(stream) - 1 - warm_m)

    def score(m, runner, tick):
        piece = stream[warm_m - m:warm_m + n_scored + 1][None]  # [1, m + scored + 1]
        return _score_rows(runner, piece, np.ones(piece.shape, bool), m, m, tick)

    extra = {"warmup": warm_m, "stream_docs": int(len(np.unique(ids[:warm_m + n_scored + 1]))),
             "scored_docs": int(len(np.unique(ids[warm_m + 1:warm_m + n_scored + 1])))}
    return _ModePlan([m + n_scored for m in mem], extra, score)


def _score_mode(mode: str, plan: _ModePlan, sizes: list[int], mem: list[int], runner, progress: bool) -> dict:
    """One mode's result: NLL, perplexity, scored tokens, throughput per size."""
    prog = resources.Progress(sum(plan.work), f"perplexity {mode}", enabled=progress)
    nlls, counts, rates, secs = [], [], [], []
    for size, m in zip(sizes, mem):
        t0, done0 = time.perf_counter(), prog.done
        tick = lambda n, size=size: prog.update(n, note=f"size {size:,}")  # noqa: E731
        tot, cnt = plan.score(m, runner(m), tick)
        dt = time.perf_counter() - t0
        nlls.append(tot / max(cnt, 1))
        counts.append(cnt)
        secs.append(round(dt, 3))
        rates.append(round((prog.done - done0) / max(dt, 1e-9), 1))
    prog.close(note="done")
    if len(set(counts)) > 1:  # by construction; a failure here is a bug, not bad input
        raise AssertionError(f"{mode}: scored token counts differ across sizes: {counts}")
    return {"mean_nll": nlls, "perplexity": [float(np.exp(x)) for x in nlls], "tokens": counts,
            "tokens_per_second": rates, "seconds": secs, **plan.extra}


def run_eval(model, params, docs: Sequence[np.ndarray], settings: PerplexitySettings, *, mesh=None) -> dict[str, Any]:
    """Mean NLL / perplexity per memory size and mode (module docstring). ``sizes``: memory tokens
    (rounded up to multiples of ``window``). ``capacity``: FIFO slots of the memory for every size (a
    size above it keeps only its newest ``capacity`` tokens; ``memory_tokens`` in the result); None =
    each size. ``max_tokens``: scored predictions per mode (None: all). ``score_from``: single-doc
    scored positions start (default: the largest memory, so every size can fill its memory from the
    document; rounded up to a window multiple). ``rows``: single-doc documents per batch.
    :func:`evaluate` is this function with the fields of :class:`PerplexitySettings` as keyword arguments
    (gin: ``perplexity_eval.*``)."""
    s = settings
    sizes, mem = _check(s)
    warm = _round_up(max(mem) if s.score_from is None else int(s.score_from), s.window)
    runners = {}

    def runner(m):
        key = m > 0
        if key not in runners:
            runners[key] = MemoryInference(model, params, WindowedConfig(
                window=s.window, top_k=s.top_k, mem_dtype=s.mem_dtype, use_memory=key), mesh=mesh)
        return runners[key]

    result: dict[str, Any] = {"task": "perplexity", "sizes": sizes, "memory_tokens": mem, "window": s.window,
                              "top_k": s.top_k, "capacity": s.capacity, "num_docs": len(docs),
                              "max_tokens": s.max_tokens, "mem_dtype": s.mem_dtype}
    for mode in s.modes:
        plan = _single_doc_plan(docs, mem, warm, s) if mode == "single_doc" else _multi_doc_plan(docs, mem, s)
        result[mode] = _score_mode(mode, plan, sizes, mem, runner, s.progress)
    first = result[s.modes[0]]
    result["mean_nll"] = first["mean_nll"][-1]
    return result


evaluate = keyword_api(run_eval, "evaluate", settings=PerplexitySettings)


def plot(result: dict[str, Any], path: str) -> None:
    """Perplexity vs memory size, single-doc and multi-doc."""
    xs = [max(s, 1) for s in result["sizes"]]
    line_plot(path, [(xs, result[mode]["perplexity"], "o-", mode.replace("_", "-"))
                     for mode in ("single_doc", "multi_doc") if mode in result],
              xlabel="memory tokens (0 plotted at 1 = no memory)", ylabel="perplexity",
              title=f"Perplexity vs memory (window {result['window']}, top-k {result['top_k']})")
