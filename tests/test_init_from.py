"""train.init_from: a new run starts from another run's params (restored straight into their shardings,
checked by name, shape and dtype), with a fresh optimizer state at step 0; resuming it later uses its own
checkpoints; the model configuration comes from the source run's config.gin and a run file may change
memory-layer settings only (fot.train: one line, exit 2)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_train import TINY, error_lines, run_cli

from fot.data.dictionary import DictionaryLookupIterator
from fot.model import Decoder, ModelConfig
from fot.training.curriculum import ConstantD
from fot.training.loop import ConfigError, train
from fot.training.optim import make_optimizer


def cfg_of(**kw):
    return ModelConfig(**{**dict(vocab_size=16, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                                 mem_layers=(1,)), **kw})


def data(seed=4):
    return DictionaryLookupIterator(8, 16, pack=2, key_len=1, value_len=1, vocab_size=16, seed=seed)


def run(workdir, cfg, steps, **kw):
    with open(os.devnull, "w") as null:
        return train(workdir=str(workdir), model_config=cfg, train_data=data(), optimizer=make_optimizer("adamw", 3e-3),
                     total_steps=steps, curriculum=ConstantD(1), log_every=1, checkpoint_every=1000, stream=null, **kw)


def losses(workdir):
    return {r["step"]: r["loss"] for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl"))) if "loss" in r}


def test_init_from_loads_params_fresh_optimizer_and_resumes_its_own(tmp_path):
    from fot.training.checkpoint import load_params
    from fot.training.step import plan_rows, token_sums

    src = tmp_path / "src"
    run(src, cfg_of(), 2)
    params, src_step = load_params(str(src))
    assert src_step == 2
    new = tmp_path / "new"
    run(new, cfg_of(), 1, init_from=str(src), mesh_config={"data": 4, "model": 2}, fsdp=True)
    # the first step's loss is the source params' loss on the new run's first batch (before the update)
    batch = next(data())
    logits = Decoder(cfg_of()).apply({"params": params}, jnp.asarray(batch.inputs), positions=batch.positions,
                                     segment_ids=batch.segment_ids, extra_rows=plan_rows(8, 1, 2))
    sums = token_sums(logits, batch.targets, batch.loss_mask)
    np.testing.assert_allclose(losses(new)[1], float(sums["loss"] / sums["tokens"]), rtol=2e-5)
    state, new_step = load_params(str(new))
    assert new_step == 1  # step 0 + 1 update, not the source's 2 + 1
    # a restart of the new run resumes from its own checkpoint (the source is not read again)
    os.rename(src, tmp_path / "moved")
    out = run(new, cfg_of(), 2, init_from=str(src))
    assert out["step"] == 2 and sorted(losses(new)) == [1, 2]


def test_restore_params_into_fsdp_shardings(tmp_path):
    from fot.parallel import axis_rules, make_mesh
    from fot.training.checkpoint import load_params, restore_params
    from fot.training.state import abstract_params, state_shardings

    run(tmp_path / "src", cfg_of(), 1)
    mesh = make_mesh({"data": 4, "model": 2})
    model, opt = Decoder(cfg_of()), make_optimizer("adamw", 1e-3)
    shardings = state_shardings(model, opt, mesh, 16, rules=axis_rules(fsdp=True))
    target = abstract_params(model, 16, shardings)
    got, step = restore_params(str(tmp_path / "src"), target, None)
    want, _ = load_params(str(tmp_path / "src"))
    for (path, a), t, w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(target), jax.tree.leaves(want)):
        assert a.sharding == t.sharding, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(a), w)
    kernel = got["layers_0"]["mlp"]["gate"]["kernel"]  # [32, 64] over data x model: each device holds 1/8
    assert {s.data.shape for s in kernel.addressable_shards} == {(8, 32)}


def test_init_from_mismatch_names_the_first_param(tmp_path):
    run(tmp_path / "src", cfg_of(), 1)
    with pytest.raises(ConfigError, match=r"param layers_0/attn/k/kernel is \(32, 16\) float32 in .*src's checkpoint "
                                          r"\(step 1\), but the model expects \(32, 32\) float32"):
        run(tmp_path / "a", cfg_of(num_kv_heads=4), 1, init_from=str(tmp_path / "src"))
    with pytest.raises(ConfigError, match=r"param embed/embedding is \(16, 32\) float32 .* expects \(16, 32\) bfloat16"):
        run(tmp_path / "b", cfg_of(param_dtype="bfloat16"), 1, init_from=str(tmp_path / "src"))
    with pytest.raises(ConfigError, match="no checkpoints/ directory"):
        run(tmp_path / "c", cfg_of(), 1, init_from=str(tmp_path / "nothing"))
    with pytest.raises(ConfigError, match="init_from_step is set but train.init_from is not"):
        run(tmp_path / "d", cfg_of(), 1, init_from_step=1)
    with pytest.raises(ConfigError, match="no checkpoint at step 7"):
        run(tmp_path / "e", cfg_of(), 1, init_from=str(tmp_path / "src"), init_from_step=7)
    for d in "abcde":
        assert not (tmp_path / d / "checkpoints").exists() or not os.listdir(tmp_path / d / "checkpoints")


def test_imported_params_only_run_is_not_resumed(tmp_path):
    from fot.training.checkpoint import save_params

    params = jax.tree.map(np.asarray, Decoder(cfg_of()).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    save_params(str(tmp_path / "imported"), jax.tree.map(lambda x: np.asarray(x.value if hasattr(x, "value") else x),
                                                          params, is_leaf=lambda x: hasattr(x, "value")))
    with pytest.raises(ConfigError, match="imported parameters without optimizer state .* train.init_from"):
        run(tmp_path / "imported", cfg_of(), 1)


def test_cli_run_file_may_change_memory_settings_only(tmp_path):
    src = tmp_path / "src"
    ok = run_cli([f"--gin_file={TINY}", f"--workdir={src}", "--gin_bindings=TOTAL_STEPS = 1",
                  "--gin_bindings=ModelConfig.qk_norm = False"])  # (QK-norm memory layers have a param more)
    assert ok.returncode == 0, ok.stderr[-2000:]
    base = [f"--gin_file={TINY}", f"--gin_bindings=train.init_from = '{src}'", "--gin_bindings=TOTAL_STEPS = 1",
            "--gin_bindings=ModelConfig.qk_norm = False"]
    bad = run_cli(base + ["--gin_bindings=ModelConfig.num_layers = 3", f"--workdir={tmp_path / 'bad'}"])
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    (line,) = error_lines(bad)
    assert "change ModelConfig.num_layers (2 there, 3 here)" in line and "mem_layers" in line
    nowhere = run_cli([f"--gin_file={TINY}", f"--gin_bindings=train.init_from = '{tmp_path / 'nowhere'}'",
                       f"--workdir={tmp_path / 'x'}"])
    assert nowhere.returncode == 2 and "no config.gin there" in error_lines(nowhere)[0]
    # memory-layer settings may change: memory layer 0 instead of 1, and the run trains from src's params
    good = run_cli(base + ["--gin_bindings=ModelConfig.mem_layers = (0,)", f"--workdir={tmp_path / 'good'}"])
    assert good.returncode == 0, good.stderr[-2000:]
    conf = (tmp_path / "good" / "config.gin").read_text().replace("\\\n    ", "")  # gin wraps long values
    assert "ModelConfig.mem_layers = (0,)" in conf and f"train.init_from = '{src}'" in conf
