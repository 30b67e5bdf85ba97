"""Segmenter: long documents → lane-stable, k-packed training rows with an exact-resume cursor.

Layout of one step (B rows of L tokens, pack k, ``B // k`` lanes)::

    lane j  →  rows j*k … j*k+k-1  =  the next k*L input positions of lane j's token stream

Each lane owns one document at a time ("pinned"); a step takes the lane's next ``k*L`` input
positions, so row ``j*k+i`` holds window ``i`` of the lane's chunk (consecutive windows of one
document sit in consecutive rows: the in-batch positives of FoT's crossbatch) and the next step's
rows ``j*k…`` continue right after row ``j*k+k-1``. When the lane's document ends it takes the next
document from the provider:

* ``boundary="continue"`` (LongLLaMA ``doc_aware``): the next document starts right after, in
  the same row; ``segment_ids`` change at the boundary so local attention can stay inside it.
* ``boundary="pad"``: the rest of the lane's chunk is padding (segment 0, loss 0) and the next
  document starts at the lane's next chunk, so a k-pack never mixes documents.

A document of text tokens ``t`` becomes ``s = [BOS]? + t + [EOS]?``; its ``len(s) - 1`` input
positions are ``s[p]`` with target ``s[p+1]`` (the last token only ever appears as a target),
so every non-padding position has a valid same-document target. Each step is one
``fot.data.batch.Batch`` (inputs, targets, loss_mask, segment_ids, positions; shapes there) with
segment ids ``1 + (serial * G + global_lane) mod (2**31 - 2)``: ``serial`` is the lane's document
counter and G the number of lanes over all hosts (unique in a global batch). A document's
``padding`` positions (filler inside it) get segment id 0 (their loss weight is the document's
``loss_weights``).

The cursor (``get_state``) is JSON: per lane the document reference, offset and serial, plus the
provider's state; ``set_state`` re-fetches the lanes' documents from the provider, so resuming
yields exactly the batches an uninterrupted run would have produced.
"""
from __future__ import annotations

import copy
from typing import Any

import numpy as np

from fot.data.batch import Batch, concatenate
from fot.data.documents import Document

BOUNDARIES = ("continue", "pad")
_SEG_MOD = 2**31 - 2


