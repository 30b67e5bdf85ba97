"""fot.model Decoder vs an independent dense jax.numpy reference written here (forward and gradients)."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fot.model import Decoder, ModelConfig

B, T = 4, 8


def make_cfg(**kw):
    base = dict(vocab_size=61, d_model=32, num_layers=2, num_heads=4, head_dim=8, mlp_dim=48,
                mem_layers=(1,), rope_theta=500.0, norm_eps=1e-5)
    base.update(kw)
    return ModelConfig(**base)


def init(cfg, rng, b=B, t=T):
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t)), jnp.int32)
    variables = Decoder(cfg).init(jax.random.key(int(rng.integers(1 << 30))), tokens)
    params = nn.meta.unbox(variables)["params"]
    # Make non-trivial norm scales / per-head params so they are exercised.
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x * (1 + 0.3 * jnp.asarray(rng.standard_normal(x.shape), x.dtype))
        if any(getattr(p, "key", "") in ("scale", "qk_scale", "qk_log_scale") for p in path) else
        x + jnp.asarray(rng.standard_normal(x.shape), x.dtype) if getattr(path[-1], "key", "") == "key_smear"
        else x, params)
    return params, tokens


def jit_apply(cfg, **static):
    """Jitted ``Decoder(cfg).apply`` taking params and tokens; ``static`` are non-array keywords."""
    model = Decoder(cfg)
    return jax.jit(lambda p, tokens, **kw: model.apply({"params": p}, tokens, **kw, **static))


# ---------------------------------------------------------------- independent reference (jax.numpy)
def _rope(x, pos, theta):
    dh = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, dh, 2) / dh)
    ang = pos[..., None].astype(np.float32) * inv  # [B,T,Dh/2]
    cos, sin = jnp.cos(ang)[:, :, None], jnp.sin(ang)[:, :, None]
    x1, x2 = x[..., : dh // 2], x[..., dh // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def _rms(x, w, eps):
    return x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * w


def ref_forward(p, cfg, tokens, extra_rows=None, key_mask=None, positions=None):
    """Dense reference: per row, memory layers softmax jointly over causal local keys and all keys of the
    rows extra_rows[b] (in memory-view encoding); returns (logits, {layer: mem_mass [B,T,H]})."""
    b, t = tokens.shape
    h, dh = cfg.num_heads, cfg.head_dim
    pos = np.broadcast_to(np.arange(t), (b, t)) if positions is None else np.asarray(positions)
    x = p["embed"]["embedding"][tokens]
    masses = {}
    for i in range(cfg.num_layers):
        lp = p[f"layers_{i}"]
        a = lp["attn"]
        y = _rms(x, lp["attn_norm"]["scale"], cfg.norm_eps)
        q, k, v = [(y @ a[n]["kernel"]).reshape(b, t, h, dh) for n in "qkv"]
        mem = i in cfg.mem_layers
        if mem and cfg.mem_key_smear:  # k'_t = s k_t + (1 - s) k_{t-1}; position 0 keeps its key
            sm = jax.nn.sigmoid(a["key_smear"])[:, None]
            k = sm * k + (1 - sm) * jnp.concatenate([k[:, :1], k[:, :-1]], 1)
        scale = dh ** -0.5
        if mem and cfg.qk_norm:
            tau = a["qk_scale"] if "qk_scale" in a else jnp.exp(a["qk_log_scale"])  # per-head temperature
            tau = jnp.broadcast_to(tau[:, None], (b, t, h, 1))
            if cfg.qk_scale_n_ref or cfg.qk_scale_extrapolation:  # n = causal local keys + valid extra keys
                n = pos + 1.0
                if extra_rows is not None:
                    kmask = np.ones((b, t), bool) if key_mask is None else np.asarray(key_mask)
                    rows = np.asarray(extra_rows)
                    n = n + np.array([sum(kmask[r].sum() for r in row if r >= 0) for row in rows])[:, None]
            if cfg.qk_scale_n_ref:  # x ln(n) / ln(n_ref)
                tau = tau * (np.log(n) / np.log(cfg.qk_scale_n_ref))[:, :, None, None]
            if cfg.qk_scale_extrapolation:  # x max(1, n / n_train) ** beta
                f = np.maximum(n / cfg.qk_scale_n_train, 1.0) ** cfg.qk_scale_extrapolation
                assert (f > 1).any() and (f == 1).any()  # both regimes in the test's rows
                tau = tau * f[:, :, None, None]
            q = q / jnp.linalg.norm(q, axis=-1, keepdims=True) * tau
            k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
            scale = 1.0
        rope = not (mem and cfg.mem_positional == "none")
        qr, kr = (_rope(q, pos, cfg.rope_theta), _rope(k, pos, cfg.rope_theta)) if rope else (q, k)
        causal = np.tril(np.ones((t, t), bool))
        s = jnp.einsum("bthd,bshd->bhts", qr, kr) * scale
        s = jnp.where(causal, s, -jnp.inf)
        vv = v
        if mem and extra_rows is not None:  # dense: gather every used source row's keys, mask, concatenate
            rows = np.asarray(extra_rows)
            n = rows.shape[1]
            rc = np.clip(rows, 0, b - 1)
            km = np.ones((b, t), bool) if key_mask is None else np.asarray(key_mask)
            km = ((rows >= 0)[:, :, None] & km[rc]).reshape(b, 1, 1, n * t)
            ke, ve = k[rc].reshape(b, n * t, h, dh), v[rc].reshape(b, n * t, h, dh)
            se = jnp.where(km, jnp.einsum("bthd,bshd->bhts", qr, ke) * scale, -jnp.inf)
            s, vv = jnp.concatenate([s, se], -1), jnp.concatenate([v, ve], 1)
        if mem and cfg.mem_gate:
            g = jax.nn.sigmoid(a["gate_bias"])[None, :, None, None]
            o = jnp.einsum("bhts,bshd->bhtd", jax.nn.softmax(s[..., :t], -1), vv[:, :t])
            if extra_rows is not None:  # rows without any memory key: local attention only
                has = km.any(-1, keepdims=True)
                mo = jnp.einsum("bhts,bshd->bhtd", jax.nn.softmax(jnp.where(has, s[..., t:], 0.0), -1), vv[:, t:])
                o = jnp.where(has, g * mo + (1 - g) * o, o)
        else:
            pr = jax.nn.softmax(s, -1)
            o = jnp.einsum("bhts,bshd->bhtd", pr, vv)
            masses[i] = pr[..., t:].sum(-1).transpose(0, 2, 1)
        o = o.transpose(0, 2, 1, 3).reshape(b, t, h * dh)
        x = x + o @ a["o"]["kernel"]
        m = lp["mlp"]
        y = _rms(x, lp["mlp_norm"]["scale"], cfg.norm_eps)
        x = x + (jax.nn.silu(y @ m["gate"]["kernel"]) * (y @ m["up"]["kernel"])) @ m["down"]["kernel"]
    x = _rms(x, p["final_norm"]["scale"], cfg.norm_eps)
    head = p["embed"]["embedding"].T if cfg.tie_embeddings else p["lm_head"]["kernel"]
    return x @ head, masses


def assert_trees_close(got, want, rtol=1e-4):
    """Leafwise allclose with atol relative to each leaf's largest magnitude (float32 summation noise)."""
    for (path, a), b_ in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        b_ = np.asarray(b_)
        np.testing.assert_allclose(np.asarray(a), b_, rtol=rtol, atol=rtol * np.abs(b_).max(),
                                   err_msg=jax.tree_util.keystr(path))


