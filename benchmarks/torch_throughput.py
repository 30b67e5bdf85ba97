"""PyTorch (exported FoT remote code) throughput on CPU over a long input: dense vs exact top-k memory.

    python -m benchmarks.torch_throughput [--tokens=16384] [--models=quickstart,paper_37m] [--top_k=32]

For each model shape, random params are exported with ``fot.convert.to_hf`` (float32 weights, bf16
memory — the export default) and loaded with ``AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True)``; ``model(input_ids)`` runs one random-token row of ``--tokens`` tokens
(consecutive windows; memory grows to the whole input), timed after a one-window warm-up:

* ``quickstart``: the ``make run`` model (gin/quickstart.gin: 3 layers, d 64, window 32, memory layer 1
  with QK-norm, vocabulary 64);
* ``paper_37m``: gin/size/paper_37m.gin (12 layers, d 512, memory layer 8 with QK-norm, 32k vocabulary)
  with a 256-token window.

Reports tokens/s for dense memory attention and for top-k, and their ratio; torch threads are
``--threads`` (default: every core). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

MODELS = {  # name -> (ModelConfig kwargs, or a benchmarks.crossbatch STEP_MODELS name; window)
    "quickstart": (dict(vocab_size=64, d_model=64, num_layers=3, num_heads=4, mlp_dim=256, mem_layers=(1,),
                        mem_positional="none", qk_norm=True, qk_scale_init=10.0), 32),
    "paper_37m": ("paper_37m", 256),
}


def _random_params(cfg, seed):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from fot.model import Decoder
    params = Decoder(cfg).init(jax.random.PRNGKey(seed), jnp.zeros((1, 4), jnp.int32))["params"]
    return jax.tree.map(np.asarray, nn.meta.unbox(params))


def measure(name: str, tokens: int, top_k: int, seed: int = 0) -> dict:
    import torch
    import transformers

    from benchmarks.crossbatch import step_model_config
    from fot.convert import to_hf
    from fot.model import ModelConfig

    spec, window = MODELS[name]
    cfg = ModelConfig(**spec) if isinstance(spec, dict) else step_model_config(spec)
    ids = torch.as_tensor(np.random.default_rng(seed).integers(0, cfg.vocab_size, (1, tokens)), dtype=torch.long)
    out = {"model": name, "window": window, "tokens": tokens, "top_k": top_k}
    with tempfile.TemporaryDirectory() as d:
        to_hf.export(_random_params(cfg, seed), cfg, os.path.join(d, "hf"), max_position_embeddings=window)
        model = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(d, "hf"), trust_remote_code=True)
        model.eval()
        with torch.no_grad():
            for mode, k in (("dense", None), ("topk", top_k)):
                model.config.mem_top_k = k
                model(ids[:, :window])  # warm-up
                t0 = time.perf_counter()
                res = model(ids, logits_to_keep=1)
                sec = time.perf_counter() - t0
                assert int(res.fot_state.memory_size()[0]) == tokens - window
                out[f"{mode}_seconds"] = round(sec, 2)
                out[f"{mode}_tokens_per_s"] = round(tokens / sec, 1)
    out["topk_over_dense"] = round(out["dense_seconds"] / out["topk_seconds"], 3)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.torch_throughput", description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--models", default="quickstart,paper_37m")
    p.add_argument("--top_k", type=int, default=32)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    results = [measure(m, args.tokens, args.top_k) for m in args.models.split(",")]
    print(json.dumps({"threads": args.threads, "load_avg_1m": round(os.getloadavg()[0], 2),
                      "results": results}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
