"""Generation with memory (fot.inference.generate) reproduces the full windowed forward pass."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fot.inference import MemoryInference, WindowedConfig
from fot.inference.generate import Generator, sample

W, V = 8, 64


@pytest.fixture(scope="module")
def setup():
    from fot.model import Decoder, ModelConfig
    cfg = ModelConfig(vocab_size=V, d_model=32, num_layers=3, num_heads=2, mlp_dim=64, mem_layers=(1, 2),
                      init_std=0.3)
    model = Decoder(cfg)
    params = jax.jit(model.init)(jax.random.PRNGKey(3), jnp.zeros((1, W), jnp.int32))["params"]
    return model, params


@pytest.mark.parametrize("lcl,new", [(4, 4), (8, 6)])  # (8, 6): the local cache is flushed into memory
def test_greedy_generation_matches_full_forward_argmax(setup, rng, lcl, new):
    model, params = setup
    cfg = WindowedConfig(window=W, last_context_length=lcl, mem_dtype="float32", top_k=6)
    prompt = rng.integers(0, V, (2, 37)).astype(np.int32)
    out = Generator(model, params, cfg).generate(prompt, new)["tokens"]
    assert out.shape == (2, new)
    # The same computation as one windowed pass over prompt + generated tokens: the cache after the
    # prompt holds min(T, lcl) tokens; a full cache (W) is moved to memory as one more window.
    t = prompt.shape[1]
    prefix = t - min(t, lcl)
    bounds = [(s, min(s + W, prefix)) for s in range(0, prefix, W)]
    start, end = prefix, t + new - 1
    while end - start > W:  # LongLLaMA flush: the full cache (W tokens) became one memory window
        bounds.append((start, start + W))
        start += W
    bounds.append((start, end))
    full = np.concatenate([prompt, out[:, :-1]], axis=1)
    runner = MemoryInference(model, params, cfg)
    logits = np.asarray(runner.forward(full, bounds=bounds)["logits"])
    np.testing.assert_array_equal(logits[:, prompt.shape[1] - 1:].argmax(-1), out)


def test_each_program_compiles_once_whatever_the_stores_alignment(setup, rng):
    """Stores passed in fresh (static pointer alignment = capacity) or left by steps and fills (alignment =
    window): generation compiles its decode and flush programs once, and the windowed runner its forward
    and append programs once (``fot.memory.for_appends`` at the API boundaries; no compile per history)."""
    from fot import memory as fm
    model, params = setup
    cfg = WindowedConfig(window=W, last_context_length=W, capacity=8 * W, mem_dtype="float32")
    gen = Generator(model, params, cfg)
    mcfg = model.config
    fresh = fm.stores_for_model(1, 8 * W, mcfg.mem_layers, mcfg.num_kv_heads, mcfg.head_dim, dtype="float32")
    assert {s.align for s in fresh.values()} == {8 * W}
    out = gen.generate(rng.integers(0, V, (1, 3)).astype(np.int32), 3 * W, stores=fresh)  # 2 flushes
    assert gen._decode._cache_size() == 1 and gen._flush._cache_size() == 1
    runner = gen.runner
    stores = runner.fill(out["stores"], rng.integers(0, V, (1, 2 * W)).astype(np.int32))
    for _ in range(2):
        stores = runner.step(stores, rng.integers(0, V, (1, W)).astype(np.int32))[1]
    assert runner._append_fn._cache_size() == 1 and {s.align for s in stores.values()} == {W}


def test_sampling(setup, rng):
    logits = jnp.asarray(rng.standard_normal((4, V)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(sample(logits)), np.asarray(logits).argmax(-1))
    key = jax.random.PRNGKey(0)
    ref = jax.random.categorical(key, logits / 0.7, axis=-1)
    np.testing.assert_array_equal(np.asarray(sample(logits, temperature=0.7, rng=key)), np.asarray(ref))
    with pytest.raises(ValueError, match="temperature"):
        sample(logits, temperature=-1.0)
    model, params = setup
    cfg = WindowedConfig(window=W, last_context_length=4, mem_dtype="float32")
    gen = Generator(model, params, cfg)
    prompt = rng.integers(0, V, (1, 20)).astype(np.int32)
    a = gen.generate(prompt, 3, temperature=1.0, rng=jax.random.PRNGKey(5))["tokens"]
    b = gen.generate(prompt, 3, temperature=1.0, rng=jax.random.PRNGKey(5))["tokens"]
    np.testing.assert_array_equal(a, b)
    assert a.min() >= 0 and a.max() < V
    with pytest.raises(ValueError, match="last_context_length"):
        Generator(model, params, WindowedConfig(window=W, last_context_length=0))
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen.generate(prompt, 0)


@pytest.mark.parametrize("kind", ["too_large", "negative"])
def test_token_ids_outside_the_vocabulary_are_refused_on_every_inference_path(setup, rng, kind):
    """Issue 15 item 2: an id >= vocab_size in a prompt gave NaN logits and a negative one another token's
    embedding row, silently. Generator prompts and MemoryInference inputs (forward, fill, a host window for
    step) now raise ValueError naming the first bad id and its position."""
    model, params = setup
    cfg = WindowedConfig(window=W, last_context_length=4, mem_dtype="float32")
    bad = int(V + rng.integers(0, 1000)) if kind == "too_large" else int(-1 - rng.integers(0, 1000))
    tokens = rng.integers(0, V, (2, 3 * W)).astype(np.int32)
    r, c = int(rng.integers(0, 2)), int(rng.integers(0, W))  # inside the first window (step gets it)
    tokens[r, c] = bad
    where = fr"token id {bad} at position \({r}, {c}\) is outside \[0, {V}\)"
    with pytest.raises(ValueError, match=r"^prompt: " + where):
        Generator(model, params, cfg).generate(tokens, 2)
    runner = MemoryInference(model, params, cfg)
    with pytest.raises(ValueError, match=r"^MemoryInference\.forward tokens: " + where):
        runner.forward(tokens)
    with pytest.raises(ValueError, match=r"^MemoryInference\.fill tokens: " + where):
        runner.fill(runner.init_memory(2, 3 * W), tokens)
    with pytest.raises(ValueError, match=r"^MemoryInference\.step tokens: " + where):
        runner.step(runner.init_memory(2, 3 * W), tokens[:, :W])
    ok = np.where(tokens < 0, 0, np.where(tokens >= V, V - 1, tokens))  # the same input, ids in range: runs
    assert np.isfinite(np.asarray(runner.forward(ok)["logits"])).all()