ROWS = np.array([[-1, -1], [0, -1], [1, 0], [2, -1]], np.int32)


def test_params_tree(rng):
    cfg = make_cfg()
    params, tokens = init(cfg, rng)
    assert set(params) == {"embed", "layers_0", "layers_1", "final_norm", "lm_head"}
    lay = params["layers_1"]
    assert set(lay) == {"attn_norm", "attn", "mlp_norm", "mlp"}
    assert set(lay["attn"]) == {"q", "k", "v", "o"} and set(lay["mlp"]) == {"gate", "up", "down"}
    assert lay["attn"]["q"]["kernel"].shape == (32, 32) and lay["mlp"]["down"]["kernel"].shape == (48, 32)
    assert params["lm_head"]["kernel"].shape == (32, 61)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    std = float(np.std(np.asarray(params["embed"]["embedding"])))
    assert 0.015 < std < 0.025
    specs = nn.get_partition_spec(Decoder(cfg).init(jax.random.key(0), tokens))["params"]
    assert tuple(specs["layers_0"]["attn"]["q"]["kernel"]) == ("embed", "heads")
    assert tuple(specs["layers_0"]["mlp"]["down"]["kernel"]) == ("mlp", "embed")
    assert tuple(specs["embed"]["embedding"]) == ("vocab", "embed")
    tied, _ = init(make_cfg(tie_embeddings=True), rng)
    assert "lm_head" not in tied


