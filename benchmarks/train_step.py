"""Train-step throughput and model-FLOPs utilisation (MFU) against the matmul peak measured in the same run.

    python -m benchmarks.train_step [--models paper_37m,paper_184m,paper_600m,paper_1_2b,openllama_3b]
        [--dtypes float32,bfloat16] [--crossbatch off,recipe] [--remat none,full] [--batch B] [--length L]
        [--reps 5] [--memory_budget_gib G] [--max_step_seconds S] [--optimizer adamw|adafactor] [--json FILE]

The step is fot's own training step (fot.training.step.make_train_step: jitted on a one-axis data mesh,
train state donated, no host transfer inside) with fot's optimizer factory; params and optimizer state
are float32 (master weights) and `--dtypes` sets ModelConfig.dtype, the compute dtype of matmuls and
activations (RMSNorm statistics, softmax and the loss stay float32). Models are the gin size files of the
paper's 37M / 184M / 600M / 1.2B configs and the OpenLLaMA-3B shape; with `--crossbatch recipe` the
memory layers see d extra contexts as in the recipes: 37M d=128 at 256-token windows
(gin/dictionary_paper.gin), 184M d=32 at 512 (gin/runs/pg19_184m.gin), 600M / 1.2B d=2 at 2048 (paper
App.: "the 600M and 1.2B models just used d=2"), 3B d=3 at 2048 with k=4 packs (the paper's 3B schedule).
The crossbatch plan is fot.ops.crossbatch_plan when the batch has more than d rows; a smaller batch (CPU)
cycles the extra rows through the batch as benchmarks/crossbatch does, so every computed block is used.

FLOPs: benchmarks.crossbatch.step_flops (matmul FLOPs: 6 x tokens x weights + 14 B H L^2 Dh per attention
block) with n = the mean number of USED extra contexts per row (model FLOPs; masked blocks and remat
recomputation are not counted); `flops_computed` counts every block the kernel computes. The peak is the
rate of a square matmul of the same dtype (float32 / bfloat16 inputs, float32 accumulation; 2048 on CPU,
8192 on accelerators), timed in the same process interleaved with the steps (every case's rep 1, then
every case's rep 2, ...; minimum of --reps), so load from other processes hits both alike. MFU = model
FLOPs / step time / that peak. Memory = XLA memory_analysis of the compiled step (arguments + temps +
outputs - donated aliases). Also reported: `cpu_time_utilisation`, the same ratio in process CPU time
(all threads) instead of wall time. It moves far less with load from other processes, but it does not
charge the step for a core left idle (single-threaded ops), so it reads higher than the wall-time MFU
on a quiet machine; use it only to compare runs on a loaded one.

A config is skipped with a reason when its train state alone exceeds --memory_budget_gib (default: 4 GiB
on CPU, 90% of device memory elsewhere), when the compiled step needs more than that, or when its
estimated time (FLOPs at 30% of the measured peak) exceeds --max_step_seconds.

Output: one JSON line per config (status "measured" or "skipped: ..."), then one "target met / NOT met"
line per issue-14 target (CPU: 37M float32 step >= 50% of the float32 matmul rate; GPU: 1.2B bfloat16 at
2K windows with crossbatch >= 45% MFU; "not measured" when this run cannot measure it).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.crossbatch import cyclic_rows, gin_size_config, step_flops
from fot.data.batch import Batch
from fot.runtime import ENV, cpu_eigen_dots

# name -> (gin size file, recipe d, recipe window, recipe pack, where the recipe comes from)
MODELS = {
    "paper_37m": ("paper_37m.gin", 128, 256, 2, "gin/dictionary_paper.gin"),
    "paper_184m": ("paper_184m.gin", 32, 512, 2, "gin/runs/pg19_184m.gin"),
    "paper_600m": ("paper_600m.gin", 2, 2048, 2, "paper App.: 600M used d=2"),
    "paper_1_2b": ("paper_1_2b.gin", 2, 2048, 2, "paper App.: 1.2B used d=2"),
    "openllama_3b": ("openllama_3b.gin", 3, 2048, 4, "paper App.: 3B schedule (0,0),(1,1),(2,1),(3,0)"),
}
REMAT = {"none": (False, "nothing_saveable"), "full": (True, "nothing_saveable"),
         "dots": (True, "dots_saveable"), "dots_no_batch": (True, "dots_with_no_batch_dims_saveable")}
CPU_TOKENS, ACCEL_TOKENS = 1024, 16384  # default tokens per step
GIB = 2 ** 30


def model_config(name, **overrides):
    """fot.model.ModelConfig of a MODELS entry (its gin size file)."""
    return gin_size_config(MODELS[name][0], **overrides)


def default_shape(name, platform, batch=None, length=None):
    """(batch, length): the recipe's window, and enough rows for CPU_TOKENS (CPU) or ACCEL_TOKENS tokens,
    a multiple of the recipe's pack."""
    _, _, window, pack, _ = MODELS[name]
    t = length or window
    if batch:
        return batch, t
    tokens = CPU_TOKENS if platform == "cpu" else ACCEL_TOKENS
    b = max(pack, tokens // t)
    return b - b % pack, t


def extra_rows(b, d, pack):
    """int32 [b, d] crossbatch rows: the recipe's plan if the batch has more than d rows, else cyclic rows
    (row b uses rows b-1, b-2, ... mod b: every block is used; rows repeat when d >= b). None for d = 0."""
    if d == 0:
        return None
    if b > d:
        from fot.ops import crossbatch_plan
        return np.asarray(crossbatch_plan(b, d, pack=pack), np.int32)
    return cyclic_rows(b, d)


def peak_case(dtype, platform):
    """(fn, args, flops) of an n x n x n matmul in `dtype` with float32 accumulation."""
    n = 2048 if platform == "cpu" else 8192
    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.standard_normal((n, n), np.float32), dtype) for _ in range(2))
    fn = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    return fn, (a, b), 2.0 * n ** 3


