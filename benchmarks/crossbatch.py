"""Crossbatch memory layer: blockwise (fot.ops) vs dense materialised, n extra contexts, one run.

    python -m benchmarks.crossbatch [--batch 4] [--length 256] [--heads 8] [--head_dim 64]
                                    [--extra 0,1,8,64] [--reps 5] [--block_rows G] [--no_train_step]

Prints a table and ratios measured in this run (time = minimum of --reps forward+backward calls after a
warm-up, all cases timed round-robin so load bursts from other processes hit them alike; peak memory = XLA
compiled memory_analysis() temp bytes of the jitted fwd+bwd), then one "target met / NOT met" line per
issue-2 target (layer memory n=max vs n=1 <= 1.5x; train-step time ratio within 10% of the FLOP ratio).
--block_rows g sets the op's extra rows per online-softmax block (default: the op's default, 1). Extra rows cycle
through the batch (row b uses rows b-1, b-2, ... mod B), so n may exceed B. FLOP ratio (n vs 0) counts
the matmul FLOPs this implementation performs: every block (local and each extra context) is a full
L x L block, so the layer's ratio is (n + 1) / 1. The full train step (fot.model Decoder, 37M-like
widths with fewer layers and a small vocabulary so it runs on CPU) is included when fot.model imports;
its FLOP ratio = (XLA cost_analysis FLOPs of the n=0 step + 14*B*H*L*L*Dh*n per memory layer) / n=0 FLOPs
(XLA's cost analysis counts a while-loop body once, so the extra contexts are added analytically).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import time

if "JAX_PLATFORMS" not in os.environ:
    os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fot.ops import crossbatch_attention  # noqa: E402


def cyclic_rows(b, n):
    return ((np.arange(b)[:, None] - 1 - np.arange(n)[None, :]) % b).astype(np.int32)


def dense_crossbatch(q, k, v, ek, ev, rows):
    """The reference's approach: gather (n+1) copies of K/V, logits [B,H,L,(n+1)L], one softmax."""
    b, t, h, d = q.shape
    n = rows.shape[1]
    keys = jnp.concatenate([k[:, None], jnp.take(ek, rows, axis=0)], axis=1).reshape(b, (n + 1) * t, h, d)
    vals = jnp.concatenate([v[:, None], jnp.take(ev, rows, axis=0)], axis=1).reshape(b, (n + 1) * t, h, d)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, keys) * d ** -0.5
    causal = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]
    mask = jnp.concatenate([causal, jnp.ones((t, n * t), bool)], axis=1)
    p = jax.nn.softmax(jnp.where(mask, s, -1e6).astype(jnp.float32), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", p, vals)


def _time_interleaved(cases, reps):
    """cases: {key: (fn, args)} -> {key: seconds}. Warm up every case, then time them round-robin
    (rep 1 of every case, rep 2 of every case, ...) and keep each case's minimum, so a burst of load
    from other processes hits all cases alike and ratios stay meaningful on a shared machine."""
    for fn, args in cases.values():
        jax.block_until_ready(fn(*args))
    best = {key: float("inf") for key in cases}
    for _ in range(reps):
        for key, (fn, args) in cases.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            best[key] = min(best[key], time.perf_counter() - t0)
    return best


def layer_case(impl, b, t, h, d, n, run_limit_bytes, block_rows=None):
    rng = np.random.default_rng(n)
    q, k, v, ek, ev = (jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32) for _ in range(5))
    rows = jnp.asarray(cyclic_rows(b, n))
    op = (functools.partial(crossbatch_attention, block_rows=block_rows) if impl == "blockwise"
          else dense_crossbatch)

    def loss(q, k, v, ek, ev, rows):
        return jnp.sum(op(q, k, v, ek, ev, rows) ** 2)

    fn = jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3, 4)))
    args = (q, k, v, ek, ev, rows)
    temp = fn.lower(*args).compile().memory_analysis().temp_size_in_bytes
    run = (fn, args) if temp <= run_limit_bytes else None
    return {"impl": impl, "n": n, "temp_bytes": int(temp), "sec": float("nan"),
            "flops": 14.0 * b * h * t * t * d * (n + 1)}, run  # fwd 4 + bwd 10 matmul FLOPs per L x L block


