"""Optimizer factory, schedules, weight-decay mask, clipping, gradient accumulation over whole packs."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fot.training.optim import decay_mask, inverse_sqrt_schedule, make_optimizer, make_schedule
from fot.training.step import split_microbatches


def test_inverse_sqrt_schedule_matches_closed_form():
    peak, warm, floor = 2e-2, 10, 1e-2
    sched = inverse_sqrt_schedule(peak, warm, min_lr=floor)
    for s in [0, 1, 5, 9, 10, 11, 20, 40, 100, 1000]:
        want = peak * s / warm if s < warm else max(peak * np.sqrt(warm / s), floor)
        np.testing.assert_allclose(float(sched(s)), want, rtol=1e-6, atol=1e-9)


def test_make_schedule_kinds():
    const = make_schedule("constant", peak_lr=3e-3, warmup_steps=4)
    np.testing.assert_allclose([float(const(s)) for s in (0, 2, 4, 100)], [0, 1.5e-3, 3e-3, 3e-3], rtol=1e-6)
    cos = make_schedule("warmup_cosine", peak_lr=1.0, warmup_steps=10, decay_steps=110, end_lr=0.1)
    np.testing.assert_allclose(float(cos(10)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(cos(60)), 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 0.5)), rtol=1e-5)
    np.testing.assert_allclose(float(cos(110)), 0.1, rtol=1e-6)
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("linear")
    with pytest.raises(ValueError, match="decay_steps"):
        make_schedule("warmup_cosine", peak_lr=1.0, warmup_steps=10, decay_steps=5)


def test_warmup_stable_decay_equals_constant_until_decay_start_then_cosine():
    peak, warm, start, end_step, end = 3e-3, 100, 1000, 2000, 3e-5
    wsd = make_schedule("warmup_stable_decay", peak_lr=peak, warmup_steps=warm, decay_start=start,
                        decay_steps=end_step, end_lr=end)
    const = make_schedule("constant", peak_lr=peak, warmup_steps=warm)
    before = np.arange(0, start, 7)
    # bit-identical to the constant schedule before the decay (a constant run resumes into the decay)
    np.testing.assert_array_equal(np.array([float(wsd(s)) for s in before]), np.array([float(const(s)) for s in before]))
    for s in (start, 1250, 1500, 1999, end_step, 2500):
        frac = min(s - start, end_step - start) / (end_step - start)
        want = end + (peak - end) * 0.5 * (1 + np.cos(np.pi * frac))
        np.testing.assert_allclose(float(wsd(s)), want, rtol=1e-5)
    for bad in (dict(decay_start=None, decay_steps=2000), dict(decay_start=2000, decay_steps=2000),
                dict(decay_start=50, decay_steps=2000)):
        with pytest.raises(ValueError, match="decay_start"):
            make_schedule("warmup_stable_decay", peak_lr=peak, warmup_steps=warm, end_lr=end, **bad)
    with pytest.raises(ValueError, match="end_lr"):
        make_schedule("warmup_stable_decay", peak_lr=peak, warmup_steps=warm, decay_start=start,
                      decay_steps=end_step, end_lr=2 * peak)


def _params(rng):
    return {"embed": {"embedding": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)},
            "layers_0": {"attn_norm": {"scale": jnp.asarray(rng.normal(size=(4,)), jnp.float32)},
                         "attn": {"q": {"kernel": jnp.asarray(rng.normal(size=(4, 4)), jnp.float32)}}}}


def test_decay_mask_excludes_norms_and_embeddings(rng):
    p = _params(rng)
    mask = decay_mask(p)
    assert mask["embed"]["embedding"] is False
    assert mask["layers_0"]["attn_norm"]["scale"] is False
    assert mask["layers_0"]["attn"]["q"]["kernel"] is True
    # With a zero gradient only weight decay moves params: masked leaves must not move.
    opt = make_optimizer("adamw", 0.1, weight_decay=0.5, decay_norms_and_embeddings=False, clip_norm=None)
    zeros = jax.tree.map(jnp.zeros_like, p)
    upd, _ = opt.update(zeros, opt.init(p), p)
    np.testing.assert_allclose(upd["embed"]["embedding"], 0.0)
    np.testing.assert_allclose(upd["layers_0"]["attn_norm"]["scale"], 0.0)
    np.testing.assert_allclose(upd["layers_0"]["attn"]["q"]["kernel"], -0.1 * 0.5 * p["layers_0"]["attn"]["q"]["kernel"],
                               rtol=1e-6)


def test_clipping_equals_adamw_on_normalised_gradient(rng):
    p = _params(rng)
    g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 50.0, jnp.float32), p)
    norm = optax.global_norm(g)
    assert float(norm) > 1.0
    ours = make_optimizer("adamw", 1e-2, b2=0.95, clip_norm=1.0)
    ref = optax.adamw(1e-2, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0)
    u1, _ = ours.update(g, ours.init(p), p)
    u2, _ = ref.update(jax.tree.map(lambda x: x / norm, g), ref.init(p), p)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8), u1, u2)


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_lr_multipliers_scale_only_the_named_params(rng, name):
    p = _params(rng)
    p["layers_0"]["attn"]["qk_log_scale"] = jnp.asarray(rng.normal(size=(4,)), jnp.float32)
    g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), p)
    base = make_optimizer(name, 1e-2, clip_norm=None)
    fast = make_optimizer(name, 1e-2, clip_norm=None, lr_multipliers={"qk_log_scale": 7.0})
    s_base, s_fast = base.init(p), fast.init(p)
    for _ in range(3):  # the optimizer state (moments) is the same; only the named param's step is x7
        u_base, s_base = base.update(g, s_base, p)
        u_fast, s_fast = fast.update(g, s_fast, p)
        want = dict(u_base, layers_0=dict(u_base["layers_0"], attn=dict(
            u_base["layers_0"]["attn"], qk_log_scale=7.0 * u_base["layers_0"]["attn"]["qk_log_scale"])))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9), u_fast, want)
    with pytest.raises(ValueError, match="lr_multipliers"):
        make_optimizer(name, 1e-2, lr_multipliers={"qk_log_scale": 0.0})


def test_adafactor_minimises_quadratic(rng):
    target = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
    p = {"w": jnp.zeros((16, 8), jnp.float32) + 0.1}
    opt = make_optimizer("adafactor", inverse_sqrt_schedule(5e-2, 5), b1=0.9, adafactor_param_scale=False)
    state = opt.init(p)
    loss = lambda q: jnp.mean((q["w"] - target) ** 2)
    first = float(loss(p))
    for _ in range(200):
        g = jax.grad(loss)(p)
        u, state = opt.update(g, state, p)
        p = optax.apply_updates(p, u)
    assert float(loss(p)) < 0.1 * first
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer("lamb")


@pytest.mark.parametrize("m,pack", [(2, 2), (4, 1), (2, 4)])
def test_split_microbatches_keeps_packs_whole(m, pack):
    b = 16
    rows = np.arange(b)
    out = split_microbatches(rows, m, pack)
    assert out.shape == (m, b // m)
    assert sorted(out.reshape(-1).tolist()) == rows.tolist()
    for micro in out:
        packs = micro.reshape(-1, pack)
        # every pack of a micro-batch is a whole, in-order pack of the batch
        assert all((p[0] % pack == 0) and np.array_equal(p, np.arange(p[0], p[0] + pack)) for p in packs)
