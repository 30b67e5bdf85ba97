"""Memory prefill (MemoryInference.fill, fot.inference.prefill) against full forwards, and the inference
programs' memory traffic (no whole-store copies)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fot import memory as fm
from fot.inference import MemoryInference, WindowedConfig
from fot.model import Decoder, ModelConfig

W = 8
V = 64


def _model(mem_layers, num_layers=4, **kw):
    cfg = ModelConfig(vocab_size=V, d_model=32, num_layers=num_layers, num_heads=2, mlp_dim=64,
                      mem_layers=mem_layers, init_std=0.3, **kw)
    model = Decoder(cfg)
    return model, model.init(jax.random.PRNGKey(len(mem_layers)), jnp.zeros((1, W), jnp.int32))["params"]


def _leaves(stores):
    return {(i, f): np.asarray(getattr(s, f)) for i, s in stores.items()
            for f in ("keys", "values", "mask", "write_pos", "evicted", "appended")}


def _assert_same(a, b, rtol=1e-5, atol=2e-5):
    """Same store leaves (default tolerance: float32 rounding; a bf16 store: one bf16 ulp, 2**-8 relative,
    since float32 rounding differences can flip the rounding of a stored value)."""
    la, lb = _leaves(a), _leaves(b)
    assert la.keys() == lb.keys()
    for k in la:
        np.testing.assert_allclose(la[k].astype(np.float32), lb[k].astype(np.float32), rtol=rtol, atol=atol,
                                   err_msg=str(k))


@pytest.mark.parametrize("mem_layers,top_k,capacity", [((1,), 3, 6 * W), ((1,), None, 4 * W),
                                                       ((1, 2), 3, 6 * W), ((1, 2), None, 4 * W)])
def test_fill_equals_full_forward_memory(rng, mem_layers, top_k, capacity):
    """fill() (layers up to the last memory layer only) leaves exactly the memory of streaming every
    window through the whole model (forward), also with masked keys and FIFO eviction."""
    model, params = _model(mem_layers, qk_norm=True, mem_positional="none")
    b, n = 2, 6 * W
    tokens = rng.integers(0, V, (b, n)).astype(np.int32)
    km = rng.random((b, n)) > 0.25
    runner = MemoryInference(model, params, WindowedConfig(window=W, top_k=top_k, mem_dtype="float32"))
    full = runner.forward(tokens, key_mask=km, stores=runner.init_memory(b, capacity))["stores"]
    for per_call in (None, 2, 4):  # several calls, a partial last call
        filled = runner.fill(runner.init_memory(b, capacity), tokens, km, windows_per_call=per_call)
        _assert_same(filled, full)
    # Layers above the last memory layer and the LM head are never touched: the fill runs without them.
    top = max(mem_layers)
    cut = {k: v for k, v in params.items() if not (k == "lm_head" or (k.startswith("layers_")
                                                                      and int(k.split("_")[1]) > top))}
    assert len(cut) < len(params)
    lean = MemoryInference(model, cut, WindowedConfig(window=W, top_k=top_k, mem_dtype="float32"))
    _assert_same(lean.fill(lean.init_memory(b, capacity), tokens, km), full)


@pytest.mark.parametrize("mem_layers,top_k,kw,mem_dtype,cap", [
    ((1, 2), None, {}, "float32", 7 * W),
    ((1, 2), 3, {}, "float32", 8 * W),
    ((1, 3), None, dict(qk_norm=True, qk_scale_n_ref=16), "bfloat16", 8 * W),
    ((0, 2, 3), 3, dict(qk_norm=True, mem_positional="none"), "float32", 7 * W),
    ((1, 3), None, dict(mem_gate=True), "float32", 8 * W),
    ((1, 3), None, dict(mem_gate=True, qk_norm=True, qk_scale_n_ref=16), "float32", 8 * W),  # slots: temp + gate
    ((1, 2), None, {}, "float32", 5 * W),  # the fill evicts (FIFO): overwritten slots stay visible until then
    ((0, 2, 3), 3, dict(qk_norm=True, qk_scale_n_ref=16), "float32", 4 * W),
])
def test_fill_several_memory_layers_batched_equals_streaming(rng, mem_layers, top_k, kw, mem_dtype, cap):
    """Several memory layers: fill() runs them layer by layer over all windows of a call at once
    (window-causal memory, fot.inference.prefill.fill_memory_layers) and leaves the same stores, and the
    same logits for a query window after them, as streaming every window through the whole model (step);
    also on a store that already holds keys (and invalid slots the fill wraps around onto), in calls of
    several windows with a partial last call, dense and top-k, bf16 stores, and fills that evict."""
    model, params = _model(mem_layers, num_layers=5, **kw)
    b = 2  # capacity 8W: calls of 4 windows start mid-ring (pointer 3W, not a multiple of the call)
    pre = rng.integers(0, V, (b, 3 * W)).astype(np.int32)
    pre_mask = np.zeros((b, 3 * W), bool)
    pre_mask[:, 2 * W:] = rng.random((b, W)) > 0.25  # slots 0..2W-1 stay invalid: the fill wraps onto them
    tokens = rng.integers(0, V, (b, 6 * W)).astype(np.int32)
    km = rng.random((b, 6 * W)) > 0.25
    query = jnp.asarray(rng.integers(0, V, (b, W)).astype(np.int32))
    runner = MemoryInference(model, params, WindowedConfig(window=W, top_k=top_k, mem_dtype=mem_dtype))
    results = []
    for parallel in (False, True):
        stores = runner.fill(runner.init_memory(b, cap), pre, pre_mask, parallel=False)
        calls = []
        stream = runner._mem_kv_fn
        runner._mem_kv_fn = lambda *a: calls.append(1) or stream(*a)
        try:
            stores = runner.fill(stores, tokens, km, parallel=parallel, windows_per_call=4)
        finally:
            runner._mem_kv_fn = stream
        assert not calls  # the batched path (no window-by-window memory layers)
        results.append((stores, runner.query(stores, query)))
    (ref, ref_logits), (got, got_logits) = results
    assert np.asarray(got[mem_layers[0]].write_pos) == 9 * W % cap  # evicted/appended counters: _assert_same
    _assert_same(got, ref, *((8e-3, 1e-3) if mem_dtype == "bfloat16" else ()))
    np.testing.assert_allclose(np.asarray(got_logits), np.asarray(ref_logits), rtol=1e-4, atol=1e-4)


def test_fill_first_memory_layer_matches_single_window_decoder(rng):
    """Independent reference: the first memory layer's keys/values of a window never depend on memory,
    so each window's Decoder call alone (no memory) gives the stored slots."""
    model, params = _model((2,))
    b, n = 2, 4 * W
    tokens = rng.integers(0, V, (b, n)).astype(np.int32)
    runner = MemoryInference(model, params, WindowedConfig(window=W, mem_dtype="float32"))
    st = runner.fill(runner.init_memory(b, n), tokens)[2]
    for s in range(0, n, W):
        _, aux = model.apply({"params": params}, jnp.asarray(tokens[:, s:s + W]), return_kv=True)
        k, v = aux["mem_kv"][2]
        np.testing.assert_allclose(np.asarray(st.keys)[:, s:s + W], np.asarray(k), rtol=1e-5, atol=2e-5)
        np.testing.assert_allclose(np.asarray(st.values)[:, s:s + W], np.asarray(v), rtol=1e-5, atol=2e-5)
    assert np.asarray(st.mask).all()


