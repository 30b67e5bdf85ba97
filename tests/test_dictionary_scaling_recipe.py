"""gin/runs/dictionary_scaling_cpu.gin composes into the recipe BUILD_NOTES.md measured (no training)."""
import os

import jax
import jax.numpy as jnp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = "runs/dictionary_scaling_cpu.gin"


@pytest.fixture
def recipe():
    import gin

    from fot.train import register_configurables
    register_configurables()
    gin.clear_config()
    gin.add_config_file_search_path(os.path.join(REPO, "gin"))
    gin.parse_config_files_and_bindings([os.path.join(REPO, "gin", RECIPE)], [])
    yield gin
    gin.clear_config()


def test_scaling_recipe_is_the_papers_task_with_the_tuned_memory_temperature(recipe):
    gin = recipe
    from fot.eval import dictionary
    from fot.eval.restore import _resolve
    from fot.model import Decoder
    from fot.training.optim import name_mask

    with gin.config_scope("train_data"):
        it = gin.get_configurable("fot.data.DictionaryLookupIterator")()
    with gin.config_scope("eval_data"):
        ev = gin.get_configurable("fot.data.DictionaryLookupIterator")()
    # the paper's records: 4-token keys and values, vocabulary 64; 64-token windows, pack 2
    assert (it.spec.key_len, it.spec.value_len, it.spec.vocab_size) == (4, 4, 64)
    assert (it.seq_len, it.pack, it.batch_size) == (64, 2, 64)
    assert ev.seed != it.seed and ev.seq_len == it.seq_len

    cfg = gin.get_configurable("fot.model.ModelConfig")()
    assert (cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.mem_layers) == (64, 3, 4, (1,))
    assert (cfg.head_dim, cfg.num_kv_heads) == (64, 1)  # 4 query heads of 64 sharing one key/value head
    # hard negatives from step 1000 on: one 8-symbol key alphabet per training step; held-out data untouched
    assert (it.spec.key_symbols, it.provider.key_symbols_from_block) == (8, 1000)
    assert ev.spec.key_symbols is None
    assert cfg.qk_norm and cfg.mem_positional == "none"
    assert (cfg.qk_scale_param, cfg.qk_scale_init, cfg.qk_scale_n_ref) == ("log", 10.0, None)

    # the 10x temperature learning rate must reach the memory layer's log-temperature, and only it
    mult = gin.query_parameter("make_optimizer.lr_multipliers")
    assert mult == {"qk_log_scale": 10.0}
    params = Decoder(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, it.seq_len), jnp.int32))["params"]
    mask = name_mask(params, tuple(mult))
    hit = [(path, leaf.shape) for (path, leaf), m in zip(jax.tree_util.tree_leaves_with_path(params),
                                                          jax.tree_util.tree_leaves(mask)) if m]
    assert len(hit) == len(cfg.mem_layers) and all(shape == (cfg.num_heads,) for _, shape in hit), hit
    assert all(f"layers_{cfg.mem_layers[0]}" in jax.tree_util.keystr(p) for p, _ in hit)

    # d = 1 until 95% training accuracy, then every other window of the batch
    assert gin.query_parameter("train.curriculum").selector == "SwitchOnAccuracy"
    assert (gin.query_parameter("SwitchOnAccuracy.before"), gin.query_parameter("SwitchOnAccuracy.after")) \
        == (1, it.batch_size - 1)
    total = _resolve(gin, gin.query_parameter("train.total_steps"))
    assert total == 2000
    # the hard phase's learning rate: constant 3e-3 (warm-up 100) to step 1000, cosine to 3e-5 at the end
    from fot.training.optim import make_schedule
    lr = gin.get_configurable("fot.training.make_schedule")()
    const = make_schedule("constant", peak_lr=3e-3, warmup_steps=100)
    assert all(float(lr(s)) == float(const(s)) for s in (0, 50, 100, 500, 999))
    assert float(lr(1500)) == pytest.approx((3e-3 + 3e-5) / 2, rel=1e-4)
    assert float(lr(total)) == pytest.approx(3e-5, rel=1e-4)
    assert gin.query_parameter("train.max_train_seconds") is None

    # its final evaluation: sizes the task can hold, exact top-k, held-out seed
    sizes = gin.query_parameter("final/dictionary_eval.sizes")
    assert max(sizes) == 1 << 20 and gin.query_parameter("final/dictionary_eval.top_k") == 32
    assert all(dictionary.size_fits(s, it.seq_len, 4, 4, 64) for s in sizes)
    assert dictionary.size_fits(1 << 24, it.seq_len, 4, 4, 64)  # the 16M point of BUILD_NOTES fits too
