"""Training entry point: gin composition, CLI errors, 1 vs 8 devices, NaN guard, micro-batching."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "gin/runs/dictionary_tiny.gin"


def run_cli(args, devices=1, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "fot.train", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def error_lines(proc):
    return [line for line in proc.stderr.splitlines() if line.startswith("fot.train: error:")]


def test_gin_composition_and_overrides():
    import gin

    from fot.train import register_configurables

    register_configurables()
    gin.clear_config()
    try:
        # `make run` leaves runs/ in the working directory: it must not shadow gin's 'runs/...' includes
        gin.add_config_file_search_path(os.path.join(REPO, "gin"))
        gin.parse_config_files_and_bindings(
            [os.path.join(REPO, "gin/quickstart.gin"), os.path.join(REPO, "gin/mesh/fsdp.gin")],
            ["train.total_steps = 7", "WINDOW = 32", "SwitchOnAccuracy.after = 2"])
        assert gin.query_parameter("train.total_steps") == 7
        assert gin.query_parameter("train.fsdp") is True  # from the later file
        assert gin.query_parameter("SwitchOnAccuracy.after") == 2
        with gin.config_scope("train_data"):
            it = gin.get_configurable("fot.data.DictionaryLookupIterator")()
        with gin.config_scope("eval_data"):
            ev = gin.get_configurable("fot.data.DictionaryLookupIterator")()
        assert (it.seq_len, it.pack, it.spec.key_len, it.seed) == (32, 2, 2, 0)
        assert ev.seq_len == 32 and ev.seed != it.seed
        cfg = gin.get_configurable("fot.model.ModelConfig")()
        assert cfg.vocab_size == 64 and cfg.mem_positional == "none" and cfg.qk_norm
        # make run reports held-out accuracy with 4K and 16K dictionary tokens in memory.
        assert gin.query_parameter("final/dictionary_eval.sizes") == [4096, 16384]
        # The paper's exact setting composes from the run file + the 37M size file.
        gin.clear_config()
        gin.parse_config_files_and_bindings([os.path.join(REPO, "gin/dictionary_paper.gin")], [])
        cfg = gin.get_configurable("fot.model.ModelConfig")()
        assert (cfg.vocab_size, cfg.d_model, cfg.num_layers, cfg.mem_layers) == (64, 512, 12, (8,))
        with gin.config_scope("train_data"):
            it = gin.get_configurable("fot.data.DictionaryLookupIterator")()
        assert it.seq_len == 256 and it.pack == 2 and it.batch_size * it.seq_len // 2 == 32768
    finally:
        gin.clear_config()


@pytest.mark.parametrize("args,devices,expect", [
    (["--gin_bindings=train.no_such_param = 1"], 1, "doesn't have a parameter named 'no_such_param'"),
    (["--gin_bindings=NoSuchThing.x = 1"], 1, "No configurable matching 'NoSuchThing'"),
    (["--gin_file=gin/no_such_file.gin"], 1, "gin file not found"),
    (["--gin_bindings=ROWS = 7"], 1, "batch_size=7 is not divisible by pack=2"),
    (["--gin_bindings=ROWS = 12", "--gin_bindings=train.mesh_config = {'data': 8}"], 8,
     "not divisible by the mesh data axis"),
    (["--workdir=/nonexistent_parent_dir/run"], 1, "workdir parent directory does not exist"),
    # issue 15 item 8: a string used to raise a TypeError traceback, 5.5 trained 6 steps
    (["--gin_bindings=TOTAL_STEPS = '5'"], 1, "train.total_steps must be an integer >= 1, got '5' (str)"),
    (["--gin_bindings=TOTAL_STEPS = 5.5"], 1, "train.total_steps must be an integer >= 1, got 5.5 (float)"),
])
def test_cli_errors_are_one_clear_line(tmp_path, args, devices, expect):
    workdir = [] if any(a.startswith("--workdir") for a in args) else [f"--workdir={tmp_path}/run"]
    proc = run_cli([f"--gin_file={TINY}", *args, *workdir], devices=devices)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = error_lines(proc)
    assert len(lines) == 1 and expect in lines[0], proc.stderr[-3000:]


def _train_in_process(workdir, mesh_config, steps=3, model_kw=None, optimizer_kw=None, **kw):
    from fot.data.dictionary import DictionaryLookupIterator
    from fot.model import ModelConfig
    from fot.training.loop import train
    from fot.training.optim import make_optimizer

    cfg = ModelConfig(vocab_size=16, d_model=32, num_layers=2, num_heads=2, mlp_dim=64, mem_layers=(1,),
                      **(model_kw or {}))
    data = DictionaryLookupIterator(16, 16, pack=2, key_len=1, value_len=1, vocab_size=16, seed=4)
    from fot.training.curriculum import ConstantD
    with open(os.devnull, "w") as null:
        train(workdir=workdir, model_config=cfg, train_data=data,
              optimizer=make_optimizer("adamw", 3e-3, **(optimizer_kw or {})),
              total_steps=steps, curriculum=ConstantD(3), mesh_config=mesh_config, log_every=1,
              checkpoint_every=1000, stream=null, **kw)
    rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    return np.array([r["loss"] for r in rows if "loss" in r])


def test_training_batches_with_token_ids_outside_the_vocabulary_stop_with_one_clear_error(tmp_path):
    """Issue 15 item 2: a batch id >= vocab_size gave a NaN loss (reported as divergence), a negative one trained
    silently on another token's embedding row; both are an input error naming the step and the id."""
    from fot.data.dictionary import DictionaryLookupIterator
    from fot.model import ModelConfig
    from fot.training.loop import ConfigError, train
    from fot.training.optim import make_optimizer

    class Poisoned:
        """DictionaryLookupIterator whose 3rd batch holds one bad id (and no vocab_size attribute)."""

        def __init__(self, bad):
            self.it = DictionaryLookupIterator(8, 16, pack=2, key_len=1, value_len=1, vocab_size=16, seed=1)
            self.batch_size, self.seq_len, self.pack, self.bad, self.n = 8, 16, 2, bad, 0

        def __next__(self):
            batch = next(self.it)
            self.n += 1
            if self.n == 3:
                batch = batch._replace(inputs=batch.inputs.copy())
                batch.inputs[1, 5] = self.bad
            return batch

        def get_state(self):
            return self.it.get_state()

        def set_state(self, state):
            self.it.set_state(state)

    cfg = ModelConfig(vocab_size=16, d_model=32, num_layers=2, num_heads=2, mlp_dim=64, mem_layers=(1,))
    for bad in (16, -1):
        with pytest.raises(ConfigError, match=fr"training batch of step 3 \(inputs\): token id {bad} at position "
                                              r"\(1, 5\) is outside \[0, 16\)"):
            with open(os.devnull, "w") as null:
                train(workdir=str(tmp_path / f"run{bad}"), model_config=cfg, train_data=Poisoned(bad),
                      optimizer=make_optimizer("adamw", 1e-3), total_steps=5, mesh_config={"data": 1},
                      stream=null)