def test_fill_rejects_bad_shapes():
    model, params = _model((1,))
    runner = MemoryInference(model, params, WindowedConfig(window=W, mem_dtype="float32"))
    with pytest.raises(ValueError, match="multiple of window"):
        runner.fill(runner.init_memory(1, 4 * W), np.zeros((1, W + 1), np.int32))
    with pytest.raises(ValueError, match="key_mask"):
        runner.fill(runner.init_memory(1, 4 * W), np.zeros((1, W), np.int32), np.ones((1, 2 * W), bool))


def _computations(txt):
    """{name: instruction lines} of a compiled HLO module's text, and the names of fused computations."""
    comps, name = {}, None
    for line in txt.splitlines():
        head = re.match(r"(?:ENTRY )?%([\w.-]+) \(.*\{$", line)
        if head:
            name = head.group(1)
            comps[name] = []
        elif line.startswith("}"):
            name = None
        elif name is not None:
            comps[name].append(line)
    return comps, set(re.findall(r" fusion\([^\n]*calls=%([\w.-]+)", txt))


def _store_traffic(txt, shape):
    """Instructions of a compiled program (``as_text()``) that copy or convert a whole store ``shape`` (any
    element type), i.e. everything producing an array of that shape except: an input (parameter,
    get-tuple-element, bitcast of one), or an in-place update of one (a fusion or op computing a
    dynamic-update-slice / scatter, same element type as its one whole-store operand, which is an input).
    Inside fused computations (the fusions' own data flow) only a whole-store convert / copy counts.
    A whole-store copy shows up as a copy, a convert, a bitcast-convert fusion, a second update of the
    update's result, or an update whose element type differs from its operand's (a new buffer)."""
    dims = ",".join(map(str, shape))
    comps, fused = _computations(txt)
    bad = []
    for comp, lines in comps.items():
        whole, inputs = {}, set()
        for line in lines:
            m = re.match(r"\s*(?:ROOT )?%([\w.-]+) = (\w+)\[([\d,]*)\]\S* ([\w-]+)\(([^)]*)\)(.*)", line)
            if m and m.group(3) == dims:
                iname, ty, _, op, operands, rest = m.groups()
                whole[iname] = (ty, op, re.findall(r"%([\w.-]+)", operands), rest)
        for iname, (ty, op, args, rest) in whole.items():  # in program order
            what = f"{comp}: %{iname} = {ty}[{dims}] {op}({', '.join(args)})"
            if op in ("copy", "convert"):
                bad.append(what)
            if comp in fused:
                continue
            if op in ("parameter", "get-tuple-element") or (op == "bitcast" and args[0] in inputs):
                inputs.add(iname)
                continue
            called = re.search(r"calls=%([\w.-]+)", rest)
            body = "\n".join(comps.get(called.group(1), [])) if called else ""
            update = op in ("dynamic-update-slice", "scatter") or re.search(r" (dynamic-update-slice|scatter)\(", body)
            src = [a for a in args if a in whole]
            if not (update and len(src) == 1 and src[0] in inputs and whole[src[0]][0] == ty) and what not in bad:
                bad.append(what)
    return bad


