"""seqio-backed document provider with a cheap, exact resume cursor.

``TaskDocuments`` streams the documents of one registered seqio Task (source + its preprocessors,
no feature converter, no truncation) for one host shard. Its position is ``(epoch, index)``:
``index`` counts raw source examples read in the epoch, so resuming is ``skip(index)`` on the
*raw* source — before tokenisation, which is the expensive part — and any earlier document is
re-read by its ``[epoch, index]`` reference the same way. Epoch ``e`` reads the source with
seed ``seed + 1009 * e`` (file shuffle + an optional raw-example shuffle buffer), so the whole
stream is a pure function of the seed. Preprocessors must be per-example and stateless (rekey,
tokenize, ...), which is what our tasks register.

Documents shorter than ``min_length`` tokens are skipped and counted (``skipped_short``).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from fot.data.documents import DataError, Document, _check_min_length
from fot.data.tf_env import import_seqio, import_tf

_EPOCH_SEED_STRIDE = 1009


class TaskDocuments:
    """Documents of one seqio Task on one host shard.

    Args:
      task: a registered Task name (or a ``seqio.Task``).
      split: source split.
      shard_info: ``seqio.ShardInfo(index, num_shards)`` of this host (None = everything).
      seed: stream seed. shuffle: shuffle files/examples each epoch (seeded).
      shuffle_buffer: raw-example shuffle buffer size (0/None = file-level shuffle only).
      num_epochs: None = repeat forever; else stop after that many epochs.
      min_length: skip documents with fewer text tokens (default: the task's registered value).
      feature: the token feature (``"targets"``); ``"loss_weights"`` is used when present.
    """

    def __init__(self, task: Any, *, split: str = "train", shard_info=None, seed: int = 0,
                 shuffle: bool = True, shuffle_buffer: int | None = 128, num_epochs: int | None = None,
                 min_length: int | None = None, feature: str = "targets"):
        seqio = import_seqio()
        self.task = seqio.get_mixture_or_task(task) if isinstance(task, str) else task
        if not isinstance(self.task, seqio.Task):
            raise ValueError(f"{task!r} is a Mixture; use fot.data.pipeline.make_provider for mixtures")
        self.name = self.task.name
        if split not in self.task.source.splits:
            raise ValueError(f"task {self.name!r} has no split {split!r}; splits: "
                             f"{list(self.task.source.splits)}")
        if feature not in self.task.output_features:
            raise ValueError(f"task {self.name!r} has no output feature {feature!r}; features: "
                             f"{list(self.task.output_features)}")
        if min_length is None:
            from fot.data.tasks import registered_min_length  # pylint: disable=g-import-not-at-top
            min_length = registered_min_length(self.name)
        self.min_length = _check_min_length(min_length, self.name)
        self.split, self.shard_info, self.seed = split, shard_info, int(seed)
        self.shuffle, self.shuffle_buffer, self.num_epochs = bool(shuffle), shuffle_buffer, num_epochs
        self.feature = feature
        self._state = {"epoch": 0, "index": 0, "docs": 0, "skipped_short": 0, "tokens": 0}
        self._it = None  # numpy iterator positioned at self._state

    # ------------------------------------------------------------------ tf.data plumbing
    def _epoch_seed(self, epoch: int) -> int:
        return (self.seed + _EPOCH_SEED_STRIDE * int(epoch)) % (2**31 - 1)

    def _raw(self, epoch: int):
        """Raw (untokenised) examples of this host's shard, in the epoch's deterministic order."""
        source, shard, seed = self.task.source, self.shard_info, self._epoch_seed(epoch)
        at_source = shard is None or source.supports_arbitrary_sharding or (
            len(source.list_shards(split=self.split)) >= shard.num_shards)
        if at_source:
            ds = source.get_dataset(split=self.split, shuffle=self.shuffle, seed=seed,
                                    shard_info=shard if shard is not None and shard.num_shards > 1 else None)
        else:
            ds = source.get_dataset(split=self.split, shuffle=self.shuffle, seed=seed)
            ds = ds.shard(shard.num_shards, shard.index)
        if self.shuffle and self.shuffle_buffer:
            ds = ds.shuffle(int(self.shuffle_buffer), seed=seed, reshuffle_each_iteration=False)
        return ds

    def _tokenize(self, ds, epoch: int):
        tf = import_tf()
        seed = self._epoch_seed(epoch)
        ds = self.task.preprocess_precache(ds, seed=seed)
        ds = self.task.preprocess_postcache(ds, sequence_length=None, seed=seed)
        keep = [k for k in (self.feature, "loss_weights") if k in ds.element_spec]
        if self.feature not in keep:
            raise ValueError(f"task {self.name!r}: preprocessing produced no {self.feature!r} feature "
                             f"(got {list(ds.element_spec)})")
        ds = ds.map(lambda ex: {k: ex[k] for k in keep}, num_parallel_calls=tf.data.AUTOTUNE)
        return ds.prefetch(tf.data.AUTOTUNE)

    def _document(self, ex: dict, ref: list) -> Document:
        toks = np.asarray(ex[self.feature], np.int32).reshape(-1)
        w = ex.get("loss_weights")
        return Document(toks, ref, None if w is None else np.asarray(w, np.float32).reshape(-1))

    def _open(self):
        s = self._state
        ds = self._raw(s["epoch"])
        if s["index"]:
            ds = ds.skip(s["index"])
        self._it = self._tokenize(ds, s["epoch"]).as_numpy_iterator()

    # ------------------------------------------------------------------ provider API
    def next_document(self) -> Document | None:
        s = self._state
        seen_in_epoch = 0
        while True:
            if self.num_epochs is not None and s["epoch"] >= self.num_epochs:
                return None
            if self._it is None:
                self._open()
            error = None
            try:
                ex = next(self._it)
            except import_tf().errors.OpError as e:
                error = self._data_error(e)
            except StopIteration:
                if _read_errors(self.name):
                    break  # the last line was a bad one: report it below
                if s["index"] == 0 or (seen_in_epoch and s["docs"] == 0):
                    what = "no documents" if s["index"] == 0 else \
                        f"no document with >= min_length={self.min_length} tokens"
                    raise ValueError(f"task {self.name!r} split {self.split!r} shard "
                                     f"{self.shard_info} yielded {what}") from None
                s["epoch"] += 1
                s["index"] = 0
                self._it = None
                continue
            if error is None and _read_errors(self.name):
                break
            if error is not None:
                # Raised outside the except clause, so it holds no reference to TF's error, its traceback or
                # the iterator: that iterator is dropped now, not during interpreter shutdown (where
                # destroying it while its reader threads wait for the GIL hung the process).
                self._it = None
                raise error
            ref = [s["epoch"], s["index"]]
            s["index"] += 1
            seen_in_epoch += 1
            doc = self._document(ex, ref)
            if len(doc.tokens) < max(self.min_length, 1):
                s["skipped_short"] += 1
                continue
            s["docs"] += 1
            s["tokens"] += int(len(doc.tokens))
            return doc
        self._it = None
        raise self._bad_line()

    def fetch(self, refs: Sequence[Any]) -> list[Document]:
        """Re-reads documents by ``[epoch, index]``: one pass per epoch, tokenising only those."""
        tf = import_tf()
        out: list[Document | None] = [None] * len(refs)
        by_epoch: dict[int, list[int]] = {}
        for j, (e, _) in enumerate(refs):
            by_epoch.setdefault(int(e), []).append(j)
        for epoch, js in by_epoch.items():
            wanted = sorted({int(refs[j][1]) for j in js})
            lo = wanted[0]
            want_t = tf.constant(wanted, tf.int64)
            ds = self._raw(epoch).skip(lo).enumerate(start=lo)
            ds = ds.filter(lambda i, ex: tf.reduce_any(tf.equal(i, want_t))).take(len(wanted))
            ds = ds.map(lambda i, ex: ex)
            got, error = {}, None
            try:
                for idx, ex in zip(wanted, self._tokenize(ds, epoch).as_numpy_iterator()):
                    got[idx] = ex
            except tf.errors.OpError as e:
                error = self._data_error(e)
            error = error or self._bad_line()
            if error is not None:
                raise error
            if len(got) != len(wanted):
                raise ValueError(f"task {self.name!r}: could not re-read documents {wanted} of epoch "
                                 f"{epoch} (source changed since the cursor was saved?)")
            for j in js:
                out[j] = self._document(got[int(refs[j][1])], [epoch, int(refs[j][1])])
        return out  # type: ignore[return-value]

    def _bad_line(self) -> DataError | None:
        """The first bad JSONL line met while reading this task (``fot.data.tasks.read_errors``), if any."""
        bad = _read_errors(self.name)
        return DataError(f"task {self.name!r} split {self.split!r}: bad JSONL line: {bad[0]}") if bad else None

    def _data_error(self, e) -> DataError:  # pylint: disable=missing-function-docstring
        from fot.data.tasks import tf_error_message  # pylint: disable=g-import-not-at-top
        return DataError(f"task {self.name!r} split {self.split!r}: {tf_error_message(e)}")

    def close(self) -> None:
        """Drop the TF iterator (stops its background reads)."""
        self._it = None

    def get_state(self) -> dict:
        return dict(self._state)

    def set_state(self, state: dict) -> None:
        self._state = {k: int(state[k]) for k in ("epoch", "index", "docs", "skipped_short", "tokens")}
        self._it = None

    def metrics(self, state: dict | None = None) -> dict[str, float]:
        s = self._state if state is None else state
        return {f"data/{self.name}/docs": s["docs"], f"data/{self.name}/skipped_short": s["skipped_short"],
                f"data/{self.name}/tokens": s["tokens"]}


def _read_errors(name: str) -> list[str]:
    from fot.data.tasks import read_errors  # pylint: disable=g-import-not-at-top
    return read_errors(name)