@pytest.mark.parametrize("param", ["linear", "log"])
def test_scale_memory_temperatures(rng, param):
    from fot.model import memory_temperatures, scale_memory_temperatures

    cfg = make_cfg(qk_norm=True, mem_positional="none", qk_scale_param=param, mem_layers=(0, 1))
    params, tokens = init(cfg, rng)
    before = {i: np.asarray(t) for i, t in memory_temperatures(cfg, params).items()}
    scaled = scale_memory_temperatures(cfg, params, 2.5)
    for i in (0, 1):
        np.testing.assert_allclose(np.asarray(memory_temperatures(cfg, scaled)[i]), 2.5 * before[i], rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(memory_temperatures(cfg, params)[i]), before[i])  # input intact
    # Logits of the scaled params = the reference forward with every tau x 2.5.
    out = jit_apply(cfg)(scaled, tokens, extra_rows=jnp.asarray(ROWS))
    ref, _ = ref_forward(scaled, cfg, tokens, ROWS)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-5, atol=2e-5)
    assert memory_temperatures(make_cfg(), init(make_cfg(), rng)[0]) == {}


@pytest.mark.parametrize("param,init_value", [("linear", None), ("linear", 10.0), ("log", None), ("log", 10.0)])
def test_qk_temperature_param_and_init(param, init_value):
    """The QK-norm temperature is stored as tau (``qk_scale``) or log tau (``qk_log_scale``) and starts at
    ``qk_scale_init`` (default sqrt(head_dim)); only memory layers have it."""
    cfg = make_cfg(qk_norm=True, mem_positional="none", qk_scale_param=param, qk_scale_init=init_value)
    tokens = jnp.zeros((1, 4), jnp.int32)
    attn = nn.meta.unbox(Decoder(cfg).init(jax.random.key(0), tokens))["params"]["layers_1"]["attn"]
    name = "qk_scale" if param == "linear" else "qk_log_scale"
    assert set(attn) == {"q", "k", "v", "o", name}
    tau = np.asarray(attn[name]) if param == "linear" else np.exp(np.asarray(attn[name]))
    np.testing.assert_allclose(tau, np.full(cfg.num_heads, init_value or np.sqrt(cfg.head_dim)), rtol=1e-6)
    assert "qk_scale" not in nn.meta.unbox(Decoder(cfg).init(jax.random.key(0), tokens))["params"]["layers_0"]["attn"]