class Segmenter:
    """Iterator of ``Batch``es (numpy) over a document provider.

    Args:
      provider: a document provider (see ``fot.data.documents``).
      batch_size: rows per batch on this host (B); divisible by ``pack``.
      seq_len: window length L (> 1).
      pack: k, consecutive windows of one lane in consecutive rows.
      bos_id / eos_id: token ids added at the start / end of every document (None = not added).
      boundary: "continue" or "pad" (see module docstring).
      lane_offset: global index of this host's first lane (segment ids unique across hosts).
      num_global_lanes: lanes over all hosts (default: this host's lanes).
    """

    def __init__(self, provider, batch_size: int, seq_len: int, *, pack: int = 1,
                 bos_id: int | None = None, eos_id: int | None = None, boundary: str = "continue",
                 lane_offset: int = 0, num_global_lanes: int | None = None):
        for name, v in (("batch_size", batch_size), ("pack", pack)):
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not isinstance(seq_len, (int, np.integer)) or seq_len <= 1:
            raise ValueError(f"seq_len (window length) must be an int > 1, got {seq_len!r}")
        if batch_size % pack:
            raise ValueError(f"batch_size={batch_size} is not divisible by pack={pack}")
        if boundary not in BOUNDARIES:
            raise ValueError(f"boundary must be one of {BOUNDARIES}, got {boundary!r}")
        self.provider = provider
        self.batch_size, self.seq_len, self.pack = int(batch_size), int(seq_len), int(pack)
        self.num_lanes = self.batch_size // self.pack
        self.bos_id, self.eos_id, self.boundary = bos_id, eos_id, boundary
        self.lane_offset = int(lane_offset)
        self.num_global_lanes = int(num_global_lanes or self.num_lanes)
        if self.lane_offset + self.num_lanes > self.num_global_lanes:
            raise ValueError(f"lane_offset={lane_offset} + {self.num_lanes} lanes exceeds "
                             f"num_global_lanes={self.num_global_lanes}")
        self._docs: list[Document | None] = [None] * self.num_lanes   # with BOS/EOS added
        self._lanes = [{"ref": None, "offset": 0, "serial": -1} for _ in range(self.num_lanes)]
        self._step = 0
        self._finished = False

    # ----------------------------------------------------------------- documents in lanes
    def _wrap(self, doc: Document) -> Document:
        toks, w, pad = doc.tokens, doc.loss_weights, doc.padding
        pre = [] if self.bos_id is None else [self.bos_id]
        post = [] if self.eos_id is None else [self.eos_id]
        if pre or post:
            toks = np.concatenate([np.asarray(pre, np.int32), toks, np.asarray(post, np.int32)])
            if w is not None:
                w = np.concatenate([np.ones(len(pre), np.float32), w, np.ones(len(post), np.float32)])
            if pad is not None:
                pad = np.concatenate([np.zeros(len(pre), bool), pad, np.zeros(len(post), bool)])
        return Document(np.asarray(toks, np.int32), doc.ref, w, pad)

    def _exhausted(self, j: int) -> bool:
        d = self._docs[j]
        return d is None or self._lanes[j]["offset"] >= len(d.tokens) - 1

    def _take_next(self, j: int) -> bool:
        while True:
            doc = self.provider.next_document()
            if doc is None:
                return False
            doc = self._wrap(doc)
            if len(doc.tokens) < 2:  # nothing to predict (empty document without BOS/EOS)
                continue
            lane = self._lanes[j]
            self._docs[j] = doc
            lane.update(ref=doc.ref, offset=0, serial=lane["serial"] + 1)
            return True

    def _segment_id(self, j: int) -> int:
        serial = self._lanes[j]["serial"]
        return 1 + (serial * self.num_global_lanes + self.lane_offset + j) % _SEG_MOD

    # ----------------------------------------------------------------- iteration
    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        if self._finished:
            raise StopIteration
        W = self.pack * self.seq_len  # one lane's chunk: its k rows of L tokens, end to end
        inputs = np.zeros((self.num_lanes, W), np.int32)  # [lanes, k*L]: a lane's k rows end to end
        targets = np.zeros((self.num_lanes, W), np.int32)
        loss = np.zeros((self.num_lanes, W), np.float32)
        seg = np.zeros((self.num_lanes, W), np.int32)
        any_tokens = False
        for j in range(self.num_lanes):
            pos = 0
            while pos < W:
                if self._exhausted(j):
                    if self.boundary == "pad" and pos > 0:
                        break
                    if not self._take_next(j):
                        break
                take = self._copy_span(j, pos, W, inputs[j], targets[j], loss[j], seg[j])
                pos += take
                any_tokens = True
        if not any_tokens:
            self._finished = True
            raise StopIteration
        self._step += 1
        B, L = self.batch_size, self.seq_len
        return Batch(inputs=inputs.reshape(B, L), targets=targets.reshape(B, L), loss_mask=loss.reshape(B, L),
                     segment_ids=seg.reshape(B, L),
                     positions=np.broadcast_to(np.arange(L, dtype=np.int32), (B, L)).copy())

    def _copy_span(self, j: int, pos: int, width: int, inputs, targets, loss, seg) -> int:
        """Copies lane ``j``'s document from its offset into chunk positions ``pos…`` (at most up to
        ``width``) of the lane's 1-D chunk arrays; returns the number of positions filled."""
        doc, lane = self._docs[j], self._lanes[j]
        off = lane["offset"]
        take = min(len(doc.tokens) - 1 - off, width - pos)
        span, nxt = slice(pos, pos + take), slice(off + 1, off + 1 + take)
        inputs[span] = doc.tokens[off:off + take]
        targets[span] = doc.tokens[nxt]
        loss[span] = 1.0 if doc.loss_weights is None else doc.loss_weights[nxt]
        seg[span] = self._segment_id(j)
        if doc.padding is not None:
            seg[span] = np.where(doc.padding[off:off + take], 0, seg[span])
        lane["offset"] = off + take
        return take

    # ----------------------------------------------------------------- cursor
    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable cursor: lanes (ref, offset, serial), step and the provider's state."""
        lanes = []
        for j, lane in enumerate(self._lanes):
            held = not self._exhausted(j)
            lanes.append({"ref": copy.deepcopy(lane["ref"]) if held else None,
                          "offset": int(lane["offset"]) if held else 0, "serial": int(lane["serial"])})
        return {"kind": "segmenter", "step": self._step, "finished": self._finished,
                "geometry": self.geometry(), "lanes": lanes, "provider": self.provider.get_state()}

    def geometry(self) -> list:
        """``[batch_size, seq_len, pack, boundary, bos_id, eos_id]``: a cursor resumes only on the same."""
        return [self.batch_size, self.seq_len, self.pack, self.boundary, self.bos_id, self.eos_id]

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores a cursor from ``get_state`` (re-fetches the documents held by the lanes)."""
        if state.get("kind") != "segmenter":
            raise ValueError(f"not a segmenter state: {str(state)[:200]}")
        geometry = self.geometry()
        if list(state["geometry"]) != geometry:
            raise ValueError(f"state was saved with [batch_size, seq_len, pack, boundary, bos, eos]="
                             f"{state['geometry']}, this segmenter has {geometry}")
        if len(state["lanes"]) != self.num_lanes:
            raise ValueError(f"state has {len(state['lanes'])} lanes, this segmenter has {self.num_lanes}")
        self.provider.set_state(state["provider"])
        held = [j for j, lane in enumerate(state["lanes"]) if lane["ref"] is not None]
        docs = self.provider.fetch([state["lanes"][j]["ref"] for j in held]) if held else []
        self._docs = [None] * self.num_lanes
        for j, doc in zip(held, docs):
            self._docs[j] = self._wrap(doc)
        self._lanes = [{"ref": copy.deepcopy(lane["ref"]), "offset": int(lane["offset"]),
                        "serial": int(lane["serial"])} for lane in state["lanes"]]
        self._step = int(state["step"])
        self._finished = bool(state["finished"])

    def close(self) -> None:
        """Release the provider's readers (TF iterators), if it has any."""
        close = getattr(self.provider, "close", None)
        if callable(close):
            close()

    def metrics(self, state: dict[str, Any] | None = None) -> dict[str, float]:
        """Counters (documents, skipped short documents, tokens per source) from a cursor."""
        state = self.get_state() if state is None else state
        out = {"data/steps": float(state["step"])}
        out.update(self.provider.metrics(state["provider"]))
        return out


