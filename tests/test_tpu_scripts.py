"""tpu_scripts: every verb's --dry_run commands, fail-fast errors, the worker-side launch/status/tail/stop
scripts run for real on this machine (fake python and metadata server), shellcheck and gcloud's own
argument parser when they are installed."""
import os
import shlex
import shutil
import signal
import subprocess
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(REPO, "tpu_scripts", "tpu.sh")
SUPERVISE = os.path.join(REPO, "tpu_scripts", "supervise.sh")
BASE = ["--name=fot-v4", "--zone=us-central2-b"]
TRAIN_ARGS = ["--gin_file=gin/dictionary_paper.gin", "--gin_bindings=train.mesh_config = {'data': -1}",
              "--gin_bindings=NAME = \"it's $HOME\"", "--workdir=gs://bucket/run"]


def sh(script, *args, env=None, timeout=60):
    return subprocess.run(["bash", script, *args], capture_output=True, text=True, timeout=timeout,
                          env=env or dict(os.environ), cwd=REPO)


def commands(proc):
    """The printed commands as argument lists (they must parse as shell words)."""
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines() if line.strip()]


def flag(cmd, name):
    values = [a.split("=", 1)[1] for a in cmd if a.startswith(f"--{name}=")]
    assert len(values) == 1, (name, cmd)
    return values[0]


@pytest.mark.parametrize("accelerator,mode,expect", [
    ("v4-32", "on-demand", ["gcloud", "compute", "tpus", "tpu-vm", "create", "fot-v4"]),
    ("v4-8", "spot", ["gcloud", "compute", "tpus", "tpu-vm", "create", "fot-v4"]),
    ("v5e-16", "queued", ["gcloud", "compute", "tpus", "queued-resources", "create", "fot-v4"]),
    ("v5p-64", "queued-spot", ["gcloud", "compute", "tpus", "queued-resources", "create", "fot-v4"]),
])
def test_create_modes(accelerator, mode, expect):
    [cmd] = commands(sh(TPU, "create", *BASE, f"--accelerator={accelerator}", f"--mode={mode}",
                        "--project=proj", "--dry_run"))
    assert cmd[:6] == expect and flag(cmd, "zone") == "us-central2-b" and flag(cmd, "project") == "proj"
    gcloud_type = {"v5e-16": "v5litepod-16"}.get(accelerator, accelerator)
    assert flag(cmd, "accelerator-type") == gcloud_type
    version = flag(cmd, "runtime-version" if "queued" in mode else "version")
    assert version == {"v5e-16": "v2-alpha-tpuv5-lite", "v5p-64": "v2-alpha-tpuv5"}.get(accelerator,
                                                                                       "tpu-ubuntu2204-base")
    assert ("--spot" in cmd) == ("spot" in mode)
    if "queued" in mode:
        assert flag(cmd, "node-id") == "fot-v4"


