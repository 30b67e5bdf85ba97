"""Segmenter, document providers, prefetching iterator, stdlib corpus (pure numpy; no seqio)."""
import json

import numpy as np
import pytest

from fot.data.documents import ListDocuments, MixtureDocuments
from fot.data.pipeline import PrefetchIterator
from fot.data.segmenter import Segmenter
from fot.parallel.multihost import make_global_batch

BOS, EOS = 3, 1
KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def random_docs(rng, n, lo=1, hi=60, vocab=1000):
    """Fresh random documents; token ids >= 4 so they never collide with BOS/EOS/pad."""
    return [rng.integers(4, vocab, size=int(rng.integers(lo, hi + 1))).astype(np.int32) for _ in range(n)]


def lane_streams(batches, pack, seq_len):
    """Per lane: the concatenation over steps of its k rows → dict of 1-D arrays."""
    out = None
    for b in batches:
        lanes = b.inputs.shape[0] // pack
        if out is None:
            out = [{k: [] for k in ("inputs", "targets", "loss_mask", "segment_ids")} for _ in range(lanes)]
        for j in range(lanes):
            for k in out[j]:
                out[j][k].append(getattr(b, k)[j * pack:(j + 1) * pack].reshape(-1))
    return [{k: np.concatenate(v) for k, v in lane.items()} for lane in out]


