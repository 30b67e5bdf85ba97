"""Data pipeline throughput vs. the 37M train step on this machine, measured in one run.

    python -m benchmarks.pipeline [--rows=8 --window=256 --pack=2 --d=3 --train_steps=3]

1. Pipeline: the stdlib corpus task (BPE 2048 vocabulary trained on it, cached) through
   ``fot.data.pipeline.make_iterator`` (seqio read + SentencePiece tokenisation + segmenter +
   prefetch thread), batches of ``rows x window`` with k-packing: batches/s and tokens/s,
   consumed as fast as possible (steady state, after the first batch).
2. Train step: the paper's 37M model (gin/size/paper_37m.gin values: 12 layers, d_model 512,
   8 heads of 64, memory layer 8, vocab 32000) with the training engineer's jitted train step
   (``fot.training.step.make_train_step``, AdaFactor) and d crossbatch contexts, on the same batch
   geometry (the paper's 64K-token batches scaled down to a CPU): steps/s after compilation,
   fed (a) from a fixed batch and (b) from the running pipeline (the real consumer).
Prints both rates, ``ratio = pipeline batches/s / train steps/s`` (target >= 10) and a final JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def measure_pipeline(it, seconds: float, max_batches: int) -> tuple[float, int]:
    next(it)  # first batch: tf.data start-up, tokenizer load
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds and n < max_batches:
        next(it)
        n += 1
    return n / (time.perf_counter() - t0), n


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--pack", type=int, default=2)
    p.add_argument("--d", type=int, default=3, help="crossbatch contexts in the train step")
    p.add_argument("--pipe_seconds", type=float, default=10.0)
    p.add_argument("--train_steps", type=int, default=3)
    p.add_argument("--vocab_size", type=int, default=2048, help="tokenizer (stdlib BPE) size")
    args = p.parse_args(argv)

    import jax

    from fot.data import pipeline, tasks, vocab
    from fot.model import Decoder, ModelConfig
    from fot.parallel import DATA_AXIS, make_mesh
    from fot.training.optim import make_optimizer
    from fot.training.state import create_train_state, state_shardings
    from fot.training.step import make_train_step, plan_rows, put_batch

    t = time.perf_counter()
    spm = vocab.stdlib_vocabulary(args.vocab_size)
    task = tasks.register_stdlib_task("stdlib_bench", vocabulary=spm)
    print(f"vocabulary + task ready in {time.perf_counter() - t:.1f}s (vocab {spm.vocab_size})", flush=True)
    it = pipeline.make_iterator(task, batch_size=args.rows, seq_len=args.window, pack=args.pack, seed=0,
                                shard_info=(0, 1), prefetch=4)
    pipe_bps, n = measure_pipeline(it, args.pipe_seconds, 100_000)
    tokens = args.rows * args.window
    print(f"pipeline: {pipe_bps:.1f} batches/s ({pipe_bps * tokens / 1e3:.0f}k tokens/s) over {n} batches "
          f"of {args.rows}x{args.window} pack {args.pack}", flush=True)

    cfg = ModelConfig(vocab_size=32000, d_model=512, num_layers=12, num_heads=8, head_dim=64, mlp_dim=1376,
                      mem_layers=(8,), mem_positional="none", qk_norm=True)
    model = Decoder(cfg)
    opt = make_optimizer("adafactor", 0.01)
    mesh = make_mesh({DATA_AXIS: -1})
    from jax.sharding import NamedSharding, PartitionSpec
    sh = state_shardings(model, opt, mesh, args.window)
    state = create_train_state(model, opt, mesh, args.window, 0, sh)
    bsh = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    step = make_train_step(model, opt, mesh=mesh, pack=args.pack, state_shardings=sh, batch_sharding=bsh)
    rows = plan_rows(args.rows, args.d, args.pack)
    fixed = put_batch(next(it), bsh)
    t = time.perf_counter()
    state, m = step(state, fixed, rows)
    jax.block_until_ready(m)
    print(f"train step compiled + first step in {time.perf_counter() - t:.1f}s", flush=True)

    def timed(feed) -> float:
        nonlocal state
        t0 = time.perf_counter()
        for _ in range(args.train_steps):
            state, metrics = step(state, feed(), rows)
        jax.block_until_ready(metrics)
        return args.train_steps / (time.perf_counter() - t0)

    train_sps = timed(lambda: fixed)
    fed_sps = timed(lambda: put_batch(next(it), bsh))
    it.close()
    ratio = pipe_bps / train_sps
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    print(f"train step (37M, {n_params / 1e6:.1f}M params, d={args.d}): {train_sps:.3f} steps/s from a fixed "
          f"batch, {fed_sps:.3f} steps/s fed by the pipeline", flush=True)
    print(f"ratio pipeline/train = {ratio:.0f}x (target >= 10x): {'OK' if ratio >= 10 else 'TOO SLOW'}")
    out = {"benchmark": "pipeline", "rows": args.rows, "window": args.window, "pack": args.pack, "d": args.d,
           "pipeline_batches_per_s": round(pipe_bps, 2), "pipeline_tokens_per_s": round(pipe_bps * tokens),
           "train_steps_per_s": round(train_sps, 4), "train_steps_per_s_fed_by_pipeline": round(fed_sps, 4),
           "ratio": round(ratio, 1), "params": int(n_params), "devices": jax.device_count(),
           "cpu_count": os.cpu_count()}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
