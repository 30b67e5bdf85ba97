"""ModelConfig.qk_scale_extrapolation: the memory temperature's power-law sharpening beyond the keys in view
of training (fot.model.temperature.n_scaling), checked against numpy; identity inside the training regime
(the exported PyTorch model: tests/test_convert_fot_remote.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fot.model import Decoder, ModelConfig
from fot.model.temperature import n_scaling

BASE = dict(vocab_size=50, d_model=32, num_layers=2, num_heads=2, mlp_dim=64, mem_layers=(1,), qk_norm=True)


@pytest.mark.parametrize("n_ref", [None, 64])
def test_n_scaling_equals_numpy(rng, n_ref):
    beta, n_train = float(rng.uniform(0.1, 0.9)), int(rng.integers(50, 500))
    cfg = ModelConfig(**BASE, qk_scale_n_ref=n_ref, qk_scale_extrapolation=beta, qk_scale_n_train=n_train)
    n = rng.integers(1, 4 * n_train, size=(3, 7)).astype(np.float32)
    want = np.maximum(n / n_train, 1.0) ** beta * (np.log(n) / np.log(n_ref) if n_ref else 1.0)
    np.testing.assert_allclose(np.asarray(n_scaling(cfg, jnp.asarray(n))), want, rtol=1e-6)


def test_identity_within_training_view_and_sharper_beyond(rng):
    """With n_train >= every query's keys in view the logits equal beta = 0's (training is unchanged);
    with a small n_train they differ."""
    cfg0 = ModelConfig(**BASE)
    b, t = 3, 8
    tokens = jnp.asarray(rng.integers(0, BASE["vocab_size"], (b, t)), jnp.int32)
    rows = jnp.asarray([[-1, -1], [0, -1], [1, 0]], jnp.int32)  # at most 2 * t + t keys in view
    params = Decoder(cfg0).init(jax.random.key(int(rng.integers(1 << 30))), tokens, extra_rows=rows)["params"]
    run = lambda cfg: np.asarray(Decoder(cfg).apply({"params": params}, tokens, extra_rows=rows))
    out0 = run(cfg0)
    np.testing.assert_array_equal(run(cfg0.replace(qk_scale_extrapolation=0.5, qk_scale_n_train=3 * t)), out0)
    assert np.abs(run(cfg0.replace(qk_scale_extrapolation=0.5, qk_scale_n_train=t)) - out0).max() > 1e-4

