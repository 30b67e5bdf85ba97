"""Exact top-k retrieval and memory-streaming throughput (one run, ratios measured side by side).

    python -m benchmarks.topk            # 64K / 256K / 1M keys + 64K-token streaming (≈5 min, 2 cores)
    python -m benchmarks.topk --quick    # 64K / 256K keys + 16K-token streaming

Part 1 — exact maximum-inner-product top-k, dim 128, k = 32, 256 queries, memories of 64K/256K/1M
keys, float32:
  * ``fot.ops.topk_scores`` (chunked scan with a running lax.top_k merge; each chunk is pre-filtered
    exactly by group maxima — the top-k keys of a chunk lie in the k groups with the largest maxima —
    so lax.top_k only sees ``C/g + k·g`` instead of ``C + k`` candidates; automatic g, 32 at C=16K),
  * the same op with the prefilter off (``group=0``: lax.top_k over every chunk),
  * full scores + ``jax.lax.top_k`` (materialises [256, M]),
  * FAISS ``IndexFlatIP`` with ``faiss.omp_set_num_threads`` set to the thread count XLA uses.
  Reported: queries/s, ratio to FAISS, extra memory (XLA ``memory_analysis().temp_size_in_bytes``,
  i.e. everything beyond inputs/outputs), and exactness against FAISS (max |Δscore|, index recall).

Part 2 — streaming a long random-token document through the tiny memory model (fot.model.Decoder,
window 256): tokens/s with exact top-k memory (fot.ops.memory_attention top_k: prefiltered running
top-k), the same with the prefilter off and the old 2048-key selection chunk, dense memory, and no memory.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fot.ops import topk_scores


def xla_threads() -> int:
    """Threads the XLA CPU client uses for intra-op parallelism (its Eigen pool = usable cores)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


@functools.partial(jax.jit, static_argnames=("k",))
def full_topk(queries, keys, k: int):
    return lax.top_k(queries @ keys.T, k)


