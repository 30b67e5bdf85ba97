"""fot.memory.store: FIFO ring buffer, overflow report, per-row reset, dtype, sharding."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fot import memory as fm
from fot.parallel import make_mesh


def _fifo_reference(windows, masks, capacity):
    """Numpy reference: per row the list of valid (key) entries, oldest first, FIFO by slot count."""
    b = windows[0].shape[0]
    slots = [[] for _ in range(b)]  # each slot: (key, valid)
    evicted = np.zeros(b, int)
    for w, m in zip(windows, masks):
        for r in range(b):
            for t in range(w.shape[1]):
                slots[r].append((w[r, t], bool(m[r, t])))
                if len(slots[r]) > capacity:
                    old = slots[r].pop(0)
                    evicted[r] += int(old[1])
    valid = [[k for k, v in row if v] for row in slots]
    return valid, evicted


@pytest.mark.parametrize("capacity,t", [(12, 4), (10, 4), (3, 4)])
def test_fifo_eviction_matches_reference(rng, capacity, t):
    b, h, dh = 2, 2, 4
    store = fm.init_store(b, capacity, h, dh, dtype=jnp.float32)
    windows, masks = [], []
    append = jax.jit(fm.append)
    for _ in range(5):
        k = rng.standard_normal((b, t, h, dh)).astype(np.float32)
        m = rng.random((b, t)) > 0.2
        windows.append(k)
        masks.append(m)
        store = append(store, jnp.asarray(k), jnp.asarray(-k), jnp.asarray(m))
    valid, evicted = _fifo_reference(windows, masks, capacity)
    np.testing.assert_array_equal(np.asarray(store.evicted), evicted)
    assert evicted.sum() > 0  # the test exercises overflow
    got_k, got_m = np.asarray(store.keys), np.asarray(store.mask)
    for r in range(b):
        got = got_k[r][got_m[r]]
        want = np.stack(valid[r]) if valid[r] else np.zeros((0, h, dh))
        # order inside the ring differs from insertion order; compare as sorted sets of rows
        key = lambda a: np.lexsort(a.reshape(len(a), -1).T)  # noqa: E731
        np.testing.assert_array_equal(got[key(got)], want[key(want)])
        np.testing.assert_array_equal(np.asarray(store.values)[r][got_m[r]][key(got)], -want[key(want)])
    assert int(np.asarray(fm.overflow_report({3: store})["evicted"]).sum()) == evicted.sum()


def test_oldest_evicted_first(rng):
    b, h, dh, cap = 1, 1, 2, 6
    store = fm.init_store(b, cap, h, dh, dtype=jnp.float32)
    for i in range(4):  # 4 windows of 3 tokens, values tag the insertion time
        v = jnp.full((b, 3, h, dh), float(i))
        store = fm.append(store, jnp.asarray(rng.standard_normal((b, 3, h, dh)), jnp.float32), v)
    tags = sorted(set(np.asarray(store.values)[0, :, 0, 0].tolist()))
    assert tags == [2.0, 3.0]  # the two oldest windows are gone
    assert np.asarray(store.evicted).tolist() == [6]
    assert np.asarray(store.appended).tolist() == [12]


def test_reset_rows_empties_memory(rng):
    b, cap = 3, 8
    store = fm.init_store(b, cap, 2, 4)
    k = jnp.asarray(rng.standard_normal((b, 4, 2, 4)), jnp.float32)
    store = fm.append(store, k, k)
    store = fm.reset(store, jnp.array([False, True, False]))
    assert np.asarray(store.size()).tolist() == [4, 0, 4]
    store = fm.append(store, k, k)
    assert np.asarray(store.size()).tolist() == [8, 4, 8]
    assert np.asarray(fm.reset(store).size()).tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="rows"):
        fm.reset(store, jnp.array([True, False]))


def test_storage_dtype_and_bad_input(rng):
    store = fm.init_store(2, 8, 2, 4)  # bf16 default
    k = jnp.asarray(rng.standard_normal((2, 4, 2, 4)), jnp.float32)
    store = fm.append(store, k, k)
    assert store.keys.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(store.keys[:, :4], np.float32), np.asarray(k), rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="keys"):
        fm.append(store, k[:, :, :1], k[:, :, :1])
    with pytest.raises(ValueError, match="mask"):
        fm.append(store, k, k, jnp.ones((2, 3), bool))
    with pytest.raises(ValueError, match="capacity"):
        fm.init_store(2, 0, 2, 4)


def test_sharded_store_equals_single_device(rng):
    mesh = make_mesh({"data": 2, "model": 4})
    b, cap, h, dh = 2, 16, 2, 4
    plain = fm.init_store(b, cap, h, dh, dtype=jnp.float32)
    sharded = fm.stores_for_model(b, cap, [1], h, dh, dtype=jnp.float32, mesh=mesh)[1]
    assert sharded.keys.sharding.spec[:2] == ("data", "model")
    append = jax.jit(fm.append)
    for _ in range(6):
        k = jnp.asarray(rng.standard_normal((b, 4, h, dh)), jnp.float32)
        m = jnp.asarray(rng.random((b, 4)) > 0.3)
        plain, sharded = fm.append(plain, k, 2 * k, m), append(sharded, k, 2 * k, m)
    for a, c in zip(jax.tree.leaves(plain), jax.tree.leaves(sharded)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


def test_would_evict_counts_only_valid_slots(rng):
    """would_evict(stores, n): appending n slots at the write pointer overwrites a valid slot (checked
    against appending them and reading the eviction counter); invalid (masked) slots may be overwritten."""
    h, dh, cap = 2, 4, 7  # 7: appends of 2..6 slots take append's modular path (exact slots from the pointer)
    kv = lambda t: (jnp.asarray(rng.normal(size=(2, t, h, dh)), jnp.float32),) * 2  # noqa: E731
    store = fm.init_store(2, cap, h, dh, dtype=jnp.float32)
    store = fm.append(store, *kv(2), jnp.zeros((2, 2), bool))  # slots 0, 1 written but invalid
    mask = np.array([[True, False, True], [False, False, True]])
    store = fm.append(store, *kv(3), jnp.asarray(mask))  # slots 2..4: valid slots 2, 4 (row 0) and 4 (row 1)
    for n in range(1, 9):
        evicts = fm.would_evict({0: store, 1: store}, n)
        after = fm.append(store, *kv(n))
        assert evicts == bool(np.asarray(after.evicted).sum() > 0), n
    assert not fm.would_evict({0: store}, 4) and fm.would_evict({0: store}, 5)  # wraps onto slots 0, 1 / 2


def _ring_reference(cap, appends):
    """Plain numpy ring buffer (the documented ``append`` semantics): a window longer than the store keeps
    its newest ``cap`` entries (the older ones count as appended and evicted); each kept entry goes to the
    slot at the pointer, which advances by one modulo ``cap``; overwriting a valid slot counts as evicted.
    Yields ``(keys, values, mask, write_pos, evicted, appended)`` after every append."""
    b, _, h, dh = appends[0][0].shape
    keys, values = np.zeros((b, cap, h, dh), np.float32), np.zeros((b, cap, h, dh), np.float32)
    mask, pos = np.zeros((b, cap), bool), 0
    evicted, appended = np.zeros(b, np.int64), np.zeros(b, np.int64)
    for k, v, m in appends:
        appended += m.sum(axis=1)
        if k.shape[1] > cap:
            evicted += m[:, : k.shape[1] - cap].sum(axis=1)
            k, v, m = k[:, -cap:], v[:, -cap:], m[:, -cap:]
        for j in range(k.shape[1]):
            evicted += mask[:, pos]
            keys[:, pos], values[:, pos], mask[:, pos] = k[:, j], v[:, j], m[:, j]
            pos = (pos + 1) % cap
        yield keys.copy(), values.copy(), mask.copy(), pos, evicted.copy(), appended.copy()


@pytest.mark.parametrize("dtype,cap,sharded", [("float32", 16, False), ("bfloat16", 16, False),
                                               ("float32", 12, False), ("bfloat16", 7, False),
                                               ("bfloat16", 16, True), ("float32", 12, True),
                                               ("bfloat16", 521, False)])  # > BLOCK_WRITES_MAX blocks: scatter
def test_append_mixed_lengths_matches_ring_reference(rng, dtype, cap, sharded):
    """Appends of mixed lengths (unaligned pointers, windows that wrap the ring, windows longer than the
    store, capacity a multiple of some lengths and not of others) write exactly the slots of a numpy ring
    buffer: slot contents, valid mask, pointer and counters after every append, eager and jitted, f32 and
    bf16 storage, single-device and length-sharded on a (data 2, model 4) mesh."""
    b, h, dh = 2, 2, 4
    lengths = [4, 8, 3, 4, 8, 4, 5, cap, 1, cap + 3, 2] + rng.integers(1, cap + 3, size=5).tolist()
    if sharded:
        mesh = make_mesh({"data": 2, "model": 4})
        store = fm.stores_for_model(b, cap, [0], h, dh, dtype=dtype, mesh=mesh)[0]
    else:
        store = fm.init_store(b, cap, h, dh, dtype=dtype)
    appends = []
    for t in lengths:
        k = rng.standard_normal((b, t, h, dh)).astype(np.float32)
        v = rng.standard_normal((b, t, h, dh)).astype(np.float32)
        # The storage dtype rounds once on the way in; the reference stores the same rounded numbers.
        k, v = (np.asarray(jnp.asarray(a).astype(dtype).astype(jnp.float32)) for a in (k, v))
        appends.append((k, v, rng.random((b, t)) > 0.25))
    for i, ((k, v, m), want) in enumerate(zip(appends, _ring_reference(cap, appends))):
        append = jax.jit(fm.append) if i % 2 else fm.append
        store = append(store, jnp.asarray(k), jnp.asarray(v), jnp.asarray(m))
        what = f"append #{i} (lengths {lengths[:i + 1]})"
        wk, wv, wm, wpos, wev, wapp = want
        np.testing.assert_array_equal(np.asarray(store.mask), wm, err_msg=f"mask after {what}")
        # Only valid slots are defined (invalid ones may hold anything); every valid slot must match.
        np.testing.assert_array_equal(np.asarray(store.keys, np.float32)[wm], wk[wm], err_msg=f"keys after {what}")
        np.testing.assert_array_equal(np.asarray(store.values, np.float32)[wm], wv[wm],
                                      err_msg=f"values after {what}")
        assert int(store.write_pos) == wpos, what
        assert store.align == math.gcd(cap, *[min(t, cap) for t in lengths[:i + 1]]), what  # static alignment
        assert wpos % store.align == 0 and cap % store.align == 0, what  # the static alignment is sound
        np.testing.assert_array_equal(np.asarray(store.evicted), wev, err_msg=f"evicted after {what}")
        np.testing.assert_array_equal(np.asarray(store.appended), wapp, err_msg=f"appended after {what}")
    assert store.keys.dtype == jnp.dtype(dtype)
    assert wev.sum() > 0  # the sequence overflows the store


def test_static_alignment_through_jit_scan_and_host(rng):
    """The store's static pointer alignment (``align``, pytree metadata) survives jit and a lax.scan carry
    (``for_appends`` first: the carry keeps its structure), stays sound when a scan appends from an
    unaligned pointer (slots as the numpy ring buffer), and ``realign`` recovers it from the pointer."""
    b, h, dh, cap, t = 2, 2, 4, 16, 4
    kv = lambda n: rng.standard_normal((b, n, h, dh)).astype(np.float32)  # noqa: E731
    first = (kv(3), kv(3), rng.random((b, 3)) > 0.25)
    steps = [(kv(t), kv(t), rng.random((b, t)) > 0.25) for _ in range(7)]  # wraps the ring from pointer 3
    store = fm.init_store(b, cap, h, dh, dtype=jnp.bfloat16)
    assert store.align == cap
    store = jax.jit(fm.append)(store, *map(jnp.asarray, first))
    assert store.align == 1 and int(store.write_pos) == 3
    xs = tuple(jnp.asarray(np.stack(a)) for a in zip(*steps))  # [7, B, t, ...]
    with pytest.raises(TypeError, match="carry"):  # the carry's static alignment would change (16 -> 4)
        jax.lax.scan(lambda s, x: (fm.append(s, *x), None), fm.init_store(b, cap, h, dh), xs)
    scan = jax.jit(lambda s, xs: jax.lax.scan(lambda c, x: (fm.append(c, *x), None), fm.for_appends(s, t), xs)[0])
    out = scan(fm.realign(store), xs)
    assert out.align == 1
    *_, (wk, wv, wm, wpos, wev, wapp) = _ring_reference(cap, [first] + steps)
    np.testing.assert_array_equal(np.asarray(out.mask), wm)
    np.testing.assert_array_equal(np.asarray(out.keys, np.float32)[wm], np.asarray(jnp.asarray(wk, jnp.bfloat16),
                                                                                    np.float32)[wm])
    np.testing.assert_array_equal(np.asarray(out.evicted), wev)
    assert int(out.write_pos) == wpos == (3 + 7 * t) % cap
    out = jax.jit(fm.append)(out, *map(jnp.asarray, first[:2]))  # pointer back to 2 * 3 + 28 = 34 = 2 mod 16
    assert out.align == 1 and fm.realign(out).align == 2
    assert fm.realign({0: fm.clear(out)})[0].align == cap and fm.for_appends(fm.clear(out), 12).align == 4
