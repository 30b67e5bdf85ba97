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
    """Item 10 (capacity): perplexity_eval.capacity caps the FIFO memory of every size (it changed nothing):
    with the same scored predictions (score_from = 64), size 64 capped to 32 slots gives exactly the NLL of
    size 32, which differs from the uncapped size 64."""
    toks = np.random.default_rng().integers(4, 64, 100).astype(np.int32)
    np.save(tmp_path / "t.npy", toks)
    common = ["--task=perplexity", f"--tokens_file={tmp_path / 't.npy'}",
              "--gin_bindings=perplexity_eval.score_from = 64"]
    ok = _run("fot.eval", f"--workdir={workdir}", *common, "--gin_bindings=perplexity_eval.sizes = [0, 32, 64]")
    assert ok.returncode == 0, ok.stderr[-2000:]
    res = json.loads(ok.stdout.strip().splitlines()[-1])
    assert np.isfinite(res["mean_nll"]) and set(res) >= {"single_doc", "multi_doc"}
    assert res["single_doc"]["tokens"][0] == res["single_doc"]["tokens"][1] == 100 - 1 - 64
    assert all(r > 0 for r in res["multi_doc"]["tokens_per_second"])
    capped = _run("fot.eval", f"--workdir={workdir}", *common, "--gin_bindings=perplexity_eval.sizes = [32, 64]",
                  "--gin_bindings=perplexity_eval.capacity = 32",
                  "--gin_bindings=perplexity_eval.modes = ['single_doc']")
    assert capped.returncode == 0, capped.stderr[-2000:]
    cap = json.loads(capped.stdout.strip().splitlines()[-1])
    assert cap["memory_tokens"] == [32, 32] and cap["sizes"] == [32, 64]
    nll, nll_cap = res["single_doc"]["mean_nll"], cap["single_doc"]["mean_nll"]
    np.testing.assert_allclose(nll_cap, [nll[1], nll[1]], rtol=1e-6)
    assert nll[2] != nll[1]  # without the cap, 64 memory tokens change the predictions
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
        ([f"--workdir={workdir}", "--task=dictionary", "--temperature_scale=0"], "--temperature_scale must be > 0"),
        ([f"--workdir={workdir}", "--task=dictionary", "--temperature_scale=2"], "needs a model with qk_norm"),
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


def _error_lines(proc, prog):
    return [line for line in proc.stderr.splitlines() if line.startswith(f"{prog}: error:")]


def test_bad_tokens_files_are_one_line_exit_2(workdir, tmp_path):
    """Issue 15 items 2 and 8: --tokens_file that is 2-D, float, empty, missing, or holds ids outside
    [0, vocab) exits 2 with one line (ids >= vocab used to give NaN perplexity with exit 0, negative ids
    plausible numbers)."""
    rng = np.random.default_rng()
    files = {"2d": rng.integers(4, 64, (4, 30)), "float": rng.random(60), "empty": np.zeros((0,), np.int32),
             "too_big": np.concatenate([rng.integers(4, 64, 40), [64 + int(rng.integers(0, 1000))]]),
             "negative": np.concatenate([rng.integers(4, 64, 40), [-1 - int(rng.integers(0, 1000))]])}
    for name, arr in files.items():
        np.save(tmp_path / f"{name}.npy", arr)
    (tmp_path / "zero_bytes.npy").write_bytes(b"")
    expect = {"2d": "1-D integer", "float": "1-D integer", "empty": "no document", "zero_bytes": "",
              "missing": "does not exist", "too_big": f"token id {files['too_big'][-1]} at position 40",
              "negative": f"token id {files['negative'][-1]} at position 40"}
    for name, msg in expect.items():
        path = tmp_path / f"{name}.npy"
        r = _run("fot.eval", f"--workdir={workdir}", "--task=perplexity", f"--tokens_file={path}",
                 "--gin_bindings=perplexity_eval.sizes = [0, 16]")
        lines = _error_lines(r, "fot.eval")
        assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, (name, r.stderr[-1500:])
        assert str(path) in lines[0] and msg in lines[0], (name, lines)