def tree_bytes(tree):
    return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


class ModelGroup:
    """All configs of one model share one mesh, optimizer, batch and train state (params are float32 in
    every config, so the donated state is passed from config to config)."""

    def __init__(self, name, b, t, optimizer_name, mesh):
        from jax.sharding import NamedSharding, PartitionSpec

        from fot.model import Decoder
        from fot.parallel import DATA_AXIS
        from fot.training.optim import make_optimizer
        from fot.training.state import abstract_train_state, state_shardings

        self.name, self.b, self.t, self.mesh = name, b, t, mesh
        self.cfg = model_config(name)
        self.optimizer = make_optimizer(optimizer_name, 1e-5, clip_norm=None)
        self.model = Decoder(self.cfg)
        self.shardings = state_shardings(self.model, self.optimizer, mesh, t)
        self.abstract_state = abstract_train_state(self.model, self.optimizer, mesh, t, self.shardings)
        self.state_bytes = tree_bytes(self.abstract_state)
        self.state = None
        self.batch_sharding = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
        self.replicated = NamedSharding(mesh, PartitionSpec())
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, self.cfg.vocab_size, (b, t + 1)).astype(np.int32)
        self.host_batch = Batch(inputs=tokens[:, :-1], targets=tokens[:, 1:], loss_mask=np.ones((b, t), np.float32),
                                segment_ids=np.ones((b, t), np.int32),
                                positions=np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy())

    def init_state(self):
        from fot.training.state import create_train_state
        if self.state is None:
            self.state = create_train_state(self.model, self.optimizer, self.mesh, self.t, 0, self.shardings)

    def step_fn(self, dtype, remat):
        from fot.model import Decoder
        from fot.training.step import make_train_step

        on, policy = REMAT[remat]
        model = Decoder(self.cfg.replace(dtype=dtype, remat=on, remat_policy=policy))
        return make_train_step(model, self.optimizer, mesh=self.mesh, pack=MODELS[self.name][3],
                               state_shardings=self.shardings, batch_sharding=self.batch_sharding)


def enumerate_configs(a, platform):
    for name in a.models:
        for dtype in a.dtypes:
            for xb in a.crossbatch:
                for remat in a.remat:
                    yield name, dtype, xb, remat


