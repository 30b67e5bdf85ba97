"""gin/tasks/*.gin and gin/runs/{lm,stdlib_lm,stdlib_scaling,pg19_184m}.gin compose and build the data pipeline."""
import json
import os

import numpy as np
import pytest

pytestmark = pytest.mark.seqio

GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin")
RUN_MACROS = ["ROWS = 4", "WINDOW = 16", "PACK = 2", "TOTAL_STEPS = 2"]


@pytest.fixture(scope="module")
def tiny_spm(tmp_path_factory):
    from fot.data.vocab import train_vocabulary

    d = tmp_path_factory.mktemp("gin_vocab")
    rng = np.random.default_rng(7)
    words = np.array("alpha beta gamma delta lane pack window token memory def return class".split())
    (d / "c.txt").write_text("\n".join(" ".join(rng.choice(words, 30)) for _ in range(300)))
    return train_vocabulary(str(d / "c.txt"), 300, str(d / "spm"))


@pytest.fixture
def gin_env():
    import gin

    from fot.train import register_configurables

    register_configurables()
    gin.clear_config()
    gin.add_config_file_search_path(GIN_DIR)
    yield gin  # (a runs/ folder in the working directory must not shadow 'runs/...': fot.train resolves includes as files)
    gin.clear_config()


def query(gin, name):
    """A binding's value with macros (%NAME) resolved."""
    v = gin.query_parameter(name)
    while str(v).startswith("%"):
        v = gin.query_parameter(str(v))
    return v


def build(gin, scope="train_data"):
    with gin.config_scope(scope):
        return gin.get_configurable("fot.data.make_iterator")()


def test_stdlib_run_file_builds_iterators(gin_env, tiny_spm):
    gin = gin_env
    gin.parse_config_files_and_bindings(
        [os.path.join(GIN_DIR, "runs/stdlib_lm.gin")],
        ["register_stdlib_task.vocabulary = @load_vocabulary()", f"load_vocabulary.path = '{tiny_spm}'",
         "VOCAB = 300", "ROWS = 4", "WINDOW = 16",
         # the validation split's documents are few and small: keeps this test fast
         "train_data/make_iterator.split = 'validation'", "train_data/make_iterator.shuffle_buffer = 0"])
    assert query(gin, "ModelConfig.vocab_size") == 300
    it = build(gin)
    b = next(it)
    assert b.inputs.shape == (4, 16) and it.pack == 2 and it.vocab_size == 300
    assert b.segment_ids[0, 0] > 0 and b.inputs[0, 0] == 3  # BOS of the first document
    ev = build(gin, "eval_data")
    s0 = ev.get_state()
    first = next(ev)
    ev.set_state(s0)  # the loop rewinds eval data like this before every evaluation
    np.testing.assert_array_equal(next(ev).inputs, first.inputs)
    it.close(), ev.close()


def test_longllama_mixture_file_registers_rates_and_min_lengths(gin_env, tiny_spm, tmp_path):
    from fot.data import tasks
    from fot.data.tf_env import import_seqio

    gin = gin_env
    subsets = ["arxiv", "python", "book", "common_crawl", "c4", "github", "stackexchange", "wikipedia"]
    bindings = [f"VOCAB_PATH = '{tiny_spm}'", "VOCAB = 300"] + RUN_MACROS
    for s in subsets:
        (tmp_path / f"{s}.jsonl").write_text(
            "\n".join(json.dumps({"text": f"{s} alpha beta {i} " * (3 + i)}) for i in range(5)) + "\n")
        bindings.append(f"{s.upper()}_FILES = '{tmp_path / s}.jsonl'")
    gin.parse_config_files_and_bindings(
        [os.path.join(GIN_DIR, "runs/lm.gin"), os.path.join(GIN_DIR, "tasks/longllama_mixture.gin")], bindings)
    it = build(gin)
    next(it)
    it.close()
    mix = import_seqio().get_mixture_or_task("longllama")
    rates = {t.name: mix.get_rate(t) for t in mix.tasks}
    assert rates == {"longllama_arxiv": 25, "longllama_python": 25, "longllama_book": 10,
                     "longllama_common_crawl": 29, "longllama_c4": 5, "longllama_github": 2,
                     "longllama_stackexchange": 2, "longllama_wikipedia": 2}
    mins = {s: tasks.registered_min_length(f"longllama_{s}") for s in subsets}
    assert mins == {"arxiv": 0, "python": 4096, "book": 0, "common_crawl": 0, "c4": 1024, "github": 2048,
                    "stackexchange": 1024, "wikipedia": 1024}