def test_damaged_checkpoint_is_exit_4_naming_it(workdir, tmp_path):
    """Item 5 for readers: eval of a workdir whose latest checkpoint lost its _METADATA exits 4 (I/O) with one
    line naming the damaged step and the others (it used to be exit 2, "cannot restore")."""
    wd = tmp_path / "wd"
    shutil.copytree(workdir, wd)
    steps = sorted(int(p) for p in os.listdir(wd / "checkpoints") if p.isdigit())
    os.remove(wd / "checkpoints" / str(steps[-1]) / "state" / "_METADATA")
    r = _run("fot.eval", f"--workdir={wd}", "--task=dictionary", "--gin_bindings=dictionary_eval.sizes = [16]",
             "--gin_bindings=dictionary_eval.num_docs = 1")
    lines = _error_lines(r, "fot.eval")
    assert r.returncode == 4 and len(lines) == 1, r.stderr[-1500:]
    assert f"checkpoint step {steps[-1]}" in lines[0] and "damaged" in lines[0], lines


@pytest.mark.parametrize("module,flag", [("fot.eval", "--task"), ("fot.generate", "--prompt"),
                                         ("fot.train", "--gin_file")])
def test_help_lists_the_flags_and_exits_0(module, flag):
    """Item 14: --help exits 0 and lists the tool's own flags (they are defined outside the __main__ module)."""
    r = _run(module, "--help")
    assert r.returncode == 0, r.stderr[-1500:]
    assert f"  {flag}" in r.stdout and "--workdir" in r.stdout and "Exit codes" in r.stdout


# ---------------------------------------------------------------------------------------------------------
# A run trained on local JSONL files with its own SentencePiece vocabulary (the stdlib_lm.gin situation).
WORDS = "alpha beta gamma delta lane pack window token memory def return class".split()


@pytest.fixture(scope="module")
def spm_run(tmp_path_factory):
    import json as _json

    from fot.data.vocab import train_vocabulary

    root = tmp_path_factory.mktemp("spm_run")
    rng = np.random.default_rng(7)
    (root / "corpus.txt").write_text("\n".join(" ".join(rng.choice(WORDS, 30)) for _ in range(300)))
    spm = train_vocabulary(str(root / "corpus.txt"), 300, str(root / "spm"))
    other = train_vocabulary(str(root / "corpus.txt"), 320, str(root / "other"))
    for split, n in (("train", 40), ("valid", 6)):
        with open(root / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                f.write(_json.dumps({"text": " ".join(rng.choice(WORDS, int(rng.integers(20, 60))))}) + "\n")
    wd = root / "wd"
    r = _run("fot.train", "--gin_file=gin/runs/lm.gin", "--gin_file=gin/tasks/local_files.gin",
             "--gin_file=gin/size/tiny_test.gin", f"--gin_bindings=VOCAB_PATH = '{spm}'", "--gin_bindings=VOCAB = 300",
             f"--gin_bindings=TRAIN_FILES = '{root / 'train.jsonl'}'",
             f"--gin_bindings=VALID_FILES = '{root / 'valid.jsonl'}'", "--gin_bindings=ROWS = 4",
             "--gin_bindings=WINDOW = 32", "--gin_bindings=PACK = 2", "--gin_bindings=TOTAL_STEPS = 2",
             "--gin_bindings=train.eval_data = None", f"--workdir={wd}")
    assert r.returncode == 0, r.stderr[-2000:]
    return {"wd": wd, "spm": spm, "other": other, "root": root}


def test_spm_run_is_sampled_and_evaluated_with_its_own_vocabulary(spm_run):
    """Item 15: a run trained with a SentencePiece vocabulary is tokenised with it by default (the operative
    config names it): passkey ran with a byte tokenizer ("bytes must be in range(0, 256)") and generate printed
    garbage; a tokenizer of another size is refused. (tiny_test.gin pads the model vocabulary to 512 ids,
    the run's SentencePiece model has 300: training accepts that, so do the readers.)"""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=spm_run["spm"])
    wd = spm_run["wd"]
    g = _run("fot.generate", f"--workdir={wd}", "--prompt=alpha beta gamma", "--max_new_tokens=3")
    assert g.returncode == 0, g.stderr[-2000:]
    out = json.loads(g.stdout.strip().splitlines()[-1])
    assert out["prompt_tokens"] == len(sp.encode("alpha beta gamma")) + 1  # + BOS, as trained
    # ids of the padded model vocabulary (>= 300) have no text (an untrained model can emit them)
    assert out["text"] == sp.decode([i for i in out["generated_tokens"] if i < 300])
    p = _run("fot.eval", f"--workdir={wd}", "--task=passkey", "--gin_bindings=passkey_eval.context_lengths = [40]",
             "--gin_bindings=passkey_eval.trials = 1")
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout.strip().splitlines()[-1])["tokenizer"] == spm_run["spm"]
    for args in ([f"--spm_path={spm_run['other']}"],):
        bad = _run("fot.generate", f"--workdir={wd}", "--prompt=alpha", *args)
        lines = _error_lines(bad, "fot.generate")
        assert bad.returncode == 2 and len(lines) == 1, bad.stderr[-1500:]
        assert "has 320 ids but the model's vocab_size is 512 (the run was trained with 300)" in lines[0], lines