def reconstruct(streams, window=None):
    """Segments of the lane streams: (sort key, segment id, input tokens + last target, complete?).

    The sort key (step, lane, position in the lane's window) is the order in which the segmenter
    took the documents from the provider (lane 0 fills its window first, then lane 1, ...).
    """
    segs = []
    for j, s in enumerate(streams):
        seg, inp, tgt = s["segment_ids"], s["inputs"], s["targets"]
        p, n = 0, len(seg)
        W = window or n
        while p < n:
            q = p
            while q < n and seg[q] == seg[p]:
                q += 1
            if seg[p] != 0:
                segs.append(((p // W, j, p % W), int(seg[p]), np.concatenate([inp[p:q], tgt[q - 1:q]]), q < n))
            p = q
    return sorted(segs, key=lambda x: x[0])


def wrap(doc, bos=True, eos=True):
    return np.concatenate([[BOS] if bos else [], doc, [EOS] if eos else []]).astype(np.int32)


def run(seg, steps):
    return [next(seg) for _ in range(steps)]


@pytest.mark.parametrize("boundary", ["continue", "pad"])
@pytest.mark.parametrize("pack", [1, 2, 4])
def test_rows_continue_documents_in_order(rng, boundary, pack):
    docs = random_docs(rng, 300, hi=90)
    L, B = 16, 8
    seg = Segmenter(ListDocuments(docs, shuffle=True, seed=int(rng.integers(1 << 30))), B, L, pack=pack,
                    bos_id=BOS, eos_id=EOS, boundary=boundary)
    order = ListDocuments(docs, shuffle=True, seed=seg.provider.seed)  # independent order reference
    batches = run(seg, 40)
    for b in batches:
        assert b._fields == KEYS
        assert b.inputs.shape == (B, L) and b.segment_ids.shape == (B, L)
        assert b.inputs.dtype == np.int32 and b.loss_mask.dtype == np.float32
        np.testing.assert_array_equal(b.positions, np.tile(np.arange(L), (B, 1)))
        # loss only on document positions, never on padding
        np.testing.assert_array_equal(b.loss_mask, (b.segment_ids > 0).astype(np.float32))
        assert np.all(b.inputs[b.segment_ids == 0] == 0)
    streams = lane_streams(batches, pack, L)
    for s in streams:  # within a lane's stream every target is the next input of the same document
        same = s["segment_ids"][:-1] == s["segment_ids"][1:]
        same &= s["segment_ids"][:-1] > 0
        np.testing.assert_array_equal(s["targets"][:-1][same], s["inputs"][1:][same])
    # segments in taking order are the provider's documents in order: complete ones exactly,
    # the ones still running at the end as prefixes; no segment id is used for two documents
    segs = reconstruct(streams, window=pack * L)
    ids = [sid for _, sid, _, _ in segs]
    assert len(set(ids)) == len(ids)
    for _, _, toks, complete in segs:
        ref = wrap(order.next_document().tokens)
        if complete:
            np.testing.assert_array_equal(toks, ref)
        else:
            np.testing.assert_array_equal(toks, ref[:len(toks)])
    assert len(segs) > 2 * B // pack


def test_k_packs_hold_consecutive_windows(rng):
    docs = random_docs(rng, 50, lo=200, hi=400)
    L, k = 8, 4
    seg = Segmenter(ListDocuments(docs), 8, L, pack=k, bos_id=BOS, eos_id=EOS)
    for b in run(seg, 10):
        for r in range(8):
            if r % k == k - 1:
                continue
            if b.segment_ids[r, -1] == b.segment_ids[r + 1, 0] != 0:
                assert b.targets[r, -1] == b.inputs[r + 1, 0]


def test_segment_ids_split_at_boundaries_and_start_flags(rng):
    docs = random_docs(rng, 200, lo=1, hi=12)  # many documents per row
    L = 32
    seg = Segmenter(ListDocuments(docs), 4, L, pack=1, bos_id=BOS, eos_id=EOS)
    batches = run(seg, 6)
    # reference: lane streams are the documents in order, cut into L-token rows
    flat_docs = [wrap(d) for d in docs]
    for j in range(4):
        inputs = np.concatenate([b.inputs[j] for b in batches])
        sids = np.concatenate([b.segment_ids[j] for b in batches])
        # boundaries: a new segment begins exactly at each BOS
        change = np.r_[True, sids[1:] != sids[:-1]]
        np.testing.assert_array_equal(change, inputs == BOS)
    assert len(flat_docs) == 200


def test_pad_boundary_keeps_one_document_per_pack(rng):
    docs = random_docs(rng, 100, lo=5, hi=70)
    L, k = 8, 4
    seg = Segmenter(ListDocuments(docs), 8, L, pack=k, bos_id=BOS, eos_id=EOS, boundary="pad")
    for b in run(seg, 30):
        for j in range(2):
            ids = b.segment_ids[j * k:(j + 1) * k]
            assert len(set(ids[ids > 0].tolist())) <= 1
            assert (ids > 0).any()  # a lane never idles on an infinite stream
            assert ids[0, 0] > 0


def test_loss_weights_follow_targets(rng):
    docs = [{"tokens": d, "loss_weights": rng.random(len(d)).astype(np.float32)}
            for d in random_docs(rng, 40, lo=20, hi=50)]
    seg = Segmenter(ListDocuments(docs), 2, 16, pack=1)  # no BOS/EOS
    b = next(seg)
    d0 = docs[0]
    n = min(16, len(d0["tokens"]) - 1)
    np.testing.assert_array_equal(b.inputs[0, :n], d0["tokens"][:n])
    np.testing.assert_allclose(b.loss_mask[0, :n], d0["loss_weights"][1:n + 1])


def test_finite_stream_emits_every_document_once(rng):
    docs = random_docs(rng, 37, lo=2, hi=40)
    seg = Segmenter(ListDocuments(docs, num_epochs=1), 4, 8, pack=2, bos_id=BOS, eos_id=EOS)
    batches = list(seg)
    segs = reconstruct(lane_streams(batches, 2, 8))
    got = sorted(tuple(t) for _, _, t, _ in segs)
    assert got == sorted(tuple(wrap(d)) for d in docs)


def _state_roundtrip(state):
    return json.loads(json.dumps(state))


@pytest.mark.parametrize("boundary", ["continue", "pad"])
def test_cursor_resume_gives_identical_batches(rng, boundary):
    docs = random_docs(rng, 120, lo=1, hi=150)
    seed = int(rng.integers(1 << 30))

    def make():
        return Segmenter(ListDocuments(docs, shuffle=True, seed=seed, min_length=3), 8, 16, pack=2,
                         bos_id=BOS, eos_id=EOS, boundary=boundary)

    a = make()
    run(a, 23)
    state = _state_roundtrip(a.get_state())
    expected = run(a, 15)
    b = make()
    b.set_state(state)
    for x, y in zip(expected, run(b, 15)):
        for k in KEYS:
            np.testing.assert_array_equal(getattr(x, k), getattr(y, k), err_msg=k)


def test_prefetch_state_is_last_consumed_batch(rng):
    docs = random_docs(rng, 80, lo=1, hi=100)

    def make():
        return Segmenter(ListDocuments(docs, shuffle=True, seed=5), 4, 8, pack=2, bos_id=BOS, eos_id=EOS)

    ref = make()
    ref_batches, ref_states = [], []
    for _ in range(12):
        ref_batches.append(next(ref))
        ref_states.append(_state_roundtrip(ref.get_state()))
    it = PrefetchIterator(make(), buffer_size=3)
    assert it.batch_size == 4 and it.seq_len == 8 and it.pack == 2
    for i in range(5):
        b = next(it)
        np.testing.assert_array_equal(b.inputs, ref_batches[i].inputs)
    import time
    time.sleep(0.05)  # let the thread prefetch ahead
    assert it.get_state() == ref_states[4]
    state = it.get_state()
    it2 = PrefetchIterator(make(), buffer_size=2)
    it2.set_state(state)
    for i in range(5, 12):
        b2 = next(it2)
        for k in KEYS:
            np.testing.assert_array_equal(getattr(b2, k), getattr(ref_batches[i], k), err_msg=k)
    it.set_state(ref_states[8])  # rewinding a running prefetcher drops its queue
    np.testing.assert_array_equal(next(it).inputs, ref_batches[9].inputs)
    assert it.metrics()["data/steps"] == 10
    it.close()
    it2.close()


def test_prefetch_forwards_errors_and_end(rng):
    class Boom(Segmenter):
        def __next__(self):
            if self._step == 2:
                raise RuntimeError("boom at step 2")
            return super().__next__()

    it = PrefetchIterator(Boom(ListDocuments(random_docs(rng, 10)), 2, 8), buffer_size=1)
    next(it), next(it)
    with pytest.raises(RuntimeError, match="boom"):
        next(it)
    it = PrefetchIterator(Segmenter(ListDocuments(random_docs(rng, 3, lo=2, hi=5), num_epochs=1), 2, 8))
    assert len(list(it)) >= 1


def test_min_length_filter_counts_skipped(rng):
    docs = random_docs(rng, 500, lo=1, hi=100)
    m = 40
    p = ListDocuments(docs, min_length=m, num_epochs=1)
    got = []
    while (d := p.next_document()) is not None:
        got.append(d.tokens)
    assert all(len(t) >= m for t in got)
    assert len(got) == sum(len(d) >= m for d in docs)
    assert p.get_state()["skipped_short"] == sum(len(d) < m for d in docs)
    assert p.metrics()["data/list/skipped_short"] == sum(len(d) < m for d in docs)
    with pytest.raises(ValueError, match="min_length"):
        ListDocuments(docs, min_length=1000).next_document()


def test_mixture_rates_within_tolerance(rng):
    rates = np.array([0.5, 0.3, 0.15, 0.05])
    provs = [ListDocuments(random_docs(rng, 7, lo=2, hi=5), name=f"s{i}") for i in range(4)]
    mix = MixtureDocuments(provs, rates * 4, seed=int(rng.integers(1 << 30)))
    n = 20000
    counts = np.zeros(4)
    for _ in range(n):
        counts[mix.next_document().ref[0]] += 1
    sigma = np.sqrt(n * rates * (1 - rates))
    assert np.all(np.abs(counts - n * rates) < 4 * sigma), (counts / n, rates)
    # resume of the mixture: same next documents
    st = _state_roundtrip(mix.get_state())
    nxt = [mix.next_document().ref for _ in range(50)]
    mix2 = MixtureDocuments(provs, rates * 4, seed=mix.seed)
    mix2.set_state(st)
    assert [mix2.next_document().ref for _ in range(50)] == nxt


def test_bad_settings_raise_clear_errors(rng):
    p = ListDocuments(random_docs(rng, 5))
    with pytest.raises(ValueError, match="seq_len"):
        Segmenter(p, 4, 1)
    with pytest.raises(ValueError, match="pack"):
        Segmenter(p, 6, 8, pack=4)
    with pytest.raises(ValueError, match="boundary"):
        Segmenter(p, 4, 8, boundary="wrap")
    with pytest.raises(ValueError, match="rate"):
        MixtureDocuments([p], [-1.0])
    with pytest.raises(ValueError, match="1-D int"):
        ListDocuments([np.zeros((2, 2), np.int32)])
    s = Segmenter(p, 4, 8)
    st = s.get_state()
    with pytest.raises(ValueError, match="seq_len"):
        Segmenter(p, 4, 16).set_state(st)


def test_make_global_batch_single_process(rng):
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    seg = Segmenter(ListDocuments(random_docs(rng, 40)), 8, 16, pack=2, bos_id=BOS, eos_id=EOS)
    b = next(seg)
    g = make_global_batch(b._asdict(), NamedSharding(mesh, P("data", None)))
    for k in KEYS:
        assert g[k].shape == getattr(b, k).shape
        np.testing.assert_array_equal(np.asarray(g[k]), getattr(b, k))
    assert g["inputs"].sharding.spec == P("data", None)
    assert len(g["positions"].addressable_shards) == 4


def test_stdlib_corpus_is_deterministic_and_split():
    from fot.data import stdlib_corpus

    train = stdlib_corpus.load_documents("train")
    val = stdlib_corpus.load_documents("validation")
    names_t, names_v = {n for n, _ in train}, {n for n, _ in val}
    assert not names_t & names_v and len(val) >= 5 and len(train) > 10 * len(val)
    assert all(stdlib_corpus.split_of(n) == "validation" for n in names_v)
    files = dict(stdlib_corpus.document_files())
    # a package document is its own .py files concatenated in sorted order
    pkg = next(n for n, fs in files.items() if len(fs) > 3 and n in names_t)
    text = dict(train)[pkg]
    pos = [text.index(f"# file: {f}\n") for f in files[pkg]]
    assert pos == sorted(pos) and list(files[pkg]) == sorted(files[pkg])
    assert "json" in names_t | names_v  # packages are documents
    assert stdlib_corpus.load_documents.__wrapped__("train") == train  # deterministic re-read
    with pytest.raises(ValueError, match="split"):
        stdlib_corpus.load_documents("dev")


def test_two_hosts_have_disjoint_lanes_and_segment_ids(rng):
    docs = random_docs(rng, 200, lo=1, hi=30)
    # host h reads every other document (as ShardInfo(h, 2) does) and owns lanes [4h, 4h+4) of 8
    hosts = [Segmenter(ListDocuments(docs[h::2]), 8, 16, pack=2, bos_id=BOS, eos_id=EOS,
                       lane_offset=4 * h, num_global_lanes=8) for h in range(2)]
    ids = [set(), set()]
    content = [set(), set()]
    for h, seg in enumerate(hosts):
        batches = run(seg, 12)
        for b in batches:
            ids[h] |= set(b.segment_ids[b.segment_ids > 0].tolist())
        for _, _, toks, complete in reconstruct(lane_streams(batches, 2, 16)):
            if complete:
                content[h].add(tuple(toks))
    assert ids[0] and ids[1] and not ids[0] & ids[1]
    assert content[0] <= {tuple(wrap(d)) for d in docs[0::2]}
    assert content[1] <= {tuple(wrap(d)) for d in docs[1::2]}
    with pytest.raises(ValueError, match="num_global_lanes"):
        Segmenter(ListDocuments(docs), 8, 16, pack=2, lane_offset=6, num_global_lanes=8)


def test_document_padding_gets_segment_zero(rng):
    """A document's ``padding`` positions (filler inside it) get segment id 0 at those input positions; the
    rest of the document keeps its id, targets and loss weights are unchanged."""
    from fot.data.documents import Document

    toks = rng.integers(4, 100, size=33).astype(np.int32)
    pad = rng.random(33) < 0.3
    weights = rng.random(33).astype(np.float32)

    class One:
        def __init__(self):
            self.given = False

        def next_document(self):
            if self.given:
                return None
            self.given = True
            return Document(toks, 0, weights, pad)

    b = next(Segmenter(One(), 2, 16, pack=2, boundary="pad"))
    seg = b.segment_ids.reshape(-1)
    np.testing.assert_array_equal(seg == 0, pad[:32])
    assert len(np.unique(seg[seg > 0])) == 1
    np.testing.assert_array_equal(b.inputs.reshape(-1), toks[:32])
    np.testing.assert_array_equal(b.targets.reshape(-1), toks[1:])
    np.testing.assert_array_equal(b.loss_mask.reshape(-1), weights[1:])
