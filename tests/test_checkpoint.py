"""Checkpoints: SIGTERM mid-run → save + exit 5; resume gives the uninterrupted run's losses exactly; saves are
committed before the next step by default."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "gin/runs/dictionary_tiny.gin"


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
                PYTHONPATH=REPO)


def _args(workdir, total_steps):
    # SwitchOnAccuracy with a low threshold makes the curriculum state matter for the resume too.
    return [sys.executable, "-m", "fot.train", f"--gin_file={TINY}", f"--workdir={workdir}",
            f"--gin_bindings=train.total_steps = {total_steps}", "--gin_bindings=train.checkpoint_every = 4",
            "--gin_bindings=train.curriculum = @SwitchOnAccuracy()",
            "--gin_bindings=SwitchOnAccuracy.before = 1", "--gin_bindings=SwitchOnAccuracy.after = 3",
            "--gin_bindings=SwitchOnAccuracy.threshold = 0.2"]


def _losses(workdir):
    rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    out = {}
    for r in rows:
        if "loss" in r:
            out[r["step"]] = (r["loss"], r["d"])
    return out


@pytest.mark.slow
def test_sigterm_then_resume_matches_uninterrupted(tmp_path):
    wd = str(tmp_path / "interrupted")
    # The interrupted run saves asynchronously (the SIGTERM save waits for the save in flight); the resume and
    # the reference use the default synchronous saves: the mode may change across a resume.
    proc = subprocess.Popen(_args(wd, 100000) + ["--gin_bindings=train.async_checkpointing = True"], cwd=REPO,
                            env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    first = os.path.join(wd, "checkpoints", "4")
    deadline = time.time() + 600
    while not os.path.isdir(first) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert os.path.isdir(first), "no first checkpoint"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    from fot.runtime import EXIT_PREEMPTED
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    assert "stop signal received" in out
    result = json.loads(out.strip().splitlines()[-1])
    stop_step = result["step"]
    assert result["stopped"] == "preempted" and stop_step >= 4
    assert os.path.isdir(os.path.join(wd, "checkpoints", str(stop_step)))

    total = stop_step + 6
    resumed = subprocess.run(_args(wd, total), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from" in resumed.stdout and json.loads(resumed.stdout.splitlines()[-1])["step"] == total

    ref = str(tmp_path / "uninterrupted")
    full = subprocess.run(_args(ref, total), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-3000:]

    got, want = _losses(wd), _losses(ref)
    assert sorted(want) == list(range(1, total + 1)) and sorted(got) == sorted(want)
    np.testing.assert_allclose([got[s][0] for s in sorted(want)], [want[s][0] for s in sorted(want)], rtol=1e-6)
    assert [got[s][1] for s in sorted(want)] == [want[s][1] for s in sorted(want)]
    assert {d for _, d in want.values()} == {1.0, 3.0}, "curriculum should have switched in this run"

    # keep_checkpoints = 2 (tiny run file): only the two most recent step directories remain.
    steps = sorted(int(p) for p in os.listdir(os.path.join(ref, "checkpoints")) if p.isdigit())
    assert steps[-1] == total and len(steps) == 2

    # Inference-side loader: params only, no model/optimizer needed; equal to the resumed run's.
    from fot.training.checkpoint import load_params
    p1, s1 = load_params(wd)
    p2, s2 = load_params(ref)
    assert s1 == s2 == total
    import jax
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert "embed" in p1 and "layers_1" in p1
    assert os.path.isfile(os.path.join(wd, "config.gin"))


def test_load_run_gives_config_and_params(tmp_path):
    wd = str(tmp_path / "run")
    proc = subprocess.run(_args(wd, 4), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import gin
    import jax
    import jax.numpy as jnp

    from fot.model import Decoder
    from fot.eval.restore import load_run

    try:
        cfg, params, step = load_run(wd)
    finally:
        gin.clear_config()
    assert step == 4 and cfg.vocab_size == 16 and cfg.mem_layers == (1,)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 16, size=(2, 16)), jnp.int32)
    logits = Decoder(cfg).apply({"params": params}, tokens)
    assert logits.shape == (2, 16, 16) and bool(jnp.all(jnp.isfinite(logits)))
    import flax.linen as nn
    assert jax.tree.structure(params) == jax.tree.structure(
        nn.meta.unbox(jax.eval_shape(lambda: Decoder(cfg).init(jax.random.PRNGKey(0), tokens)))["params"])


class _WatchedData:
    """A DictionaryLookupIterator that records, whenever the loop asks for the batch of step n, which
    checkpoint directories are committed (``<step>``) and which are still being written
    (``<step>.orbax-checkpoint-tmp*``)."""

    def __init__(self, workdir):
        from fot.data.dictionary import DictionaryLookupIterator

        self.it = DictionaryLookupIterator(8, 16, pack=2, key_len=1, value_len=1, vocab_size=16,
                                           seed=int(np.random.default_rng().integers(1 << 30)))
        self.batch_size, self.seq_len, self.pack = 8, 16, 2
        self.dir = os.path.join(workdir, "checkpoints")
        self.seen = {}  # step n -> (committed steps, steps in flight)
        self.n = 0

    def __next__(self):
        self.n += 1
        names = os.listdir(self.dir) if os.path.isdir(self.dir) else []
        self.seen[self.n] = ({int(p) for p in names if p.isdigit()},
                             {int(p.split(".")[0]) for p in names if ".orbax-checkpoint-tmp" in p})
        return next(self.it)

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)


def test_checkpoints_are_committed_before_the_next_step_by_default(tmp_path):
    """The default (synchronous saves, as t5x): when step n+1 starts, the checkpoint of step n is committed,
    so a kill from then on loses at most checkpoint_every steps. With asynchronous saves the checkpoint
    of step n would still be in flight here (committed some steps later)."""
    from fot.model import ModelConfig
    from fot.training.checkpoint import load_params
    from fot.training.loop import train
    from fot.training.optim import make_optimizer

    wd = str(tmp_path / "run")
    data = _WatchedData(wd)
    cfg = ModelConfig(vocab_size=16, d_model=32, num_layers=2, num_heads=2, mlp_dim=64, mem_layers=(1,))
    with open(os.devnull, "w") as null:
        train(workdir=wd, model_config=cfg, train_data=data, optimizer=make_optimizer("adamw", 1e-3),
              total_steps=9, mesh_config={"data": 1}, checkpoint_every=2, keep_checkpoints=None, stream=null)
    assert sorted(data.seen) == list(range(1, 10))
    for n, (committed, in_flight) in data.seen.items():
        due = set(range(2, n, 2))  # every checkpoint saved before step n
        assert committed == due and not in_flight, (n, committed, in_flight)
    _, step = load_params(wd)
    assert step == 9