@pytest.mark.parametrize("kw", [dict(), dict(mem_positional="none", qk_norm=True, mem_layers=(0, 1)),
                                dict(mem_positional="none", qk_norm=True, qk_scale_param="log"),
                                dict(qk_norm=True, qk_scale_param="log", qk_scale_n_ref=20, mem_layers=(0, 1)),
                                dict(qk_norm=True, qk_scale_n_ref=20, qk_scale_extrapolation=0.7,
                                     qk_scale_n_train=T + 2),
                                dict(tie_embeddings=True, mem_layers=(0, 1)),
                                dict(crossbatch_block_rows=2, mem_layers=(0, 1)),
                                dict(qk_norm=True, qk_scale_param="log", mem_key_smear=True, mem_layers=(0, 1))])
def test_forward_and_grad_match_reference(rng, kw):
    cfg = make_cfg(**kw)
    params, tokens = init(cfg, rng)
    key_mask = np.ones((B, T), bool)
    key_mask[0, -3:] = False  # padded keys of source row 0
    apply = jit_apply(cfg)
    out = apply(params, tokens, extra_rows=jnp.asarray(ROWS), extra_key_mask=key_mask)
    ref, _ = jax.jit(lambda p: ref_forward(p, cfg, tokens, ROWS, key_mask))(params)
    assert out.dtype == jnp.float32 and out.shape == (B, T, cfg.vocab_size)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-5, atol=2e-5)
    w = jnp.asarray(rng.standard_normal(out.shape), jnp.float32)
    g = jax.jit(jax.grad(lambda p: jnp.sum(apply(p, tokens, extra_rows=jnp.asarray(ROWS),
                                                 extra_key_mask=key_mask) * w)))(params)
    g_ref = jax.jit(jax.grad(lambda p: jnp.sum(ref_forward(p, cfg, tokens, ROWS, key_mask)[0] * w)))(params)
    assert_trees_close(g, g_ref)


def test_mem_mass_and_gate_match_reference(rng):
    cfg = make_cfg()
    params, tokens = init(cfg, rng)
    logits, aux = jit_apply(cfg, collect_mem_mass=True)(params, tokens, extra_rows=jnp.asarray(ROWS))
    _, mass = jax.jit(lambda p: ref_forward(p, cfg, tokens, ROWS))(params)
    assert set(aux["mem_mass"]) == {1} and aux["mem_mass"][1].shape == (B, T, cfg.num_heads)
    np.testing.assert_allclose(np.asarray(aux["mem_mass"][1]), np.asarray(mass[1]), atol=1e-5)
    assert np.all(np.asarray(aux["mem_mass"][1])[0] == 0) and np.all(np.asarray(aux["mem_mass"][1])[1:] > 0)
    gcfg = make_cfg(mem_gate=True)
    gparams, _ = init(gcfg, rng)
    gparams["layers_1"]["attn"]["gate_bias"] = jnp.asarray(rng.standard_normal(4), jnp.float32)
    out = jit_apply(gcfg)(gparams, tokens, extra_rows=jnp.asarray(ROWS))
    ref, _ = jax.jit(lambda p: ref_forward(p, gcfg, tokens, ROWS))(gparams)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("segments", [False, True])
def test_no_memory_layers_equals_memory_layers_without_extras(rng, segments):
    cfg_mem, cfg_plain = make_cfg(mem_layers=(0, 1)), make_cfg(mem_layers=())
    params, tokens = init(cfg_mem, rng)
    seg = None
    if segments:
        seg = np.ones((B, T), np.int32)
        seg[:, 5:] = 2
        seg[1, 6:] = 0
    plain = jit_apply(cfg_plain)(params, tokens, segment_ids=seg)
    mem = jit_apply(cfg_mem)
    for rows in (None, -np.ones((B, 3), np.int32)):
        out = mem(params, tokens, segment_ids=seg, extra_rows=rows)
        np.testing.assert_allclose(np.asarray(out), np.asarray(plain), rtol=1e-5, atol=1e-6)
    linked = mem(params, tokens, segment_ids=seg, extra_rows=ROWS)
    assert not np.allclose(np.asarray(linked)[1:], np.asarray(plain)[1:], atol=1e-4)
    np.testing.assert_allclose(np.asarray(linked)[0], np.asarray(plain)[0], rtol=1e-5, atol=1e-6)


