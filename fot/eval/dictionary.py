"""Dictionary-lookup accuracy vs the number of dictionary tokens in memory (FoT paper §5.2, App.).

For every memory size N and document d, one document is generated with ``fot.data.dictionary`` from
its own seed ``(seed, N, d)`` (so a size's result does not depend on which other sizes are listed,
nor on how documents are batched): N tokens of definitions ``<k> k.. <v> v..`` followed by one window
of queries ``<q> k.. <v> v..``. Documents are generated as they are needed (``rows`` at a time), the
definitions are pushed into memory by the prefill path (:meth:`MemoryInference.fill`: only the layers
up to the last memory layer run), then the query window attends to that memory without being appended
to it. Accuracy = fraction of answer tokens v_1..v_V predicted by argmax. Lines:

* ``fot_accuracy``: exact top-k memory attention (``top_k``);
* ``fot_dense_accuracy``: the same memory, dense memory attention (sizes up to ``dense_max_tokens``);
* ``baseline_accuracy``: an optional standard transformer (``baseline=(model, params)``, e.g. trained
  with the whole document as local context, ``gin/runs/dictionary_baseline_cpu*.gin``) reading
  definitions and queries as one local context of N + window tokens (sizes up to
  ``baseline_max_tokens``; None beyond) — the paper's "baseline fails beyond its context";
* ``no_memory_accuracy``: the FoT model with its memory off (the query window sees only itself).

A progress line (tokens/s, ETA) goes to stderr every 10 s. Before any work the host memory of the
largest size is estimated and the evaluation refused if it cannot fit.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fot.data.dictionary import DictionarySpec, generate_documents
from fot.eval import resources
from fot.eval.baseline import FullContext
from fot.eval.plotting import line_plot
from fot.inference.windowed import FILL_LAYERS_CALL_TOKENS, MemoryInference, WindowedConfig
from fot.keyword_api import keyword_api
from fot.training.step import token_sums

HOST_BYTES_PER_TOKEN = 48  # one generated document while it is laid out: int32 tokens/segment, answer, copies
HOST_DOCUMENT_BATCHES = 2  # batches of documents held at once: the scored one and the next (generated meanwhile)


_token_sums = jax.jit(token_sums)


def _hits(logits, targets, answer) -> int:
    """Argmax hits of logits [b, Tq, V] on the answer tokens (``answer`` float [b, Tq]), as training counts them."""
    return int(_token_sums(logits, targets, answer)["correct"])


def _round_up(x: int, m: int) -> int:
    return int(math.ceil(x / m) * m)


def max_dictionary_tokens(key_len: int, value_len: int, vocab_size: int) -> int:
    """Largest number of definition tokens whose keys can still be unique in a document."""
    num_symbols = vocab_size - 4
    record = key_len + value_len + 2
    return int(min(num_symbols ** key_len, 2**62) * record)


def _align_definitions(docs, n: int, window: int, record: int):
    """Re-lay the ``n`` definition tokens of ``docs`` window by window (whole records, padded)."""
    tokens, segment = docs["tokens"].copy(), docs["segment"].copy()
    b, per, nw = tokens.shape[0], window // record, n // window
    n_def = docs["keys"].shape[1]  # = nw * per (num_definitions, aligned)
    recs = tokens[:, : n_def * record].reshape(b, nw, per * record)  # [b, windows, records of a window]
    laid = np.zeros((b, nw, window), tokens.dtype)  # [b, windows, window]: records, then padding
    laid[:, :, : per * record] = recs
    tokens[:, :n] = laid.reshape(b, n)
    laid[:, :, : per * record] = 1
    laid[:, :, per * record:] = 0
    segment[:, :n] = laid.reshape(b, n)
    return {**docs, "tokens": tokens, "segment": segment}


def num_definitions(n: int, window: int, record: int, aligned: bool) -> int:
    """Definition records in ``n`` memory tokens (aligned: ``window // record`` whole records per window)."""
    return (n // window) * (window // record) if aligned else n // record


def size_fits(n: int, window: int, key_len: int, value_len: int, vocab_size: int, aligned: bool = True) -> bool:
    """Whether ``n`` memory tokens of definitions can have unique keys (see :func:`max_dictionary_tokens`)."""
    record = key_len + value_len + 2
    limit = max_dictionary_tokens(key_len, value_len, vocab_size)
    return num_definitions(_round_up(n, window), window, record, aligned) <= limit // record


def documents(seed: int, n: int, *, window: int, key_len: int, value_len: int, vocab_size: int,
              num_docs: int | None = None, indices=None, aligned: bool = True) -> dict[str, np.ndarray]:
    """The documents :func:`evaluate` scores for ``n`` definition tokens (a multiple of ``window``)
    followed by one window of queries: document ``d`` comes from its own seed ``(seed, n, d)``; ``indices``
    (default ``range(num_docs)``) picks which. Arrays [len(indices), n + window + 1] as
    ``fot.data.dictionary.generate_documents``: ``tokens`` int32, ``answer`` bool, ``segment`` int32."""
    record = key_len + value_len + 2
    spec = DictionarySpec(key_len=key_len, value_len=value_len, vocab_size=vocab_size, doc_len=n + window,
                          query_len=window, num_definitions=num_definitions(n, window, record, aligned))
    indices = range(num_docs) if indices is None else indices
    out = []
    for d in indices:
        doc = generate_documents(np.random.default_rng([seed, n, int(d)]), 1, spec)
        doc = _align_definitions(doc, n, window, record) if aligned else doc
        out.append({k: doc[k][0] for k in ("tokens", "answer", "segment")})
    return {k: np.stack([o[k] for o in out]) for k in ("tokens", "answer", "segment")}


def memory_bytes_per_token(model_config, mem_dtype: str) -> int:
    """Memory-store bytes per token: keys + values of every memory layer in ``mem_dtype``."""
    c = model_config
    return 2 * c.num_kv_heads * c.head_dim * jnp.dtype(mem_dtype).itemsize * len(c.mem_layers)


def estimate_bytes(model_config, n: int, rows: int, mem_dtype: str) -> int:
    """Host-memory estimate of one batch of ``rows`` documents of memory size ``n``: the stores, the
    generated documents (this batch's and the next's) and the prefill's activations (one call of
    ``FILL_LAYERS_CALL_TOKENS`` tokens, the fill's largest program: one memory layer scans smaller blocks)."""
    act = FILL_LAYERS_CALL_TOKENS * 4 * (8 * model_config.d_model + 3 * model_config.mlp_dim)
    docs = HOST_DOCUMENT_BATCHES * HOST_BYTES_PER_TOKEN
    return rows * n * (memory_bytes_per_token(model_config, mem_dtype) + docs) + act


@dataclasses.dataclass(frozen=True)
class DictionaryTask:
    """The lookup task the model was trained on: ``window`` (the query window, the training ``seq_len``),
    ``key_len`` / ``value_len`` tokens per key / value, ``vocab_size`` (symbols: ``vocab_size - 4``);
    ``aligned``: definitions laid out as in training (``window // record`` whole records per window,
    padding at the window's end)."""

    window: int
    key_len: int
    value_len: int
    vocab_size: int
    aligned: bool = True

    @property
    def record(self) -> int:
        return self.key_len + self.value_len + 2


@dataclasses.dataclass(frozen=True)
class DictionaryEvalSettings:
    """What :func:`evaluate` measures and within which bounds (its docstring)."""

    sizes: Sequence[int]
    num_docs: int = 16
    top_k: int | None = 32
    seed: int = 0
    mem_dtype: str = "float32"
    memory_budget_bytes: int = 1 << 30
    dense: bool = True
    dense_max_tokens: int | None = None
    baseline_max_tokens: int = 1 << 14
    baseline_chunk: int = 512
    progress: bool = True


def _check(task: DictionaryTask, settings: DictionaryEvalSettings) -> tuple[list[int], int]:
    """(sizes rounded up to windows, the task's unique-key limit); ValueError naming the bad setting."""
    sizes, window, record = settings.sizes, task.window, task.record
    if settings.num_docs < 1:
        raise ValueError(f"dictionary_eval.num_docs must be >= 1, got {settings.num_docs}")
    if not sizes:
        raise ValueError("dictionary_eval.sizes must name at least one memory size")
    if min(int(s) for s in sizes) < 1:
        raise ValueError(f"dictionary_eval.sizes must be >= 1, got {list(sizes)}")
    ns = [_round_up(int(s), window) for s in sizes]
    if task.aligned and window // record < 1:
        raise ValueError(f"window={window} holds no whole record of {record} tokens")
    limit = max_dictionary_tokens(task.key_len, task.value_len, task.vocab_size)
    too_big = [s for s in sizes
               if not size_fits(int(s), window, task.key_len, task.value_len, task.vocab_size, task.aligned)]
    if too_big:
        raise ValueError(f"dictionary_eval.sizes {too_big} exceed the task's unique-key limit of {limit:,} "
                         f"tokens ({task.vocab_size - 4} symbols ** key_len {task.key_len} keys x {record}-token "
                         "records); use smaller sizes or a model trained with longer keys")
    top_k = settings.top_k
    if top_k is not None and top_k > min(ns):
        raise ValueError(f"top_k={top_k} is larger than the memory at size {min(ns)} ({min(ns)} tokens); "
                         "lower top_k or drop the smaller sizes")
    return ns, limit


def _score_documents(runners, docs, n: int, use, prog, spare: list | None = None
                     ) -> tuple[dict[str, int], int, float]:
    """Argmax hits of each used line on the query answers of ``docs`` (``documents``) with their first ``n``
    tokens in memory: (hits per line, answer tokens, seconds spent filling the memory). ``spare``: a list
    holding the previous batch's stores (emptied in place and reused; this batch's are left there)."""
    inputs, targets = docs["tokens"][:, :-1], docs["tokens"][:, 1:]  # [b, n + Tq]
    answer, keep = docs["answer"][:, 1:], docs["segment"][:, :-1] > 0  # [b, n + Tq]
    b = inputs.shape[0]
    done = [0]

    def tick(t):
        prog.update((t - done[0]) * b, note=f"size {n:,}")
        done[0] = t

    tf = time.perf_counter()
    fot_runner = runners["fot"]
    stores = fot_runner.empty_memory(b, n, spare.pop() if spare else None)
    stores = fot_runner.fill(stores, inputs[:, :n], keep[:, :n], progress=tick)
    jax.block_until_ready(stores)
    fill_s = time.perf_counter() - tf
    q = jnp.asarray(inputs[:, n:])  # [b, Tq] query tokens
    tgt, ans = jnp.asarray(targets[:, n:]), jnp.asarray(answer[:, n:], jnp.float32)  # [b, Tq]
    hits = {"fot": _hits(fot_runner.query(stores, q), tgt, ans)}
    if use["dense"]:
        hits["dense"] = _hits(runners["dense"].query(stores, q), tgt, ans)
    if spare is not None:
        spare.append(stores)
    del stores
    hits["off"] = _hits(runners["off"].query({}, q), tgt, ans)
    if use["baseline"]:
        hits["baseline"] = _hits(runners["baseline"](inputs, n), tgt, ans)
    return hits, int(answer[:, n:].sum()), fill_s


def _runners(model, params, task: DictionaryTask, settings: DictionaryEvalSettings, baseline, mesh) -> dict:
    """The evaluated lines: ``fot`` (top-k), ``dense``, ``off`` (memory off) ``MemoryInference``s and
    ``baseline`` (``FullContext(...).logits`` or None)."""
    window, mem_dtype = task.window, settings.mem_dtype
    runners = {"fot": MemoryInference(model, params, WindowedConfig(window=window, top_k=settings.top_k,
                                                                    mem_dtype=mem_dtype, on_overflow="error"),
                                      mesh=mesh),
               "dense": MemoryInference(model, params, WindowedConfig(window=window, mem_dtype=mem_dtype), mesh=mesh),
               "off": MemoryInference(model, params, WindowedConfig(window=window, use_memory=False), mesh=mesh),
               "baseline": None}
    if baseline is not None:
        b_model, b_params = baseline
        if b_model.config.vocab_size < task.vocab_size:
            raise ValueError(f"baseline vocab_size {b_model.config.vocab_size} < the task's {task.vocab_size}")
        runners["baseline"] = FullContext(b_model, b_params, chunk=settings.baseline_chunk).logits
    return runners


def _score_size(runners, task: DictionaryTask, settings: DictionaryEvalSettings, n: int, rows: int,
                prog) -> tuple[dict[str, float | None], int, float]:
    """Accuracy of every line at memory size ``n`` over ``num_docs`` documents, ``rows`` at a time (None for
    a line not evaluated at ``n``): (accuracies, answer tokens, seconds spent filling the memory)."""
    s = settings
    use = {"fot": True, "dense": s.dense and (s.dense_max_tokens is None or n <= s.dense_max_tokens),
           "baseline": runners["baseline"] is not None and n + task.window <= s.baseline_max_tokens, "off": True}
    correct = dict.fromkeys(use, 0)
    total, fill_s = 0, 0.0
    batches = [range(r, min(r + rows, s.num_docs)) for r in range(0, s.num_docs, rows)]

    def make(indices):
        return documents(s.seed, n, window=task.window, key_len=task.key_len, value_len=task.value_len,
                         vocab_size=task.vocab_size, indices=indices, aligned=task.aligned)

    spare = []  # one batch's stores, reused by the next (MemoryInference.empty_memory)
    # The next batch's documents are generated on a host thread while this batch fills the memory.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as host:
        pending = host.submit(make, batches[0])
        for i in range(len(batches)):
            docs = pending.result()
            pending = host.submit(make, batches[i + 1]) if i + 1 < len(batches) else None
            hits, n_answers, seconds_filling = _score_documents(runners, docs, n, use, prog, spare)
            del docs
            for k, v in hits.items():
                correct[k] += v
            total += n_answers
            fill_s += seconds_filling
    return {k: correct[k] / total if use[k] else None for k in use}, total, fill_s


def run_eval(model, params, task: DictionaryTask, settings: DictionaryEvalSettings, *, baseline=None,
             mesh=None) -> dict[str, Any]:
    """Accuracy curves (module docstring). ``sizes``: definition tokens in memory (rounded up to a
    multiple of ``window``; beyond the task's unique-key limit → ValueError). ``aligned``: lay
    definitions out as in training — ``window // record`` whole records per window, padding at the
    window's end. ``memory_budget_bytes`` bounds the stores of one batch of documents (at least one
    document per batch; the RAM check refuses sizes whose single document cannot fit).
    ``baseline``: ``(model, params)`` of a standard transformer (see module docstring), read in chunks of
    ``baseline_chunk`` tokens with a key/value cache (:class:`fot.eval.baseline.FullContext`).

    Returns ``{"sizes", "fot_accuracy", "fot_dense_accuracy", "baseline_accuracy", "no_memory_accuracy",
    "answers", "seconds", "fill_tokens_per_second", "peak_rss_gib", ...}`` (None where a line was not
    evaluated at that size). :func:`evaluate` is this function with flat keyword arguments (the fields of
    :class:`DictionaryTask` and :class:`DictionaryEvalSettings`; gin binds them as ``dictionary_eval.*``).
    """
    s = settings
    ns, limit = _check(task, s)
    model_config = model.config
    if not model_config.mem_layers:
        raise ValueError("the model has no memory layers (ModelConfig.mem_layers is empty)")
    resources.check_fits(estimate_bytes(model_config, max(ns), 1, s.mem_dtype),
                         f"dictionary eval at {max(ns):,} tokens in memory (mem_dtype {s.mem_dtype})")
    runners = _runners(model, params, task, s, baseline, mesh)
    bpt = memory_bytes_per_token(model_config, s.mem_dtype)
    prog = resources.Progress(sum(ns) * s.num_docs, "dictionary eval (memory tokens filled)", enabled=s.progress)
    lines = {k: [] for k in ("fot", "dense", "baseline", "off")}
    answers, seconds, fill_rates = [], [], []
    for n in ns:
        t0 = time.perf_counter()
        rows = max(1, min(s.num_docs, s.memory_budget_bytes // max(1, n * bpt)))
        accuracy, total, fill_s = _score_size(runners, task, s, n, rows, prog)
        for k in lines:
            lines[k].append(accuracy[k])
        answers.append(total)
        seconds.append(round(time.perf_counter() - t0, 3))
        fill_rates.append(round(n * s.num_docs / max(fill_s, 1e-9), 1))
    prog.close(note="done")
    result = {"task": "dictionary", "sizes": ns, "fot_accuracy": lines["fot"],
              "fot_dense_accuracy": lines["dense"], "no_memory_accuracy": lines["off"],
              "answers": answers, "seconds": seconds, "fill_tokens_per_second": fill_rates,
              "peak_rss_gib": round(resources.peak_rss_bytes() / resources.GIB, 3),
              "window": task.window, "top_k": s.top_k, "num_docs": s.num_docs, "seed": s.seed,
              "mem_dtype": s.mem_dtype, "key_len": task.key_len, "value_len": task.value_len,
              "vocab_size": task.vocab_size, "max_dictionary_tokens": limit, "aligned": task.aligned}
    if runners["baseline"] is not None:
        result["baseline_accuracy"] = lines["baseline"]
        result["baseline_max_tokens"] = s.baseline_max_tokens
    return result


evaluate = keyword_api(run_eval, "evaluate", task=DictionaryTask, settings=DictionaryEvalSettings)


def plot(result: dict[str, Any], path: str) -> None:
    """Accuracy vs dictionary tokens in memory (log2 x): FoT top-k, FoT dense, baseline, memory off."""
    xs = result["sizes"]

    def series(key, fmt, label):
        pts = [(x, y) for x, y in zip(xs, result.get(key) or []) if y is not None]
        return ([p[0] for p in pts], [p[1] for p in pts], fmt, label) if pts else None

    lines = [series("fot_accuracy", "o-", f"FoT (top-k={result['top_k']})"),
             series("fot_dense_accuracy", "^-", "FoT (dense memory)"),
             series("baseline_accuracy", "d-.", "baseline (whole document as local context)"),
             series("no_memory_accuracy", "s--", "FoT model, memory off")]
    line_plot(path, [s for s in lines if s is not None], xlabel="dictionary tokens in memory",
              ylabel="answer-token accuracy", ylim=(0, 1.02), title=f"Dictionary lookup (window {result['window']})")
