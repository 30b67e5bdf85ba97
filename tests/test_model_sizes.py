"""Every gin/size/*.gin parses into a ModelConfig; parameter counts match the nominal sizes (eval_shape only)."""
import math
import pathlib

import gin
import jax
import jax.numpy as jnp
import pytest

from fot.model import Decoder, ModelConfig

SIZE_DIR = pathlib.Path(__file__).resolve().parents[1] / "gin" / "size"

# file: (nominal params, which count, num_layers, mem_layers)
EXPECTED = {
    "tiny_test": (None, None, 2, (1,)),
    "paper_37m": (37e6, "non_embedding", 12, (8,)),
    "paper_184m": (184e6, "with_input_embedding", 12, (8,)),
    "paper_600m": (600e6, "non_embedding", 12, (8,)),
    "paper_1_2b": (1.2e9, "non_embedding", 12, (8,)),
    "openllama_3b": (3.43e9, "total", 26, (6, 12, 18)),
    "llama_7b": (6.74e9, "total", 32, (8, 16, 24)),
}


def parse(name: str) -> ModelConfig:
    gin.clear_config()
    try:
        gin.external_configurable(ModelConfig, module="fot.model")
    except ValueError:  # already registered (by this test or an entry point)
        pass
    gin.parse_config_file(str(SIZE_DIR / f"{name}.gin"))
    try:
        return gin.get_configurable("fot.model.ModelConfig")()
    finally:
        gin.clear_config()


def test_every_size_file_is_covered():
    assert {p.stem for p in SIZE_DIR.glob("*.gin")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_size_file(name):
    nominal, kind, layers, mem = EXPECTED[name]
    cfg = parse(name)
    assert cfg.num_layers == layers and cfg.mem_layers == mem
    shapes = jax.eval_shape(lambda: Decoder(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    leaves = jax.tree_util.tree_leaves_with_path(shapes["params"])
    count = lambda pred: sum(math.prod(x.shape) for p, x in leaves if pred(jax.tree_util.keystr(p)))
    total = count(lambda p: True)
    emb = count(lambda p: "'embed'" in p)
    head = count(lambda p: "'lm_head'" in p)
    assert emb == cfg.vocab_size * cfg.d_model
    if nominal is None:
        assert total < 1e6
        return
    n = {"non_embedding": total - emb - head, "with_input_embedding": total - head, "total": total}[kind]
    assert abs(n - nominal) / nominal < 0.2, (name, n, nominal)
    if name == "openllama_3b":
        assert cfg.head_dim == 100 and abs(total - 3.43e9) / 3.43e9 < 0.01
    if name.startswith("paper"):
        assert cfg.mem_positional == "none" and cfg.qk_norm
