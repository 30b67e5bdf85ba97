"""Smeared memory-layer keys (ModelConfig.mem_key_smear): the mix vs numpy, and where such models are refused.

The model-level checks (forward and gradients vs the dense reference, memory path = crossbatch, top-k = dense)
are the ``mem_key_smear`` cases of tests/test_model.py.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fot.model import Decoder, ModelConfig
from fot.model.attention import smear_keys


def _numpy_smear(k, s, seg):
    out = k.astype(np.float64).copy()
    b, t = k.shape[:2]
    for i in range(b):
        for j in range(1, t):
            if seg is None or seg[i, j] == seg[i, j - 1]:
                out[i, j] = s[None, :, None] * k[i, j] + (1 - s[None, :, None]) * k[i, j - 1]
    return out


@pytest.mark.parametrize("segments", [False, True])
def test_smear_keys_matches_numpy(rng, segments):
    b, t, hkv, dh = 3, 11, 2, 4
    k = rng.standard_normal((b, t, hkv, dh)).astype(np.float32)
    s = rng.uniform(0.05, 0.95, hkv).astype(np.float32)
    seg = None
    if segments:
        seg = np.sort(rng.integers(0, 3, (b, t)), axis=1).astype(np.int32)  # packed segments, 0 = padding
    got = jax.jit(smear_keys)(jnp.asarray(k), jnp.asarray(s), None if seg is None else jnp.asarray(seg))
    np.testing.assert_allclose(np.asarray(got), _numpy_smear(k, s, seg), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got)[:, 0], k[:, 0], rtol=1e-6, atol=1e-7)  # first token: own key


def _smeared_model(rng):
    cfg = ModelConfig(vocab_size=50, d_model=32, num_layers=2, num_heads=4, mlp_dim=48, mem_layers=(1,),
                      qk_norm=True, mem_key_smear=True)
    tokens = jnp.asarray(rng.integers(0, 50, (1, 8)), jnp.int32)
    model = Decoder(cfg)
    params = nn.meta.unbox(model.init(jax.random.key(int(rng.integers(1 << 30))), tokens))["params"]
    return cfg, model, params


def test_smear_param_is_per_kv_head_and_starts_at_an_even_mix(rng):
    cfg, _, params = _smeared_model(rng)
    smear = np.asarray(params["layers_1"]["attn"]["key_smear"])
    assert smear.shape == (cfg.num_kv_heads,) and np.all(smear == 0)  # sigmoid(0) = 0.5
    assert "key_smear" not in params["layers_0"]["attn"]  # local layers keep plain keys


def test_generation_and_export_refuse_smeared_models(rng):
    from fot.convert.to_hf import check_exportable
    from fot.inference.generate import Generator
    from fot.inference.windowed import WindowedConfig
    cfg, model, params = _smeared_model(rng)
    with pytest.raises(ValueError, match="mem_key_smear"):
        Generator(model, params, WindowedConfig(window=8, last_context_length=4))
    with pytest.raises(ValueError, match="mem_key_smear"):
        check_exportable(cfg)
    assert check_exportable(cfg.replace(mem_layers=())) == []  # no memory layer: the flag smears nothing
