"""fot.runconfig: reading an untrusted run's config.gin, and the model/data comparison behind resume refusal."""
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# An operative config as fot.train writes it (abridged), with a seqio data iterator.
SAVED = """
ROWS = 8
WINDOW = 16
TASK = @register_stdlib_task()
ModelConfig.d_model = 32
ModelConfig.vocab_size = 300
ModelConfig.remat = False
register_stdlib_task.name = 'stdlib'
register_stdlib_task.vocabulary = @load_vocabulary()
load_vocabulary.path = '/tmp/spm.model'
train_data/make_iterator.task = %TASK
train_data/make_iterator.batch_size = %ROWS
train_data/make_iterator.seq_len = %WINDOW
train_data/make_iterator.prefetch = 2
eval_data/make_iterator.batch_size = 4
train.model_config = @ModelConfig()
train.train_data = @train_data/make_iterator()
train.eval_data = @eval_data/make_iterator()
train.total_steps = 100
make_optimizer.name = 'adamw'
"""


def test_model_and_data_changes_are_named_and_the_rest_is_free():
    from fot import runconfig
    from fot.train import register_configurables

    register_configurables()
    same = SAVED.replace("train.total_steps = 100", "train.total_steps = 500").replace("'adamw'", "'adafactor'")
    same = same.replace("eval_data/make_iterator.batch_size = 4", "eval_data/make_iterator.batch_size = 2")
    same = same.replace("ModelConfig.remat = False", "ModelConfig.remat = True")  # compute-only
    same = same.replace("make_iterator.prefetch = 2", "make_iterator.prefetch = 8")
    assert runconfig.data_and_model_changes(SAVED, same, runconfig.gin_default) == []
    changed = SAVED.replace("ROWS = 8", "ROWS = 4").replace("'/tmp/spm.model'", "'/tmp/other.model'")
    assert runconfig.data_and_model_changes(SAVED, changed, runconfig.gin_default) == [
        "load_vocabulary.path: '/tmp/spm.model' -> '/tmp/other.model'",
        "train_data/make_iterator.batch_size: 8 -> 4"]
    # A parameter missing on one side is compared with its default (a field added since the run was saved).
    added = SAVED + "ModelConfig.tie_embeddings = False\n"
    assert runconfig.data_and_model_changes(SAVED, added, runconfig.gin_default) == []
    assert runconfig.data_and_model_changes(SAVED, SAVED + "ModelConfig.tie_embeddings = True\n",
                                            runconfig.gin_default) == ["ModelConfig.tie_embeddings: False -> True"]


def test_untrusted_run_config_imports_and_calls_nothing(tmp_path, monkeypatch):
    """Issue 15 item 13: a run directory's config.gin may hold `import` lines and references to any registered
    configurable; reading the run (fot.train.parse_run_config, used by eval/generate/to_hf) must import
    nothing and call nothing but ModelConfig / the data-config functions it asks for."""
    import gin

    from fot.eval.restore import _train_data_param
    from fot.train import parse_run_config, register_configurables

    register_configurables()
    calls = []

    def tripwire(**kw):
        calls.append(kw)
        return 7

    gin.external_configurable(tripwire, name="tripwire_for_test", module="fot.test")
    pkg = tmp_path / "site" / "evil_pkg_for_test"
    pkg.mkdir(parents=True)
    marker = tmp_path / "IMPORTED"
    (pkg / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "config.gin").write_text(
        "import evil_pkg_for_test\n"
        "from evil_pkg_for_test import nothing\n"
        f"include '{tmp_path / 'other.gin'}'\n"
        "KEY = @tripwire_for_test()\n"
        "ModelConfig.vocab_size = 16\nModelConfig.d_model = 32\nModelConfig.num_layers = 2\n"
        "ModelConfig.num_heads = 2\nModelConfig.mlp_dim = 64\n"
        "ModelConfig.norm_eps = @tripwire_for_test()\n"          # a non-data call inside the model config
        "ModelConfig.init_std = @make_optimizer()\n"             # another configurable a reader must not call
        "train.model_config = @ModelConfig()\n"
        "train.train_data = @train_data/DictionaryLookupIterator()\n"
        "train.optimizer = @make_optimizer()\n"
        "train_data/DictionaryLookupIterator.seq_len = 16\n"
        "train_data/DictionaryLookupIterator.key_len = %KEY\n"
        "train_data/DictionaryLookupIterator.seed = @train()\n")
    try:
        parse_run_config(str(wd))
        cfg = gin.get_configurable("fot.model.ModelConfig")()
        assert (cfg.vocab_size, cfg.d_model, cfg.norm_eps, cfg.init_std) == (16, 32, 1e-6, 0.02)
        assert _train_data_param(gin, "seq_len") == 16
        assert _train_data_param(gin, "key_len") is None and _train_data_param(gin, "seed") is None
        assert repr(gin.query_parameter("train.train_data")) == "@train_data/DictionaryLookupIterator()"
    finally:
        gin.clear_config()
    assert not marker.exists() and "evil_pkg_for_test" not in sys.modules
    assert calls == []


