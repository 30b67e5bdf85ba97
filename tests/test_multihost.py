"""Several processes (jax.distributed over gloo on CPU): rows per process, cursors, the 2-process
`python -m fot.train` run against the 1-process one, resume across process counts, a killed process."""
import json
import os
import signal
import sys
import time

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from fot.parallel import make_mesh, multihost
from fot.parallel.launch import Group

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "gin/runs/dictionary_tiny.gin"
# 16 rows (8 documents, pack 2) on 8 devices: 2 rows each, rows 0-7 on process 0 and 8-15 on process 1.
ROWS, D = 16, 3
BINDINGS = ["train.mesh_config = {'data': -1}", f"ROWS = {ROWS}", f"ConstantD.d = {D}",
            "train.eval_data = None", "train.checkpoint_every = 2", "train.keep_checkpoints = None"]


def train_args(workdir, steps, *extra):
    return [sys.executable, "-m", "fot.train", f"--gin_file={TINY}", f"--workdir={workdir}",
            *[f"--gin_bindings={b}" for b in BINDINGS + [f"TOTAL_STEPS = {steps}"]], *extra]


def run(tmp, name, workdir, steps, processes, devices, timeout=600):
    with Group(train_args(workdir, steps), processes, devices, str(tmp / name)) as g:
        codes = g.wait(timeout)
        logs = [(g.read(i, "out"), g.read(i, "err")) for i in range(processes)]
    assert codes == [0] * processes, f"{name}: exit codes {codes}\n" + "\n".join(e[-3000:] for _, e in logs)
    return logs


def losses(workdir):
    """{step: loss} from metrics.jsonl, asserting every step was written exactly once."""
    steps = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl")) if '"loss"' in line]
    by_step = {r["step"]: r["loss"] for r in steps}
    assert len(by_step) == len(steps), f"a step was logged twice: {[r['step'] for r in steps]}"
    return by_step


# --------------------------------------------------------------------------- one process (fast)
def test_single_process_is_the_identity():
    mesh = make_mesh({"data": -1})
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    np.testing.assert_array_equal(multihost.process_rows(sharding, 16), np.arange(16))
    batch = {"inputs": np.arange(32).reshape(16, 2)}
    assert multihost.local_rows(batch, sharding, 16) is batch
    state = {"kind": "segmenter", "step": 3}
    assert multihost.gather_cursor(state) is state and multihost.local_cursor(state) is state
    vote = multihost.StopVote(sharding, 16)
    assert not vote.multi and vote.result(vote.cast(2)) == 2
    multihost.check_whole_packs(sharding, 16, 2)  # all rows on this process: nothing to split


def test_local_cursor_rules(monkeypatch):
    per = {"kind": multihost.PER_PROCESS, "states": [{"lanes": [0]}, {"lanes": [1]}]}
    same = {"kind": multihost.PER_PROCESS, "states": [{"step": 5}, {"step": 5}]}
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert multihost.local_cursor(per) == {"lanes": [1]}  # same process count: own lanes
    monkeypatch.setattr(jax, "process_count", lambda: 1)
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    assert multihost.local_cursor(same) == {"step": 5}  # process-independent iterator: any count
    with pytest.raises(ValueError, match="lanes of 2 processes"):
        multihost.local_cursor(per)


def test_whole_packs_check_names_the_split_rows(monkeypatch):
    """A mesh whose devices interleave processes (process 0 holds rows 0 and 3 of a 4-row batch of
    packs of 2) is refused for process-sharded pipelines."""

    class FakeSharding:
        def addressable_devices_indices_map(self, shape):
            return {0: (slice(0, 1),), 1: (slice(3, 4),)}

    monkeypatch.setattr(jax, "process_index", lambda: 0)
    np.testing.assert_array_equal(multihost.process_rows(FakeSharding(), 4), [0, 3])
    with pytest.raises(ValueError, match="holds rows 0-0, 3-3 of the 4-row batch, which splits k-packs of 2"):
        multihost.check_whole_packs(FakeSharding(), 4, 2)
    multihost.check_whole_packs(FakeSharding(), 4, 1)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_processes=2, process_id=0), "needs --coordinator_address"),
    (dict(coordinator_address="localhost", num_processes=2, process_id=0), "must be HOST:PORT"),
    (dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=2), r"must be in \[0, 2\)"),
    (dict(coordinator_address="127.0.0.1:1234", num_processes=0, process_id=0), "must be >= 1"),
    (dict(coordinator_address="127.0.0.1:1234", mode="off"), "contradicts"),
    (dict(mode="sometimes"), "auto, on or off"),
])
def test_initialize_rejects_bad_coordinates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        multihost.initialize(**kwargs)


