"""Dictionary-lookup generator: well-formed records, answers match definitions, k-packing, resume."""
import dataclasses

import numpy as np
import pytest

from fot.data.dictionary import KEY, PAD, QUERY, VALUE, DictionaryLookupIterator, DictionarySpec, generate_documents


def _parse_document(tokens, key_len, value_len):
    """Independent parser: walk the token stream, return (definitions dict, list of (key, value, pos))."""
    defs, queries, i = {}, [], 0
    n = len(tokens)
    while i < n:
        t = tokens[i]
        if t == PAD:
            i += 1
            continue
        assert t in (KEY, QUERY), f"record must start with <k> or <q>, got {t} at {i}"
        key = tuple(tokens[i + 1:i + 1 + key_len])
        assert tokens[i + 1 + key_len] == VALUE
        val = tuple(tokens[i + 2 + key_len:i + 2 + key_len + value_len])
        assert all(x >= 4 for x in key + val), "keys/values must be symbols (>= 4)"
        if t == KEY:
            assert key not in defs, "keys must be unique within a document"
            assert not queries, "definitions must precede queries"
            defs[key] = val
        else:
            queries.append((key, val, i + 2 + key_len))
        i += 2 + key_len + value_len
    return defs, queries


@pytest.mark.parametrize("key_len,value_len,seq_len,vocab", [(4, 4, 64, 64), (2, 3, 32, 20), (1, 1, 16, 40)])
def test_documents_well_formed_and_answers_match(key_len, value_len, seq_len, vocab):
    it = DictionaryLookupIterator(8, seq_len, pack=2, key_len=key_len, value_len=value_len, vocab_size=vocab, seed=3)
    b = next(it)
    B, L = b.inputs.shape
    assert (B, L) == (8, seq_len)
    assert b.inputs.dtype == np.int32 and b.targets.dtype == np.int32
    assert b.loss_mask.dtype == np.float32 and b.segment_ids.dtype == np.int32
    assert b.positions.dtype == np.int32
    np.testing.assert_array_equal(b.positions, np.broadcast_to(np.arange(L), (B, L)))
    assert b.inputs.max() < vocab
    for doc in range(B // 2):
        rows = slice(2 * doc, 2 * doc + 2)
        tokens = b.inputs[rows].reshape(-1)
        targets = b.targets[rows].reshape(-1)
        mask = b.loss_mask[rows].reshape(-1)
        # Targets are the next tokens of the document (also across the pack's window boundary).
        np.testing.assert_array_equal(targets[:-1], tokens[1:])
        # The definitions live in the first window, the queries in the second.
        assert QUERY not in tokens[:L] and KEY not in tokens[L:]
        defs, queries = _parse_document(list(tokens), key_len, value_len)
        assert len(defs) == (L // (key_len + value_len + 2)) and len(queries) >= 1
        expected_mask = np.zeros(2 * L, np.float32)
        for key, val, pos in queries:
            assert defs[key] == val, "query answer must equal the definition"
            expected_mask[pos - 1:pos - 1 + value_len] = 1.0  # predicting v_i from the token before it
            np.testing.assert_array_equal(targets[pos - 1:pos - 1 + value_len], val)
        np.testing.assert_array_equal(mask, expected_mask)
        # One document per k-pack: one segment id on its two rows, a new one for the next pack.
        ids = np.unique(b.segment_ids[rows])
        assert len(ids[ids > 0]) == 1 and not np.isin(ids[ids > 0], b.segment_ids[2 * doc + 2:]).any()
        # Padding has segment id 0, record tokens a positive id.
        np.testing.assert_array_equal(b.segment_ids[rows].reshape(-1) > 0, tokens != PAD)


def test_deterministic_per_seed_and_seeds_differ():
    a = DictionaryLookupIterator(4, 32, key_len=2, value_len=2, seed=7)
    b = DictionaryLookupIterator(4, 32, key_len=2, value_len=2, seed=7)
    c = DictionaryLookupIterator(4, 32, key_len=2, value_len=2, seed=8)
    for _ in range(3):
        x, y, z = next(a), next(b), next(c)
        for k in x._fields:
            np.testing.assert_array_equal(getattr(x, k), getattr(y, k))
        assert not np.array_equal(x.inputs, z.inputs)
    # Consecutive steps differ.
    assert not np.array_equal(a.batch_at(0).inputs, a.batch_at(1).inputs)


def test_get_state_set_state_resume():
    a = DictionaryLookupIterator(6, 32, key_len=3, value_len=2, seed=11)
    for _ in range(4):
        next(a)
    state = a.get_state()
    expected = [next(a) for _ in range(3)]
    b = DictionaryLookupIterator(6, 32, key_len=3, value_len=2, seed=11)
    b.set_state(state)
    for want in expected:
        got = next(b)
        for k in want._fields:
            np.testing.assert_array_equal(getattr(got, k), getattr(want, k))
    with pytest.raises(ValueError, match="seed"):
        DictionaryLookupIterator(6, 32, key_len=3, value_len=2, seed=12).set_state(state)


def test_queries_cover_distinct_keys_and_values_vary(rng):
    it = DictionaryLookupIterator(64, 64, key_len=4, value_len=4, seed=int(rng.integers(1 << 30)))
    b = next(it)
    q = b.inputs[1::2]
    assert len(np.unique(q[q >= 4])) > 40  # all 60 symbols are used
    # Queries in one document ask for distinct definitions when there are enough of them.
    tokens = np.concatenate([b.inputs[0], b.inputs[1]])
    _, queries = _parse_document(list(tokens), 4, 4)
    assert len({k for k, _, _ in queries}) == len(queries)


def test_bad_input():
    with pytest.raises(ValueError, match="batch_size=7 is not divisible by pack=2"):
        DictionaryLookupIterator(7, 32)
    with pytest.raises(ValueError, match="distinct keys"):
        DictionarySpec(key_len=1, value_len=1, vocab_size=8, doc_len=128)
    with pytest.raises(ValueError, match="query"):
        DictionaryLookupIterator(4, 8, key_len=4, value_len=4)


def test_cursor_of_the_pre_segmenter_iterator_resumes(rng):
    """A checkpoint cursor written before the dictionary task went through the segmenter ({"kind": "dictionary",
    "seed", "step"}) resumes at that step: the batches equal a fresh iterator's from that step on."""
    seed, step = int(rng.integers(1 << 30)), int(rng.integers(1, 20))
    ref = DictionaryLookupIterator(8, 16, pack=2, key_len=1, value_len=1, vocab_size=16, seed=seed)
    for _ in range(step):
        next(ref)
    it = DictionaryLookupIterator(8, 16, pack=2, key_len=1, value_len=1, vocab_size=16, seed=seed)
    it.set_state({"kind": "dictionary", "seed": seed, "step": step})
    for _ in range(3):
        want, got = next(ref), next(it)
        for k in want._fields:
            np.testing.assert_array_equal(getattr(got, k), getattr(want, k), err_msg=k)
    with pytest.raises(ValueError, match="seed"):
        it.set_state({"kind": "dictionary", "seed": seed + 1, "step": step})


def test_cursor_resumes_with_another_batch_size(rng):
    """Batches are a pure function of (seed, step): a cursor saved with another batch size resumes at its step
    (what ``fot.train --allow_config_change`` relies on), the batch of that step in the new geometry."""
    seed, step = int(rng.integers(1 << 30)), int(rng.integers(1, 20))
    a = DictionaryLookupIterator(8, 16, pack=2, key_len=1, value_len=1, vocab_size=16, seed=seed)
    for _ in range(step):
        next(a)
    ref = DictionaryLookupIterator(4, 16, pack=2, key_len=1, value_len=1, vocab_size=16, seed=seed)
    for _ in range(step):
        next(ref)
    b = DictionaryLookupIterator(4, 16, pack=2, key_len=1, value_len=1, vocab_size=16, seed=seed)
    b.set_state(a.get_state())
    want, got = next(ref), next(b)
    for k in want._fields:
        np.testing.assert_array_equal(getattr(got, k), getattr(want, k), err_msg=k)
    with pytest.raises(ValueError, match="not a dictionary"):
        b.set_state({"kind": "segmenter_shards"})


def test_key_symbols_share_one_alphabet_per_step_and_make_hard_negatives():
    """``key_symbols = A``: every key of one step's documents is spelled from one set of A symbols (another
    set next step), values from all symbols, answers still match; near-miss keys across the step's
    documents become as common as drawing from A symbols predicts (vs the full alphabet)."""
    K, A, B = 4, 12, 32
    it = DictionaryLookupIterator(B, 64, pack=2, key_len=K, value_len=4, vocab_size=64, key_symbols=A, seed=5)
    full = DictionaryLookupIterator(B, 64, pack=2, key_len=K, value_len=4, vocab_size=64, seed=5)
    alphabets, shares = [], {"hard": [], "full": []}
    for name, iterator in (("hard", it), ("full", full)):
        for _ in range(3):
            b = next(iterator)
            keys, vals = [], []
            for doc in range(B // 2):
                defs, queries = _parse_document(list(b.inputs[2 * doc:2 * doc + 2].reshape(-1)), K, 4)
                assert queries and all(defs[k] == v for k, v, _ in queries)
                keys += list(defs)
                vals += list(defs.values())
            symbols = {s for k in keys for s in k}
            if name == "hard":
                assert len(symbols) <= A
                alphabets.append(frozenset(symbols))
                assert len({s for v in vals for s in v}) > A  # values are not restricted
            k = np.array(keys)  # [n_keys, K]
            same = (k[:, None, :] == k[None, :, :]).sum(-1)[np.triu_indices(len(k), 1)]
            shares[name].append(np.mean(same == 1))  # fraction of key pairs sharing exactly one position
    assert len(set(alphabets)) == 3, "each step draws its own alphabet"
    expect = lambda s: K * (1 / s) * (1 - 1 / s) ** (K - 1)  # noqa: E731
    assert abs(np.mean(shares["hard"]) - expect(A)) < 0.05
    assert abs(np.mean(shares["full"]) - expect(60)) < 0.02
    with pytest.raises(ValueError, match="key_symbols"):
        DictionarySpec(key_len=4, vocab_size=64, key_symbols=61)
    with pytest.raises(ValueError, match="distinct keys"):
        DictionarySpec(key_len=1, vocab_size=64, doc_len=512, key_symbols=3)


def test_hard_keys_are_unique_across_the_whole_step():
    """With ``key_symbols`` one step's keys come from A**K ids only: no key may repeat in another document of
    the step with another value (a crossbatch negative identical to the query's key is a contradiction);
    plain keys stay unique per document; too few distinct keys for the step is refused."""
    spec = DictionarySpec(key_len=4, value_len=4, vocab_size=64, doc_len=128, query_len=64, key_symbols=6)
    for block in range(5):
        docs = generate_documents(np.random.default_rng([11, block]), 32, spec)
        keys = docs["keys"].reshape(-1, 4)  # [32 * n_def, K]
        assert len({tuple(k) for k in keys}) == len(keys)
        assert len(np.unique(keys)) <= 6
    plain = dataclasses.replace(spec, key_symbols=None)
    docs = generate_documents(np.random.default_rng(3), 32, plain)
    assert all(len({tuple(k) for k in doc}) == len(doc) for doc in docs["keys"])
    huge = DictionarySpec(key_len=22, value_len=4, vocab_size=64, doc_len=512, key_symbols=8)  # 8**22 > 2**62 ids
    keys = generate_documents(np.random.default_rng(4), 4, huge)["keys"]
    assert len(np.unique(keys)) <= 8 and keys.shape[-1] == 22
    tight = DictionarySpec(key_len=2, value_len=4, vocab_size=64, doc_len=128, query_len=64, key_symbols=4)
    with pytest.raises(ValueError, match=r"only 16 distinct keys for the 8 x \d+ definitions"):
        generate_documents(np.random.default_rng(0), 8, tight)


def test_key_symbols_from_step_starts_the_hard_keys_at_that_step_and_resumes():
    """Before ``key_symbols_from_step`` the batches equal the plain iterator's; from it on, one step's keys use
    at most ``key_symbols`` symbols; ``batch_at`` (the resume path) gives the same batches."""
    kw = dict(pack=2, key_len=4, value_len=4, vocab_size=64, seed=9)
    plain = DictionaryLookupIterator(16, 64, **kw)
    hard = DictionaryLookupIterator(16, 64, key_symbols=10, key_symbols_from_step=2, **kw)
    for step in range(4):
        a, b = next(plain), next(hard)
        keys = {k for doc in range(8) for k in _parse_document(list(b.inputs[2 * doc:2 * doc + 2].reshape(-1)),
                                                                4, 4)[0]}
        symbols = {s for k in keys for s in k}
        if step < 2:
            np.testing.assert_array_equal(a.inputs, b.inputs)
            assert len(symbols) > 10
        else:
            assert len(symbols) <= 10
        np.testing.assert_array_equal(hard.batch_at(step).inputs, b.inputs)
    with pytest.raises(ValueError, match="key_symbols_from_step"):
        DictionaryLookupIterator(16, 64, key_symbols=10, key_symbols_from_step=-1, **kw)
