"""Windowed memory inference (fot.inference.windowed) against independent formulations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fot import memory as fm
from fot.inference import MemoryInference, WindowedConfig
from fot.model import Decoder, ModelConfig
from fot.parallel import make_mesh

W = 8
V = 64


@pytest.fixture(scope="module")
def multi():
    """3 layers, memory layers 1 and 2 (the second one's keys depend on the first one's memory)."""
    cfg = ModelConfig(vocab_size=V, d_model=32, num_layers=3, num_heads=2, mlp_dim=64, mem_layers=(1, 2),
                      init_std=0.3)
    model = Decoder(cfg)
    params = model.init(jax.random.PRNGKey(1), jnp.zeros((1, W), jnp.int32))["params"]
    return model, params


def _tokens(rng, b, t):
    return rng.integers(0, V, (b, t)).astype(np.int32)


def _f32(**kw):
    return WindowedConfig(window=W, mem_dtype="float32", **kw)


_RUNNERS = {}


def _runner(model, params, mesh=None, **kw):
    """One MemoryInference per (model, config, mesh) so compiled steps are shared between tests."""
    key = (id(model), tuple(sorted(kw.items())), mesh is not None)
    if key not in _RUNNERS:
        _RUNNERS[key] = MemoryInference(model, params, _f32(**kw), mesh=mesh)
    return _RUNNERS[key]


_APPLY = {}


def _apply(model, params, tokens, memory):
    """Jitted Decoder call with memory (compiled once per shape)."""
    if id(model) not in _APPLY:
        _APPLY[id(model)] = jax.jit(lambda p, t, m: model.apply({"params": p}, t, memory=m, return_kv=True))
    return _APPLY[id(model)](params, tokens, memory)


def _manual_loop(model, params, tokens, bounds, final=None, keep_last=None, slots=48):
    """Reference: call the Decoder per window with memory = concatenation of all earlier windows'
    mem_kv (numpy; optionally only the last ``keep_last`` tokens), placed in a ``slots``-long buffer
    whose unused tail is masked (so one compilation serves every window)."""
    mem = {}
    outs = []
    b = tokens.shape[0]
    h, dh = model.config.num_heads, model.config.head_dim
    for s, e in bounds:
        memory = {}
        for i in model.config.mem_layers:
            k, v = mem.get(i, (np.zeros((b, 0, h, dh), np.float32),) * 2)
            if keep_last is not None:
                k, v = k[:, -keep_last:], v[:, -keep_last:]
            n = k.shape[1]
            pad = [(0, 0), (0, slots - n), (0, 0), (0, 0)]
            mask = np.arange(slots)[None].repeat(b, 0) < n
            memory[i] = (jnp.asarray(np.pad(k, pad)), jnp.asarray(np.pad(v, pad)), jnp.asarray(mask))
        logits, aux = _apply(model, params, jnp.asarray(tokens[:, s:e]), memory)
        outs.append(np.asarray(logits))
        if final is not None and (s, e) == final:
            continue
        for i, (k, v) in aux["mem_kv"].items():
            k, v = np.asarray(k), np.asarray(v)
            mem[i] = (k, v) if i not in mem else (np.concatenate([mem[i][0], k], 1), np.concatenate([mem[i][1], v], 1))
    return np.concatenate(outs, axis=1), mem


def test_windowed_equals_manual_loop(multi, rng):
    model, params = multi
    tokens = _tokens(rng, 2, 35)
    runner = _runner(model, params)
    out = runner.forward(tokens, last_context_length=5)
    bounds = [(0, 8), (8, 16), (16, 24), (24, 30), (30, 35)]  # short prefix tail, final window of 5
    assert runner.plan(35, 5)[0] == bounds
    ref, mem = _manual_loop(model, params, tokens, bounds, final=(30, 35))
    np.testing.assert_allclose(np.asarray(out["logits"]), ref, rtol=2e-5, atol=2e-5)
    for i in (1, 2):  # memory holds exactly the 30 prefix tokens' memory-view keys
        s = out["stores"][i]
        got_k = np.asarray(s.keys)[np.asarray(s.mask)].reshape(2, 30, 2, 16)
        np.testing.assert_allclose(got_k, mem[i][0], rtol=2e-5, atol=2e-5)
    # the final window's local kv is returned for the generation cache
    assert out["final_kv"].kv[0].keys.shape == (2, 5, 2, 16)


def test_topk_at_least_memory_size_equals_dense(multi, rng):
    model, params = multi
    tokens = _tokens(rng, 2, 40)
    dense = np.asarray(_runner(model, params).forward(tokens)["logits"])
    full_k = np.asarray(_runner(model, params, top_k=40).forward(tokens)["logits"])
    small_k = np.asarray(_runner(model, params, top_k=2).forward(tokens)["logits"])
    np.testing.assert_allclose(full_k, dense, rtol=2e-5, atol=2e-5)
    assert np.abs(small_k[:, W:] - dense[:, W:]).max() > 1e-3  # top-2 really drops memory keys
    np.testing.assert_allclose(small_k[:, :W], dense[:, :W], rtol=2e-5, atol=2e-5)  # no memory yet


def test_dense_memory_equals_crossbatch_formulation(multi, rng):
    """Windows 0..n-1 of one document as n batch rows; row b attends to rows b-1..0 as extra contexts."""
    model, params = multi
    n = 5
    tokens = _tokens(rng, 1, n * W)
    rows = tokens.reshape(n, W)
    extra = np.full((n, n - 1), -1, np.int32)
    for b in range(n):
        extra[b, :b] = np.arange(b - 1, -1, -1)
    cb = model.apply({"params": params}, jnp.asarray(rows), extra_rows=jnp.asarray(extra))
    win = _runner(model, params).forward(tokens)["logits"]
    np.testing.assert_allclose(np.asarray(win).reshape(n, W, V), np.asarray(cb), rtol=2e-5, atol=2e-5)


def test_single_doc_reset_empties_memory(multi, rng):
    model, params = multi
    runner = _runner(model, params)
    tokens = _tokens(rng, 2, 3 * W)
    stores = runner.init_memory(2, 4 * W)
    for s in (0, W):
        _, stores, _ = runner.step(stores, tokens[:, s:s + W])
    assert np.asarray(stores[1].size()).tolist() == [2 * W, 2 * W]
    got, stores, _ = runner.step(stores, tokens[:, 2 * W:], reset_rows=np.array([True, False]))
    assert np.asarray(stores[1].size()).tolist() == [W, 3 * W]  # row 0: only the window just appended
    fresh = _manual_loop(model, params, tokens[:, 2 * W:], [(0, W)])[0][:1]
    cont = runner.forward(tokens, stores=runner.init_memory(2, 4 * W))["logits"][1:, 2 * W:]
    np.testing.assert_allclose(np.asarray(got[:1]), np.asarray(fresh), rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(got[1:]), np.asarray(cont), rtol=2e-5, atol=2e-5)


def test_overflow_evicts_oldest_and_is_reported(multi, rng):
    model, params = multi
    tokens = _tokens(rng, 2, 5 * W)
    out = _runner(model, params, capacity=2 * W).forward(tokens)
    assert out["overflow"] == {"capacity": 2 * W, "size": [2 * W, 2 * W], "evicted": [3 * W, 3 * W]}
    bounds = [(s, s + W) for s in range(0, 5 * W, W)]
    ref, _ = _manual_loop(model, params, tokens, bounds, keep_last=2 * W)
    np.testing.assert_allclose(np.asarray(out["logits"]), ref, rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="capacity"):
        MemoryInference(model, params, _f32(capacity=2 * W, on_overflow="error")).forward(tokens)


def test_sharded_memory_equals_single_device(multi, rng):
    model, params = multi
    mesh = make_mesh({"data": 2, "model": 4})
    tokens = _tokens(rng, 2, 4 * W)
    cfg = _f32(top_k=5, capacity=4 * W)
    plain = _runner(model, params, top_k=5, capacity=4 * W).forward(tokens)
    sharded_runner = MemoryInference(model, params, cfg, mesh=mesh)
    stores = sharded_runner.init_memory(2, 4 * W)
    assert stores[1].keys.sharding.spec[:2] == ("data", "model")  # memory length over `model`
    sharded = sharded_runner.forward(tokens, stores=stores)
    np.testing.assert_allclose(np.asarray(sharded["logits"]), np.asarray(plain["logits"]), rtol=2e-5, atol=2e-5)
    assert sharded["stores"][2].keys.sharding.spec[:2] == ("data", "model")
    np.testing.assert_allclose(np.asarray(sharded["stores"][2].keys), np.asarray(plain["stores"][2].keys),
                               rtol=2e-5, atol=2e-5)


def test_parallel_fill_equals_sequential(rng):
    cfg = ModelConfig(vocab_size=V, d_model=32, num_layers=2, num_heads=2, mlp_dim=64, mem_layers=(1,),
                      init_std=0.3)
    model = Decoder(cfg)
    params = model.init(jax.random.PRNGKey(2), jnp.zeros((1, W), jnp.int32))["params"]
    runner = MemoryInference(model, params, _f32(top_k=3))
    tokens = _tokens(rng, 2, 4 * W)
    mask = rng.random((2, 4 * W)) > 0.2
    par = runner.fill(runner.init_memory(2, 4 * W), tokens, mask, windows_per_call=3)
    seq = runner.fill(runner.init_memory(2, 4 * W), tokens, mask, parallel=False)
    for a, b in zip(jax.tree.leaves(par), jax.tree.leaves(seq)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)
    assert np.asarray(par[1].size()).tolist() == mask.sum(1).tolist()


def test_config_validation():
    with pytest.raises(ValueError, match="top_k"):
        WindowedConfig(window=8, top_k=0)
    with pytest.raises(ValueError, match="top_k"):
        WindowedConfig.longllama(max_position_embeddings=8, last_context_length=4, top_k=4)
    with pytest.raises(ValueError, match="capacity"):
        WindowedConfig.longllama(max_position_embeddings=8, last_context_length=4, capacity=16)
    with pytest.raises(ValueError, match="last_context_length"):
        WindowedConfig(window=8, last_context_length=9)
    ll = WindowedConfig.longllama(max_position_embeddings=8, last_context_length=4)
    assert ll.plan(21) == ([(0, 8), (8, 16), (16, 17), (17, 21)], 17)  # LongLLaMA §3.2 split
    assert ll.plan(3) == ([(0, 3)], 0)
    assert isinstance(fm.MemoryStore, type)