def test_store_traffic_check_flags_copying_appends():
    """Negative controls for the structural checks below: a bf16 append that copies the store in a way
    that is neither a copy nor a convert op (two update-slices through the bit pattern; a scatter through
    it; a read of the store; a native bf16 update-slice) is flagged; the aligned append, the general
    path's loop of block updates (unaligned pointer) and a float32 scatter are not."""
    from fot.ops import bits
    shape = (1, 64 * W, 2, 16)
    k = jnp.asarray(np.random.default_rng(0).standard_normal((1, W) + shape[2:]), jnp.float32)

    def update(b, u, pos):
        return jax.lax.dynamic_update_slice_in_dim(b, u, pos, axis=1)

    def two_writes(store, k):  # tail block at the pointer, head block at slot 0 (a correct runtime wrap)
        u = k.astype(store.keys.dtype)
        return bits.move(lambda b, x: update(update(b, x, store.write_pos), x, 0), store.keys, u)

    def read_write(store, k):
        old = bits.move(lambda b: jax.lax.dynamic_slice_in_dim(b, 0, W, axis=1), store.keys)
        return bits.move(lambda b, x: update(b, x, store.write_pos), store.keys, k.astype(old.dtype) + old)

    def native(store, k):
        return update(store.keys, k.astype(store.keys.dtype), store.write_pos)

    def scatter(store, k):  # the general path before the block loop (still past BLOCK_WRITES_MAX blocks)
        idx = (store.write_pos + jnp.arange(W)) % shape[1]
        return bits.move(lambda b, x: b.at[:, idx].set(x), store.keys, k.astype(store.keys.dtype))

    def traffic(fn, dtype, align):
        store = fm.for_appends(fm.init_store(*shape, dtype=dtype), align)
        return _store_traffic(jax.jit(fn, donate_argnums=(0,)).lower(store, k).compile().as_text(), shape)

    append = lambda s, k: fm.append(s, k, k)  # noqa: E731
    for fn, dtype, align in ((append, jnp.bfloat16, W), (append, jnp.bfloat16, 3), (scatter, jnp.float32, 3)):
        assert traffic(fn, dtype, align) == [], (fn, dtype, align)
    for fn, align in ((two_writes, W), (read_write, W), (native, W), (scatter, 3)):
        assert traffic(fn, jnp.bfloat16, align), fn