def test_gradient_reaches_previous_row_only_when_linked(rng):
    cfg = make_cfg(vocab_size=64, mem_layers=(1,))
    params, _ = init(cfg, rng)
    tokens = jnp.asarray(np.stack([rng.integers(16 * r, 16 * (r + 1), T) for r in range(B)]), jnp.int32)
    apply = jit_apply(cfg)
    w = jnp.asarray(rng.standard_normal((T, cfg.vocab_size)), jnp.float32)
    grad = jax.jit(jax.grad(lambda p, rows: jnp.sum(apply(p, tokens, extra_rows=rows)[2] * w)))  # row 2 only

    def emb_grad(rows):
        return np.abs(np.asarray(grad(params, rows)["embed"]["embedding"]))

    g = emb_grad(jnp.asarray(ROWS))  # row 2 uses rows 1 and 0
    assert g[0:16].max() > 1e-6 and g[16:32].max() > 1e-6 and g[32:48].max() > 0
    assert g[48:64].max() == 0
    g = emb_grad(jnp.asarray([[-1], [-1], [1], [-1]], jnp.int32))
    assert g[16:32].max() > 1e-6 and g[0:16].max() == 0
    g = emb_grad(jnp.asarray(-np.ones((B, 1), np.int32)))
    assert g[0:32].max() == 0 and g[32:48].max() > 0


@pytest.mark.parametrize("kw, segments", [(dict(), True), (dict(mem_positional="none", qk_norm=True), False),
                                          (dict(remat=True), False)])
def test_cache_path_equals_full_forward(rng, kw, segments):
    cfg = make_cfg(**kw)
    t, c = 11, 7
    params, tokens = init(cfg, rng, t=t)
    seg = None
    if segments:  # left padding in row 1, a second document from token 5 on in row 2
        seg = np.ones((B, t), np.int32)
        seg[1, :2] = 0
        seg[2, 5:] = 2
    full = jit_apply(cfg)(params, tokens, segment_ids=seg)
    step = jit_apply(cfg, return_kv=True)
    sl = (lambda a, b_: None) if seg is None else (lambda a, b_: seg[:, a:b_])
    l1, aux = step(params, tokens[:, :c], segment_ids=sl(0, c))
    assert set(aux["kv"]) == {0, 1} and set(aux["mem_kv"]) == {1}
    assert aux["kv"][0][0].shape == (B, c, cfg.num_heads, cfg.head_dim)
    # default positions continue at C; segment_ids [B, C+T] cover the cached keys too
    l2, aux2 = step(params, tokens[:, c:c + 2], cache=aux["kv"], segment_ids=sl(0, c + 2))
    cache = {i: tuple(jnp.concatenate([a, b_], 1) for a, b_ in zip(aux["kv"][i], aux2["kv"][i])) for i in aux["kv"]}
    l3, _ = step(params, tokens[:, c + 2:], cache=cache, positions=jnp.broadcast_to(jnp.arange(c + 2, t), (B, 2)),
                 segment_ids=sl(0, t))
    np.testing.assert_allclose(np.asarray(jnp.concatenate([l1, l2, l3], 1)), np.asarray(full),
                               rtol=1e-5, atol=1e-5)
    if segments:  # [B, T] segment ids with a cache: cached keys take the id of the row's first new token
        l3b, _ = step(params, tokens[:, c + 2:], cache=cache, segment_ids=seg[:, c + 2:])
        # exact for the rows whose cached keys all belong to that document (rows 0 and 3) ...
        np.testing.assert_allclose(np.asarray(l3b)[[0, 3]], np.asarray(full)[[0, 3], c + 2:], rtol=1e-5, atol=1e-5)
        # ... and visibly different where the cache holds padding (row 1) or another document (row 2)
        assert np.abs(np.asarray(l3b)[[1, 2]] - np.asarray(full)[[1, 2], c + 2:]).max() > 1e-3


