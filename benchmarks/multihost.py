"""Per-step time of a 2-process run vs a 1-process run on the same 8 CPU devices, measured in one run.

    python -m benchmarks.multihost [--steps=60 --rows=64 --d=8 --repeats=2 --size=]

Both run ``python -m fot.train`` on the quickstart model and data (gin/quickstart.gin: dictionary lookup,
3 layers, d_model 64, memory layer 1; ``--size=gin/size/paper_37m.gin`` swaps in a size file) with a
constant crossbatch d on a ``{"data": 8}`` mesh: 1 process with 8 fake CPU devices, and 2 processes
with 4 each (jax.distributed on 127.0.0.1, gloo collectives), so the 2-process figure adds exactly the
cross-process collectives (gradient all-reduce, crossbatch all-gathers whose extra contexts come from
the other process, the stop vote) and the per-process batch assembly. Step time = median of the
``steps_per_sec`` the loop logs every 10 steps, after the first 20 (compilation). The two layouts
alternate ``--repeats`` times so machine load drifts hit both. Prints one line per run, the ratio, and
a final JSON line. (There is no target: the figure goes to BUILD_NOTES.md.)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

from fot.parallel.launch import Group


def run_once(workdir: str, processes: int, args) -> float:
    """Median seconds per step of one run with ``processes`` processes sharing 8 devices."""
    bindings = ["train.mesh_config = {'data': -1}", f"TOTAL_STEPS = {args.steps}", f"ROWS = {args.rows}",
                "train.curriculum = @ConstantD()", f"ConstantD.d = {args.d}", "train.eval_data = None",
                "train.checkpoint_every = 1000000", "train.log_every = 10", "train.max_train_seconds = None"]
    argv = [sys.executable, "-m", "fot.train", "--gin_file=gin/quickstart.gin", f"--workdir={workdir}/run",
            *([f"--gin_file={args.size}"] if args.size else []), *[f"--gin_bindings={b}" for b in bindings]]
    with Group(argv, processes, 8 // processes, f"{workdir}/logs") as group:
        codes = group.wait(args.timeout)
        if codes != [0] * processes:
            raise RuntimeError(f"{processes}-process run failed with {codes}: {group.read(0, 'err')[-2000:]}")
    rates = [r["steps_per_sec"] for r in map(json.loads, open(f"{workdir}/run/metrics.jsonl"))
             if "steps_per_sec" in r and r["step"] > 20]
    return 1.0 / statistics.median(rates)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rows", type=int, default=64, help="global batch rows (8 documents per process at 64)")
    p.add_argument("--d", type=int, default=8, help="crossbatch contexts per row")
    p.add_argument("--size", default="", help="optional gin size file, e.g. gin/size/paper_37m.gin")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--timeout", type=float, default=1800)
    args = p.parse_args(argv)
    if args.steps <= 30:
        p.error("--steps must be > 30 (steps 1-20 are compilation and warm-up)")
    times: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for n in (1, 2):
                t = run_once(os.path.join(tmp, f"r{r}_p{n}"), n, args)
                times[n].append(t)
                print(f"repeat {r}: {n} process(es) x {8 // n} devices: {t * 1e3:.1f} ms/step", flush=True)
    one, two = statistics.median(times[1]), statistics.median(times[2])
    print(f"2-process / 1-process step time: {two / one:.2f} ({two * 1e3:.1f} vs {one * 1e3:.1f} ms/step, "
          f"load {os.getloadavg()[0]:.1f})", flush=True)
    result = {"ms_per_step_1_process": round(one * 1e3, 2), "ms_per_step_2_processes": round(two * 1e3, 2),
              "ratio": round(two / one, 3), "rows": args.rows, "d": args.d, "steps": args.steps,
              "size": args.size or "quickstart", "load_avg_1min": round(os.getloadavg()[0], 2)}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