def test_one_vs_eight_devices_identical_losses(tmp_path):
    one = _train_in_process(str(tmp_path / "one"), {"data": 1})
    eight = _train_in_process(str(tmp_path / "eight"), {"data": 8}, fsdp=True)
    assert one.shape == (3,) and np.all(np.isfinite(one))
    np.testing.assert_allclose(eight, one, rtol=2e-5)
    assert not np.allclose(one[0], one[-1])  # the run actually trains


def test_temperature_metric_and_lr_multiplier(tmp_path):
    """The logged ``qk_temperature`` is the mean tau of the saved params; with lr_multipliers the
    log-temperature moves about 20x farther than with the base learning rate (Adam steps ~ lr)."""
    from fot.training.checkpoint import load_params

    moves = {}
    for mult in (1.0, 20.0):
        wd = str(tmp_path / f"m{mult}")
        _train_in_process(wd, {"data": 1}, steps=3, model_kw=dict(qk_norm=True, qk_scale_param="log",
                                                                   qk_scale_init=8.0),
                          optimizer_kw=dict(lr_multipliers={"qk_log_scale": mult}))
        rows = [json.loads(x) for x in open(os.path.join(wd, "metrics.jsonl"))]
        logged = [r["qk_temperature"] for r in rows if "qk_temperature" in r]
        log_tau = load_params(wd)[0]["layers_1"]["attn"]["qk_log_scale"]
        np.testing.assert_allclose(logged[-1], np.exp(log_tau).mean(), rtol=1e-5)
        moves[mult] = np.abs(log_tau - np.log(8.0)).mean()
    assert 0 < moves[1.0] <= 3 * 3e-3 + 1e-6 and 5 * moves[1.0] < moves[20.0] <= 3 * 20 * 3e-3 + 1e-5