@pytest.mark.parametrize("kw", [dict(mem_layers=(0, 1)), dict(mem_positional="none", qk_norm=True),
                                dict(mem_positional="none", qk_norm=True, qk_scale_n_ref=16), dict(mem_gate=True),
                                dict(mem_gate=True, qk_norm=True, qk_scale_n_ref=16),
                                dict(qk_norm=True, qk_scale_extrapolation=0.5, qk_scale_n_train=T + 2),
                                dict(qk_norm=True, mem_key_smear=True, mem_layers=(0, 1))])
def test_memory_path_equals_crossbatch(rng, kw):
    """Windows w0, w1, w2 streamed with memory = crossbatch rows [w0, w1, w2] with row r using rows < r."""
    cfg = make_cfg(**kw)
    params, tokens = init(cfg, rng, b=3)
    rows = jnp.asarray([[-1, -1], [0, -1], [1, 0]], jnp.int32)
    stream = jit_apply(cfg, return_kv=True, collect_mem_mass=True)
    cross, caux = stream(params, tokens, extra_rows=rows)
    mem = None
    for r in range(3):
        w = tokens[r:r + 1]
        out, aux = stream(params, w, memory=mem)
        np.testing.assert_allclose(np.asarray(out[0]), np.asarray(cross[r]), rtol=1e-5, atol=1e-5)
        for i in cfg.mem_layers:
            np.testing.assert_allclose(np.asarray(aux["mem_kv"][i][0][0]), np.asarray(caux["mem_kv"][i][0][r]),
                                       rtol=1e-5, atol=1e-6)
            if mem is not None:
                np.testing.assert_allclose(np.asarray(aux["mem_mass"][i][0]), np.asarray(caux["mem_mass"][i][r]),
                                           atol=1e-5)
        if r == 2 and not cfg.mem_gate:  # exact top-k with K >= M valid slots equals dense memory attention
            topk = jit_apply(cfg, top_k=2 * T)(params, w, memory=mem)
            np.testing.assert_allclose(np.asarray(topk), np.asarray(out), rtol=1e-5, atol=1e-5)
        new = {i: aux["mem_kv"][i] for i in cfg.mem_layers}
        if mem is None:
            mem = {i: (k, v, jnp.ones((1, T), bool)) for i, (k, v) in new.items()}
        else:
            mem = {i: (jnp.concatenate([mem[i][0], new[i][0]], 1), jnp.concatenate([mem[i][1], new[i][1]], 1),
                       jnp.ones((1, mem[i][2].shape[1] + T), bool)) for i in cfg.mem_layers}


def test_remat_and_bf16(rng):
    cfg = make_cfg()
    params, tokens = init(cfg, rng)
    f = lambda c: jax.jit(jax.grad(lambda p: jnp.sum(Decoder(c).apply({"params": p}, tokens, extra_rows=ROWS) ** 2)))
    g0 = f(cfg)(params)
    g1 = f(dataclasses.replace(cfg, remat=(1,)))(params)
    assert_trees_close(g1, g0, rtol=1e-5)
    bf = jit_apply(dataclasses.replace(cfg, dtype="bfloat16"))(params, tokens, extra_rows=ROWS)
    ref = jit_apply(cfg)(params, tokens, extra_rows=ROWS)
    assert bf.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(bf), np.asarray(ref), atol=0.05)


