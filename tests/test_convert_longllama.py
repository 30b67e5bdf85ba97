"""fot's LongLLaMA-mode MemoryInference vs a PyTorch LongLLaMA inference on the exported weights.

The torch side (fot.convert.torch_longllama) re-implements LongLLaMA's `_handle_long_input` window
loop and memory-layer attention on transformers' LlamaForCausalLM weights; fot's side is
`MemoryInference(..., WindowedConfig.longllama(...))`. Logits are compared for every token of a
multi-window input (marker `torch`)."""
import numpy as np
import pytest

import jax.numpy as jnp

from fot.convert import to_hf
from fot.inference import MemoryInference, WindowedConfig
from fot.model import Decoder

from test_convert import random_params, tiny_cfg

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.mark.parametrize("positional,length,kv", [("as_first", 27, 4), ("none", 29, 4), ("as_first", 27, 2)])
def test_memory_inference_matches_torch_longllama(tmp_path, rng, positional, length, kv):
    from fot.convert.torch_longllama import TorchLongLlama

    w, lcl = 8, 5
    cfg = tiny_cfg(mem_layers=(1, 2), mem_positional=positional, num_kv_heads=kv)
    params = random_params(cfg, rng)
    out = tmp_path / "hf"
    to_hf.export(params, cfg, str(out), max_position_embeddings=w, last_context_length=lcl, mem_dtype="float32")
    tokens = rng.integers(0, cfg.vocab_size, (2, length))
    # 27 tokens: prefix 22 = windows 8, 8, 6 (a short last prefix window) + final 5; 29: 8, 8, 8 + 5.
    ll = TorchLongLlama.from_pretrained(str(out))
    assert ll.window == w and ll.last_context_length == lcl and ll.mem_positionals == (positional == "as_first")
    want, memory = ll(tokens)
    assert sorted(memory) == [1, 2] and memory[1][0].shape == (2, kv, length - lcl, cfg.head_dim)

    runner = MemoryInference(Decoder(cfg), params, WindowedConfig.longllama(
        max_position_embeddings=w, last_context_length=lcl, mem_dtype="float32"))
    got = np.asarray(runner.forward(jnp.asarray(tokens, jnp.int32))["logits"])
    assert got.shape == (2, length, cfg.vocab_size)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=1e-4)

    # the comparison is sensitive to memory: changing only the first window changes later windows'
    # logits (no local attention crosses windows, so only memory carries it)
    other = tokens.copy()
    other[:, :w] = (other[:, :w] + 1) % cfg.vocab_size
    changed, _ = ll(other)
    assert np.abs(changed.numpy()[:, -lcl:] - want.numpy()[:, -lcl:]).max() > 1e-2


def test_bf16_memory_close(tmp_path, rng):
    """Default LongLLaMA memory dtype (bf16) on both sides: same rounding of stored keys/values."""
    from fot.convert.torch_longllama import TorchLongLlama

    cfg = tiny_cfg(mem_layers=(1,))
    params = random_params(cfg, rng)
    to_hf.export(params, cfg, str(tmp_path / "hf"), max_position_embeddings=8, last_context_length=4)
    tokens = rng.integers(0, cfg.vocab_size, (1, 20))
    want, memory = TorchLongLlama.from_pretrained(str(tmp_path / "hf"))(tokens)
    assert memory[1][0].dtype == torch.bfloat16
    runner = MemoryInference(Decoder(cfg), params, WindowedConfig.longllama(8, 4))
    got = np.asarray(runner.forward(tokens)["logits"])
    np.testing.assert_allclose(got, want.numpy(), atol=2e-3, rtol=2e-3)


def test_generation_matches_torch_longllama(tmp_path, rng):
    """Decode steps (teacher-forced) across two local-cache flushes, and greedy tokens (§3.4)."""
    from fot.convert.torch_longllama import TorchLongLlama
    from fot.inference.generate import Generator

    w, lcl = 8, 5
    cfg = tiny_cfg(mem_layers=(1, 2))
    params = random_params(cfg, rng)
    to_hf.export(params, cfg, str(tmp_path / "hf"), max_position_embeddings=w, last_context_length=lcl,
                 mem_dtype="float32")
    ll = TorchLongLlama.from_pretrained(str(tmp_path / "hf"))
    wcfg = WindowedConfig.longllama(w, lcl, mem_dtype="float32")
    prompt = rng.integers(0, cfg.vocab_size, (2, 21))  # prefix 16 (2 windows) + 5 cached
    forced = rng.integers(0, cfg.vocab_size, (2, 13))  # flushes before forced tokens 3 and 11
    gen = Generator(Decoder(cfg), params, wcfg)
    got, state = gen.prefill(prompt, max_new_tokens=len(forced[0]))
    want, _, tstate = ll.forward(prompt, return_state=True)
    np.testing.assert_allclose(np.asarray(got), want[:, -1].numpy(), atol=1e-4, rtol=1e-4)
    for j in range(forced.shape[1]):
        got, state = gen.decode(state, jnp.asarray(forced[:, j], jnp.int32))
        want = ll.decode(tstate, torch.as_tensor(forced[:, j]))
        np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-4, rtol=1e-4, err_msg=f"step {j}")
    assert tstate["memory"][1][0].shape[2] == 16 + 8 + 8  # two flushes of a full cache happened
    tokens = gen.generate(prompt, 12)["tokens"]
    np.testing.assert_array_equal(tokens, ll.generate(prompt, 12).numpy())