def test_install_launch_and_the_rest_target_all_workers():
    install = commands(sh(TPU, "install", *BASE, "--dry_run"))
    assert install[0][:2] == ["git", "-C"] and "tar" in install[0]  # pack the checkout (tracked + new files)
    assert install[1][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and flag(install[1], "worker") == "all"
    assert "pip install -q -e \"$HOME/fot[tpu,data]\"" in flag(install[2], "command")
    [clone] = commands(sh(TPU, "install", *BASE, "--repo=https://example.com/fot.git", "--ref=v1", "--dry_run"))
    assert "git clone -q https://example.com/fot.git ~/fot && git -C ~/fot checkout -q v1" in flag(clone, "command")
    for verb in ("launch", "status", "tail", "stop"):
        cmds = commands(sh(TPU, verb, *BASE, "--dry_run", "--", *TRAIN_ARGS))
        ssh = [c for c in cmds if c[4] == "ssh"]
        assert len(ssh) == 1 and ssh[0][5] == "fot-v4" and flag(ssh[0], "worker") == "all", verb
        assert subprocess.run(["bash", "-n", "-c", flag(ssh[0], "command")]).returncode == 0, verb
    [delete] = commands(sh(TPU, "delete", *BASE, "--dry_run"))
    assert delete[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "fot-v4"] and "--quiet" in delete
    [delete] = commands(sh(TPU, "delete", *BASE, "--mode=queued", "--dry_run"))
    assert delete[3:5] == ["queued-resources", "delete"] and "--force" in delete


@pytest.mark.parametrize("args,expect", [
    (["create", "--zone=z", "--accelerator=v4-8"], "--name is required"),
    (["create", "--name=n", "--accelerator=v4-8"], "--zone is required"),
    (["create", *BASE], "--accelerator is required"),
    (["create", *BASE, "--accelerator=v4"], "--accelerator must look like v4-32"),
    (["create", *BASE, "--accelerator=v4-8", "--mode=cheap"], "--mode must be one of"),
    (["launch", *BASE], "no arguments for python -m fot.train after --"),
    (["launch", *BASE, "--module=os", "--", "x"], "--module must be a fot module"),
    (["tail", *BASE, "--lines=many"], "--lines must be a number"),
    (["create", "--name=Bad_Name", "--zone=z", "--accelerator=v4-8"], "--name must be lower-case"),
    (["frobnicate", *BASE], "unknown verb 'frobnicate'"),
    (["create", *BASE, "--acelerator=v4-8"], "unknown argument '--acelerator=v4-8'"),
])
def test_bad_parameters_fail_fast_with_one_line(args, expect):
    proc = sh(TPU, *args, "--dry_run")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines[-1].startswith("tpu.sh: error:") and expect in lines[-1], proc.stderr
    assert proc.stdout == ""


def test_missing_gcloud_fails_fast(tmp_path):
    """Without --dry_run, a PATH without gcloud stops before anything runs, naming the fix."""
    for tool in ("bash", "sed", "date", "git", "tar", "grep", "python3", "cat"):
        if shutil.which(tool):
            os.symlink(shutil.which(tool), tmp_path / tool)
    env = dict(os.environ, PATH=str(tmp_path))
    for script, args in ((TPU, ["create", *BASE, "--accelerator=v4-8"]),
                         (SUPERVISE, [*BASE, "--accelerator=v4-8", "--workdir=gs://b/r", "--", "--gin_file=x"])):
        proc = sh(script, *args, env=env)
        assert proc.returncode == 2 and "error: gcloud not found on PATH" in proc.stderr, proc.stderr


def test_supervise_dry_run_prints_one_cycle():
    proc = sh(SUPERVISE, *BASE, "--accelerator=v4-32", "--workdir=gs://bucket/run", "--dry_run", "--",
              *TRAIN_ARGS[:2])
    cmds = commands(proc)
    subcommands = [" ".join(c[1:5]) for c in cmds if c[0] == "gcloud"]
    assert subcommands == ["compute tpus tpu-vm describe", "compute tpus tpu-vm create", "compute tpus tpu-vm scp",
                           "compute tpus tpu-vm ssh", "compute tpus tpu-vm ssh",
                           "storage cat gs://bucket/run/results.json"]
    create = next(c for c in cmds if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"])
    assert "--spot" in create
    train = flag(cmds[-2], "command")
    assert ".venv/bin/python -m fot.train --gin_file=gin/dictionary_paper.gin" in train
    assert train.count("--workdir=gs://bucket/run") == 1
    bad = sh(SUPERVISE, *BASE, "--accelerator=v4-32", "--workdir=/local/run", "--dry_run", "--", "--gin_file=x")
    assert bad.returncode == 2 and "--workdir must be a gs:// path" in bad.stderr


def _remote(verb, *extra):
    cmds = commands(sh(TPU, verb, *BASE, "--dry_run", *extra))
    return flag(cmds[-1], "command")


def test_worker_side_scripts_run_for_real(tmp_path):
    """launch / status / tail / stop as a worker runs them (HOME with a fake ~/fot/.venv/bin/python and a
    fake metadata server): the training command arrives with its arguments intact, a second launch is
    refused, status and tail read the worker's own log, stop sends SIGTERM."""
    home, fakebin = tmp_path / "home", tmp_path / "bin"
    (home / "fot" / ".venv" / "bin").mkdir(parents=True)
    fakebin.mkdir()
    python = home / "fot" / ".venv" / "bin" / "python"
    python.write_text("#!/bin/bash\nprintf '%s\\n' \"$@\" > \"$HOME/args.txt\"\n"
                      "trap 'echo got-TERM >> \"$HOME/args.txt\"; exit 0' TERM\n"
                      "echo 'step 7/100 | loss 1.2345'\nwhile true; do sleep 0.1; done\n")
    (fakebin / "curl").write_text("#!/bin/bash\necho 3\n")  # agent-worker-number
    for f in (python, fakebin / "curl"):
        f.chmod(0o755)
    env = dict(os.environ, HOME=str(home), PATH=f"{fakebin}:{os.environ['PATH']}")

    def worker(script):
        return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30, env=env)

    launch = _remote("launch", "--", *TRAIN_ARGS)
    pid_file = home / "fot_logs" / "train.pid"
    try:
        out = worker(launch)
        assert out.returncode == 0 and "worker 3: started fot.train" in out.stdout, out.stderr
        deadline = time.monotonic() + 20
        while not (home / "args.txt").exists() or "step 7/100" not in (home / "fot_logs" / "train.w3.log").read_text():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert (home / "args.txt").read_text().splitlines() == ["-m", "fot.train", *TRAIN_ARGS]
        again = worker(launch)
        assert again.returncode == 3 and "worker 3: run train is already running" in again.stderr
        status = worker(_remote("status"))
        assert "worker 3: train running | step 7/100 | loss 1.2345" in status.stdout
        tail = worker(_remote("tail", "--lines=5"))
        assert "[worker 3] step 7/100 | loss 1.2345" in tail.stdout
        stop = worker(_remote("stop"))
        assert "worker 3: sent SIGTERM to train" in stop.stdout
        deadline = time.monotonic() + 20
        while "got-TERM" not in (home / "args.txt").read_text():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        while "worker 3: train stopped" not in worker(_remote("status")).stdout:  # once the process is reaped
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        if pid_file.exists():
            try:  # setsid made the fake training process a process-group leader
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, PermissionError, ValueError):
                pass


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck():
    scripts = [os.path.join(REPO, "tpu_scripts", f) for f in ("lib.sh", "tpu.sh", "supervise.sh")]
    scripts.append(os.path.join(REPO, "tpu_scripts", "slurm_gpu.sbatch"))
    proc = subprocess.run(["shellcheck", "-x", *scripts], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("gcloud") is None, reason="gcloud not installed")
