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
from fot.inference.windowed import MemoryInference, WindowedConfig
from fot.training.step import token_sums

HOST_BYTES_PER_TOKEN = 48  # one generated document while it is laid out: int32 tokens/segment, answer, copies
FILL_TOKENS_PER_CALL = 1 << 16  # MemoryInference.fill's default rows per call (tokens)


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
    per = window // record
    n_def = docs["keys"].shape[1]
    recs = tokens[:, : n_def * record].reshape(tokens.shape[0], n_def, record).copy()
    tokens[:, :n] = 0
    segment[:, :n] = 0
    for w in range(n // window):
        chunk = recs[:, w * per:(w + 1) * per].reshape(tokens.shape[0], -1)
        tokens[:, w * window: w * window + chunk.shape[1]] = chunk
        segment[:, w * window: w * window + chunk.shape[1]] = 1
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
    generated documents and the prefill's activations (one call of ``FILL_TOKENS_PER_CALL`` tokens)."""
    act = FILL_TOKENS_PER_CALL * 4 * (8 * model_config.d_model + 3 * model_config.mlp_dim)
    return rows * n * (memory_bytes_per_token(model_config, mem_dtype) + HOST_BYTES_PER_TOKEN) + act


def _check(sizes, window, key_len, value_len, vocab_size, top_k, aligned, num_docs):
    if num_docs < 1:
        raise ValueError(f"dictionary_eval.num_docs must be >= 1, got {num_docs}")
    if not sizes:
        raise ValueError("dictionary_eval.sizes must name at least one memory size")
    if min(int(s) for s in sizes) < 1:
        raise ValueError(f"dictionary_eval.sizes must be >= 1, got {list(sizes)}")
    ns = [_round_up(int(s), window) for s in sizes]
    record = key_len + value_len + 2
    if aligned and window // record < 1:
        raise ValueError(f"window={window} holds no whole record of {record} tokens")
    limit = max_dictionary_tokens(key_len, value_len, vocab_size)
    too_big = [s for s in sizes if not size_fits(int(s), window, key_len, value_len, vocab_size, aligned)]
    if too_big:
        raise ValueError(f"dictionary_eval.sizes {too_big} exceed the task's unique-key limit of {limit:,} "
                         f"tokens ({vocab_size - 4} symbols ** key_len {key_len} keys x {record}-token "
                         "records); use smaller sizes or a model trained with longer keys")
    if top_k is not None and top_k > min(ns):
        raise ValueError(f"top_k={top_k} is larger than the memory at size {min(ns)} ({min(ns)} tokens); "
                         "lower top_k or drop the smaller sizes")
    return ns, limit


def _score_documents(runners, docs, n: int, use, prog) -> tuple[dict[str, int], int, float]:
    """Argmax hits of each used line on the query answers of ``docs`` (``documents``) with their first ``n``
    tokens in memory: (hits per line, answer tokens, seconds spent filling the memory)."""
    inputs, targets = docs["tokens"][:, :-1], docs["tokens"][:, 1:]  # [b, n + Tq]
    answer, keep = docs["answer"][:, 1:], docs["segment"][:, :-1] > 0  # [b, n + Tq]
    b = inputs.shape[0]
    done = [0]

    def tick(t):
        prog.update((t - done[0]) * b, note=f"size {n:,}")
        done[0] = t

    tf = time.perf_counter()
    fot_runner = runners["fot"]
    stores = fot_runner.fill(fot_runner.init_memory(b, n), inputs[:, :n], keep[:, :n], progress=tick)
    jax.block_until_ready(stores)
    fill_s = time.perf_counter() - tf
    q = jnp.asarray(inputs[:, n:])  # [b, Tq] query tokens
    tgt, ans = jnp.asarray(targets[:, n:]), jnp.asarray(answer[:, n:], jnp.float32)  # [b, Tq]
    hits = {"fot": _hits(fot_runner.query(stores, q), tgt, ans)}
    if use["dense"]:
        hits["dense"] = _hits(runners["dense"].query(stores, q), tgt, ans)
    del stores
    hits["off"] = _hits(runners["off"].query({}, q), tgt, ans)
    if use["baseline"]:
        hits["baseline"] = _hits(runners["baseline"](inputs, n), tgt, ans)
    return hits, int(answer[:, n:].sum()), fill_s


def evaluate(model, params, *, window: int, key_len: int, value_len: int, vocab_size: int,
             sizes: Sequence[int], num_docs: int = 16, top_k: int | None = 32, seed: int = 0,
             mem_dtype: str = "float32", memory_budget_bytes: int = 1 << 30, aligned: bool = True,
             dense: bool = True, dense_max_tokens: int | None = None, baseline=None,
             baseline_max_tokens: int = 1 << 14, baseline_chunk: int = 512, progress: bool = True, mesh=None) -> dict[str, Any]:
    """Accuracy curves (module docstring). ``sizes``: definition tokens in memory (rounded up to a
    multiple of ``window``; beyond the task's unique-key limit → ValueError). ``aligned``: lay
    definitions out as in training — ``window // record`` whole records per window, padding at the
    window's end. ``memory_budget_bytes`` bounds the stores of one batch of documents (at least one
    document per batch; the RAM check refuses sizes whose single document cannot fit).
    ``baseline``: ``(model, params)`` of a standard transformer (see module docstring), read in chunks of
    ``baseline_chunk`` tokens with a key/value cache (:class:`fot.eval.baseline.FullContext`).

    Returns ``{"sizes", "fot_accuracy", "fot_dense_accuracy", "baseline_accuracy", "no_memory_accuracy",
    "answers", "seconds", "fill_tokens_per_second", "peak_rss_gib", ...}`` (None where a line was not
    evaluated at that size).
    """
    ns, limit = _check(sizes, window, key_len, value_len, vocab_size, top_k, aligned, num_docs)
    model_config = model.config
    if not model_config.mem_layers:
        raise ValueError("the model has no memory layers (ModelConfig.mem_layers is empty)")
    resources.check_fits(estimate_bytes(model_config, max(ns), 1, mem_dtype),
                         f"dictionary eval at {max(ns):,} tokens in memory (mem_dtype {mem_dtype})")
    runners = {"fot": MemoryInference(model, params, WindowedConfig(window=window, top_k=top_k, mem_dtype=mem_dtype,
                                                                    on_overflow="error"), mesh=mesh),
               "dense": MemoryInference(model, params, WindowedConfig(window=window, mem_dtype=mem_dtype), mesh=mesh),
               "off": MemoryInference(model, params, WindowedConfig(window=window, use_memory=False), mesh=mesh),
               "baseline": None}
    if baseline is not None:
        b_model, b_params = baseline
        if b_model.config.vocab_size < vocab_size:
            raise ValueError(f"baseline vocab_size {b_model.config.vocab_size} < the task's {vocab_size}")
        runners["baseline"] = FullContext(b_model, b_params, chunk=baseline_chunk).logits
    bpt = memory_bytes_per_token(model_config, mem_dtype)
    prog = resources.Progress(sum(ns) * num_docs, "dictionary eval (memory tokens filled)", enabled=progress)
    lines = {k: [] for k in ("fot", "dense", "baseline", "off")}
    answers, seconds, fill_rates = [], [], []
    for n in ns:
        t0 = time.perf_counter()
        rows = max(1, min(num_docs, memory_budget_bytes // max(1, n * bpt)))
        use = {"fot": True, "dense": dense and (dense_max_tokens is None or n <= dense_max_tokens),
               "baseline": runners["baseline"] is not None and n + window <= baseline_max_tokens, "off": True}
        correct = dict.fromkeys(lines, 0)
        total, fill_s = 0, 0.0
        for r in range(0, num_docs, rows):
            docs = documents(seed, n, window=window, key_len=key_len, value_len=value_len, vocab_size=vocab_size,
                             indices=range(r, min(r + rows, num_docs)), aligned=aligned)
            hits, n_answers, seconds_filling = _score_documents(runners, docs, n, use, prog)
            del docs
            for k, v in hits.items():
                correct[k] += v
            total += n_answers
            fill_s += seconds_filling
        for k in lines:
            lines[k].append(correct[k] / total if use[k] else None)
        answers.append(total)
        seconds.append(round(time.perf_counter() - t0, 3))
        fill_rates.append(round(n * num_docs / max(fill_s, 1e-9), 1))
    prog.close(note="done")
    result = {"task": "dictionary", "sizes": ns, "fot_accuracy": lines["fot"],
              "fot_dense_accuracy": lines["dense"], "no_memory_accuracy": lines["off"],
              "answers": answers, "seconds": seconds, "fill_tokens_per_second": fill_rates,
              "peak_rss_gib": round(resources.peak_rss_bytes() / resources.GIB, 3),
              "window": window, "top_k": top_k, "num_docs": num_docs, "seed": seed, "mem_dtype": mem_dtype,
              "key_len": key_len, "value_len": value_len, "vocab_size": vocab_size,
              "max_dictionary_tokens": limit, "aligned": aligned}
    if runners["baseline"] is not None:
        result["baseline_accuracy"] = lines["baseline"]
        result["baseline_max_tokens"] = baseline_max_tokens
    return result


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