class SegmenterGroup:
    """Segmenters of several document shards side by side (batch contract).

    ``segmenters`` maps a shard index in ``[0, num_shards)`` to the Segmenter reading that document
    shard (its lanes' segment ids are global: ``lane_offset = index * lanes``). ``next()`` concatenates
    their batches in shard order; the group ends when any shard ends. The cursor maps each shard index
    to its segmenter's cursor, ``{"kind": "segmenter_shards", "num_shards": S, "shards": {"i": ...}}``;
    ``set_state`` takes the entries of this group's shards from a cursor holding at least those
    (e.g. the union of the cursors of all processes of an earlier run), so a run whose data is cut into
    S shards resumes exactly on any number of processes that divides S.
    """

    KIND = "segmenter_shards"

    def __init__(self, segmenters, num_shards: int):
        if not segmenters:
            raise ValueError("a SegmenterGroup needs at least one segmenter")
        self.segmenters = dict(sorted((int(i), s) for i, s in segmenters.items()))
        if any(not 0 <= i < num_shards for i in self.segmenters):
            raise ValueError(f"shard indices {list(self.segmenters)} not all in [0, {num_shards})")
        first = next(iter(self.segmenters.values()))
        if any((s.seq_len, s.pack) != (first.seq_len, first.pack) for s in self.segmenters.values()):
            raise ValueError("the segmenters of a group need one seq_len and pack")
        self.num_shards = int(num_shards)
        self.batch_size = sum(s.batch_size for s in self.segmenters.values())
        self.seq_len, self.pack = first.seq_len, first.pack

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        return concatenate([next(s) for s in self.segmenters.values()])

    def get_state(self) -> dict[str, Any]:
        return {"kind": self.KIND, "num_shards": self.num_shards,
                "shards": {str(i): s.get_state() for i, s in self.segmenters.items()}}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.KIND:
            raise ValueError(f"not a cursor of data shards (kind {state.get('kind')!r}); it was saved without "
                             f"data_shards")
        if int(state["num_shards"]) != self.num_shards:
            raise ValueError(f"the cursor cuts the data into {state['num_shards']} shards, this run into "
                             f"{self.num_shards}")
        missing = [i for i in self.segmenters if str(i) not in state["shards"]]
        if missing:
            raise ValueError(f"the cursor has no entry for data shards {missing}")
        for i, s in self.segmenters.items():
            s.set_state(state["shards"][str(i)])

    def metrics(self, state: dict[str, Any] | None = None) -> dict[str, float]:
        """The shards' counters added up (``data/steps`` is the group's step count)."""
        state = self.get_state() if state is None else state
        out: dict[str, float] = {}
        for i, s in self.segmenters.items():
            for k, v in s.metrics(state["shards"][str(i)]).items():
                out[k] = float(v) if k == "data/steps" else out.get(k, 0.0) + float(v)
        return out
