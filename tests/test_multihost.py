"""Several processes (jax.distributed over gloo on CPU): rows per process, cursors, the 2-process
`python -m fot.train` run against the 1-process one, resume across process counts, a killed process."""
import json
import os
import re
import signal
import sys
import time

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from fot.parallel import make_mesh, multihost
from fot.runtime import EXIT_PREEMPTED
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
    assert multihost.gather_cursor(state, sharded=True) is state and multihost.local_cursor(state) is state
    vote = multihost.StopVote(sharding, 16)
    assert not vote.multi and vote.result(vote.cast(2)) == 2
    multihost.check_whole_packs(sharding, 16, 2)  # all rows on this process: nothing to split


def test_local_cursor_rules(monkeypatch):
    shards = {"kind": multihost.PER_PROCESS, "sharded": True, "states": [{"lanes": [0]}, {"lanes": [0]}]}
    same = {"kind": multihost.PER_PROCESS, "sharded": False, "states": [{"step": 5}, {"step": 5}]}
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert multihost.local_cursor(shards) is shards["states"][1]  # same process count: its own lanes
    monkeypatch.setattr(jax, "process_count", lambda: 1)
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    assert multihost.local_cursor(same) == {"step": 5}  # process-independent iterator: any count
    with pytest.raises(ValueError, match="shards and lanes of 2 processes; this run has 1"):
        multihost.local_cursor(shards)  # equal-looking cursors of different shards are still refused
    assert multihost.local_cursor({"step": 7}) == {"step": 7}  # saved by one process


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


def test_unreachable_coordinator_is_one_clear_error():
    """A process other than 0 checks the coordinator's port before JAX (whose failed connect aborts the
    process) and reports a missing coordinator within the initialization timeout."""
    from fot.parallel.launch import free_port

    address = f"127.0.0.1:{free_port()}"  # nobody listens there
    t = time.monotonic()
    with pytest.raises(RuntimeError, match=f"no coordinator answers at {address} after 2 s"):
        multihost.initialize(address, 2, 1, initialization_timeout=2)
    assert 1.5 < time.monotonic() - t < 30 and not jax.distributed.is_initialized()


@pytest.mark.parametrize("module", ["fot.train", "fot.eval"])
def test_unreachable_coordinator_exits_4_in_one_line(tmp_path, module):
    """README "Exit codes": a CLI process whose coordinator does not answer exits 4 (retryable I/O), one line."""
    import subprocess

    from fot.parallel.launch import free_port
    from fot.runtime import EXIT_IO

    address = f"127.0.0.1:{free_port()}"  # nobody listens there
    args = ([f"--gin_file={TINY}"] if module == "fot.train" else ["--task=dictionary"]) + [
        f"--workdir={tmp_path / 'run'}", f"--coordinator_address={address}", "--num_processes=2", "--process_id=1",
        "--distributed_initialization_timeout=2"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    lines = [x for x in proc.stderr.splitlines() if x.startswith(f"{module}: error:")]
    assert proc.returncode == EXIT_IO and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"no coordinator answers at {address} after 2 s" in lines[0], lines


def test_cluster_detection_follows_jax(monkeypatch):
    for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
              "OMPI_MCA_orte_hnp_uri"):
        monkeypatch.delenv(k, raising=False)
    assert multihost.detected_cluster() is None
    assert multihost.initialize() is False  # auto, nothing detected: one process, nothing started
    monkeypatch.setenv("OMPI_MCA_orte_hnp_uri", "1531576320.0;tcp://10.96.0.1:34911")
    assert multihost.detected_cluster() == "OmpiCluster"


# --------------------------------------------------------------------------- several processes (slow)
def wait_for_step(group, step, timeout=600):
    """Block until process 0 has printed its progress line for ``step`` (all processes still alive)."""
    deadline = time.monotonic() + timeout
    while f"step {step}/" not in group.read(0, "out"):
        assert time.monotonic() < deadline and all(p.poll() is None for p in group.procs), \
            group.read(0, "err")[-3000:] + group.read(1, "err")[-3000:]
        time.sleep(0.2)


