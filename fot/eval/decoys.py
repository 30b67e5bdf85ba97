"""Which near-miss keys distract the memory layer? Dictionary accuracy with planted decoy records.

The held-out documents of ``fot.eval.dictionary`` (seed ``(seed, n, d)``) hold ``n`` tokens of random
definitions and one window of queries. Here, before the memory is filled, ``count`` definition records
per query (never a queried one) are rewritten into **decoys**: their key shares exactly ``shared`` of
the K key positions with the query's key (the other positions get other symbols), their value is new.
The accuracy drop per decoy estimates how likely one memory record that shares ``shared`` key tokens
with a query is to win over the true record; multiplied by how many such records a memory of size M
holds (``expected_near_misses``) it says which kind of key the model fails on as memory grows.

    python -m fot.eval.decoys --workdir=runs/dict --step=1500 [--n=4096 --num_docs=32]

prints one JSON line: accuracy (top-k and dense) with no decoys and for each (shared, count) case.
"""
from __future__ import annotations

import json
import math
import sys
from typing import Sequence

import numpy as np

from fot.eval import resources
from fot.eval.dictionary import DictionaryEvalSettings, DictionaryTask, _runners, _score_documents, documents

# (shared key tokens, decoys per query): six queries per 64-token window of queries, so at n = 4096
# (384 records) the largest case rewrites 300 of them.
DEFAULT_CASES = ((3, 6), (2, 20), (1, 50), (0, 50))


def record_starts(n: int, window: int, record: int) -> np.ndarray:
    """Start offsets of the definition records of an aligned document (``window // record`` per window)."""
    per = window // record
    return np.array([w * window + r * record for w in range(n // window) for r in range(per)])


def plant_decoys(tokens: np.ndarray, n: int, *, window: int, key_len: int, value_len: int, vocab_size: int,
                 shared: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """A copy of ``tokens`` [b, n + window + 1] (``fot.eval.dictionary.documents``) in which, for every query
    record of the last window, ``count`` definition records that no query asks for get a key sharing exactly
    ``shared`` positions with that query's key and a random value. Raises ValueError if they do not fit."""
    K, R, S = key_len, key_len + value_len + 2, vocab_size - 4
    if not 0 <= shared < K:
        raise ValueError(f"shared must be in [0, {K - 1}] for key_len {K}, got {shared}")
    out = tokens.copy()
    starts = record_starts(n, window, R)
    num_queries = window // R
    if num_queries * (count + 1) > len(starts):
        raise ValueError(f"{count} decoys for each of {num_queries} queries do not fit in {len(starts)} records")
    for b in range(out.shape[0]):
        def_keys = np.stack([out[b, s + 1:s + 1 + K] for s in starts])  # [records, K]
        q_keys = [out[b, n + q * R + 1:n + q * R + 1 + K].copy() for q in range(num_queries)]
        true = {int(np.flatnonzero((def_keys == k).all(1))[0]) for k in q_keys}
        free = rng.permutation([j for j in range(len(starts)) if j not in true])
        for q, key in enumerate(q_keys):
            for j in free[q * count:(q + 1) * count]:
                decoy = key.copy()
                changed = rng.permutation(K)[:K - shared]
                decoy[changed] = 4 + (decoy[changed] - 4 + rng.integers(1, S, len(changed))) % S  # another symbol
                s = starts[j]
                out[b, s + 1:s + 1 + K] = decoy
                out[b, s + K + 2:s + R] = 4 + rng.integers(0, S, value_len)
    return out


def expected_near_misses(memory_tokens: int, *, window: int, key_len: int, value_len: int,
                         vocab_size: int) -> dict[int, float]:
    """Expected number of random definition records in a memory of ``memory_tokens`` whose key shares
    exactly s positions with a given key, for s = 0..K-1 (keys uniform over the symbols)."""
    R, S, K = key_len + value_len + 2, vocab_size - 4, key_len
    records = (memory_tokens // window) * (window // R)
    return {s: records * math.comb(K, s) * (1 / S) ** s * (1 - 1 / S) ** (K - s) for s in range(K)}


def evaluate(model, params, *, n: int = 4096, window: int = 64, key_len: int = 4, value_len: int = 4,
             vocab_size: int = 64, num_docs: int = 32, top_k: int = 32, seed: int = 4242,
             cases: Sequence[tuple[int, int]] = DEFAULT_CASES) -> dict:
    """Accuracy (top-k, dense) on the answers of ``num_docs`` held-out documents with ``n`` memory tokens:
    ``"none"`` without decoys, ``"shared=s,count=c"`` with decoys; ``per_decoy_loss`` = the top-k accuracy
    lost per planted decoy for each case. Filling and scoring are ``fot.eval.dictionary``'s own."""
    task = DictionaryTask(window=window, key_len=key_len, value_len=value_len, vocab_size=vocab_size)
    settings = DictionaryEvalSettings(sizes=[n], num_docs=num_docs, top_k=top_k, seed=seed, progress=False)
    runners = _runners(model, params, task, settings, None, None)
    use = {"fot": True, "dense": True, "baseline": False, "off": True}  # off: always scored there
    prog = resources.Progress(0, "decoys", enabled=False)
    base = documents(seed, n, window=window, key_len=key_len, value_len=value_len, vocab_size=vocab_size,
                     num_docs=num_docs)
    rng = np.random.default_rng([seed, n, 7])
    out: dict = {"n": n, "num_docs": num_docs, "top_k": top_k, "seed": seed}

    def accuracy(tokens):
        hits, answers, _ = _score_documents(runners, {**base, "tokens": tokens}, n, use, prog)
        out["answers"] = answers
        return [round(hits[line] / answers, 4) for line in ("fot", "dense")]

    out["none"] = accuracy(base["tokens"])
    out["per_decoy_loss"] = {}
    for shared, count in cases:
        toks = plant_decoys(base["tokens"], n, window=window, key_len=key_len, value_len=value_len,
                            vocab_size=vocab_size, shared=shared, count=count, rng=rng)
        name = f"shared={shared},count={count}"
        out[name] = accuracy(toks)
        out["per_decoy_loss"][name] = round((out["none"][0] - out[name][0]) / count, 6)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    from fot.eval.restore import EvalError, _train_data_param, load_model
    from fot.runtime import describe_os_error, fail, os_error_code
    prog = "fot.eval.decoys"
    p = argparse.ArgumentParser(prog=f"python -m {prog}", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--n", type=int, default=4096, help="definition tokens in memory")
    p.add_argument("--num_docs", type=int, default=32)
    p.add_argument("--top_k", type=int, default=32)
    p.add_argument("--seed", type=int, default=4242)
    a = p.parse_args(argv)
    try:
        model, params, step = load_model(a.workdir, a.step)
    except EvalError as e:
        fail(prog, e)
    except OSError as e:  # a damaged checkpoint: exit 4, naming it
        fail(prog, describe_os_error(e), os_error_code(e))
    import gin
    task = {k: _train_data_param(gin, k) for k in ("seq_len", "key_len", "value_len", "vocab_size")}
    if None in task.values():
        fail(prog, f"{a.workdir} is not a dictionary-task run (its training data binds {task})")
    window = task["seq_len"]
    if a.n % window or a.n < window:
        fail(prog, f"--n={a.n} must be a positive multiple of the window {window}")
    res = evaluate(model, params, n=a.n, window=window, key_len=task["key_len"], value_len=task["value_len"],
                   vocab_size=task["vocab_size"], num_docs=a.num_docs, top_k=a.top_k, seed=a.seed)
    res.update(workdir=a.workdir, checkpoint_step=step)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