@pytest.mark.parametrize("top_k", [None, 4])
def test_inference_programs_never_copy_or_upcast_the_store(top_k):
    """Structural (timing-free) check of the compiled programs for a bf16 store: the window forward
    only reads it (no whole-store copy, no whole-store float32 conversion) and the append writes it in
    place (donated; no copy, no conversion)."""
    model, params = _model((1,), num_layers=2)
    runner = MemoryInference(model, params, WindowedConfig(window=W, top_k=top_k, mem_dtype="bfloat16"))
    from fot.ops.memory import TOPK_CHUNK_MAX
    m = 4 * TOPK_CHUNK_MAX  # several chunks: a chunk-sized conversion is not a whole-store one
    stores = runner.init_memory(1, m)
    tok = jnp.zeros((1, W), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(W, dtype=jnp.int32), (1, W))
    shape = (1, m, 2, 16)
    fwd = runner._forward_fn.lower(params, stores, tok, pos, None, None).compile().as_text()
    kv = {1: (jnp.zeros((1, W, 2, 16)), jnp.zeros((1, W, 2, 16)))}
    app = runner._append_fn.lower(stores, kv, jnp.ones((1, W), bool), None).compile().as_text()
    for txt in (fwd, app):
        assert _store_traffic(txt, shape) == []
    assert "input_output_alias" in app.split("\n", 1)[0]  # the append is donated: written in place


@pytest.mark.parametrize("capacity", [8 * W, 4 * W, 5 * W])
def test_blocked_fill_equals_full_forward(rng, capacity):
    """The scanned fill (blocks of windows per jitted call appended in place; remainder calls, a write
    pointer left mid-ring by an earlier fill, ring wrap, odd capacities) leaves the memory of streaming every
    window through the whole model (forward), the same query answers, and so does a cleared, reused store."""
    model, params = _model((1,), qk_norm=True, mem_positional="none")
    b, nw = 2, 7
    tokens = rng.integers(0, V, (b, nw * W)).astype(np.int32)
    km = rng.random((b, nw * W)) > 0.25
    q = rng.integers(0, V, (b, W)).astype(np.int32)
    runner = MemoryInference(model, params, WindowedConfig(window=W, top_k=3, mem_dtype="float32"))
    full = runner.forward(tokens, key_mask=km, stores=runner.init_memory(b, capacity))["stores"]
    want = np.asarray(runner.query(full, q)).argmax(-1)  # [b, W]
    for block_tokens, per_call in ((4 * W, None), (8 * W, 3), (2 * W, 2), (1 << 12, None)):
        filled = runner.fill(runner.init_memory(b, capacity), tokens, km, block_tokens=block_tokens,
                             windows_per_call=per_call)
        _assert_same(filled, full)
        np.testing.assert_array_equal(np.asarray(runner.query(filled, q)).argmax(-1), want)
    cut = 3 * W  # a second fill starts where the first one left the pointer
    half = runner.fill(runner.init_memory(b, capacity), tokens[:, :cut], km[:, :cut], block_tokens=4 * W)
    _assert_same(runner.fill(half, tokens[:, cut:], km[:, cut:], block_tokens=4 * W), full)
    again = runner.fill(runner.empty_memory(b, capacity, reuse=filled), tokens, km)
    _assert_same(again, full)


def test_blocked_fill_into_a_bfloat16_store_equals_full_forward(rng):
    """The scan writes a bf16 store through its bit pattern (fot.ops.bits): same slots as streaming the
    windows through the whole model, up to one bf16 rounding of float32 values that differ in the last bits."""
    model, params = _model((1,), qk_norm=True, mem_positional="none")
    b, nw, capacity = 2, 6, 4 * W
    tokens = rng.integers(0, V, (b, nw * W)).astype(np.int32)
    km = rng.random((b, nw * W)) > 0.25
    runner = MemoryInference(model, params, WindowedConfig(window=W, top_k=3, mem_dtype="bfloat16"))
    full = _leaves(runner.forward(tokens, key_mask=km, stores=runner.init_memory(b, capacity))["stores"])
    filled = _leaves(runner.fill(runner.init_memory(b, capacity), tokens, km, block_tokens=4 * W))
    assert full.keys() == filled.keys()
    for k in full:
        assert filled[k].dtype == full[k].dtype, k
        np.testing.assert_allclose(filled[k].astype(np.float32), full[k].astype(np.float32), rtol=8e-3,
                                   atol=1e-6, err_msg=str(k))


def test_blocked_fill_on_a_mesh_equals_single_device(rng):
    """The scanned fill into a store sharded over a mesh (batch over ``data``, memory length over ``model``)
    leaves the single-device memory, and keeps the store's sharding."""
    from fot.parallel import make_mesh
    model, params = _model((1,), qk_norm=True, mem_positional="none")
    b, nw, capacity = 2, 8, 8 * W
    tokens = rng.integers(0, V, (b, nw * W)).astype(np.int32)
    km = rng.random((b, nw * W)) > 0.25
    cfg = WindowedConfig(window=W, top_k=3, mem_dtype="float32")
    plain = MemoryInference(model, params, cfg)
    sharded = MemoryInference(model, params, cfg, mesh=make_mesh({"data": 2, "model": 4}))
    want = plain.fill(plain.init_memory(b, capacity), tokens, km, block_tokens=4 * W)
    got = sharded.fill(sharded.init_memory(b, capacity), tokens, km, block_tokens=4 * W)
    assert got[1].keys.sharding.spec[:2] == ("data", "model")
    _assert_same(got, want)