@pytest.mark.slow
def test_two_processes_equal_one_and_resume_on_one(tmp_path):
    """2 processes x 4 devices train crossbatch steps whose extra contexts cross the process boundary
    until process 1 alone gets SIGTERM: both stop at the same step and save; losses equal the 1-process
    8-device run's; one checkpoint directory per step; metrics, config and results written once. Then
    1 process (8 devices) resumes the 2-process checkpoint with the uninterrupted run's losses."""
    from fot.ops import crossbatch_plan

    plan = np.asarray(crossbatch_plan(ROWS, D, pack=2))[ROWS // 2:]  # rows of process 1
    assert np.any((plan >= 0) & (plan < ROWS // 2)), "extra contexts must live on the other process"
    multi = tmp_path / "two_processes"
    with Group(train_args(multi, 1000), 2, 4, str(tmp_path / "two")) as g:
        wait_for_step(g, 3)
        g.kill(1, signal.SIGTERM)  # a preemption notice reaching one host only
        codes = g.wait(600)
        (out0, err0), (out1, err1) = [(g.read(i, "out"), g.read(i, "err")) for i in range(2)]
    assert codes == [EXIT_PREEMPTED] * 2, f"exit codes {codes}\n{err0[-3000:]}\n{err1[-3000:]}"
    results = json.loads((multi / "results.json").read_text())
    stop = results["step"]
    assert results["stopped"] == "preempted" and 3 <= stop < 1000
    assert f"saved checkpoint at step {stop}" in out0 and out0.strip().splitlines()[-1] == json.dumps(
        results, sort_keys=True)
    # gloo's own connection lines aside: its threads print them concurrently, so one can be split across
    # two lines ("[Gloo] Rank [Gloo] Rank 6 is connected ..." then "5 is connected to 7 peer ranks. ...").
    printed = [line for line in out1.splitlines() if line.strip() and not line.startswith("[Gloo]")
               and not re.fullmatch(r"\d+ is connected to \d+ peer ranks\. Expected number of connected peer "
                                    r"ranks is : \d+", line.strip())]
    assert not printed, f"process 1 printed: {printed[:5]}"
    assert (multi / "config.gin").is_file()
    assert len([f for f in os.listdir(multi) if f.startswith("events.out.tfevents")]) == 1
    expected_ckpts = sorted({s for s in range(2, stop + 1, 2)} | {stop})
    assert sorted(int(c) for c in os.listdir(multi / "checkpoints")) == expected_ckpts
    got = losses(multi)
    assert sorted(got) == list(range(1, stop + 1))

    full = tmp_path / "one_process"
    run(tmp_path, "full", full, stop + 3, 1, 8)
    ref = losses(full)
    np.testing.assert_allclose([got[s] for s in range(1, stop + 1)], [ref[s] for s in range(1, stop + 1)],
                               rtol=2e-6)
    run(tmp_path, "resume", multi, stop + 3, 1, 8)
    got = losses(multi)
    assert sorted(got) == list(range(1, stop + 4))
    np.testing.assert_allclose([got[s] for s in range(stop + 1, stop + 4)],
                               [ref[s] for s in range(stop + 1, stop + 4)], rtol=2e-6)

    # fot.eval on 2 processes: both evaluate, process 0 alone prints and writes; same numbers as on 1.
    evaluated = {}
    for n in (1, 2):
        argv = [sys.executable, "-m", "fot.eval", f"--workdir={multi}", "--task=dictionary",
                "--gin_bindings=dictionary_eval.sizes = [16, 32]", "--top_k=4"]
        with Group(argv, n, 8 // n, str(tmp_path / f"eval{n}")) as g:
            codes = g.wait(600)
            outs = [[line for line in g.read(i, "out").splitlines() if line.startswith("{")] for i in range(n)]
            assert codes == [0] * n, g.read(0, "err")[-3000:]
        assert len(outs[0]) == 1 and all(not o for o in outs[1:])
        evaluated[n] = json.loads(outs[0][0])
        assert json.loads((multi / "results_dictionary.json").read_text()) == evaluated[n]
    assert evaluated[1]["fot_accuracy"] == evaluated[2]["fot_accuracy"]
    assert evaluated[1]["checkpoint_step"] == evaluated[2]["checkpoint_step"] == stop + 3


SEQIO_SCRIPT = r"""
import sys
import numpy as np
from fot.parallel import multihost
args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
multihost.initialize(args["coordinator_address"], int(args["num_processes"]), int(args["process_id"]))
import jax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from fot.data import pipeline
from fot.data.tasks import register_dictionary_task
from fot.parallel import make_mesh
from fot.training.step import put_batch

task = register_dictionary_task("multihost_dictionary", docs_per_epoch=64, key_len=1, value_len=1,
                                vocab_size=16, doc_len=32, query_len=16)
kw = dict(batch_size=8, seq_len=16, pack=2, add_bos=False, add_eos=False, boundary="pad", prefetch=0)
it = pipeline.make_iterator(task, **kw)                     # this process's shard (jax.process_index())
sharding = NamedSharding(make_mesh({"data": -1}), PartitionSpec("data"))
assert it.local_batch_size == 4 and it.batch_size == 8
seen = []
for _ in range(3):
    batch = put_batch(next(it), sharding, it.batch_size)
    seen.append({k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in batch._asdict().items()})
cursor = multihost.gather_cursor(it.get_state(), sharded=True)
# Reference: both shards' iterators in this one process; the global batch is their rows in process order.
refs = [pipeline.make_iterator(task, shard_info=(i, 2), **kw) for i in range(2)]
for got in seen:
    parts = [next(r)._asdict() for r in refs]
    for k, v in got.items():
        np.testing.assert_array_equal(v, np.concatenate([p[k] for p in parts]), err_msg=k)
resumed = pipeline.make_iterator(task, **kw)
resumed.set_state(multihost.local_cursor(cursor))        # this process's lanes from the gathered cursor
nxt, ref = next(resumed)._asdict(), [next(r)._asdict() for r in refs][jax.process_index()]
for k in ref:
    np.testing.assert_array_equal(nxt[k], ref[k], err_msg=k)
assert len(cursor["states"]) == 2 and cursor["sharded"]
print("seqio-multihost-ok", flush=True)
"""


@pytest.mark.slow
@pytest.mark.seqio
def test_seqio_pipeline_feeds_each_process_its_shard(tmp_path):
    """The seqio pipeline on 2 processes: each reads its document shard; the global batch is the two
    shards' rows in process order (equal to both shards' iterators run in one process); the gathered
    cursor resumes each process on its own lanes."""
    with Group([sys.executable, "-c", SEQIO_SCRIPT], 2, 4, str(tmp_path / "logs")) as g:
        codes = g.wait(600)
        logs = [g.read(i, "out") + g.read(i, "err")[-3000:] for i in range(2)]
    assert codes == [0, 0], "\n".join(logs)
    assert all("seqio-multihost-ok" in log for log in logs)


@pytest.mark.slow
def test_killed_process_stops_the_other(tmp_path):
    """SIGKILL process 1 mid-run: process 0 exits non-zero within 60 s with JAX's line naming the cause."""
    with Group(train_args(tmp_path / "run", 100000, "--gin_bindings=train.checkpoint_every = 100000"), 2, 4,
               str(tmp_path / "logs")) as g:
        wait_for_step(g, 3)
        g.kill(1, signal.SIGKILL)
        t_kill = time.monotonic()
        codes = g.wait(120, stop_on_failure=False)
        waited = time.monotonic() - t_kill
        err = g.read(0, "err")
    assert codes[0] not in (None, 0), f"process 0: {codes[0]} after {waited:.0f} s\n{err[-3000:]}"
    assert waited < 60, f"process 0 took {waited:.0f} s"
    # JAX's coordination service names the dead peer; when the kill lands inside a gloo collective the
    # survivor's TCP pair fails first and gloo aborts with its transport line (seen once in 480 runs).
    causes = ("another task died", "detected fatal errors", "external/gloo/gloo/transport")
    assert any(c in err for c in causes), (codes, err[-3000:])


@pytest.mark.parametrize("name,chips,fsdp", [("tpu_v4_8", 4, False), ("tpu_v4_32", 16, True),
                                             ("tpu_v5e_16", 16, True), ("tpu_v5p_64", 32, True)])
def test_slice_mesh_files(name, chips, fsdp):
    """Each slice's mesh file composes with a run file and spans exactly the slice's chips (a wrong slice
    is refused with the device counts named)."""
    import gin

    from fot.parallel import mesh_shape_from_config
    from fot.train import register_configurables

    register_configurables()
    gin.clear_config()
    try:
        gin.add_config_file_search_path(os.path.join(REPO, "gin"))
        gin.parse_config_files_and_bindings(
            [os.path.join(REPO, "gin/dictionary_paper.gin"), os.path.join(REPO, f"gin/mesh/{name}.gin")], [])
        config = gin.query_parameter("fot.training.train.mesh_config")
        try:
            assert gin.query_parameter("fot.training.train.fsdp") is fsdp
        except ValueError:
            assert not fsdp
    finally:
        gin.clear_config()
    names, sizes = mesh_shape_from_config(config, chips)
    assert names[0] == "data" and int(np.prod(sizes)) == chips
    with pytest.raises(ValueError, match=f"has {chips} devices, but {chips * 2} devices were given"):
        mesh_shape_from_config(config, chips * 2)


@pytest.mark.seqio
def test_data_shards_resume_on_another_number_of_processes(monkeypatch):
    """make_iterator(data_shards=2): the global batch is the same whether 1 host reads both shards or 2
    hosts read one each, and a cursor gathered from 2 hosts resumes 1 host exactly (and back)."""
    from fot.data import pipeline
    from fot.data.tasks import register_dictionary_task

    task = register_dictionary_task("multihost_shards", docs_per_epoch=64, key_len=1, value_len=1,
                                    vocab_size=16, doc_len=32, query_len=16)
    kw = dict(batch_size=8, seq_len=16, pack=2, add_bos=False, add_eos=False, boundary="pad", prefetch=0,
              data_shards=2)
    one = pipeline.make_iterator(task, shard_info=(0, 1), **kw)
    two = [pipeline.make_iterator(task, shard_info=(i, 2), **kw) for i in range(2)]
    assert one.local_batch_size == 8 and two[0].local_batch_size == 4

    def step(iterators):
        parts = [next(it)._asdict() for it in iterators]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    for _ in range(3):
        a, b = step([one]), step(two)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert len(np.unique(a["segment_ids"][a["segment_ids"] > 0])) == 4  # one document per lane, ids unique
    docs = [it.metrics()["data/multihost_shards/docs"] for it in (one, *two)]
    assert docs[0] == docs[1] + docs[2] > 0 and one.metrics()["data/steps"] == 3
    gathered = {"kind": multihost.PER_PROCESS, "sharded": True, "states": [it.get_state() for it in two]}
    resumed = pipeline.make_iterator(task, shard_info=(0, 1), **kw)
    resumed.set_state(multihost.local_cursor(gathered))           # 2 hosts' cursor on 1 host
    back = [pipeline.make_iterator(task, shard_info=(i, 2), **kw) for i in range(2)]
    for it in back:
        it.set_state(multihost.local_cursor(one.get_state()))     # 1 host's cursor on 2 hosts
    expected = step(two)
    for got in (step([resumed]), step(back), step([one])):
        for k in expected:
            np.testing.assert_array_equal(got[k], expected[k], err_msg=k)
    with pytest.raises(ValueError, match="data_shards=3 must be a positive multiple of the number of hosts 2"):
        pipeline.make_iterator(task, shard_info=(0, 2), **{**kw, "data_shards": 3})
    plain = pipeline.make_iterator(task, shard_info=(0, 1), **{**kw, "data_shards": None})
    with pytest.raises(ValueError, match="saved without data_shards"):
        resumed.set_state(plain.get_state())