def run(a):
    from fot.training.step import put_batch

    platform = jax.devices()[0].platform
    device_kind = jax.devices()[0].device_kind
    budget = a.memory_budget_gib * GIB if a.memory_budget_gib else _default_budget(platform)
    from fot.parallel import make_mesh
    mesh = make_mesh({"data": -1, "model": 1}, devices=jax.devices()[:1])
    peaks = {dt: peak_case(dt, platform) for dt in a.dtypes}
    # a first, short peak measurement for the "too slow" estimate
    peak_quick = {dt: f / _min_time(fn, args, 2) for dt, (fn, args, f) in peaks.items()}
    lines = []
    for name in a.models:
        b, t = default_shape(name, platform, a.batch, a.length)
        group = ModelGroup(name, b, t, a.optimizer, mesh)
        _, d_recipe, _, pack, recipe = MODELS[name]
        cases, rows_of = {}, {}
        for _, dtype, xb, remat in (c for c in enumerate_configs(a, platform) if c[0] == name):
            d = d_recipe if xb == "recipe" else 0
            rows = extra_rows(b, d, pack)
            n_used = 0.0 if rows is None else float((rows >= 0).sum()) / b
            flops = step_flops(group.cfg, b, t, n_used)
            line = {"benchmark": "train_step", "model": name, "dtype": dtype, "crossbatch_d": d,
                    "d_source": recipe if d else None, "remat": remat, "batch": b, "length": t,
                    "tokens_per_step": b * t, "platform": platform, "device": device_kind,
                    "optimizer": a.optimizer, "model_flops": flops, "flops_computed": step_flops(group.cfg, b, t, d),
                    "state_gib": group.state_bytes / GIB}
            est = flops / (0.3 * peak_quick[dtype])
            if group.state_bytes > budget:
                line["status"] = (f"skipped: does not fit (train state {group.state_bytes / GIB:.2f} GiB > "
                                  f"budget {budget / GIB:.2f} GiB)")
            elif est > a.max_step_seconds:
                line["status"] = (f"skipped: too slow (estimated {est:.0f} s/step at 30% of the measured "
                                  f"{dtype} peak > --max_step_seconds {a.max_step_seconds:g})")
            else:
                fn = group.step_fn(dtype, remat)
                batch_abs = group.host_batch.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype))
                compiled = fn.lower(group.abstract_state, batch_abs, rows).compile()
                mem = compiled.memory_analysis()
                need = (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
                        - mem.alias_size_in_bytes)
                line["memory_gib"] = need / GIB
                line["temp_gib"] = mem.temp_size_in_bytes / GIB
                if need > budget:
                    line["status"] = (f"skipped: does not fit (compiled step needs {need / GIB:.2f} GiB > "
                                      f"budget {budget / GIB:.2f} GiB)")
                else:
                    line["status"] = "measured"
                    key = (name, dtype, d, remat)
                    cases[key] = compiled  # called directly: no second compilation through jit's cache
                    rows_of[key] = None if rows is None else jax.device_put(rows, group.replicated)
            lines.append(line)
        if cases:
            group.init_state()
            batch = put_batch(group.host_batch, group.batch_sharding)
            secs, cpu = _time_group(group, cases, rows_of, batch, peaks, a.reps)
            for line in lines:
                key = (line["model"], line["dtype"], line["crossbatch_d"], line["remat"])
                if line["model"] == name and key in secs:
                    pkey = ("peak", line["dtype"])
                    peak = peaks[line["dtype"]][2] / secs[pkey]
                    sec = secs[key]
                    line.update(step_s=sec, tokens_per_s=b * t / sec, model_flops_per_s=line["model_flops"] / sec,
                                peak_flops_per_s=peak, mfu=line["model_flops"] / sec / peak,
                                mfu_computed=line["flops_computed"] / sec / peak,
                                step_cpu_s=cpu[key], peak_cpu_s=cpu[pkey],
                                cpu_time_utilisation=(line["model_flops"] / cpu[key])
                                / (peaks[line["dtype"]][2] / cpu[pkey]))
            group.state = None
        for line in lines:
            if line["model"] == name:
                line["uptime"] = _uptime()
                print(json.dumps(line, default=float), flush=True)
    return lines


def _time_group(group, cases, rows_of, batch, peaks, reps):
    """Interleaved timing of every step config of one model plus the matmul peaks; min of reps each."""
    holder = {"state": group.state}

    def stepper(fn, rows):
        def call():
            holder["state"], metrics = fn(holder["state"], batch, rows)
            return metrics
        return call

    timed = {key: (stepper(fn, rows_of[key]), ()) for key, fn in cases.items()}
    for dt in {k[1] for k in cases}:
        fn, args, _ = peaks[dt]
        timed["peak", dt] = (fn, args)
    from benchmarks.crossbatch import _time_interleaved
    cpu = {}
    wall = _time_interleaved(timed, reps, cpu_seconds=cpu)
    group.state = holder["state"]
    return wall, cpu


