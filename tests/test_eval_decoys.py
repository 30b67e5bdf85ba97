"""Decoy records for the dictionary eval (fot.eval.decoys): planted keys share exactly the asked number of
positions with their query, queried records stay intact, and the near-miss counts match a simulation."""
import numpy as np
import pytest

from fot.eval.decoys import expected_near_misses, plant_decoys, record_starts
from fot.eval.dictionary import documents

W, K, V, VOC, N = 64, 4, 4, 64, 1024
R = K + V + 2


def _records(row, n):
    """(key, value) of every definition record of ``row`` and of its query window, parsed independently."""
    defs = [(tuple(row[s + 1:s + 1 + K]), tuple(row[s + K + 2:s + R])) for s in range(0, n, W)
            for s in range(s, s + (W // R) * R, R)]
    queries = [(tuple(row[n + q * R + 1:n + q * R + 1 + K]), tuple(row[n + q * R + K + 2:n + (q + 1) * R]))
               for q in range(W // R)]
    return defs, queries


@pytest.mark.parametrize("shared,count", [(3, 4), (2, 10), (0, 14)])
def test_decoys_share_exactly_the_asked_positions(shared, count):
    docs = documents(11, N, window=W, key_len=K, value_len=V, vocab_size=VOC, num_docs=3)
    planted = plant_decoys(docs["tokens"], N, window=W, key_len=K, value_len=V, vocab_size=VOC, shared=shared,
                           count=count, rng=np.random.default_rng(0))
    for b in range(3):
        before, queries = _records(docs["tokens"][b], N)
        after, queries_after = _records(planted[b], N)
        assert queries_after == queries
        changed = [i for i in range(len(before)) if before[i] != after[i]]
        assert len(changed) == count * len(queries)
        for key, value in queries:  # the queried record is intact and still the only exact key
            assert [v for k, v in after if k == key] == [value]
        per_query = [sum(1 for i in changed if sum(a == c for a, c in zip(after[i][0], key)) == shared)
                     for key, _ in queries]
        assert sum(per_query) >= count * len(queries)  # every decoy shares exactly `shared` with some query
        assert all(min(x) >= 4 for x, _ in after) and all(min(v) >= 4 for _, v in after)
    assert (planted[:, N:] == docs["tokens"][:, N:]).all()


def test_too_many_decoys_and_bad_shared_are_refused():
    docs = documents(1, 256, window=W, key_len=K, value_len=V, vocab_size=VOC, num_docs=1)
    with pytest.raises(ValueError, match="do not fit"):
        plant_decoys(docs["tokens"], 256, window=W, key_len=K, value_len=V, vocab_size=VOC, shared=1, count=10,
                     rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="shared"):
        plant_decoys(docs["tokens"], 256, window=W, key_len=K, value_len=V, vocab_size=VOC, shared=4, count=1,
                     rng=np.random.default_rng(0))


def test_expected_near_misses_match_a_simulation():
    rng = np.random.default_rng(3)
    M = 262144
    exp = expected_near_misses(M, window=W, key_len=K, value_len=V, vocab_size=VOC)
    records = len(record_starts(M, W, R))
    keys = rng.integers(0, VOC - 4, (records, K))
    q = rng.integers(0, VOC - 4, K)
    counts = np.bincount((keys == q).sum(1), minlength=K + 1)
    assert sum(exp.values()) == pytest.approx(records, rel=1e-3)
    for s in range(K - 1):  # enough records for a tight check at s = 0, 1, 2
        assert counts[s] == pytest.approx(exp[s], rel=0.1, abs=12)