def test_unknown_configurables_and_imports_in_a_run_config_are_skipped(tmp_path):
    """A run trained with a user's own configurables (imported by its gin files) still loads for reading:
    their bindings are skipped, the model configuration is read."""
    import gin

    from fot.train import parse_run_config

    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "config.gin").write_text("import my_private_tasks\nmy_private_tasks.MyTask.size = 3\n"
                                   "ModelConfig.vocab_size = 40\nModelConfig.d_model = 8\n"
                                   "ModelConfig.num_layers = 1\nModelConfig.num_heads = 1\nModelConfig.mlp_dim = 8\n"
                                   "train.model_config = @ModelConfig()\ntrain.train_data = @my_private_tasks.make()\n")
    try:
        parse_run_config(str(wd))
        assert gin.get_configurable("fot.model.ModelConfig")().vocab_size == 40
    finally:
        gin.clear_config()


@pytest.mark.parametrize("bad", ["ModelConfig.vocab_size = \n", "ModelConfig.vocab_size = [1, 2\n"])
def test_a_broken_run_config_is_one_clear_error(tmp_path, bad):
    from fot.eval.restore import EvalError, load_run

    wd = tmp_path / "wd"
    (wd / "checkpoints" / "1").mkdir(parents=True)
    (wd / "config.gin").write_text(bad)
    with pytest.raises(EvalError, match="bad gin config"):
        load_run(str(wd))


def test_a_task_bound_through_a_macro_is_registered_with_its_macro_scoped_bindings(tmp_path):
    """Issue 9 (stdlib_scaling): for `TASK = @register_stdlib_task()` with unscoped bindings, gin's operative
    config (a run's config.gin) writes them as `TASK/register_stdlib_task.name = ...` (gin calls the reference
    in the macro's scope). fot.eval --seqio_task on such a run failed with "register_stdlib_task() missing ...
    'vocabulary'" (the task was called without that scope) and the run's vocabulary was not found."""
    import json
    import uuid

    import gin
    import seqio

    from fot import runconfig
    from fot.data.vocab import train_vocabulary
    from fot.train import parse_run_config

    rng = __import__("numpy").random.default_rng(3)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
    (tmp_path / "corpus.txt").write_text("\n".join(" ".join(rng.choice(words, 20)) for _ in range(200)))
    spm = train_vocabulary(str(tmp_path / "corpus.txt"), 60, str(tmp_path / "spm"), byte_fallback=False)
    with open(tmp_path / "valid.jsonl", "w") as f:
        for _ in range(3):
            f.write(json.dumps({"text": " ".join(rng.choice(words, 12))}) + "\n")
    name = f"macro_scoped_{uuid.uuid4().hex[:8]}"
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "config.gin").write_text(f"""
TASK = @register_files_task()
ModelConfig.d_model = 32
ModelConfig.vocab_size = 64
TASK/register_files_task.name = '{name}'
TASK/register_files_task.patterns = {{'validation': '{tmp_path / "valid.jsonl"}'}}
TASK/register_files_task.format = 'jsonl'
TASK/register_files_task.vocabulary = @load_vocabulary()
TASK/load_vocabulary.path = '{spm}'
train_data/make_iterator.task = %TASK
train_data/make_iterator.seq_len = 16
train.model_config = @ModelConfig()
train.train_data = @train_data/make_iterator()
""")
    parse_run_config(str(wd))
    assert runconfig.register_run_tasks(gin) == [name]
    assert name in seqio.TaskRegistry.names()
    assert runconfig.spm_model_path(runconfig.run_vocabulary(gin)) == spm