def test_cluster_detection_follows_jax(monkeypatch):
    for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
              "OMPI_MCA_orte_hnp_uri"):
        monkeypatch.delenv(k, raising=False)
    assert multihost.detected_cluster() is None
    assert multihost.initialize() is False  # auto, nothing detected: one process, nothing started
    monkeypatch.setenv("OMPI_MCA_orte_hnp_uri", "1531576320.0;tcp://10.96.0.1:34911")
    assert multihost.detected_cluster() == "OmpiCluster"


# --------------------------------------------------------------------------- several processes (slow)
@pytest.mark.slow
def test_two_processes_equal_one_and_resume_on_one(tmp_path):
    """2 processes x 4 devices train 3 crossbatch steps whose extra contexts cross the process boundary:
    losses equal the 1-process 8-device run; one checkpoint directory per step; metrics, config and
    results written once; then 1 process (8 devices) resumes the 2-process checkpoint and continues
    with the uninterrupted run's losses."""
    from fot.ops import crossbatch_plan

    plan = np.asarray(crossbatch_plan(ROWS, D, pack=2))
    assert np.any(plan[ROWS // 2:] >= 0) and np.any((plan[ROWS // 2:] >= 0) & (plan[ROWS // 2:] < ROWS // 2)), \
        "the test must use extra contexts that live on the other process"
    full, multi = tmp_path / "one_process", tmp_path / "two_processes"
    run(tmp_path, "full", full, 6, 1, 8)
    ref = losses(full)
    assert sorted(ref) == [1, 2, 3, 4, 5, 6]

    logs = run(tmp_path, "two", multi, 3, 2, 4)
    got = losses(multi)
    assert sorted(got) == [1, 2, 3]
    np.testing.assert_allclose([got[s] for s in (1, 2, 3)], [ref[s] for s in (1, 2, 3)], rtol=2e-6)
    assert sorted(os.listdir(multi / "checkpoints")) == ["2", "3"]
    assert (multi / "config.gin").is_file() and json.loads((multi / "results.json").read_text())["step"] == 3
    (out0, _), (out1, _) = logs
    assert "step 3/3" in out0 and out0.strip().splitlines()[-1].startswith("{")
    printed = [line for line in out1.splitlines() if line.strip() and not line.startswith("[Gloo]")]
    assert not printed, f"process 1 printed: {printed[:5]}"  # gloo's own connection lines aside
    assert len([f for f in os.listdir(multi) if f.startswith("events.out.tfevents")]) == 1

    run(tmp_path, "resume", multi, 6, 1, 8)
    got = losses(multi)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([got[s] for s in (4, 5, 6)], [ref[s] for s in (4, 5, 6)], rtol=2e-6)
    assert sorted(os.listdir(multi / "checkpoints")) == ["2", "3", "4", "6"]


@pytest.mark.slow
def test_killed_process_stops_the_other(tmp_path):
    """SIGKILL process 1 mid-run: process 0 exits non-zero within 60 s with JAX's line naming the cause."""
    with Group(train_args(tmp_path / "run", 100000, "--gin_bindings=train.checkpoint_every = 100000"), 2, 4,
               str(tmp_path / "logs")) as g:
        deadline = time.monotonic() + 600
        while "step 3/" not in g.read(0, "out"):
            assert time.monotonic() < deadline and all(p.poll() is None for p in g.procs), \
                g.read(0, "err")[-3000:] + g.read(1, "err")[-3000:]
            time.sleep(0.5)
        g.kill(1, signal.SIGKILL)
        t_kill = time.monotonic()
        codes = g.wait(120, stop_on_failure=False)
        waited = time.monotonic() - t_kill
        err = g.read(0, "err")
    assert codes[0] not in (None, 0), f"process 0: {codes[0]} after {waited:.0f} s\n{err[-3000:]}"
    assert waited < 60
    assert "another task died" in err or "detected fatal errors" in err, err[-3000:]
