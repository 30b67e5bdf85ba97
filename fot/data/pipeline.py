"""Per-host batch pipeline: seqio task/mixture → documents → segmenter → prefetching iterator.

``make_iterator(...)`` is what the training entry point calls: it reads this host's shard
(``seqio.ShardInfo(jax.process_index(), jax.process_count())`` by default), gives the host
``batch_size // process_count`` rows (its lanes have globally unique segment ids) and returns a
``PrefetchIterator`` that follows the batch contract (``get_state``/``set_state``, ``batch_size``,
``seq_len``, ``pack``). ``fot.parallel.multihost.make_global_batch`` turns a host batch into global
``jax.Array``s.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import queue
import threading
from typing import Any, Iterator, Mapping

import numpy as np

from fot.data.documents import MixtureDocuments
from fot.data.segmenter import Segmenter
from fot.data.tasks import (register_dictionary_task, register_files_task, register_function_task,  # noqa: F401
                            register_mixture, register_stdlib_task, register_tfds_task)
from fot.data.vocab import check_vocab_size, load_vocabulary, run_vocabulary, stdlib_vocabulary  # noqa: F401
from fot.keyword_api import keyword_api



class PrefetchIterator:
    """Runs an iterator with ``get_state``/``set_state`` in a background thread.

    Attributes: ``batch_size`` (global rows per step; ``local_batch_size`` rows come from this
    host), ``seq_len``, ``pack``, ``vocab_size`` (tokenizer size, or None).

    ``buffer_size`` batches (with the cursor *after* each) wait in a bounded queue.
    ``get_state()`` returns the cursor after the last batch handed to the caller — not after
    the prefetched ones — so a checkpoint taken after step n resumes at batch n+1.
    ``set_state`` stops the thread, drops the prefetched batches and restores the cursor; the
    thread restarts on the next ``next()``. Exceptions in the thread re-raise in ``next()``.
    ``buffer_size=0`` runs synchronously (no thread), with the same interface.
    """

    def __init__(self, iterator, buffer_size: int = 2, *, batch_size: int | None = None,
                 vocab_size: int | None = None):
        if buffer_size < 0:
            raise ValueError(f"buffer_size must be >= 0, got {buffer_size}")
        self._it = iterator
        self.buffer_size = int(buffer_size)
        self.local_batch_size, self.seq_len, self.pack = iterator.batch_size, iterator.seq_len, iterator.pack
        self.batch_size = int(batch_size or iterator.batch_size)
        self.vocab_size = vocab_size
        self._state = _json_copy(iterator.get_state())
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None
        self._done = False

    def _producer(self, q: queue.Queue, stop: threading.Event) -> None:
        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            while not stop.is_set():
                try:
                    batch = next(self._it)
                except StopIteration:
                    put(("end", None, None))
                    return
                if not put(("batch", batch, _json_copy(self._it.get_state()))):
                    return
        except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
            put(("error", e, None))

    def _start(self) -> None:
        self._queue = queue.Queue(maxsize=self.buffer_size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._producer, args=(self._queue, self._stop),
                                        name="fot-data-prefetch", daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._done:
            raise StopIteration
        if self.buffer_size == 0:
            try:
                batch = next(self._it)
            except StopIteration:
                self._done = True
                raise
            self._state = _json_copy(self._it.get_state())
            return batch
        if self._thread is None:
            self._start()
        kind, value, state = self._queue.get()
        if kind == "end":
            self._done = True
            self.close()
            raise StopIteration
        if kind == "error":
            self.close()
            raise value
        self._state = state
        return value

    def get_state(self) -> dict[str, Any]:
        return copy.deepcopy(self._state)

    def set_state(self, state: Mapping[str, Any]) -> None:
        self.close()
        state = _json_copy(dict(state))
        self._it.set_state(state)
        self._state = state
        self._done = False

    def metrics(self) -> dict[str, float]:
        """Document/token/skip counters as of the last consumed batch."""
        return self._it.metrics(self._state)

    def close(self) -> None:
        """Stops the background thread, drops prefetched batches and the source's open readers (the next
        ``next()`` reopens them at the current cursor)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self._thread = self._queue = self._stop = None
        release = getattr(self._it, "close", None)
        if callable(release):
            release()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _json_copy(x: Any) -> Any:
    """Deep copy through JSON (also proves the state is JSON-serialisable)."""
    return json.loads(json.dumps(x))


