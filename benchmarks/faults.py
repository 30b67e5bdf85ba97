"""Fault injection: N random SIGKILLs during training and checkpointing, then a check against an uninterrupted run.

    python -m benchmarks.faults [--kills 8] [--steps 60] [--checkpoint_every 5] [--seed 0] [--async]
                                [--gin_file gin/runs/dictionary_tiny.gin] [--workdir DIR]

1. Reference: ``fot.train`` runs ``--steps`` steps uninterrupted (checkpoint every ``--checkpoint_every``,
   a metrics line every step).
2. Faulty run on another workdir: ``--kills`` times, start the same command (it resumes) and SIGKILL it,
   alternately (a) while an orbax save is in flight (a ``<step>.orbax-checkpoint-tmp*`` directory
   exists; the second save after the restart, so that every restart makes progress) and (b) after a
   random number (1 to 3 checkpoint intervals) of logged steps. After each kill: the newest checkpoint L on
   disk, the last step M logged in metrics.jsonl; "metrics lines lost" = steps <= L missing from
   metrics.jsonl; "steps lost" = M - L (the work the restart repeats). Each restart must print "resumed
   from .../L" (or start fresh when no checkpoint exists yet).
3. Finally the faulty run is run to the end; its final params, metrics rows (each step exactly once) and
   losses are compared with the reference.

Prints one line per kill, one "target met / NOT met" line per target and a final JSON line. Targets:
resumes OK; steps lost <= checkpoint interval; metrics lines lost = 0; final params equal (max |diff| = 0).

The default mode is the training default (synchronous saves: each checkpoint is committed before the next
step, so steps lost <= the interval). ``--async`` binds ``train.async_checkpointing = True``: a kill during
the save of step s restarts from s - interval, so it also loses the steps trained while s was being
written; the steps-lost target is then interval + the most steps trained during one save, measured on
every save of both runs (newest logged step when the checkpoint directory appeared, minus its step).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _command(args, workdir: str) -> list[str]:
    return [sys.executable, "-m", "fot.train", f"--gin_file={args.gin_file}", f"--workdir={workdir}",
            f"--gin_bindings=train.total_steps = {args.steps}",
            f"--gin_bindings=train.checkpoint_every = {args.checkpoint_every}",
            "--gin_bindings=train.log_every = 1", "--gin_bindings=train.keep_checkpoints = 2",
            *(["--gin_bindings=train.async_checkpointing = True"] if args.async_save else [])]


def _env() -> dict[str, str]:
    return dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"), PYTHONPATH=REPO)


def _checkpoints(workdir: str) -> list[int]:
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(p) for p in os.listdir(d) if p.isdigit()) if os.path.isdir(d) else []


def _logged_steps(workdir: str) -> list[int]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    steps = []
    for line in open(path):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if "loss" in row:
            steps.append(int(row["step"]))
    return steps


class SaveWatch:
    """Steps trained during each save of a run: polled, ``during[s]`` = the newest logged step when
    checkpoint ``s`` first appears committed, minus s (0 with synchronous saves: the loop logs step s, then
    waits for its save)."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.seen = set(_checkpoints(workdir))  # committed before this run started
        self.during: dict[int, int] = {}

    def poll(self) -> None:
        new = set(_checkpoints(self.workdir)) - self.seen
        if new:
            newest = max(_logged_steps(self.workdir), default=0)
            for s in new:
                self.during[s] = newest - s
            self.seen |= new


def _losses(workdir: str) -> dict[int, float]:
    return {json.loads(x)["step"]: json.loads(x)["loss"] for x in open(os.path.join(workdir, "metrics.jsonl"))
            if "loss" in json.loads(x)}


