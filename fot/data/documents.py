"""Document providers: deterministic, resumable streams of tokenised documents (pure numpy).

A *provider* hands out documents one at a time and can re-fetch any document it handed out
earlier from a small JSON reference, so a segmenter cursor never has to store tokens:

    next_document() -> Document | None     # None: a finite stream is exhausted
    fetch(refs: list) -> list[Document]    # re-read documents by their ``ref``
    get_state() -> dict / set_state(dict)  # JSON-serialisable position (exact resume)
    metrics(state) -> dict[str, float]     # document / token / skip counters from a state

``ListDocuments`` serves in-memory token arrays (tests, pre-tokenised corpora),
``MixtureDocuments`` samples among providers with fixed rates (seqio ``Mixture`` semantics:
rates are per document) and ``fot.data.sources.TaskDocuments`` reads a seqio Task.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Protocol, Sequence

import numpy as np


class DataError(ValueError):
    """The input data cannot be read as documents (a bad line in a file, a changed source): one line naming
    the task, file and line where known. ``fot.train`` reports it with exit 2."""


@dataclasses.dataclass
class Document:
    """One tokenised document.

    tokens: int32 [n] text tokens (no BOS/EOS; the segmenter adds them as configured).
    ref: JSON-serialisable reference; ``provider.fetch([ref])`` returns this document again.
    loss_weights: optional float32 [n]; ``loss_weights[i]`` weighs the prediction of ``tokens[i]``
      (None = every token counts; used by synthetic tasks such as dictionary lookup).
    padding: optional bool [n]; True where ``tokens[i]`` is filler inside the document (the gap between
      the dictionary task's definitions and queries): segment id 0 there, so no query attends to it.
    """

    tokens: np.ndarray
    ref: Any
    loss_weights: np.ndarray | None = None
    padding: np.ndarray | None = None


class DocumentProvider(Protocol):
    def next_document(self) -> Document | None: ...
    def fetch(self, refs: Sequence[Any]) -> list[Document]: ...
    def get_state(self) -> dict: ...
    def set_state(self, state: dict) -> None: ...
    def metrics(self, state: dict | None = None) -> dict[str, float]: ...


def _check_min_length(min_length: int, name: str) -> int:
    if not isinstance(min_length, (int, np.integer)) or min_length < 0:
        raise ValueError(f"min_length of source {name!r} must be an int >= 0, got {min_length!r}")
    return int(min_length)


class ListDocuments:
    """Documents from an in-memory list of token arrays.

    Args:
      docs: sequence of int token arrays (or dicts with ``tokens`` and optional ``loss_weights``).
      shuffle: visit documents in a fresh seeded permutation each epoch.
      seed: permutation seed; epoch ``e`` uses ``default_rng([seed, e])``.
      num_epochs: None = repeat forever; otherwise stop after that many epochs.
      min_length: documents with fewer tokens are skipped and counted (``skipped_short``).
      name: used in metrics and error messages.
    """

    def __init__(self, docs: Sequence[Any], *, shuffle: bool = False, seed: int = 0,
                 num_epochs: int | None = None, min_length: int = 0, name: str = "list"):
        self.name = name
        self.min_length = _check_min_length(min_length, name)
        self._docs = []
        for i, d in enumerate(docs):
            toks, w = (d["tokens"], d.get("loss_weights")) if isinstance(d, dict) else (d, None)
            toks = np.asarray(toks)
            if toks.ndim != 1 or not np.issubdtype(toks.dtype, np.integer):
                raise ValueError(f"{name}: document {i} must be a 1-D int array, got "
                                 f"shape {toks.shape} dtype {toks.dtype}")
            self._docs.append((toks.astype(np.int32), None if w is None else np.asarray(w, np.float32)))
        if not self._docs:
            raise ValueError(f"{name}: no documents given")
        self.shuffle, self.seed, self.num_epochs = bool(shuffle), int(seed), num_epochs
        self._state = {"epoch": 0, "index": 0, "docs": 0, "skipped_short": 0, "tokens": 0}

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self._docs)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def _doc(self, epoch: int, index: int) -> Document:
        toks, w = self._docs[int(self._order(epoch)[index])]
        return Document(toks, [epoch, index], w)

    def next_document(self) -> Document | None:
        s = self._state
        skipped_run = 0
        while True:
            if s["index"] >= len(self._docs):
                s["epoch"] += 1
                s["index"] = 0
            if self.num_epochs is not None and s["epoch"] >= self.num_epochs:
                return None
            doc = self._doc(s["epoch"], s["index"])
            s["index"] += 1
            if len(doc.tokens) < max(self.min_length, 1):
                s["skipped_short"] += 1
                skipped_run += 1
                if skipped_run >= len(self._docs):
                    raise ValueError(f"{self.name}: no document has >= min_length={self.min_length} "
                                     "tokens")
                continue
            s["docs"] += 1
            s["tokens"] += len(doc.tokens)
            return doc

    def fetch(self, refs: Sequence[Any]) -> list[Document]:
        return [self._doc(int(e), int(i)) for e, i in refs]

    def get_state(self) -> dict:
        return dict(self._state)

    def set_state(self, state: dict) -> None:
        self._state = {k: int(state[k]) for k in ("epoch", "index", "docs", "skipped_short", "tokens")}

    def metrics(self, state: dict | None = None) -> dict[str, float]:
        s = self._state if state is None else state
        return {f"data/{self.name}/docs": s["docs"], f"data/{self.name}/skipped_short": s["skipped_short"],
                f"data/{self.name}/tokens": s["tokens"]}


class MixtureDocuments:
    """Draws each next document from one of several providers with fixed rates.

    Draw ``i`` uses the uniform number ``u_i`` from ``default_rng([seed, i // 4096])`` (block
    ``i // 4096``, entry ``i % 4096``), so the draw sequence is a pure function of
    ``(seed, i)`` and the state is just the draw counter plus the providers' states. A finite
    provider that runs out is dropped and the remaining rates are renormalised; the mixture
    ends when all are exhausted.

    Args:
      providers: the document providers (e.g. ``TaskDocuments``), each with a ``name``.
      rates: non-negative relative rates (per document), one per provider.
      seed: sampling seed.
    """

    _BLOCK = 4096

    def __init__(self, providers: Sequence[Any], rates: Sequence[float], *, seed: int = 0):
        if len(providers) == 0 or len(providers) != len(rates):
            raise ValueError(f"need one rate per provider, got {len(providers)} providers and "
                             f"{len(rates)} rates")
        rates = np.asarray(rates, np.float64)
        if np.any(~np.isfinite(rates)) or np.any(rates < 0) or rates.sum() <= 0:
            raise ValueError(f"mixture rates must be finite, >= 0 and not all 0, got {rates.tolist()}")
        self.providers = list(providers)
        self.rates = rates / rates.sum()
        self.seed = int(seed)
        self._draws = 0
        self._exhausted = [False] * len(self.providers)
        self._block_id, self._block = -1, None

    def _uniform(self, i: int) -> float:
        b = i // self._BLOCK
        if b != self._block_id:
            self._block = np.random.default_rng([self.seed, b]).random(self._BLOCK)
            self._block_id = b
        return float(self._block[i % self._BLOCK])

    def next_document(self) -> Document | None:
        while True:
            live = np.array([r if not ex else 0.0 for r, ex in zip(self.rates, self._exhausted)])
            if live.sum() <= 0:
                return None
            cdf = np.cumsum(live / live.sum())
            s = int(min(np.searchsorted(cdf, self._uniform(self._draws), side="right"), len(cdf) - 1))
            while live[s] == 0:  # rounding at the cdf's top end
                s -= 1
            self._draws += 1
            doc = self.providers[s].next_document()
            if doc is None:
                self._exhausted[s] = True
                continue
            return Document(doc.tokens, [s, doc.ref], doc.loss_weights)

    def fetch(self, refs: Sequence[Any]) -> list[Document]:
        out: list[Document | None] = [None] * len(refs)
        by_source: dict[int, list[int]] = {}
        for j, (s, _) in enumerate(refs):
            by_source.setdefault(int(s), []).append(j)
        for s, idx in by_source.items():
            docs = self.providers[s].fetch([refs[j][1] for j in idx])
            for j, d in zip(idx, docs):
                out[j] = Document(d.tokens, [s, d.ref], d.loss_weights)
        return out  # type: ignore[return-value]

    def close(self) -> None:
        for p in self.providers:
            close = getattr(p, "close", None)
            if callable(close):
                close()

    def get_state(self) -> dict:
        return {"draws": self._draws, "exhausted": list(self._exhausted),
                "sources": [p.get_state() for p in self.providers]}

    def set_state(self, state: dict) -> None:
        if len(state["sources"]) != len(self.providers):
            raise ValueError(f"state has {len(state['sources'])} sources, this mixture has "
                             f"{len(self.providers)}")
        self._draws = int(state["draws"])
        self._exhausted = [bool(x) for x in state["exhausted"]]
        for p, s in zip(self.providers, state["sources"]):
            p.set_state(s)

    def metrics(self, state: dict | None = None) -> dict[str, float]:
        state = self.get_state() if state is None else state
        out: dict[str, float] = {}
        for p, s in zip(self.providers, state["sources"]):
            out.update(p.metrics(s))
        return out
