"""`python -m fot.eval` end to end on a tiny model trained for 2 steps with `python -m fot.train`."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A self-contained tiny dictionary run (independent of gin/quickstart.gin's current tuning).
TINY_GIN = """
include 'runs/dictionary.gin'
WINDOW = 16
PACK = 2
ROWS = 4
KEY_LEN = 2
VALUE_LEN = 2
VOCAB = 64
TOTAL_STEPS = 2
ModelConfig.d_model = 32
ModelConfig.num_layers = 2
ModelConfig.num_heads = 2
ModelConfig.mlp_dim = 64
ModelConfig.mem_layers = (1,)
make_optimizer.name = "adamw"
make_schedule.kind = "constant"
make_schedule.peak_lr = 1e-3
train.mesh_config = {"data": -1}
train.checkpoint_every = 1
train.log_every = 1
"""


def _env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, like a user's shell
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _run(module, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    wd = root / "wd"
    (root / "tiny.gin").write_text(TINY_GIN)
    args = [f"--gin_file={root / 'tiny.gin'}", f"--workdir={wd}"]
    r = _run("fot.train", *args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (wd / "config.gin").is_file() and (wd / "checkpoints").is_dir()
    return wd


def _snapshot(d):
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, d)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def test_dictionary_end_to_end_writes_only_results(workdir):
    before = _snapshot(workdir)
    r = _run("fot.eval", f"--workdir={workdir}", "--task=dictionary", "--top_k=8",
             "--gin_bindings=dictionary_eval.sizes = [16, 64]", "--gin_bindings=dictionary_eval.num_docs = 2")
    assert r.returncode == 0, r.stderr[-2000:]
    line = json.loads(r.stdout.strip().splitlines()[-1])
    assert line["task"] == "dictionary" and line["sizes"] == [16, 64] and line["window"] == 16
    assert line["top_k"] == 8 and len(line["fot_accuracy"]) == 2
    after = _snapshot(workdir)
    new = set(after) - set(before)
    assert new == {"results_dictionary.json", "eval_dictionary.png"}
    assert {k: after[k] for k in before} == before  # nothing else touched (results.json included)
    with open(workdir / "results_dictionary.json") as f:
        assert json.load(f)["fot_accuracy"] == line["fot_accuracy"]


def test_perplexity_tokens_file_and_capacity(workdir, tmp_path):
    toks = np.random.default_rng(0).integers(4, 64, 100).astype(np.int32)
    np.save(tmp_path / "t.npy", toks)
    ok = _run("fot.eval", f"--workdir={workdir}", "--task=perplexity", f"--tokens_file={tmp_path / 't.npy'}",
              "--gin_bindings=perplexity_eval.sizes = [0, 32]")
    assert ok.returncode == 0, ok.stderr[-2000:]
    res = json.loads(ok.stdout.strip().splitlines()[-1])
    assert np.isfinite(res["mean_nll"]) and set(res) >= {"single_doc", "multi_doc"}
    assert res["single_doc"]["tokens"][0] == res["single_doc"]["tokens"][1] > 0
    assert all(r > 0 for r in res["multi_doc"]["tokens_per_second"])
    capped = _run("fot.eval", f"--workdir={workdir}", "--task=perplexity", f"--tokens_file={tmp_path / 't.npy'}",
                  "--gin_bindings=perplexity_eval.sizes = [64]", "--gin_bindings=perplexity_eval.capacity = 32")
    assert capped.returncode == 0, capped.stderr[-2000:]
    assert json.loads(capped.stdout.strip().splitlines()[-1])["memory_tokens"] == [32]
    bad = _run("fot.eval", f"--workdir={workdir}", "--task=perplexity", f"--tokens_file={tmp_path / 't.npy'}",
               "--gin_bindings=perplexity_eval.sizes = [64]", "--gin_bindings=perplexity_eval.capacity = 0")
    assert bad.returncode == 2 and "capacity" in bad.stderr


BASELINE_GIN = TINY_GIN.replace("WINDOW = 16\nPACK = 2", "WINDOW = 32\nPACK = 1").replace(
    "ModelConfig.mem_layers = (1,)", "ModelConfig.mem_layers = ()\ntrain.curriculum = @ConstantD()\nConstantD.d = 0")


def test_dictionary_baseline_workdir(workdir, tmp_path):
    """--baseline_workdir adds the whole-document baseline (a run without memory layers) to the curve."""
    (tmp_path / "base.gin").write_text(BASELINE_GIN)
    r = _run("fot.train", f"--gin_file={tmp_path / 'base.gin'}", f"--workdir={tmp_path / 'base'}")
    assert r.returncode == 0, r.stderr[-2000:]
    r = _run("fot.eval", f"--workdir={workdir}", "--task=dictionary", "--top_k=8",
             f"--baseline_workdir={tmp_path / 'base'}", "--gin_bindings=dictionary_eval.sizes = [16, 64]",
             "--gin_bindings=dictionary_eval.num_docs = 2", "--gin_bindings=dictionary_eval.baseline_max_tokens = 40")
    assert r.returncode == 0, r.stderr[-2000:]
    line = json.loads(r.stdout.strip().splitlines()[-1])
    assert line["sizes"] == [16, 64] and line["baseline_accuracy"][1] is None  # 64 + 16 > 40 tokens
    assert 0 <= line["baseline_accuracy"][0] <= 1 and line["baseline_step"] == 2
    assert len(line["fot_dense_accuracy"]) == 2 and "tokens/s" in r.stderr  # the progress line


def test_bad_inputs_fail_clearly(workdir, tmp_path):
    cases = [
        (["--workdir=" + str(tmp_path / "missing"), "--task=dictionary"], "does not exist"),
        ([f"--workdir={workdir}", "--task=nonsense"], "unknown --task"),
        ([f"--workdir={workdir}", "--task=dictionary", "--top_k=0"], "--top_k must be >= 1"),
        ([f"--workdir={workdir}", "--task=dictionary", "--gin_bindings=dictionary_eval.top_k = -3"], "top_k"),
        ([f"--workdir={workdir}", "--task=passkey"], "vocab_size"),  # byte fallback needs 259 ids
        ([f"--workdir={workdir}", "--task=dictionary", "--gin_bindings=dictionary_eval.sizes = [16, 65536]"],
         "unique-key limit"),
        ([f"--workdir={workdir}", "--task=dictionary", "--top_k=32", "--gin_bindings=dictionary_eval.sizes = [16]"],
         "top_k=32 is larger than the memory"),
        ([f"--workdir={workdir}", "--task=perplexity", "--baseline_workdir=/x"], "--baseline_workdir applies"),
    ]
    empty = tmp_path / "no_ckpt"
    empty.mkdir()
    shutil.copy(workdir / "config.gin", empty / "config.gin")
    cases.append(([f"--workdir={empty}", "--task=dictionary"], "no checkpoint"))
    for args, msg in cases:
        r = _run("fot.eval", *args)
        assert r.returncode == 2, (args, r.stdout[-500:], r.stderr[-1500:])
        assert msg in r.stderr and "Traceback" not in r.stderr, (args, r.stderr[-1500:])
