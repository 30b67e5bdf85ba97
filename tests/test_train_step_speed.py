"""Train-step speed work (issue 14): the cheaper accuracy count, donation / no host transfers in the step,
and the train_step benchmark's configuration helpers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fot.data.batch import Batch
from fot.training.step import argmax_hits, token_sums


def test_argmax_hits_equal_numpy_argmax_including_ties(rng):
    """Random logits with many exact ties (values on a coarse grid): hits == (np.argmax == target), ties
    going to the first maximal index as argmax does."""
    logits = rng.integers(-3, 3, size=(3, 50, 17)).astype(np.float32)  # coarse grid: ties everywhere
    targets = rng.integers(0, 17, size=(3, 50))
    top = logits.argmax(-1)
    targets[:, ::3] = top[:, ::3]  # a third of the tokens are argmax hits
    ties = (logits == logits.max(-1, keepdims=True)).sum(-1) > 1
    assert ties.mean() > 0.3  # the case under test really occurs
    got = np.asarray(argmax_hits(jnp.asarray(logits), jnp.asarray(targets)))
    np.testing.assert_array_equal(got, (top == targets).astype(np.float32))


def test_token_sums_loss_and_accuracy_match_references(rng):
    logits = rng.normal(size=(2, 9, 31)).astype(np.float32)
    targets = rng.integers(0, 31, size=(2, 9))
    mask = (rng.random((2, 9)) > 0.3).astype(np.float32)
    s = token_sums(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    ce = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(s["loss"]), (ce * mask).sum(), rtol=1e-5)
    assert float(s["correct"]) == ((logits.argmax(-1) == targets) * mask).sum()
    assert float(s["tokens"]) == mask.sum()


def _tiny_step():
    from fot.model import Decoder, ModelConfig
    from fot.parallel import make_mesh
    from fot.training.optim import make_optimizer
    from fot.training.state import create_train_state, state_shardings
    from fot.training.step import make_train_step

    cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=2, mlp_dim=64, mem_layers=(1,))
    model = Decoder(cfg)
    mesh = make_mesh({"data": -1, "model": 1}, devices=jax.devices()[:1])
    opt = make_optimizer("adamw", 1e-3)
    sh = state_shardings(model, opt, mesh, 16)
    state = create_train_state(model, opt, mesh, 16, 0, sh)
    return make_train_step(model, opt, mesh=mesh, pack=2, state_shardings=sh), state, mesh


def test_train_step_donates_state_and_has_no_host_transfers(rng):
    """The compiled step aliases every state buffer to an output (donation) and contains no host callback;
    calling it with device-resident inputs makes no implicit host<->device transfer."""
    step, state, mesh = _tiny_step()
    b, t = 4, 16
    tok = rng.integers(0, 64, size=(b, t)).astype(np.int32)
    batch = Batch(inputs=tok, targets=tok, loss_mask=np.ones((b, t), np.float32),
                  segment_ids=np.ones((b, t), np.int32), positions=np.tile(np.arange(t, dtype=np.int32), (b, 1)))
    rows = np.asarray([[-1], [0], [-1], [2]], np.int32)
    compiled = step.lower(state, batch, rows).compile()
    text = compiled.as_text()
    assert "callback" not in text.lower() and "outfeed" not in text.lower()
    n_state = len(jax.tree.leaves(state))
    assert text.count("may-alias") + text.count("must-alias") >= n_state
    P, NS = jax.sharding.PartitionSpec, jax.sharding.NamedSharding
    dev_batch = batch.map(lambda v: jax.device_put(v, NS(mesh, P("data"))))
    dev_rows = jax.device_put(rows, NS(mesh, P()))
    leaves_before = jax.tree.leaves(state)
    with jax.transfer_guard("disallow"):
        state2, metrics = step(state, dev_batch, dev_rows)
        jax.block_until_ready(metrics)
    assert all(x.is_deleted() for x in leaves_before)  # donated
    assert np.isfinite(float(metrics["loss"]))


def test_benchmark_recipes_match_the_gin_run_files():
    """The benchmark's recipe d / window / pack for 37M and 184M are those of the run files."""
    import os
    import re

    from benchmarks.train_step import MODELS

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def binding(path, name):
        text = open(os.path.join(root, path)).read()
        return int(re.search(rf"^{re.escape(name)}\s*=\s*(\d+)", text, re.M).group(1))

    assert MODELS["paper_37m"][1:4] == (binding("gin/dictionary_paper.gin", "SwitchOnAccuracy.after"),
                                        binding("gin/dictionary_paper.gin", "WINDOW"),
                                        binding("gin/dictionary_paper.gin", "PACK"))
    assert MODELS["paper_184m"][1:4] == (binding("gin/runs/pg19_184m.gin", "SwitchAtStep.after"),
                                         binding("gin/runs/pg19_184m.gin", "WINDOW"),
                                         binding("gin/runs/pg19_184m.gin", "PACK"))


def test_benchmark_shapes_and_rows():
    from benchmarks.train_step import default_shape, extra_rows
    from fot.ops import crossbatch_plan

    assert default_shape("paper_37m", "cpu") == (4, 256)
    assert default_shape("paper_1_2b", "gpu") == (8, 2048)
    assert default_shape("openllama_3b", "cpu") == (4, 2048)  # at least one k=4 pack
    assert extra_rows(4, 0, 2) is None
    np.testing.assert_array_equal(extra_rows(8, 2, 2), crossbatch_plan(8, 2, pack=2))
    rows = extra_rows(4, 6, 2)  # fewer rows than d: rows b-1, b-2, ... cycling through the batch
    np.testing.assert_array_equal(rows, (np.arange(4)[:, None] - 1 - np.arange(6)[None, :]) % 4)


@pytest.mark.slow
def test_benchmark_runs_and_skips(monkeypatch, capsys):
    """A tiny model through the whole benchmark: measured lines carry finite tokens/s and MFU; a memory
    budget below the train state gives a 'skipped: does not fit' line."""
    import json

    import benchmarks.train_step as bt

    monkeypatch.setitem(bt.MODELS, "tiny", ("tiny_test.gin", 2, 32, 2, "test"))
    lines = bt.run(_args(bt, ["--models", "tiny", "--dtypes", "float32", "--crossbatch", "off,recipe",
                              "--remat", "none", "--reps", "1", "--batch", "4"]))
    assert [l["status"] for l in lines] == ["measured", "measured"]
    for l in lines:
        assert l["tokens_per_s"] > 0 and 0 < l["mfu"] < 10 and l["memory_gib"] > 0
    assert lines[1]["crossbatch_d"] == 2 and lines[1]["model_flops"] > lines[0]["model_flops"]
    printed = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [p["status"] for p in printed] == ["measured", "measured"]
    skipped = bt.run(_args(bt, ["--models", "tiny", "--dtypes", "float32", "--crossbatch", "off", "--remat", "none",
                                "--memory_budget_gib", "1e-6"]))
    assert skipped[0]["status"].startswith("skipped: does not fit")


def _args(bt, argv):
    a = bt.parse_args(argv)
    a.max_step_seconds = 600.0
    return a