def _time(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile + warm
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best


def _temp_bytes(jitted, *args) -> int:
    return int(jitted.lower(*args).compile().memory_analysis().temp_size_in_bytes)


def retrieval(sizes, *, dim=128, k=32, num_queries=256, chunk=16384, repeats=2, seed=0):
    import faiss

    threads = xla_threads()
    faiss.omp_set_num_threads(threads)
    rng = np.random.default_rng(seed)
    rows = []
    for m in sizes:
        keys_np = rng.standard_normal((m, dim), dtype=np.float32)
        q_np = rng.standard_normal((num_queries, dim), dtype=np.float32)
        keys, q = jnp.asarray(keys_np), jnp.asarray(q_np)
        index = faiss.IndexFlatIP(dim)
        index.add(keys_np)
        t_faiss = min(_timed_faiss(index, q_np, k) for _ in range(repeats))
        ref_d, ref_i = index.search(q_np, k)

        ops_fn = jax.jit(lambda a, b: topk_scores(a, b, k, chunk_size=chunk))
        cands = {
            "fot.ops.topk_scores": (ops_fn, (q, keys)),
            "topk_scores group=0": (jax.jit(lambda a, b: topk_scores(a, b, k, chunk_size=chunk, group=0)),
                                    (q, keys)),
            "full scores + top_k": (jax.jit(lambda a, b: full_topk(a, b, k=k)), (q, keys)),
        }
        row = {"keys": m, "faiss_qps": num_queries / t_faiss}
        for name, (fn, args) in cands.items():
            t = _time(lambda: fn(*args), repeats)
            d, i = fn(*args)
            d, i = np.asarray(d), np.asarray(i)
            recall = np.mean([len(set(i[r]) & set(ref_i[r])) / k for r in range(num_queries)])
            row[name] = {"qps": num_queries / t, "vs_faiss": t_faiss / t,
                         "temp_MiB": _temp_bytes(fn, *args) / 2**20,
                         "max_abs_score_err": float(np.abs(d - ref_d).max()), "recall": float(recall)}
        rows.append(row)
        print(f"[topk] {m} keys: FAISS {row['faiss_qps']:.1f} q/s, " + ", ".join(
            f"{k} {v['qps']:.1f} q/s" for k, v in row.items() if isinstance(v, dict)), flush=True)
        del keys, index
    return {"threads": threads, "dim": dim, "k": k, "queries": num_queries, "chunk": chunk, "rows": rows}


def _timed_faiss(index, q, k) -> float:
    index.search(q[:8], k)
    t0 = time.perf_counter()
    index.search(q, k)
    return time.perf_counter() - t0


def streaming(doc_len: int, *, window=256, top_k=32, seed=0):
    """tokens/s for one ``doc_len``-token document through the tiny model (memory holds the whole doc)."""
    import fot.ops.memory as opsmem
    import fot.ops.topk as opstopk
    from fot.inference.windowed import MemoryInference, WindowedConfig
    from fot.model import Decoder, ModelConfig

    cfg = ModelConfig(vocab_size=256, d_model=128, num_layers=4, num_heads=4, mlp_dim=256,
                      mem_layers=(2,))
    model = Decoder(cfg)
    tokens = np.random.default_rng(seed).integers(0, 256, (1, doc_len), dtype=np.int32)
    params = model.init(jax.random.PRNGKey(seed), jnp.asarray(tokens[:, :window]))["params"]
    out = {}
    variants = (("top-k (k=%d)" % top_k, dict(top_k=top_k), None),
                ("top-k unfiltered", dict(top_k=top_k), "unfiltered"),
                ("dense", {}, None), ("no memory", dict(use_memory=False), None))
    for name, kw, mode in variants:
        saved = (opsmem.TOPK_CHUNK_MAX, opstopk.auto_group)
        if mode == "unfiltered":  # the previous op: 2048-key chunks, lax.top_k over every chunk
            opsmem.TOPK_CHUNK_MAX, opstopk.auto_group = opsmem.DEFAULT_CHUNK, (lambda size, k: 0)
        runner = MemoryInference(model, params, WindowedConfig(window=window, capacity=doc_len,
                                                               mem_dtype="float32", **kw))
        warm = runner.init_memory(1, doc_len)
        jax.block_until_ready(runner.step(warm, tokens[:, :window])[0])  # compile (traces with the setting)
        opsmem.TOPK_CHUNK_MAX, opstopk.auto_group = saved
        stores = runner.init_memory(1, doc_len)
        t0 = time.perf_counter()
        for s in range(0, doc_len, window):
            logits, stores, _ = runner.step(stores, tokens[:, s:s + window])
        jax.block_until_ready(logits)
        out[name] = doc_len / (time.perf_counter() - t0)
        print(f"[stream] {name}: {out[name]:.0f} tokens/s", flush=True)
    return {"doc_len": doc_len, "window": window, "model": "4 layers, d=128, 4 heads, mem layer 2",
            "tokens_per_s": out}


def print_report(res) -> None:
    r = res["retrieval"]
    print(f"\nExact top-k: dim {r['dim']}, k {r['k']}, {r['queries']} queries, float32, "
          f"{r['threads']} threads (XLA and FAISS), ops chunk {r['chunk']}")
    print(f"{'keys':>9} {'method':<22} {'queries/s':>10} {'x FAISS':>8} {'extra MiB':>10} "
          f"{'max|dS|':>9} {'recall':>7}")
    for row in r["rows"]:
        print(f"{row['keys']:>9} {'FAISS IndexFlatIP':<22} {row['faiss_qps']:>10.1f} {1.0:>8.2f} "
              f"{'-':>10} {'-':>9} {'-':>7}")
        for name, v in row.items():
            if isinstance(v, dict):
                print(f"{'':>9} {name:<22} {v['qps']:>10.1f} {v['vs_faiss']:>8.2f} {v['temp_MiB']:>10.1f} "
                      f"{v['max_abs_score_err']:>9.1e} {v['recall']:>7.3f}")
    s = res.get("streaming")
    if s:
        print(f"\nStreaming a {s['doc_len']}-token document, window {s['window']} ({s['model']}):")
        base = s["tokens_per_s"]["no memory"]
        for name, tps in s["tokens_per_s"].items():
            print(f"  {name:<14} {tps:>10.0f} tokens/s  ({tps / base:.2f}x of no memory)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="64K/256K keys, 16K-token stream")
    p.add_argument("--sizes", default=None, help="comma-separated memory sizes (keys)")
    p.add_argument("--stream_len", type=int, default=None)
    p.add_argument("--chunk", type=int, default=16384, help="fot.ops.topk_scores chunk_size")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    a = p.parse_args(argv)
    sizes = [int(x) for x in a.sizes.split(",")] if a.sizes else (
        [65536, 262144] if a.quick else [65536, 262144, 1048576])
    stream_len = a.stream_len if a.stream_len is not None else (16384 if a.quick else 65536)
    res = {"retrieval": retrieval(sizes, chunk=a.chunk, repeats=a.repeats)}
    if stream_len > 0:
        res["streaming"] = streaming(stream_len)
    print_report(res)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