def train_step_case(n, b, t):
    import optax
    from fot.model import Decoder, ModelConfig

    cfg = ModelConfig(vocab_size=2048, d_model=512, num_layers=4, num_heads=8, head_dim=64, mlp_dim=1376,
                      mem_layers=(2,), mem_positional="none", qk_norm=True)
    model = Decoder(cfg)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, size=(b, t)), jnp.int32)
    rows = jnp.asarray(cyclic_rows(b, n))
    params = model.init(jax.random.PRNGKey(0), tokens[:, :8])["params"]
    opt = optax.adamw(1e-4)
    opt_state = opt.init(params)

    def step(params, opt_state, tokens, rows):
        def loss_fn(p):
            logits = model.apply({"params": p}, tokens, extra_rows=rows)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
            return ce.mean()
        loss, g = jax.value_and_grad(loss_fn)(params)
        upd, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, upd), opt_state, loss

    fn = jax.jit(step)
    args = (params, opt_state, tokens, rows)
    compiled = fn.lower(*args).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"n": n, "temp_bytes": int(temp), "sec": float("nan"),
            "xla_flops": float(cost.get("flops", float("nan"))),
            "extra_flops": 14.0 * b * cfg.num_heads * t * t * cfg.head_dim * n * len(cfg.mem_layers)}, (fn, args)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head_dim", type=int, default=64)
    ap.add_argument("--extra", default="0,1,8,64")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dense_run_limit_gib", type=float, default=4.0,
                    help="compile but do not run the dense variant when its temp memory exceeds this")
    ap.add_argument("--block_rows", type=int, default=None,
                    help="extra rows per online-softmax block of the layer (default: the op's default, 1)")
    ap.add_argument("--no_train_step", action="store_true")
    a = ap.parse_args(argv)
    ns = [int(x) for x in a.extra.split(",")]
    b, t, h, d = a.batch, a.length, a.heads, a.head_dim
    print(f"# crossbatch memory layer fwd+bwd: B={b} L={t} H={h} Dh={d} devices={jax.devices()[0].platform}")
    res, runs = {}, {}
    for impl in ("blockwise", "dense"):
        for n in ns:
            res[impl, n], run = layer_case(impl, b, t, h, d, n, a.dense_run_limit_gib * 2 ** 30, a.block_rows)
            if run is not None:
                runs[impl, n] = run
    for key, sec in _time_interleaved(runs, a.reps).items():
        res[key]["sec"] = sec
    base = {impl: res[impl, ns[0]] for impl in ("blockwise", "dense")}
    n1 = 1 if 1 in ns else ns[0]
    print(f"{'impl':>9} {'n':>4} {'time_s':>9} {'t/t0':>7} {'flop/f0':>8} {'t-ratio/flop-ratio':>19} "
          f"{'temp_MiB':>9} {'mem/mem(n=1)':>12}")
    summary = {"layer": []}
    for impl in ("blockwise", "dense"):
        for n in ns:
            r = res[impl, n]
            tr = r["sec"] / base[impl]["sec"]
            fr = r["flops"] / base[impl]["flops"]
            mr = r["temp_bytes"] / res[impl, n1]["temp_bytes"]
            print(f"{impl:>9} {n:>4} {r['sec']:>9.4f} {tr:>7.2f} {fr:>8.1f} {tr / fr:>19.3f} "
                  f"{r['temp_bytes'] / 2**20:>9.1f} {mr:>12.2f}")
            summary["layer"].append(dict(r, time_ratio=tr, flop_ratio=fr, mem_ratio_vs_n1=mr))
    for n in ns:
        bl, de = res["blockwise", n], res["dense", n]
        print(f"n={n:>3}: dense/blockwise time {de['sec'] / bl['sec']:.2f}x, "
              f"temp memory {de['temp_bytes'] / bl['temp_bytes']:.2f}x")
    targets = []
    if 1 in ns and max(ns) > 1:
        nmax = max(ns)
        mr = res["blockwise", nmax]["temp_bytes"] / res["blockwise", 1]["temp_bytes"]
        targets.append(f"layer peak memory n={nmax} / n=1 = {mr:.2f} (target <= 1.5): "
                       f"{'target met' if mr <= 1.5 else 'target NOT met'}")
    if not a.no_train_step:
        try:
            import fot.model  # noqa: F401
        except Exception as e:  # pragma: no cover - reported, not hidden
            print(f"# full train step skipped: fot.model not importable ({e!r})")
        else:
            print("# full train step (Decoder: d_model 512, 4 layers, 8 heads x 64, mem layer 2, vocab 2048, "
                  f"adamw), B={b} L={t}")
            cases = [train_step_case(n, b, t) for n in ns]
            tr_res = [c[0] for c in cases]
            secs = _time_interleaved({i: c[1] for i, c in enumerate(cases)}, a.reps)
            for i, r in enumerate(tr_res):
                r["sec"] = secs[i]
            f0 = tr_res[0]["xla_flops"]
            print(f"{'n':>4} {'time_s':>9} {'t/t0':>7} {'flop/f0':>8} {'t-ratio/flop-ratio':>19} {'temp_MiB':>9}")
            summary["train_step"] = []
            for r in tr_res:
                tr = r["sec"] / tr_res[0]["sec"]
                fr = (f0 + r["extra_flops"]) / f0
                print(f"{r['n']:>4} {r['sec']:>9.4f} {tr:>7.2f} {fr:>8.2f} {tr / fr:>19.3f} "
                      f"{r['temp_bytes'] / 2**20:>9.1f}")
                summary["train_step"].append(dict(r, time_ratio=tr, flop_ratio=fr))
                if r["n"] != ns[0]:
                    ok = abs(tr / fr - 1.0) <= 0.10
                    targets.append(f"train step n={r['n']}: time ratio {tr:.2f} vs FLOP ratio {fr:.2f} "
                                   f"({tr / fr:.3f}x; target within 10%): {'target met' if ok else 'target NOT met'}")
    for line in targets:
        print(line)
    print(json.dumps({"benchmark": "crossbatch", "batch": b, "length": t, "heads": h, "head_dim": d,
                      **summary}, default=float))


if __name__ == "__main__":
    main()