def test_bad_inputs(rng):
    with pytest.raises(ValueError, match=r"mem_layers.*num_layers=2"):
        make_cfg(mem_layers=(2,))
    with pytest.raises(ValueError, match="mem_positional"):
        make_cfg(mem_positional="rope")
    cfg = make_cfg()
    params, tokens = init(cfg, rng)
    app = lambda *a, **k: Decoder(cfg).apply({"params": params}, *a, **k)
    kv = {i: (jnp.zeros((B, 3, 4, 8)),) * 2 for i in range(2)}
    cases = [
        ((tokens[0],), {}, r"tokens.*\(8,\)"),
        ((tokens,), dict(positions=jnp.zeros((B, T + 1), jnp.int32)), r"positions.*\(4, 9\)"),
        ((tokens,), dict(segment_ids=jnp.ones((B, 2), jnp.int32)), r"segment_ids.*\(4, 2\)"),
        ((tokens,), dict(extra_rows=jnp.zeros((B + 1, 2), jnp.int32)), r"extra_rows.*\(5, 2\)"),
        ((tokens,), dict(extra_rows=jnp.zeros((B,), jnp.int32)), r"extra_rows.*\(4,\)"),
        ((tokens,), dict(extra_rows=np.full((B, 1), B, np.int32)), r"extra_rows.*\[-1, batch=4\)"),
        ((tokens,), dict(extra_key_mask=np.ones((B, 3), bool), extra_rows=ROWS), r"extra_key_mask.*\(4, 3\)"),
        ((tokens,), dict(memory={0: (jnp.zeros((B, 2, 4, 8)),) * 2 + (jnp.ones((B, 2), bool),)}),
         r"layer 0.*mem_layers"),
        ((tokens,), dict(memory={1: (jnp.zeros((B, 2, 4, 8)), jnp.zeros((B, 2, 4, 8)), jnp.ones((B, 3), bool))}),
         r"memory\[1\] shapes"),
        ((tokens,), dict(cache={0: kv[0]}), r"cache must map every layer"),
        ((tokens,), dict(cache={i: (jnp.zeros((B, 3, 4, 4)),) * 2 for i in range(2)}), r"cache\[0\]"),
        ((tokens,), dict(cache=kv, extra_rows=ROWS), "cache"),
    ]
    for args, kwargs, msg in cases:
        with pytest.raises(ValueError, match=msg):
            app(*args, **kwargs)


def test_config_resolution():
    cfg = ModelConfig(vocab_size=10, d_model=64, num_layers=4, num_heads=4, mlp_dim=8, mem_layers=[3, 1])
    assert cfg.head_dim == 16 and cfg.mem_layers == (1, 3) and cfg.is_memory_layer(3) and not cfg.is_memory_layer(2)
    assert cfg.replace(d_model=128).head_dim == 32
    assert cfg.replace(d_model=128, head_dim=8).head_dim == 8
    assert ModelConfig(10, 64, 4, 4, 8, head_dim=8).replace(num_heads=2).head_dim == 8
    assert ModelConfig(10, 64, 4, 4, 8, remat=[2]).remat_layer(2) and not cfg.remat_layer(2)
    for bad in (dict(head_dim=7), dict(d_model=30), dict(remat=[4]), dict(dtype="float33"),
                dict(remat_policy="nope"), dict(mem_layers=(1, 1)), dict(mem_layers=(-1,)),
                dict(crossbatch_block_rows=0), dict(crossbatch_block_rows=2.0), dict(qk_scale_param="exp"),
                dict(qk_scale_init=0.0), dict(qk_norm=True, qk_scale_n_ref=1), dict(qk_scale_n_ref=64),
                dict(qk_norm=True, qk_scale_extrapolation=0.5), dict(qk_scale_extrapolation=0.5, qk_scale_n_train=8),
                dict(qk_norm=True, qk_scale_extrapolation=-0.1, qk_scale_n_train=8),
                dict(qk_norm=True, qk_scale_n_train=0)):
        with pytest.raises(ValueError):
            ModelConfig(**{**dict(vocab_size=10, d_model=64, num_layers=4, num_heads=4, mlp_dim=8), **bad})