def test_several_layer_fill_with_an_unaligned_pointer_streams_window_by_window(rng):
    """A write pointer that is not a multiple of the window (an earlier 3-token append into a store whose
    capacity is a multiple of the window): fill() streams the memory layers window by window and still
    leaves the memory of streaming every window through the whole model."""
    model, params = _model((1, 2), num_layers=3)
    b, capacity = 2, 8 * W
    tokens = rng.integers(0, V, (b, 4 * W)).astype(np.int32)
    first = rng.integers(0, V, (b, 3)).astype(np.int32)
    runner = MemoryInference(model, params, WindowedConfig(window=W, mem_dtype="float32"))
    out = []
    for parallel in (False, True):
        stores = runner.step(runner.init_memory(b, capacity), first)[1]
        calls = []
        stream = runner._mem_kv_fn
        runner._mem_kv_fn = lambda *a: calls.append(1) or stream(*a)
        out.append(runner.fill(stores, tokens, parallel=parallel))
        runner._mem_kv_fn = stream
    assert len(calls) == 4  # the last fill went window by window
    _assert_same(out[1], out[0])


@pytest.mark.parametrize("top_k", [None, 3])
def test_batched_several_layer_fill_on_a_mesh_equals_single_device(rng, top_k):
    """Several memory layers, stores sharded over a mesh (batch over ``data``, memory length over
    ``model``): the batched layer-by-layer fill leaves the single-device memory and keeps the sharding."""
    from fot.parallel import make_mesh
    model, params = _model((1, 2), num_layers=3)
    b, nw, capacity = 2, 8, 8 * W
    tokens = rng.integers(0, V, (b, nw * W)).astype(np.int32)
    km = rng.random((b, nw * W)) > 0.25
    cfg = WindowedConfig(window=W, top_k=top_k, mem_dtype="float32")
    plain = MemoryInference(model, params, cfg)
    sharded = MemoryInference(model, params, cfg, mesh=make_mesh({"data": 2, "model": 4}))
    want = plain.fill(plain.init_memory(b, capacity), tokens, km, parallel=False)
    sharded._mem_kv_fn = None  # the window-by-window path would call it
    got = sharded.fill(sharded.init_memory(b, capacity), tokens, km, windows_per_call=4)
    assert got[2].keys.sharding.spec[:2] == ("data", "model")
    _assert_same(got, want)


def test_fill_and_clear_programs_write_the_store_in_place():
    """Structural check for a bf16 store: the scanned fill (one memory layer; several: appends, then
    window-causal reads of the same store) and clear are donated and never copy or upcast the whole
    store (no per-block store copy inside the scans)."""
    model, params = _model((1,), num_layers=2)
    runner = MemoryInference(model, params, WindowedConfig(window=W, mem_dtype="bfloat16"))
    m = 64 * W
    stores = runner.init_memory(1, m)
    tok, km = jnp.zeros((1, 8 * W), jnp.int32), jnp.ones((1, 8 * W), bool)
    aligned = fm.for_appends(fm.realign(stores), 4 * W)  # as fill() passes them: the pointer is a block multiple
    fill = runner._fill_fn.lower(params, aligned, tok, km, block=4).compile().as_text()
    clear = runner._clear_fn.lower(stores).compile().as_text()
    model2, params2 = _model((0, 1), num_layers=2)
    runner2 = MemoryInference(model2, params2, WindowedConfig(window=W, mem_dtype="bfloat16"))
    from fot.ops.memory import DEFAULT_CHUNK
    m2 = 4 * DEFAULT_CHUNK  # several dense chunks: a chunk-sized conversion is not a whole-store one
    layers = runner2._fill_layers_fn.lower(params2, runner2.init_memory(1, m2), tok.reshape(8, W), km)
    for txt, size in ((fill, m), (clear, m), (layers.compile().as_text(), m2)):
        assert _store_traffic(txt, (1, size, 2, 16)) == []
        assert "input_output_alias" in txt.split("\n", 1)[0]