def test_gcloud_parses_every_command(tmp_path):
    """gcloud's own parser accepts each printed command: with an empty config (no account, so nothing can
    run) it stops at authentication, not at the arguments."""
    runs = [("create", "--accelerator=v4-32", "--mode=spot"), ("create", "--accelerator=v5e-16", "--mode=queued-spot"),
            ("install",), ("launch", "--", *TRAIN_ARGS), ("status",), ("tail",), ("stop",), ("delete",),
            ("delete", "--mode=queued")]
    env = dict(os.environ, CLOUDSDK_CONFIG=str(tmp_path), CLOUDSDK_CORE_DISABLE_PROMPTS="1")
    seen = set()
    for verb, *extra in runs:
        for cmd in commands(sh(TPU, verb, *BASE, "--project=proj", "--dry_run", *extra)):
            if cmd[0] != "gcloud" or " ".join(cmd[:5]) in seen and cmd[4] == "ssh":
                continue
            seen.add(" ".join(cmd[:5]))
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
            assert proc.returncode != 0 and "active account" in proc.stderr, (cmd[:6], proc.stderr[-500:])


def test_slurm_sbatch_runs_fot_train_on_every_task(tmp_path):
    """The sbatch script as SLURM runs it (fake srun that records its arguments): one srun over all tasks
    with per-task logs, fot.train with the workdir and the given arguments; clear errors without them."""
    fot, fakebin = tmp_path / "fot", tmp_path / "bin"
    (fot / ".venv" / "bin").mkdir(parents=True)
    fakebin.mkdir()
    (fot / ".venv" / "bin" / "python").write_text("#!/bin/bash\n")
    (fakebin / "srun").write_text("#!/bin/bash\nprintf '%s\\n' \"$@\" > \"$FOT/srun_args.txt\"\n")
    for f in (fot / ".venv" / "bin" / "python", fakebin / "srun"):
        f.chmod(0o755)
    script = os.path.join(REPO, "tpu_scripts", "slurm_gpu.sbatch")
    env = dict(os.environ, FOT=str(fot), SLURM_JOB_ID="77", WORKDIR="/shared/runs/a b",
               PATH=f"{fakebin}:{os.environ['PATH']}")
    proc = subprocess.run(["bash", script, "--gin_file=gin/runs/pg19_184m.gin", "--gin_bindings=X = 'y z'"],
                          capture_output=True, text=True, env=env, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert (fot / "srun_args.txt").read_text().splitlines() == [
        "--kill-on-bad-exit=1", f"--output={fot}/logs/77/task%t.log", f"{fot}/.venv/bin/python", "-m", "fot.train",
        "--workdir=/shared/runs/a b", "--gin_file=gin/runs/pg19_184m.gin", "--gin_bindings=X = 'y z'"]
    for drop, expect in (("WORKDIR", "set WORKDIR"), (None, "no fot.train arguments")):
        env2 = {k: v for k, v in env.items() if k != drop}
        args = ["--gin_file=x"] if drop else []
        proc = subprocess.run(["bash", script, *args], capture_output=True, text=True, env=env2, timeout=30)
        assert proc.returncode != 0 and expect in proc.stderr, proc.stderr