def test_final_eval_gets_the_trained_params_and_reaches_results(tmp_path):
    import jax

    from fot.training.checkpoint import load_params

    seen = {}

    def final_eval(model, params):
        seen["params"], seen["vocab"] = jax.device_get(params), model.config.vocab_size
        return {"sizes": [16], "fot_accuracy": [0.25]}

    _train_in_process(str(tmp_path / "run"), {"data": 1}, steps=2, final_eval=final_eval)
    results = json.load(open(tmp_path / "run" / "results.json"))
    assert results["final_eval"] == {"sizes": [16], "fot_accuracy": [0.25]} and results["final_eval_seconds"] >= 0
    saved, step = load_params(str(tmp_path / "run"))
    assert step == 2 and seen["vocab"] == 16  # called with the final (checkpointed) params
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), seen["params"], saved)


def test_microbatches_match_full_batch(rng):
    # d = 1 with pack 2: every row's extra context is inside its own pack, so micro-batches of whole
    # packs see exactly the full batch's contexts: loss, metrics and the updated params must agree.
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from fot.data.dictionary import DictionaryLookupIterator
    from fot.model import Decoder, ModelConfig
    from fot.parallel import make_mesh
    from fot.training.optim import make_optimizer
    from fot.training.state import create_train_state, state_shardings
    from fot.training.step import make_train_step, plan_rows, put_batch

    cfg = ModelConfig(vocab_size=16, d_model=32, num_layers=2, num_heads=2, mlp_dim=64, mem_layers=(1,))
    model, opt = Decoder(cfg), make_optimizer("adamw", 3e-3)
    mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
    sh = state_shardings(model, opt, mesh, 16)
    bs = NamedSharding(mesh, PartitionSpec("data"))
    batch = next(DictionaryLookupIterator(16, 16, pack=2, key_len=1, value_len=1, vocab_size=16,
                                          seed=int(rng.integers(1 << 20))))
    outs = []
    for m in (1, 4):
        state = create_train_state(model, opt, mesh, 16, 0, sh)
        step = make_train_step(model, opt, mesh=mesh, num_microbatches=m, pack=2, state_shardings=sh)
        state, metrics = step(state, put_batch(batch, bs), plan_rows(16 // m, 1, 2))
        outs.append((jax.device_get(metrics), jax.device_get(state.params)))
    for k in ("loss", "accuracy", "tokens", "grad_norm"):
        np.testing.assert_allclose(outs[1][0][k], outs[0][0][k], rtol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=5e-5), outs[1][1], outs[0][1])  # Adam step ~ lr = 3e-3


def test_nan_loss_stops_with_clear_message_and_good_checkpoint(tmp_path):
    wd = tmp_path / "nan"
    # lr is sane for 3 steps, then absurd: params blow up and the loss turns NaN/inf a step later.
    proc = run_cli([f"--gin_file={TINY}", f"--workdir={wd}",
                    "--gin_bindings=make_optimizer.learning_rate = @optax.join_schedules()",
                    "--gin_bindings=optax.join_schedules.schedules = [@ok/optax.constant_schedule(), "
                    "@bad/optax.constant_schedule()]",
                    "--gin_bindings=optax.join_schedules.boundaries = [3]",
                    "--gin_bindings=ok/optax.constant_schedule.value = 1e-3",
                    "--gin_bindings=bad/optax.constant_schedule.value = 1e30",
                    "--gin_bindings=train.checkpoint_every = 2",
                    "--gin_bindings=train.total_steps = 50"])
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = error_lines(proc)
    assert len(lines) == 1 and "training diverged at step" in lines[0] and "Last good checkpoint: step" in lines[0], lines
    nan_step = int(lines[0].split(" at step ")[1].split(":")[0])
    from fot.training.checkpoint import load_params
    params, step = load_params(str(wd))
    assert 2 <= step < nan_step
    assert all(np.all(np.isfinite(x)) for x in __import__("jax").tree.leaves(params))
    assert not (wd / "results.json").exists()


def _lr_jump(bad_lr, *extra):
    """Bindings: lr 1e-3 for 3 steps, then ``bad_lr``; a checkpoint every step, keep only 1."""
    return ["--gin_bindings=make_optimizer.learning_rate = @optax.join_schedules()",
            "--gin_bindings=optax.join_schedules.schedules = [@ok/optax.constant_schedule(), "
            "@bad/optax.constant_schedule()]",
            "--gin_bindings=optax.join_schedules.boundaries = [3]",
            "--gin_bindings=ok/optax.constant_schedule.value = 1e-3",
            f"--gin_bindings=bad/optax.constant_schedule.value = {bad_lr}",
            "--gin_bindings=train.checkpoint_every = 1", "--gin_bindings=train.keep_checkpoints = 1",
            "--gin_bindings=train.total_steps = 12", *extra]


@pytest.mark.parametrize("case", ["exploded_params", "finite_params_nan_loss", "finite_params_nan_loss_async"])
def test_nan_guard_names_only_a_truly_good_checkpoint(tmp_path, case):
    """Issue 15 item 1: the checkpoint named "last good" must hold finite parameters that give a finite loss,
    even with a checkpoint every step and keep_checkpoints = 1, and resuming from it must work.
    exploded_params: lr 1e30 at step 4 overflows the parameters (their norm is inf; each still finite).
    finite_params_nan_loss: float16 compute and lr 30 at step 4: finite parameters whose next loss is NaN
    (``_async``: with asynchronous saves, the rejected checkpoint is moved once its write finished)."""
    wd = tmp_path / case
    extra = ["--gin_bindings=ModelConfig.dtype = 'float16'"] if case.startswith("finite_params_nan_loss") else []
    if case.endswith("_async"):
        extra.append("--gin_bindings=train.async_checkpointing = True")
    bad_lr = 30.0 if extra else 1e30
    proc = run_cli([f"--gin_file={TINY}", f"--workdir={wd}", *_lr_jump(bad_lr, *extra)])
    assert proc.returncode == 3, proc.stderr[-3000:]
    lines = error_lines(proc)
    assert len(lines) == 1 and "training diverged at step" in lines[0], proc.stderr[-3000:]
    good = int(lines[0].split("Last good checkpoint: step ")[1].split()[0])
    assert good == 3, lines[0]
    from fot.training.checkpoint import load_params
    params, step = load_params(str(wd))
    assert step == good
    leaves = [np.asarray(x, np.float64) for x in __import__("jax").tree.leaves(params)]
    assert all(np.all(np.isfinite(x)) for x in leaves)
    assert np.sqrt(sum(np.sum(x * x) for x in leaves)) < 1e3  # an overflowed update would be ~1e30
    if case.startswith("finite_params_nan_loss"):
        assert "moved to" in lines[0] and (wd / "rejected_checkpoints" / "4-diverged").is_dir()
    else:  # resume with a sane learning rate from the checkpoint named good: trains to the end
        resumed = run_cli([f"--gin_file={TINY}", f"--workdir={wd}", *_lr_jump(1e-3)])
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"resumed from {wd}/checkpoints/3" in resumed.stdout
        assert json.loads(resumed.stdout.splitlines()[-1])["step"] == 12


@pytest.mark.parametrize("name", ["adafactor", "adamw"])
def test_state_shardings_on_a_data_model_mesh(name):
    # Optimizer state follows its params where param-shaped (Adam moments) and is replicated where it
    # is not (Adafactor's factored row/column statistics), so init and one step work on a 4x2 mesh.
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from fot.data.dictionary import DictionaryLookupIterator
    from fot.model import Decoder, ModelConfig
    from fot.parallel import axis_rules, make_mesh
    from fot.training.optim import make_optimizer
    from fot.training.state import create_train_state, state_shardings
    from fot.training.step import make_train_step, plan_rows, put_batch

    cfg = ModelConfig(vocab_size=16, d_model=32, num_layers=2, num_heads=2, mlp_dim=64, mem_layers=(1,))
    model, opt = Decoder(cfg), make_optimizer(name, 1e-3)
    mesh = make_mesh({"data": 4, "model": 2})
    sh = state_shardings(model, opt, mesh, 16, rules=axis_rules(fsdp=True))
    assert sh.params["layers_0"]["mlp"]["up"]["kernel"].spec == PartitionSpec("data", "model")
    state = create_train_state(model, opt, mesh, 16, 0, sh)
    step = make_train_step(model, opt, mesh=mesh, pack=2, state_shardings=sh)
    batch = next(DictionaryLookupIterator(8, 16, pack=2, key_len=1, value_len=1, vocab_size=16, seed=1))
    state, metrics = step(state, put_batch(batch, NamedSharding(mesh, PartitionSpec("data"))), plan_rows(8, 2, 2))
    assert np.isfinite(float(metrics["loss"])) and int(state.step) == 1


def test_gin_includes_resolve_in_process_beside_a_runs_directory(tmp_path, monkeypatch):
    """Issue 15 item 11: after `make run` (a `runs/` folder in the working directory, which pytest puts on
    sys.path), parsing in-process must still resolve `include 'runs/dictionary.gin'` from gin/ instead of
    crashing in gin's package-path reader (runs/ would be a namespace package without an origin)."""
    import importlib

    import gin

    from fot.train import register_configurables

    (tmp_path / "runs" / "quickstart").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    register_configurables()
    gin.clear_config()
    try:
        gin.add_config_file_search_path(os.path.join(REPO, "gin"))
        gin.parse_config_files_and_bindings([os.path.join(REPO, "gin/quickstart.gin")], ["TOTAL_STEPS = 3"])
        assert gin.query_parameter("%TOTAL_STEPS") == 3
        assert repr(gin.query_parameter("train.train_data")) == "@train_data/DictionaryLookupIterator()"  # included
    finally:
        gin.clear_config()


def test_gin_includes_work_beside_a_runs_directory(tmp_path):
    """A `runs/` folder in the working directory (where run directories usually go) or in any other
    directory on sys.path (the repository after `make run`, on PYTHONPATH) must not shadow gin's
    `include 'runs/...'` (gin's package-path reader would find it as a namespace package)."""
    (tmp_path / "runs").mkdir()
    (tmp_path / "on_path" / "runs").mkdir(parents=True)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=f"{REPO}{os.pathsep}{tmp_path / 'on_path'}")
    proc = subprocess.run(
        [sys.executable, "-m", "fot.train", f"--gin_file={REPO}/gin/quickstart.gin",
         f"--gin_search_paths={REPO}/gin", "--gin_bindings=TOTAL_STEPS = 2", "--gin_bindings=train.eval_every = 0",
         "--gin_bindings=train.eval_data = None", "--gin_bindings=final/dictionary_eval.num_docs = 2",
         "--gin_bindings=final/dictionary_eval.sizes = [64, 256]", "--workdir=runs/q"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results["step"] == 2
    # The quickstart's final eval (dictionary accuracy vs tokens in memory) reaches the results JSON.
    final = results["final_eval"]
    assert final["sizes"] == [64, 256] and final["num_docs"] == 2 and final["top_k"] == 32
    assert all(0.0 <= a <= 1.0 for a in final["fot_accuracy"] + final["no_memory_accuracy"])
    assert "final eval" in proc.stdout
    assert (tmp_path / "runs" / "q" / "config.gin").is_file()