def host_shard(shard_info=None):
    """``seqio.ShardInfo`` of this host: given, else (jax.process_index(), jax.process_count())."""
    from fot.data.tf_env import import_seqio  # pylint: disable=g-import-not-at-top
    seqio = import_seqio()
    if shard_info is not None:
        if isinstance(shard_info, (tuple, list)):
            shard_info = seqio.ShardInfo(int(shard_info[0]), int(shard_info[1]))
        if not 0 <= shard_info.index < shard_info.num_shards:
            raise ValueError(f"shard_info index {shard_info.index} not in [0, {shard_info.num_shards})")
        return shard_info
    import jax  # pylint: disable=g-import-not-at-top
    return seqio.ShardInfo(jax.process_index(), jax.process_count())


def make_provider(task_or_mixture: str, *, split: str = "train", shard_info=None, seed: int = 0,
                  shuffle: bool = True, shuffle_buffer: int | None = 128, num_epochs: int | None = None,
                  min_lengths: Mapping[str, int] | None = None) -> MixtureDocuments:
    """Documents of a registered seqio Task or Mixture on one shard (mixture rates per document).

    ``min_lengths`` overrides the tasks' registered minimum document lengths by task name.
    Each task's stream gets its own seed derived from ``seed`` and its position in the mixture.
    """
    from fot.data.sources import TaskDocuments  # pylint: disable=g-import-not-at-top
    from fot.data.tf_env import import_seqio  # pylint: disable=g-import-not-at-top
    seqio = import_seqio()
    provider = seqio.get_mixture_or_task(task_or_mixture)
    if isinstance(provider, seqio.Mixture):
        tasks = provider.tasks
        rates = [provider.get_rate(t) for t in tasks]
    else:
        tasks, rates = [provider], [1.0]
    min_lengths = dict(min_lengths or {})
    unknown = set(min_lengths) - {t.name for t in tasks}
    if unknown:
        raise ValueError(f"min_lengths names tasks not in {task_or_mixture!r}: {sorted(unknown)}")
    sources = [TaskDocuments(t, split=split, shard_info=shard_info, seed=seed + 7919 * i, shuffle=shuffle,
                             shuffle_buffer=shuffle_buffer, num_epochs=num_epochs,
                             min_length=min_lengths.get(t.name))
               for i, t in enumerate(tasks)]
    return MixtureDocuments(sources, rates, seed=seed)


def _special_ids(task_or_mixture: str, add_bos: bool, add_eos: bool) -> tuple[int | None, int | None]:
    from fot.data.tf_env import import_seqio  # pylint: disable=g-import-not-at-top
    seqio = import_seqio()
    provider = seqio.get_mixture_or_task(task_or_mixture)
    vocab = provider.output_features["targets"].vocabulary
    ids = []
    for flag, what in ((add_bos, "bos_id"), (add_eos, "eos_id")):
        if not flag:
            ids.append(None)
            continue
        try:
            i = getattr(vocab, what)
        except NotImplementedError:
            i = None
        if i is None or i < 0:
            raise ValueError(f"add_{what[:3]}=True but the vocabulary of {task_or_mixture!r} has no "
                             f"{what} (set add_{what[:3]}=False)")
        ids.append(int(i))
    return ids[0], ids[1]


