"""Dictionary-lookup accuracy vs the number of dictionary tokens in memory (FoT paper §5.2, App.).

For every memory size N, ``num_docs`` documents are generated with ``fot.data.dictionary`` holding N
tokens of definitions ``<k> k.. <v> v..`` followed by one window of queries ``<q> k.. <v> v..``. The
definitions stream through the memory (N tokens, windows of ``window``), then the query window runs with
exact top-k (or dense) memory attention. Accuracy = fraction of answer tokens v_1..v_V predicted by
argmax. The baseline is the same model without memory (the query window sees only itself), the paper's
"baseline fails beyond its context" curve.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fot.data.dictionary import DictionarySpec, generate_documents
from fot.inference.windowed import MemoryInference, WindowedConfig
from fot.eval.plotting import line_plot


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


def documents(rng: np.random.Generator, n: int, *, window: int, key_len: int, value_len: int, vocab_size: int,
              num_docs: int, aligned: bool = True) -> dict[str, np.ndarray] | None:
    """The ``num_docs`` documents :func:`evaluate` scores for ``n`` definition tokens (a multiple of
    ``window``) followed by one window of queries (``fot.data.dictionary.generate_documents`` arrays,
    [num_docs, n + window + 1]); None when ``n`` holds no definition or more than the unique keys."""
    record = key_len + value_len + 2
    n_def = (n // window) * (window // record) if aligned else n // record
    if n_def > max_dictionary_tokens(key_len, value_len, vocab_size) // record or n_def < 1:
        return None
    spec = DictionarySpec(key_len=key_len, value_len=value_len, vocab_size=vocab_size,
                          doc_len=n + window, query_len=window, num_definitions=n_def)
    docs = generate_documents(rng, num_docs, spec)
    return _align_definitions(docs, n, window, record) if aligned else docs


def evaluate(model, params, *, window: int, key_len: int, value_len: int, vocab_size: int,
             sizes: Sequence[int], num_docs: int = 16, top_k: int | None = 32, seed: int = 0,
             mem_dtype: str = "float32", memory_budget_bytes: int = 1 << 30, aligned: bool = True,
             mesh=None) -> dict[str, Any]:
    """Accuracy curves. ``sizes``: definition tokens in memory (rounded up to a multiple of ``window``;
    sizes beyond the unique-key limit of the spec are skipped and listed in ``skipped``).
    ``aligned``: lay definitions out as in training — ``window // record`` whole records per window,
    padding at the window's end, so no record straddles a window boundary (False: records back to back).

    Returns ``{"sizes", "fot_accuracy", "no_memory_accuracy", "answers", "skipped", ...}``.
    """
    if num_docs < 1:
        raise ValueError(f"num_docs must be >= 1, got {num_docs}")
    if not sizes:
        raise ValueError("sizes must name at least one memory size")
    cfg_mem = WindowedConfig(window=window, top_k=top_k, mem_dtype=mem_dtype, on_overflow="error")
    fot_runner = MemoryInference(model, params, cfg_mem, mesh=mesh)
    base_runner = MemoryInference(model, params, WindowedConfig(window=window, use_memory=False), mesh=mesh)
    mcfg = model.config
    limit = max_dictionary_tokens(key_len, value_len, vocab_size)
    bytes_per_token = 2 * mcfg.num_kv_heads * mcfg.head_dim * jnp.dtype(mem_dtype).itemsize * len(mcfg.mem_layers)
    out_sizes, fot_acc, base_acc, answers, skipped = [], [], [], [], []
    rng = np.random.default_rng(seed)
    for size in sizes:
        n = _round_up(int(size), window)
        if n < 1:
            raise ValueError(f"memory sizes must be >= 1, got {size}")
        docs = documents(rng, n, window=window, key_len=key_len, value_len=value_len, vocab_size=vocab_size,
                         num_docs=num_docs, aligned=aligned)
        if docs is None:
            skipped.append(int(size))
            continue
        inputs, targets = docs["tokens"][:, :-1], docs["tokens"][:, 1:]
        answer = docs["answer"][:, 1:]
        keep = docs["segment"][:, :-1] > 0
        rows = max(1, min(num_docs, memory_budget_bytes // max(1, n * bytes_per_token)))
        correct_f = correct_b = total = 0
        for r in range(0, num_docs, rows):
            sl = slice(r, min(r + rows, num_docs))
            b = sl.stop - sl.start
            stores = fot_runner.init_memory(b, n)
            stores = fot_runner.fill(stores, inputs[sl, :n], keep[sl, :n])
            q_tok = inputs[sl, n:]
            logits_f, _, _ = fot_runner.step(stores, q_tok)
            logits_b, _, _ = base_runner.step({}, q_tok)
            tgt, ans = targets[sl, n:], answer[sl, n:]
            correct_f += int(np.sum((np.asarray(logits_f).argmax(-1) == tgt) & ans))
            correct_b += int(np.sum((np.asarray(logits_b).argmax(-1) == tgt) & ans))
            total += int(ans.sum())
        out_sizes.append(n)
        fot_acc.append(correct_f / total)
        base_acc.append(correct_b / total)
        answers.append(total)
    return {"task": "dictionary", "sizes": out_sizes, "fot_accuracy": fot_acc, "no_memory_accuracy": base_acc,
            "answers": answers, "skipped": skipped, "window": window, "top_k": top_k, "num_docs": num_docs,
            "key_len": key_len, "value_len": value_len, "vocab_size": vocab_size,
            "max_dictionary_tokens": limit, "aligned": aligned}


def plot(result: dict[str, Any], path: str) -> None:
    """Accuracy vs dictionary tokens in memory (log2 x), FoT vs no memory."""
    line_plot(path, [(result["sizes"], result["fot_accuracy"], "o-", f"FoT (top-k={result['top_k']})"),
                     (result["sizes"], result["no_memory_accuracy"], "s--", "same model, no memory")],
              xlabel="dictionary tokens in memory", ylabel="answer-token accuracy", ylim=(0, 1.02),
              title=f"Dictionary lookup (window {result['window']})")