def test_perplexity_on_the_runs_seqio_task_with_bos_as_trained(spm_run):
    """Item 10: --seqio_task names a task the run registered (it was "No Task or Mixture found" with a traceback)
    and its documents carry the BOS/EOS the run was trained with (make_iterator's add_bos/add_eos default True)."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=spm_run["spm"])
    r = _run("fot.eval", f"--workdir={spm_run['wd']}", "--task=perplexity", "--seqio_task=local_files",
             "--split=validation", "--gin_bindings=perplexity_eval.sizes = [0]",
             "--gin_bindings=perplexity_eval.modes = ['multi_doc']")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    texts = [json.loads(line)["text"] for line in open(spm_run["root"] / "valid.jsonl")]
    assert res["num_docs"] == len(texts)
    assert res["multi_doc"]["tokens"] == [sum(len(sp.encode(t)) + 2 for t in texts) - 1]
    bad = _run("fot.eval", f"--workdir={spm_run['wd']}", "--task=perplexity", "--seqio_task=no_such_task")
    lines = _error_lines(bad, "fot.eval")
    assert bad.returncode == 2 and len(lines) == 1 and "this run registers ['local_files']" in lines[0], lines


def test_perplexity_on_the_stdlib_task_of_a_stdlib_run(spm_run, tmp_path):
    """Item 10 as reported: `fot.eval --task=perplexity --seqio_task=stdlib` on a gin/runs/stdlib_lm.gin run
    ("No Task or Mixture found", a traceback, exit 1: the task was registered only by training). The run's
    config registers it again, with the run's vocabulary (BOS/EOS as trained: the local-files test above)."""
    from fot.data import stdlib_corpus

    wd = tmp_path / "stdlib"
    r = _run("fot.train", "--gin_file=gin/runs/stdlib_lm.gin", "--gin_bindings=register_stdlib_task.vocabulary = "
             "@load_vocabulary()", f"--gin_bindings=load_vocabulary.path = '{spm_run['spm']}'",
             "--gin_bindings=VOCAB = 300", "--gin_bindings=ROWS = 4", "--gin_bindings=WINDOW = 32",
             "--gin_bindings=TOTAL_STEPS = 2", "--gin_bindings=train.eval_data = None",
             # the validation split's documents are few and small: keeps this test fast
             "--gin_bindings=train_data/make_iterator.split = 'validation'",
             "--gin_bindings=train_data/make_iterator.shuffle_buffer = 0", f"--workdir={wd}")
    assert r.returncode == 0, r.stderr[-2000:]
    e = _run("fot.eval", f"--workdir={wd}", "--task=perplexity", "--seqio_task=stdlib", "--split=validation",
             "--gin_bindings=perplexity_eval.sizes = [0, 32]", "--gin_bindings=perplexity_eval.modes = ['multi_doc']",
             "--gin_bindings=perplexity_eval.max_tokens = 64")
    assert e.returncode == 0 and "Traceback" not in e.stderr, e.stderr[-2000:]
    res = json.loads(e.stdout.strip().splitlines()[-1])
    docs = stdlib_corpus.load_documents("validation")
    assert res["num_docs"] == min(64, len(docs)) and res["multi_doc"]["tokens"] == [64, 64]
    assert np.isfinite(res["multi_doc"]["mean_nll"]).all()
