"""The paper's dictionary-lookup task (FoT App. "Dictionary lookup task") as a seeded generator.

A document is a run of definition records followed by query records::

    definitions:  <k> k_1 .. k_K <v> v_1 .. v_V      (keys unique within a document)
    queries:      <q> k_1 .. k_K <v> v_1 .. v_V      (keys drawn from the document's definitions)

The loss is taken only on the answer tokens v_1..v_V of the queries. The paper uses K = V = 4,
a vocabulary of 64 tokens and 512-token documents whose first half is definitions and second half
queries; with a local context of 256 tokens the answers are only reachable through memory.

Token ids: 0 = padding, 1 = ``<k>``, 2 = ``<v>``, 3 = ``<q>``, 4..vocab_size-1 = symbols.

``DictionaryLookupIterator`` is the segmenter (``fot.data.segmenter``) over generated documents: every
step holds ``batch_size // pack`` documents, each cut into ``pack`` consecutive windows of ``seq_len``
tokens in ``pack`` consecutive rows (k-packing), so with ``pack = 2`` the query window's previous row is
its own definitions window (the positive) and other packs are other documents (the negatives). Batches
are a pure function of ``(seed, step)``, so ``get_state``/``set_state`` give exact resume.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from fot.data.batch import Batch
from fot.data.documents import Document
from fot.data.segmenter import Segmenter

PAD, KEY, VALUE, QUERY = 0, 1, 2, 3
NUM_SPECIAL = 4


@dataclasses.dataclass(frozen=True)
class DictionarySpec:
    """Shape of the task.

    key_len / value_len: tokens per key / value (paper: 4 / 4).
    vocab_size: total vocabulary incl. the 4 special tokens (paper: 64).
    doc_len: tokens per document (paper: 512); query_len: the last ``query_len`` tokens are queries
      (paper: doc_len // 2, the default when None).
    num_definitions: definitions per document (default: as many as fit in ``doc_len - query_len``).
    key_symbols: if set, the keys of one ``generate_documents`` call (one training step's documents in
      ``DictionaryDocuments``) are spelled from one random subset of this many symbols (values still use
      all of them): near-miss keys sharing 1..K-1 tokens with a query become common among its crossbatch
      negatives (hard negatives; an option of this implementation, not the paper's). The keys of such a
      block are unique across all its documents (A**K must hold them all): with A = 8, per-document
      uniqueness alone left ~5% of queries an identical key with another value among their negatives,
      a contradiction no model can fit. None: all symbols (keys unique per document).
    """

    key_len: int = 4
    value_len: int = 4
    vocab_size: int = 64
    doc_len: int = 512
    query_len: int | None = None

    num_definitions: int | None = None
    key_symbols: int | None = None

    def __post_init__(self):
        if self.key_symbols is not None and not 2 <= self.key_symbols <= self.num_symbols:
            raise ValueError(f"key_symbols must be in [2, {self.num_symbols}] (the symbols of vocab_size="
                             f"{self.vocab_size}), got {self.key_symbols}")
        if self.key_len < 1 or self.value_len < 1:
            raise ValueError(f"key_len and value_len must be >= 1, got {self.key_len}, {self.value_len}")
        if self.vocab_size < NUM_SPECIAL + 2:
            raise ValueError(f"vocab_size must be >= {NUM_SPECIAL + 2}, got {self.vocab_size}")
        if self.key_alphabet ** self.key_len < self.max_definitions:
            raise ValueError(
                f"vocab_size={self.vocab_size}, key_symbols={self.key_symbols}, key_len={self.key_len}: only "
                f"{self.key_alphabet ** self.key_len} distinct keys for {self.max_definitions} definitions")
        if self.queries < 1:
            raise ValueError(f"query_len={self.resolved_query_len} holds no query record of "
                             f"{self.record_len} tokens")
        if self.definitions < 1:
            raise ValueError(f"doc_len={self.doc_len}, query_len={self.resolved_query_len}: no room for a "
                             f"definition record of {self.record_len} tokens")

    @property
    def num_symbols(self) -> int:
        return self.vocab_size - NUM_SPECIAL

    @property
    def key_alphabet(self) -> int:
        """Symbols the keys of one generated block are spelled from."""
        return self.num_symbols if self.key_symbols is None else self.key_symbols

    @property
    def record_len(self) -> int:
        return self.key_len + self.value_len + 2

    @property
    def resolved_query_len(self) -> int:
        return self.doc_len // 2 if self.query_len is None else self.query_len

    @property
    def max_definitions(self) -> int:
        return (self.doc_len - self.resolved_query_len) // self.record_len

    @property
    def definitions(self) -> int:
        n = self.max_definitions if self.num_definitions is None else self.num_definitions
        if not 1 <= n <= self.max_definitions:
            raise ValueError(f"num_definitions must be in [1, {self.max_definitions}] for doc_len="
                             f"{self.doc_len}, query_len={self.resolved_query_len}, got {n}")
        return n

    @property
    def queries(self) -> int:
        return self.resolved_query_len // self.record_len


def generate_documents(rng: np.random.Generator, num_docs: int, spec: DictionarySpec) -> dict[str, np.ndarray]:
    """Generate ``num_docs`` documents.

    Returns a dict of numpy arrays, each [num_docs, doc_len + 1] (one extra position so that the
    targets of the last token exist):
      ``tokens`` int32; ``answer`` bool (True on query answer tokens v_1..v_V);
      ``segment`` int32 (1 on record tokens, 0 on padding).
    Also ``keys`` int32 [num_docs, n_def, K], ``values`` int32 [num_docs, n_def, V] and
    ``query_index`` int32 [num_docs, n_q] (which definition each query asks for).
    """
    K, V, R = spec.key_len, spec.value_len, spec.record_len
    n_def, n_q = spec.definitions, spec.queries
    S = spec.num_symbols
    A = spec.key_alphabet
    # Unique keys per document (with key_symbols: per block): draw key ids without replacement from A**K,
    # then spell them in base A.
    total = A ** K
    if total > 2**62:  # astronomically many keys: rejection of duplicates is cheap.
        keys = rng.integers(0, A, size=(num_docs, n_def, K))
    else:
        if spec.key_symbols is None:
            key_ids = np.stack([rng.choice(total, size=n_def, replace=False) for _ in range(num_docs)])
        else:  # unique across the block: no negative repeats a query's key
            if total < num_docs * n_def:
                raise ValueError(f"key_symbols={A}, key_len={K}: only {total} distinct keys for the {num_docs} x "
                                 f"{n_def} definitions of one step's documents (they must all differ)")
            key_ids = rng.choice(total, size=num_docs * n_def, replace=False).reshape(num_docs, n_def)
        digits = A ** np.arange(K - 1, -1, -1, dtype=np.int64)
        keys = (key_ids[..., None] // digits) % A
    if spec.key_symbols is not None:  # one random alphabet of A symbols for the whole block
        keys = rng.permutation(S)[:A][keys]
    keys = keys.astype(np.int32) + NUM_SPECIAL
    values = rng.integers(0, S, size=(num_docs, n_def, V)).astype(np.int32) + NUM_SPECIAL
    if n_q <= n_def:
        qidx = np.argsort(rng.random((num_docs, n_def)), axis=1)[:, :n_q]
    else:
        qidx = rng.integers(0, n_def, size=(num_docs, n_q))
    qidx = qidx.astype(np.int32)

    def records(marker: int, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        n = k.shape[1]
        rec = np.empty((num_docs, n, R), np.int32)
        rec[:, :, 0] = marker
        rec[:, :, 1:K + 1] = k
        rec[:, :, K + 1] = VALUE
        rec[:, :, K + 2:] = v
        return rec.reshape(num_docs, n * R)

    def_part = records(KEY, keys, values)
    q_keys = np.take_along_axis(keys, qidx[..., None], axis=1)
    q_vals = np.take_along_axis(values, qidx[..., None], axis=1)
    q_part = records(QUERY, q_keys, q_vals)

    L = spec.doc_len
    q_start = L - spec.resolved_query_len
    tokens = np.zeros((num_docs, L + 1), np.int32)
    segment = np.zeros((num_docs, L + 1), np.int32)
    answer = np.zeros((num_docs, L + 1), bool)
    tokens[:, :def_part.shape[1]] = def_part
    segment[:, :def_part.shape[1]] = 1
    tokens[:, q_start:q_start + q_part.shape[1]] = q_part
    segment[:, q_start:q_start + q_part.shape[1]] = 1
    ans_pos = (np.arange(n_q)[:, None] * R + K + 2 + np.arange(V)[None, :]).reshape(-1) + q_start
    answer[:, ans_pos] = True
    return {"tokens": tokens, "answer": answer, "segment": segment, "keys": keys, "values": values,
            "query_index": qidx}


class DictionaryDocuments:
    """Document provider (``fot.data.documents``) of generated dictionary-lookup documents.

    Document ``n`` is document ``n % per_block`` of block ``n // per_block`` =
    ``generate_documents(default_rng([seed, block]), per_block, spec)``, so any document is re-made from
    its number (the ``ref``) and the stream is a pure function of ``seed``. Each document is
    ``doc_len + 1`` tokens; ``loss_weights`` = the answer mask, ``padding`` = the gap between the
    definitions and the queries (segment id 0 in the batch). ``spec.key_symbols`` applies to blocks
    ``>= key_symbols_from_block`` only (earlier blocks spell keys from all symbols).
    """

    def __init__(self, spec: DictionarySpec, seed: int, per_block: int, key_symbols_from_block: int = 0):
        self.spec, self.seed, self.per_block = spec, int(seed), int(per_block)
        self.key_symbols_from_block = int(key_symbols_from_block)
        self._next = 0
        self._block: tuple[int, dict[str, np.ndarray]] | None = None

    def _document(self, n: int) -> Document:
        block, i = divmod(int(n), self.per_block)
        if self._block is None or self._block[0] != block:
            rng = np.random.default_rng([self.seed, block])
            spec = self.spec
            if block < self.key_symbols_from_block:
                spec = dataclasses.replace(spec, key_symbols=None)
            self._block = (block, generate_documents(rng, self.per_block, spec))
        docs = self._block[1]
        return Document(docs["tokens"][i], int(n), docs["answer"][i].astype(np.float32), docs["segment"][i] == 0)

    def next_document(self) -> Document:
        self._next += 1
        return self._document(self._next - 1)

    def fetch(self, refs) -> list[Document]:
        return [self._document(int(r)) for r in refs]

    def get_state(self) -> dict[str, Any]:
        return {"kind": "dictionary_documents", "seed": self.seed, "next": self._next}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "dictionary_documents":
            raise ValueError(f"not a dictionary document state: {state!r}")
        if int(state["seed"]) != self.seed:
            raise ValueError(f"state was saved with seed={state['seed']}, this iterator has seed={self.seed}")
        self._next = int(state["next"])

    def metrics(self, state: dict[str, Any] | None = None) -> dict[str, float]:
        del state
        return {}


class DictionaryLookupIterator(Segmenter):
    """Infinite, deterministic iterator of dictionary-lookup ``Batch``es: the segmenter over
    ``DictionaryDocuments`` with boundary "pad", no BOS/EOS, one document per k-pack.

    Args:
      batch_size: rows per step (B); must be divisible by ``pack``.
      seq_len: window length L (the model's local context).
      pack: windows per document (k); each document has ``doc_len = pack * seq_len`` tokens.
      key_len, value_len, vocab_size, query_len, num_definitions, key_symbols: see ``DictionarySpec``
        (``key_symbols``: one alphabet per step's documents, i.e. hard crossbatch negatives).
      key_symbols_from_step: the first step whose documents use ``key_symbols`` (a curriculum: retrieval
        forms on ordinary keys first; with restricted alphabets from step 0 it forms much later).
      seed: batches are a pure function of (seed, step).
    """

    def __init__(self, batch_size: int, seq_len: int, *, pack: int = 2, key_len: int = 4,
                 value_len: int = 4, vocab_size: int = 64, query_len: int | None = None,
                 num_definitions: int | None = None, key_symbols: int | None = None,
                 key_symbols_from_step: int = 0, seed: int = 0):
        if pack < 1 or batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size, seq_len and pack must be >= 1, got {batch_size}, {seq_len}, {pack}")
        if batch_size % pack:
            raise ValueError(f"batch_size={batch_size} is not divisible by pack={pack}")
        if query_len is None:
            query_len = seq_len if pack > 1 else seq_len // 2
        self.spec = DictionarySpec(key_len=key_len, value_len=value_len, vocab_size=vocab_size,
                                   doc_len=pack * seq_len, query_len=query_len,
                                   num_definitions=num_definitions, key_symbols=key_symbols)
        self.seed = int(seed)
        if key_symbols_from_step < 0:
            raise ValueError(f"key_symbols_from_step must be >= 0, got {key_symbols_from_step}")
        docs = DictionaryDocuments(self.spec, self.seed, batch_size // pack, key_symbols_from_step)
        super().__init__(docs, batch_size, seq_len,
                         pack=pack, boundary="pad")

    @property
    def vocab_size(self) -> int:
        return self.spec.vocab_size

    def cursor_at(self, step: int, seed: int | None = None) -> dict[str, Any]:
        """The cursor before batch ``step`` (every document fills one k-pack: no lane holds a document)."""
        lanes = [{"ref": None, "offset": 0, "serial": int(step) - 1}] * self.num_lanes
        provider = {"kind": "dictionary_documents", "seed": self.seed if seed is None else int(seed),
                    "next": int(step) * self.num_lanes}
        return {"kind": "segmenter", "step": int(step), "finished": False, "geometry": self.geometry(),
                "lanes": lanes, "provider": provider}

    def batch_at(self, step: int) -> Batch:
        """The batch of step ``step`` (the iterator's position is unchanged)."""
        saved = self.get_state()
        self.set_state(self.cursor_at(step))
        try:
            return next(self)
        finally:
            self.set_state(saved)

    def set_state(self, state: dict[str, Any]) -> None:
        """Resumes at the cursor's step. Batches are a pure function of (seed, step), so a cursor saved with
        another batch size or window resumes too (``--allow_config_change``), as does the cursor
        ``{"kind": "dictionary", "seed", "step"}`` saved before this iterator became a segmenter."""
        if state.get("kind") == "dictionary":
            seed = state["seed"]
        elif state.get("kind") == "segmenter" and state.get("provider", {}).get("kind") == "dictionary_documents":
            seed = state["provider"]["seed"]
        else:
            raise ValueError(f"not a dictionary iterator state: {str(state)[:200]}")
        super().set_state(self.cursor_at(int(state["step"]), seed=int(seed)))

    def metrics(self, state: dict[str, Any] | None = None) -> dict[str, float]:
        """Generated documents: no reader counters (the loop logs none for this task)."""
        del state
        return {}