def _min_time(fn, args, reps):
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def _default_budget(platform):
    if platform == "cpu":
        return 4 * GIB
    stats = jax.devices()[0].memory_stats() or {}
    return 0.9 * stats.get("bytes_limit", 16 * GIB)


def _uptime():
    try:
        with open("/proc/loadavg") as f:
            return "load " + " ".join(f.read().split()[:3])
    except OSError:  # pragma: no cover - not Linux
        return "load unknown"


def target_lines(lines, platform):
    out = []
    cpu37 = [l for l in lines if l["model"] == "paper_37m" and l["dtype"] == "float32" and l["crossbatch_d"] == 0
             and l["remat"] == "none" and l["status"] == "measured"]
    if platform == "cpu" and cpu37:
        r = cpu37[0]["mfu"]
        out.append(f"CPU 37M float32 train step (B={cpu37[0]['batch']}, L={cpu37[0]['length']}, no crossbatch, no "
                   f"remat): {r * 100:.1f}% of the float32 matmul rate measured in this run (target >= 50%): "
                   f"{'target met' if r >= 0.5 else 'target NOT met'}")
    else:
        out.append("CPU 37M float32 train step >= 50% of the float32 matmul rate: not measured in this run"
                   + ("" if platform == "cpu" else f" (platform {platform})"))
    gpu = [l for l in lines if l["model"] == "paper_1_2b" and l["dtype"] == "bfloat16" and l["crossbatch_d"] > 0
           and l["length"] == 2048 and l["status"] == "measured"]
    if platform == "gpu" and gpu:
        best = max(gpu, key=lambda l: l["mfu"])
        out.append(f"GPU 1.2B bfloat16 2K windows with crossbatch d={best['crossbatch_d']} (remat {best['remat']}): "
                   f"MFU {best['mfu'] * 100:.1f}% (target >= 45%): "
                   f"{'target met' if best['mfu'] >= 0.45 else 'target NOT met'}")
    else:
        out.append("GPU 1.2B bfloat16 2K windows with crossbatch >= 45% MFU: not measured"
                   + (" (no GPU in this run)" if platform != "gpu" else " (config not run)"))
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--crossbatch", default="off,recipe", help="off (d=0) and/or recipe (the recipe's d)")
    ap.add_argument("--remat", default="none,full", help=f"remat policies, of {sorted(REMAT)}")
    ap.add_argument("--batch", type=int, default=None, help="rows per step (default: see default_shape)")
    ap.add_argument("--length", type=int, default=None, help="window length (default: the recipe's)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--optimizer", default="adamw", choices=("adamw", "adafactor"))
    ap.add_argument("--memory_budget_gib", type=float, default=None)
    ap.add_argument("--max_step_seconds", type=float, default=None,
                    help="skip configs estimated slower than this (default: 60 on CPU, 600 elsewhere)")
    ap.add_argument("--json", default=None, help="also write all lines to this JSON file")
    a = ap.parse_args(argv)
    a.models = [m for m in a.models.split(",") if m]
    a.dtypes = [d for d in a.dtypes.split(",") if d]
    a.crossbatch = [x for x in a.crossbatch.split(",") if x]
    a.remat = [r for r in a.remat.split(",") if r]
    for what, got, ok in (("--models", a.models, MODELS), ("--remat", a.remat, REMAT),
                          ("--crossbatch", a.crossbatch, ("off", "recipe")),
                          ("--dtypes", a.dtypes, ("float32", "bfloat16"))):
        bad = [x for x in got if x not in ok]
        if bad:
            ap.error(f"{what}: unknown {bad}; choose from {sorted(ok)}")
    return a


def main(argv=None):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    cpu_eigen_dots(enable=os.environ.get(ENV, "0") == "1")
    a = parse_args(argv)
    platform = jax.devices()[0].platform
    if a.max_step_seconds is None:
        a.max_step_seconds = 60.0 if platform == "cpu" else 600.0
    print(f"# train step MFU: platform {platform} ({jax.devices()[0].device_kind}), {_uptime()}, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
    lines = run(a)
    for line in target_lines(lines, platform):
        print(line)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(lines, f, indent=1, default=float)


if __name__ == "__main__":
    main()
