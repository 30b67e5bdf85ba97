"""``fot.convert.from_hf`` on a random 1B-shaped bf16 LLaMA checkpoint in 2 safetensors shards: seconds and
peak RSS of the import, against the checkpoint's size on disk (target: peak RSS <= 1.5x the size on disk).

    python -m benchmarks.convert            # TinyLlama-1.1B shape (22 layers, 2048 wide, 32 q / 4 kv heads)
    python -m benchmarks.convert --quick    # 4 layers (~0.3B), for a smoke run

The checkpoint is written tensor by tensor with random bf16 values (safetensors, the HF shard naming and
index); the import runs in a child process (``python -m fot.convert.from_hf --dtype=bfloat16``), whose
peak RSS is the child's own VmHWM; the peak RSS of a child that only imports the same modules is
reported beside it. Prints one JSON object and one "target met / NOT met" line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4)
TARGET = 1.5


def _shapes(c):
    d, f, v, hd = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["hidden_size"] // c["num_attention_heads"]
    kvd = c["num_key_value_heads"] * hd
    out = {"model.embed_tokens.weight": (v, d)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": (d,), p + "self_attn.q_proj.weight": (d, d),
                    p + "self_attn.k_proj.weight": (kvd, d), p + "self_attn.v_proj.weight": (kvd, d),
                    p + "self_attn.o_proj.weight": (d, d), p + "post_attention_layernorm.weight": (d,),
                    p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                    p + "mlp.down_proj.weight": (d, f)})
    out["model.norm.weight"] = (d,)
    out["lm_head.weight"] = (v, d)
    return out


def write_checkpoint(path: str, conf: dict, shards: int = 2, seed: int = 0) -> int:
    """Random bf16 tensors in ``shards`` safetensors files + index + config.json; returns bytes on disk."""
    import ml_dtypes
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    shapes = _shapes(conf)
    total = sum(int(np.prod(s)) * 2 for s in shapes.values())
    names, groups, cur, size = list(shapes), [], [], 0
    for n in names:  # split into `shards` groups of about equal bytes, in order
        cur.append(n)
        size += int(np.prod(shapes[n])) * 2
        if size >= total / shards * (len(groups) + 1) and len(groups) < shards - 1:
            groups.append(cur)
            cur = []
    groups.append(cur)
    os.makedirs(path, exist_ok=True)
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for n in group:
            x = rng.standard_normal(shapes[n], dtype=np.float32) * 0.02
            tensors[n] = x.astype(ml_dtypes.bfloat16)
            del x
        save_file(tensors, os.path.join(path, fname), metadata={"format": "pt"})
        del tensors
        weight_map.update({n: fname for n in group})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu",
                   "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                   "tie_word_embeddings": False, "torch_dtype": "bfloat16", **conf}, f)
    return int(sum(os.path.getsize(os.path.join(path, g)) for g in set(weight_map.values())))


_WRAPPER = """
import atexit, runpy, sys
def _peak():
    with open("/proc/self/status") as f:
        kb = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    print(f"FOT_PEAK_RSS_KB={kb}", file=sys.stderr, flush=True)
atexit.register(_peak)
sys.argv = sys.argv[1:]
if sys.argv[0] == "-m":
    sys.argv = sys.argv[1:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    exec(sys.argv[1])
"""


def _child(args: list[str]) -> tuple[float, int, subprocess.CompletedProcess]:
    """Run ``python args`` as a child: (seconds, its peak RSS in bytes, completed process). The peak is the
    child's own VmHWM (read at exit: ``ru_maxrss`` of children would include the parent's pages when the
    child is forked from a large parent)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, *args], capture_output=True, text=True)
    secs = time.perf_counter() - t0
    kb = [line.split("=", 1)[1] for line in proc.stderr.splitlines() if line.startswith("FOT_PEAK_RSS_KB=")]
    if not kb:
        raise RuntimeError(f"child {args} reported no peak RSS: {proc.stderr[-2000:]}")
    return secs, int(kb[-1]) * 1024, proc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="4 layers instead of 22")
    p.add_argument("--dir", default=None, help="scratch directory (default: a temporary one, removed)")
    args = p.parse_args(argv)
    conf = dict(TINYLLAMA, num_hidden_layers=4 if args.quick else TINYLLAMA["num_hidden_layers"])
    scratch = args.dir or tempfile.mkdtemp(prefix="fot_bench_convert_")
    hf, run = os.path.join(scratch, "hf"), os.path.join(scratch, "run")
    try:
        shutil.rmtree(run, ignore_errors=True)
        t0 = time.perf_counter()
        disk = write_checkpoint(hf, conf)
        write_s = time.perf_counter() - t0
        # baseline child: the modules from_hf imports, no conversion
        base_s, base_rss, _ = _child(["-c", "import fot.convert.from_hf, fot.training.checkpoint, fot.train"])
        secs, peak, proc = _child(["-m", "fot.convert.from_hf", f"--hf_dir={hf}", f"--workdir={run}",
                                   "--dtype=bfloat16"])
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            return 1
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        ratio = peak / disk
        result = {"shape": conf, "params": summary["params"], "shards": len(summary["weight_files"]),
                  "disk_bytes": disk, "from_hf_seconds": round(secs, 2), "from_hf_inner_seconds": summary["seconds"],
                  "peak_rss_bytes": peak, "baseline_rss_bytes": base_rss, "peak_rss_over_disk": round(ratio, 3),
                  "write_checkpoint_seconds": round(write_s, 1), "load": os.getloadavg()[0]}
        print(json.dumps(result))
        met = "target met" if ratio <= TARGET else "target NOT met"
        print(f"from_hf peak RSS {peak / 2**30:.2f} GiB = {ratio:.2f}x the {disk / 2**30:.2f} GiB on disk "
              f"(target <= {TARGET}x): {met}")
        return 0
    finally:
        if args.dir is None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
