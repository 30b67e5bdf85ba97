"""Faults during training (issue 15): kill -9, damaged checkpoints, a second process, a full disk, a re-run.

Every case runs the real CLI (``python -m fot.train``) on the tiny dictionary run and checks the exit code
(fot.runtime.EXIT_*), that the failure is ONE line on stderr, and what is left on disk.
"""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fot.runtime import EXIT_BUSY, EXIT_IO

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "gin/runs/dictionary_tiny.gin"


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
                PYTHONPATH=REPO)


def _args(workdir, total_steps, *extra):
    return [sys.executable, "-m", "fot.train", f"--gin_file={TINY}", f"--workdir={workdir}",
            f"--gin_bindings=train.total_steps = {total_steps}", "--gin_bindings=train.checkpoint_every = 4",
            *extra]


def _run(workdir, total_steps, *extra, timeout=600):
    return subprocess.run(_args(workdir, total_steps, *extra), cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _start(workdir, total_steps, *extra):
    return subprocess.Popen(_args(workdir, total_steps, *extra), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(path, proc, timeout=600):
    deadline = time.time() + timeout
    while not os.path.exists(path) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert os.path.exists(path), f"{path} never appeared (exit {proc.poll()})"


def _errors(proc):
    return [line for line in proc.stderr.splitlines() if line.startswith("fot.train: error:")]


def _one_line(proc):
    lines = _errors(proc)
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def _loss_rows(workdir):
    rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


@pytest.mark.slow
def test_kill9_keeps_every_metrics_line_and_the_resume_logs_each_step_once(tmp_path):
    """Item 4: after kill -9, metrics.jsonl holds every step up to the last checkpoint (it was empty: the
    writer buffered until close); the resumed run drops the rows after that checkpoint and re-logs them."""
    wd = str(tmp_path / "run")
    proc = _start(wd, 100000)
    _wait_for(os.path.join(wd, "checkpoints", "12"), proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    last_ckpt = max(int(p) for p in os.listdir(os.path.join(wd, "checkpoints")) if p.isdigit())
    steps = [s for s, _ in _loss_rows(wd)]
    assert last_ckpt >= 12 and steps[:last_ckpt] == list(range(1, last_ckpt + 1)), (last_ckpt, steps)
    total = last_ckpt + 3
    resumed = _run(wd, total)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {wd}/checkpoints/{last_ckpt}" in resumed.stdout
    assert [s for s, _ in _loss_rows(wd)] == list(range(1, total + 1))


def _damage_truncate(step_dir):
    data = os.path.join(step_dir, "state", "ocdbt.process_0", "d")
    biggest = max((os.path.join(data, f) for f in os.listdir(data)), key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 2)


def _damage_metadata(step_dir):
    os.remove(os.path.join(step_dir, "state", "_METADATA"))


@pytest.mark.parametrize("damage", [_damage_truncate, _damage_metadata], ids=["truncated_data", "no_metadata"])
def test_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, damage):
    """Item 5: a truncated data file or a missing _METADATA in the newest checkpoint: the run names the damaged
    step, moves it aside, resumes from the older one with the uninterrupted run's losses; with
    train.restore_fallback = False it refuses with exit 4 and one line naming the step."""
    wd = str(tmp_path / "run")
    first = _run(wd, 8)
    assert first.returncode == 0, first.stderr[-3000:]
    reference = dict(_loss_rows(wd))
    damage(os.path.join(wd, "checkpoints", "8"))

    refused = _run(wd, 8, "--gin_bindings=train.restore_fallback = False")
    assert refused.returncode == EXIT_IO
    line = _one_line(refused)
    assert "checkpoint step 8" in line and "damaged" in line and "restore_fallback" in line, line
    assert os.path.isdir(os.path.join(wd, "checkpoints", "8"))  # nothing moved when refusing

    resumed = _run(wd, 8)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "checkpoint step 8" in resumed.stdout and "is damaged" in resumed.stdout
    assert f"resumed from {wd}/checkpoints/4" in resumed.stdout
    assert os.path.isdir(os.path.join(wd, "rejected_checkpoints", "8-damaged"))
    got = dict(_loss_rows(wd))
    assert sorted(got) == list(range(1, 9))
    np.testing.assert_allclose([got[s] for s in range(5, 9)], [reference[s] for s in range(5, 9)], rtol=1e-6)


@pytest.mark.slow
def test_second_process_on_a_workdir_refuses_and_a_stale_lock_does_not_block(tmp_path):
    """Item 6: a second fot.train on a live run's workdir exits 6 at once with one line naming the owner; after
    the owner is killed (-9, its lock file left behind) a new run resumes normally."""
    wd = str(tmp_path / "run")
    owner = _start(wd, 100000)
    try:
        _wait_for(os.path.join(wd, "checkpoints", "4"), owner)
        second = _run(wd, 100000)
        assert second.returncode == EXIT_BUSY, second.stderr[-3000:]
        line = _one_line(second)
        assert f"workdir {wd} is in use" in line and f"pid {owner.pid}" in line, line
        assert owner.poll() is None  # the owner was not disturbed
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.communicate(timeout=60)
    assert os.path.isfile(os.path.join(wd, ".lock"))
    last = max(int(p) for p in os.listdir(os.path.join(wd, "checkpoints")) if p.isdigit())
    again = _run(wd, last + 2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout.splitlines()[-1])["step"] == last + 2


def _mount_small_tmpfs(path, size="300k"):
    os.makedirs(path)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True,
                       capture_output=True, timeout=30)
        return True
    except (OSError, subprocess.SubprocessError):
        return False


def test_disk_full_is_an_io_error_in_one_line(tmp_path):
    """Item 7: a full disk is an I/O failure (exit 4) reported in one line naming the file or checkpoint, not a
    configuration error after hundreds of "Event loop is closed" tracebacks. A 300 KiB tmpfs when this user
    may mount one (root), else metrics.jsonl writes fail with ENOSPC through a patched writer."""
    small = tmp_path / "small"
    if _mount_small_tmpfs(small):
        try:
            proc = _run(str(small / "run"), 40)
        finally:
            subprocess.run(["umount", str(small)], capture_output=True, timeout=60)
    else:
        code = ("import errno, sys\n"
                "from fot.training import metrics\n"
                "def full(self, line):\n"
                "    raise OSError(errno.ENOSPC, 'No space left on device')\n"
                "orig = metrics._JsonlWriter._write\n"
                "def write(self, line):\n"
                "    try:\n"
                "        return full(self, line)\n"
                "    except OSError as e:\n"
                "        raise OSError(e.errno, e.strerror, self.path) from None\n"
                "metrics._JsonlWriter._write = write\n"
                "sys.argv = ['fot.train'] + sys.argv[1:]\n"
                "from fot.train import run\n"
                "run()\n")
        proc = subprocess.run([sys.executable, "-c", code, *_args(str(small / "run"), 40)[3:]], cwd=REPO,
                              env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == EXIT_IO, proc.stderr[-3000:]
    line = _one_line(proc)
    assert "No space left on device (ENOSPC)" in line and str(small) in line, line
    assert errno.ENOSPC == 28


def test_rerunning_a_finished_workdir_changes_nothing(tmp_path):
    """Item 9: the same command on a finished workdir reports the finished run and leaves results.json alone
    (it used to overwrite it with train_loss null and steps_per_sec 0.0)."""
    wd = str(tmp_path / "run")
    first = _run(wd, 4)
    assert first.returncode == 0, first.stderr[-3000:]
    before = open(os.path.join(wd, "results.json")).read()
    rows_before = _loss_rows(wd)
    again = _run(wd, 4)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already finished at step 4" in again.stdout
    assert open(os.path.join(wd, "results.json")).read() == before
    assert json.loads(again.stdout.splitlines()[-1]) == json.loads(before)
    assert json.loads(before)["train_loss"] is not None and _loss_rows(wd) == rows_before


def test_resume_with_another_model_or_data_config_is_refused_unless_asked(tmp_path):
    """Item 9: a resume whose model/data bindings differ from the saved config.gin is refused, naming them
    (a changed ROWS was silently accepted and config.gin overwritten); --allow_config_change resumes anyway and
    keeps the old config; other settings (total_steps here) may change freely."""
    wd = str(tmp_path / "run")
    first = _run(wd, 4)
    assert first.returncode == 0, first.stderr[-3000:]
    saved = open(os.path.join(wd, "config.gin")).read()
    refused = _run(wd, 6, "--gin_bindings=ROWS = 4", "--gin_bindings=ModelConfig.mlp_dim = 32")
    assert refused.returncode == 2
    line = _one_line(refused)
    assert "train_data/DictionaryLookupIterator.batch_size: 8 -> 4" in line and "ModelConfig.mlp_dim: 64 -> 32" in line
    assert open(os.path.join(wd, "config.gin")).read() == saved
    allowed = _run(wd, 6, "--gin_bindings=ROWS = 4", "--allow_config_change")
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert open(os.path.join(wd, "config.previous.gin")).read() == saved
    assert "batch_size = %ROWS" in open(os.path.join(wd, "config.gin")).read()
    assert json.loads(allowed.stdout.splitlines()[-1])["step"] == 6


@pytest.fixture(scope="module")
def bad_jsonl(tmp_path_factory):
    """A tiny SentencePiece model and JSONL files whose line 31 (after the first 64 KB the start-up check
    reads) is undecodable / lacks the text field."""
    from fot.data.vocab import train_vocabulary

    root = tmp_path_factory.mktemp("jsonl")
    rng = np.random.default_rng(3)
    words = np.array("alpha beta gamma delta lane pack window token memory def return class".split())
    (root / "c.txt").write_text("\n".join(" ".join(rng.choice(words, 30)) for _ in range(300)))
    spm = train_vocabulary(str(root / "c.txt"), 300, str(root / "spm"))
    good = [json.dumps({"text": " ".join(rng.choice(words, 400))}).encode() for _ in range(40)]
    assert sum(len(x) + 1 for x in good[:30]) > 1 << 16
    for name, bad in (("undecodable", b'{"text": "caf\xe9 \xff\xfe"}'), ("no_field", b'{"body": "no text here"}')):
        (root / f"{name}.jsonl").write_bytes(b"\n".join(good[:30] + [bad] + good[30:]) + b"\n")
    return root, spm


@pytest.mark.seqio
@pytest.mark.parametrize("name,reason", [("undecodable", "UnicodeDecodeError"), ("no_field", "KeyError: 'text'")])
def test_a_bad_jsonl_line_after_64kb_is_one_line_and_the_process_exits(bad_jsonl, tmp_path, name, reason):
    """Item 3: the bad line used to print a TensorFlow traceback (112 lines for a missing field) and then, for
    an undecodable line, never exit. Now: exit 2, one line naming the file and the line number."""
    root, spm = bad_jsonl
    path = root / f"{name}.jsonl"
    cmd = [sys.executable, "-m", "fot.train", "--gin_file=gin/runs/lm.gin", "--gin_file=gin/tasks/local_files.gin",
           "--gin_file=gin/size/tiny_test.gin", f"--gin_bindings=VOCAB_PATH = '{spm}'", "--gin_bindings=VOCAB = 300",
           f"--gin_bindings=TRAIN_FILES = '{path}'", f"--gin_bindings=VALID_FILES = '{path}'",
           "--gin_bindings=ROWS = 4", "--gin_bindings=WINDOW = 64", "--gin_bindings=PACK = 2",
           "--gin_bindings=TOTAL_STEPS = 1000", "--gin_bindings=train.eval_data = None",
           f"--workdir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _one_line(proc)
    assert f"bad JSONL line: {path} line 31" in line and reason in line, line