def test_local_files_template_and_pg19_run_parse(gin_env, tiny_spm, tmp_path):
    gin = gin_env
    for split in ("train", "valid"):
        (tmp_path / f"{split}.jsonl").write_text(
            "\n".join(json.dumps({"text": "alpha beta gamma " * (10 + i)}) for i in range(6)) + "\n")
    gin.parse_config_files_and_bindings(
        [os.path.join(GIN_DIR, "runs/lm.gin"), os.path.join(GIN_DIR, "tasks/local_files.gin"),
         os.path.join(GIN_DIR, "size/tiny_test.gin")],
        [f"VOCAB_PATH = '{tiny_spm}'", "VOCAB = 300", f"TRAIN_FILES = '{tmp_path}/train.jsonl'",
         f"VALID_FILES = '{tmp_path}/valid.jsonl'"] + RUN_MACROS)
    it = build(gin, "eval_data")
    assert next(it).inputs.shape == (4, 16)
    it.close()
    gin.clear_config()
    # pg19 184M: parses and binds the paper's geometry (the data itself is not on this machine)
    gin.parse_config_files_and_bindings([os.path.join(GIN_DIR, "runs/pg19_184m.gin")], [])
    assert query(gin, "train_data/make_iterator.batch_size") == 64
    assert query(gin, "train_data/make_iterator.seq_len") == 512
    assert query(gin, "train_data/make_iterator.add_bos") is False
    assert query(gin, "ModelConfig.d_model") == 1024
    assert query(gin, "register_tfds_task.tfds_name") == "pg19:0.1.1"


@pytest.mark.parametrize("d", [31, 0])
def test_stdlib_scaling_recipe_composes(gin_env, tiny_spm, d):
    """Issue 9 item 4: gin/runs/stdlib_scaling.gin (and its d = 0 twin, `D = 0`) composes: the model with
    memory layer 2, smeared memory-layer keys, log-parametrised QK-norm temperature scaled by ln(n)/ln(2048),
    the optimizer with the temperature's 10x learning rate, constant d, and the packed stdlib iterators."""
    import jax.numpy as jnp

    gin = gin_env
    gin.parse_config_files_and_bindings(
        [os.path.join(GIN_DIR, "runs/stdlib_scaling.gin")],
        ["register_stdlib_task.vocabulary = @load_vocabulary()", f"load_vocabulary.path = '{tiny_spm}'",
         "VOCAB = 300", f"D = {d}", "train_data/make_iterator.split = 'validation'",
         "train_data/make_iterator.shuffle_buffer = 0"])
    cfg = gin.get_configurable("fot.model.ModelConfig")()
    assert (cfg.vocab_size, cfg.d_model, cfg.num_layers, cfg.mem_layers) == (300, 128, 4, (2,))
    assert cfg.qk_norm and cfg.qk_scale_param == "log" and cfg.qk_scale_n_ref == 2048 and cfg.mem_key_smear
    # the temperature extrapolation starts at the keys in view of a training query: (D + 1) * WINDOW for D = 31
    assert cfg.qk_scale_n_train == 32 * 128 and cfg.qk_scale_extrapolation == 0.25
    assert gin.get_configurable("fot.training.ConstantD")().values == (d,)
    assert query(gin, "train.max_train_seconds") <= 3600 and query(gin, "train.eval_num_extra") == (15, 0)
    # the temperature's learning-rate multiplier reaches the optimizer: one Adam step on zero gradients
    # except log tau moves log tau 10x as far as an equal gradient on another parameter
    opt = gin.get_configurable("fot.training.make_optimizer")(learning_rate=1e-2)
    params = {"attn": {"qk_log_scale": jnp.zeros(4), "w": jnp.zeros(4)}}
    rng = np.random.default_rng(0)
    g = jnp.asarray(rng.normal(size=4).astype(np.float32))
    upd, _ = opt.update({"attn": {"qk_log_scale": g, "w": g}}, opt.init(params), params)
    np.testing.assert_allclose(np.asarray(upd["attn"]["qk_log_scale"]), 10 * np.asarray(upd["attn"]["w"]), rtol=1e-5)
    it = build(gin)
    b = next(it)
    assert b.inputs.shape == (32, 128) and it.pack == 4
    it.close()