@dataclasses.dataclass(frozen=True)
class DocumentStream:
    """Which documents in which order (:func:`make_provider`'s settings): ``split``, ``seed``, ``shuffle``
    through ``shuffle_buffer`` documents, ``num_epochs`` (None = forever), ``min_lengths`` (per-task
    minimum document length overrides)."""

    split: str = "train"
    seed: int = 0
    shuffle: bool = True
    shuffle_buffer: int | None = 128
    num_epochs: int | None = None
    min_lengths: Mapping[str, int] | None = None

    def settings(self) -> dict[str, Any]:
        """The fields as :func:`make_provider` keyword arguments."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def build_iterator(task: str, *, batch_size: int, seq_len: int, pack: int = 1, stream: DocumentStream,
                   add_bos: bool = True, add_eos: bool = True, boundary: str = "continue", shard_info=None,
                   data_shards: int | None = None, prefetch: int = 2) -> PrefetchIterator:
    """The training/eval batch iterator for a registered seqio Task or Mixture (:func:`make_iterator`, the
    gin-bound ``make_iterator.*``, is this function with the fields of ``DocumentStream`` as keywords).

    Args:
      task: registered Task or Mixture name (e.g. the return value of a ``tasks.register_*``).
      batch_size: GLOBAL rows per step; this host gets ``batch_size // num_shards`` of them.
      seq_len: window length L. pack: k (consecutive windows of a document in k rows).
      split, seed, shuffle, shuffle_buffer, num_epochs: document stream (None epochs = forever).
      add_bos / add_eos: wrap each document with the vocabulary's BOS / EOS.
      boundary: "continue" (next document follows in the same row) or "pad" (see segmenter).
      min_lengths: per-task minimum document length overrides.
      shard_info: ``seqio.ShardInfo`` or ``(index, count)`` of this host; default from jax's process index.
      data_shards: None = the documents are cut into one shard per host (this host's lanes read its
        shard). S = cut into S shards with ``batch_size / S`` rows each; this host reads shards
        ``index * S / count ...`` (a ``SegmenterGroup``). The batches then depend on S only, so a run
        resumes exactly on any number of hosts that divides S (e.g. a v4-32 run continued on a v4-16).
      prefetch: batches prepared ahead in a background thread (0 = synchronous).

    Returns a ``PrefetchIterator``: ``batch_size`` is the global batch, each ``next()`` gives this
    host's ``local_batch_size`` rows; ``vocab_size`` is the task vocabulary's size.
    """
    shard = host_shard(shard_info)
    if data_shards is not None:
        return _sharded_iterator(task, shard, int(data_shards), batch_size=batch_size, seq_len=seq_len, pack=pack,
                                 add_bos=add_bos, add_eos=add_eos, boundary=boundary, prefetch=prefetch,
                                 **stream.settings())
    if batch_size % shard.num_shards:
        raise ValueError(f"batch_size={batch_size} is not divisible by the number of hosts "
                         f"{shard.num_shards}")
    local = batch_size // shard.num_shards
    if local % pack:
        raise ValueError(f"per-host batch {local} (batch_size={batch_size} / {shard.num_shards} hosts) "
                         f"is not divisible by pack={pack}")
    if not isinstance(seq_len, (int, np.integer)) or seq_len <= 1:
        raise ValueError(f"seq_len (window length) must be an int > 1, got {seq_len!r}")
    provider = make_provider(task, shard_info=shard, **stream.settings())
    bos, eos = _special_ids(task, add_bos, add_eos)
    lanes = local // pack
    seg = Segmenter(provider, local, seq_len, pack=pack, bos_id=bos, eos_id=eos, boundary=boundary,
                    lane_offset=shard.index * lanes, num_global_lanes=lanes * shard.num_shards)
    from fot.data.tf_env import import_seqio  # pylint: disable=g-import-not-at-top
    vocab = import_seqio().get_mixture_or_task(task).output_features["targets"].vocabulary
    return PrefetchIterator(seg, prefetch, batch_size=batch_size, vocab_size=int(vocab.vocab_size))


make_iterator = keyword_api(build_iterator, "make_iterator", stream=DocumentStream)


def _sharded_iterator(task: str, host, num_shards: int, *, batch_size: int, seq_len: int, pack: int,
                      add_bos: bool, add_eos: bool, boundary: str, prefetch: int, **stream) -> PrefetchIterator:
    """``make_iterator(data_shards=num_shards)``: this host's document shards side by side."""
    from fot.data.segmenter import SegmenterGroup  # pylint: disable=g-import-not-at-top
    from fot.data.tf_env import import_seqio  # pylint: disable=g-import-not-at-top
    seqio = import_seqio()
    if num_shards < 1 or num_shards % host.num_shards:
        raise ValueError(f"data_shards={num_shards} must be a positive multiple of the number of hosts "
                         f"{host.num_shards}")
    if batch_size % num_shards or (batch_size // num_shards) % pack:
        raise ValueError(f"batch_size={batch_size} must split into data_shards={num_shards} shards of whole "
                         f"k-packs (pack={pack})")
    if not isinstance(seq_len, (int, np.integer)) or seq_len <= 1:
        raise ValueError(f"seq_len (window length) must be an int > 1, got {seq_len!r}")
    shard_rows = batch_size // num_shards
    lanes, per_host = shard_rows // pack, num_shards // host.num_shards
    bos, eos = _special_ids(task, add_bos, add_eos)
    segmenters = {}
    for i in range(host.index * per_host, (host.index + 1) * per_host):
        provider = make_provider(task, shard_info=seqio.ShardInfo(i, num_shards), **stream)
        segmenters[i] = Segmenter(provider, shard_rows, seq_len, pack=pack, bos_id=bos, eos_id=eos, boundary=boundary,
                                  lane_offset=i * lanes, num_global_lanes=lanes * num_shards)
    vocab = seqio.get_mixture_or_task(task).output_features["targets"].vocabulary
    return PrefetchIterator(SegmenterGroup(segmenters, num_shards), prefetch, batch_size=batch_size,
                            vocab_size=int(vocab.vocab_size))