def _kill_once(args, workdir: str, mode: str, rng: random.Random, watch: SaveWatch) -> dict:
    """Start the run, SIGKILL it according to ``mode``; returns what was on disk before and after.

    Kill moments are counted from the run's "model: ..." line (printed after the restore, the metrics
    truncation and the cleanup of interrupted saves), read by a thread from its stdout."""
    before = _checkpoints(workdir)
    proc = subprocess.Popen(_command(args, workdir), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    target = rng.randint(1, 3 * args.checkpoint_every)
    # During a save: the second save after the restart (the first completes, so the run makes progress).
    save_step = max(before, default=0) + 2 * args.checkpoint_every
    deadline = time.time() + args.timeout
    baseline, how = None, "finished"
    while proc.poll() is None and time.time() < deadline:
        watch.poll()
        if baseline is None:
            if any(x.startswith("model: ") for x in list(lines)):
                baseline = len(_logged_steps(workdir))
        elif mode == "during_save" and any(
                int(os.path.basename(p).split(".")[0]) >= save_step
                for p in glob.glob(os.path.join(workdir, "checkpoints", "*.orbax-checkpoint-tmp*"))):
            how = f"during the save of step {save_step}"
            break
        elif mode == "random" and len(_logged_steps(workdir)) - baseline >= target:
            how = f"after {target} logged steps"
            break
        time.sleep(0.002)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    err = proc.stderr.read()
    proc.wait(timeout=120)
    reader.join(timeout=60)
    resumed_from = None
    for line in lines:
        if line.startswith("resumed from "):
            resumed_from = int(line.strip().split("/")[-1].split()[0])
    last_ckpt = max(_checkpoints(workdir), default=0)
    logged = _logged_steps(workdir)
    missing = sorted(set(range(1, last_ckpt + 1)) - set(logged))
    return {"mode": how, "exit": proc.returncode, "resumed_from": resumed_from,
            "resume_ok": resumed_from == max(before, default=None), "last_checkpoint": last_ckpt,
            "last_logged": max(logged, default=0), "steps_lost": max(logged, default=0) - last_ckpt,
            "metrics_lines_lost": len(missing),
            "stderr_tail": err.strip().splitlines()[-1:] if how == "finished" else []}


def _final_params(workdir: str):
    from fot.training.checkpoint import load_params
    return load_params(workdir)


def _run_watched(args, workdir: str, log_dir: str, name: str) -> tuple[int, str, dict[int, int]]:
    """Run the command on ``workdir`` to the end while watching its saves: (exit code, stdout, during)."""
    watch = SaveWatch(workdir)
    out_path, err_path = os.path.join(log_dir, f"{name}.out"), os.path.join(log_dir, f"{name}.err")
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(_command(args, workdir), cwd=REPO, env=_env(), stdout=out, stderr=err, text=True)
        while proc.poll() is None:
            watch.poll()
            time.sleep(0.002)
    watch.poll()
    if proc.returncode != 0:
        raise SystemExit(f"{name} run failed ({proc.returncode}): {open(err_path).read().strip().splitlines()[-1:]}")
    return proc.returncode, open(out_path).read(), watch.during


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kills", type=int, default=8)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--checkpoint_every", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--async", dest="async_save", action="store_true",
                   help="asynchronous checkpoint saves (train.async_checkpointing = True); default: the training "
                        "default (synchronous)")
    p.add_argument("--gin_file", default="gin/runs/dictionary_tiny.gin")
    p.add_argument("--workdir", default=None, help="parent of the two run directories (default: a temp dir)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per start before giving up")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    base = args.workdir or tempfile.mkdtemp(prefix="fot_faults_")
    ref, faulty = os.path.join(base, "reference"), os.path.join(base, "faulty")
    for d in (ref, faulty):
        shutil.rmtree(d, ignore_errors=True)
    os.makedirs(base, exist_ok=True)
    t0 = time.perf_counter()
    _, _, ref_during = _run_watched(args, ref, base, "reference")
    print(f"reference: {args.steps} steps in {time.perf_counter() - t0:.0f}s; steps trained during its saves: "
          f"max {max(ref_during.values(), default=0)}", flush=True)
    during = {("reference", s): n for s, n in ref_during.items()}  # (run, checkpoint step) -> steps during its save

    kills = []
    for i in range(args.kills):
        watch = SaveWatch(faulty)
        k = _kill_once(args, faulty, "during_save" if i % 2 == 0 else "random", rng, watch)
        during.update({(i, s): n for s, n in watch.during.items()})
        kills.append(k)
        print(f"kill {i + 1}/{args.kills} {k['mode']}: resumed from {k['resumed_from']} "
              f"({'ok' if k['resume_ok'] else 'WRONG'}), last checkpoint {k['last_checkpoint']}, last logged "
              f"step {k['last_logged']}, steps lost {k['steps_lost']}, metrics lines lost {k['metrics_lines_lost']}",
              flush=True)
        if k["mode"] == "finished":
            break
    start = max(_checkpoints(faulty), default=None)
    code, out, final_during = _run_watched(args, faulty, base, "faulty_final")
    during.update({("final", s): n for s, n in final_during.items()})
    final_resume_ok = code == 0 and (start is None or f"resumed from {faulty}/checkpoints/{start}" in out)

    import numpy as np
    import jax
    p_ref, s_ref = _final_params(ref)
    p_got, s_got = _final_params(faulty)
    diff = max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
               for a, b in zip(jax.tree.leaves(p_ref), jax.tree.leaves(p_got)))
    steps_logged = _logged_steps(faulty)
    loss_ref, loss_got = _losses(ref), _losses(faulty)
    loss_diff = max(abs(loss_ref[s] - loss_got.get(s, float("inf"))) for s in loss_ref)

    summary = {
        "kills": len(kills), "during_save": sum(k["mode"].startswith("during") for k in kills),
        "resumes_ok": sum(k["resume_ok"] for k in kills) + int(final_resume_ok), "restarts": len(kills) + 1,
        "max_steps_lost": max((k["steps_lost"] for k in kills), default=0),
        "steps_lost": [k["steps_lost"] for k in kills], "checkpoint_every": args.checkpoint_every,
        "max_steps_during_save": max(during.values(), default=0), "saves_watched": len(during),
        "metrics_lines_lost": sum(k["metrics_lines_lost"] for k in kills),
        "final_step": s_got, "reference_step": s_ref, "final_params_max_abs_diff": diff,
        "metrics_rows_each_step_once": steps_logged == list(range(1, args.steps + 1)),
        "loss_max_abs_diff": loss_diff, "async_checkpointing": args.async_save,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if args.async_save:  # the interval cannot bound it: at step s + 1 the save of s is not committed yet
        bound = args.checkpoint_every + summary["max_steps_during_save"]
        lost = ("steps lost <= checkpoint interval + steps trained during one save (async saves)",
                summary["max_steps_lost"] <= bound,
                f"max {summary['max_steps_lost']} (interval {args.checkpoint_every} + up to "
                f"{summary['max_steps_during_save']} steps during a save of {len(during)} watched = {bound})")
    else:
        bound = args.checkpoint_every
        lost = ("steps lost <= checkpoint interval", summary["max_steps_lost"] <= bound,
                f"max {summary['max_steps_lost']} (interval {args.checkpoint_every})")
    summary["steps_lost_bound"] = bound
    targets = [
        ("resumes OK", summary["resumes_ok"] == summary["restarts"],
         f"{summary['resumes_ok']}/{summary['restarts']}"),
        lost,
        ("metrics lines lost = 0 up to the last checkpoint", summary["metrics_lines_lost"] == 0,
         str(summary["metrics_lines_lost"])),
        ("final params equal to the uninterrupted run", s_got == s_ref and diff == 0.0,
         f"step {s_got} vs {s_ref}, max |diff| {diff:.3g}"),
        ("metrics.jsonl: each step once, losses equal", summary["metrics_rows_each_step_once"] and loss_diff == 0.0,
         f"max |loss diff| {loss_diff:.3g}"),
    ]
    for name, ok, detail in targets:
        print(f"{name}: {detail} — target {'met' if ok else 'NOT met'}", flush=True)
    summary["targets_met"] = all(ok for _, ok, _ in targets)
    print(json.dumps(summary), flush=True)
    if not args.workdir:
        shutil.rmtree(base, ignore_errors=True)
    return summary


if __name__ == "__main__":
    main()
