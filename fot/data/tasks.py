"""seqio Task / Mixture registration — always inside functions, idempotent.

Every ``register_*`` function (re-)registers a ``seqio.Task`` under ``name`` and returns the
name: calling it again (tests, gin re-parsing) replaces the previous registration instead of
raising seqio's duplicate-name error. Tasks only *read and tokenise*: preprocessors are
``rekey`` (source text field → ``targets``) and ``tokenize`` (SentencePiece, no EOS); BOS/EOS,
windows and packing belong to ``fot.data.segmenter``. No feature converter is used.

Each task records a per-source minimum document length (text tokens); ``TaskDocuments`` skips
and counts shorter documents. Sources:

* ``register_files_task``: local / GCS files by glob — ``format`` "text" (one document per
  file), "lines" (one per line), "jsonl" (one JSON object per line, field ``text_key``),
  "tfrecord" (tf.train.Example with a bytes feature ``text_key``).
* ``register_tfds_task``: ``seqio.TfdsDataSource`` (e.g. ``pg19``, field ``book_text``), read
  from the user's TFDS data dir (local or GCS); nothing is downloaded.
* ``register_function_task``: ``seqio.FunctionDataSource`` (synthetic tasks);
  ``register_stdlib_task`` (the Python standard library corpus) and
  ``register_dictionary_task`` (the paper's dictionary lookup) are built on it.
"""
from __future__ import annotations

import functools
import json
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from fot.data.tf_env import import_seqio, import_tf

FORMATS = ("text", "lines", "jsonl", "tfrecord")
_MIN_LENGTH: dict[str, int] = {}
_READ_ERRORS: dict[str, list[str]] = {}


def registered_min_length(name: str) -> int:
    """The minimum document length (text tokens) registered with task ``name`` (0 if none)."""
    return _MIN_LENGTH.get(name, 0)


def _vocabulary(vocabulary: Any):
    if isinstance(vocabulary, str):
        from fot.data.vocab import load_vocabulary  # pylint: disable=g-import-not-at-top
        return load_vocabulary(vocabulary)
    if vocabulary is None:
        raise ValueError("vocabulary is required (a seqio.Vocabulary or a SentencePiece .model path)")
    return vocabulary


def _add_task(name: str, source, vocabulary, *, text_key: str | None, min_length: int,
              extra_features: Sequence[str] = ()) -> str:
    seqio, tf = import_seqio(), import_tf()
    if not isinstance(min_length, (int, np.integer)) or min_length < 0:
        raise ValueError(f"task {name!r}: min_length must be an int >= 0, got {min_length!r}")
    vocabulary = _vocabulary(vocabulary)
    features = {"targets": seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32)}
    for f in extra_features:
        features[f] = seqio.Feature(seqio.PassThroughVocabulary(1), add_eos=False, dtype=tf.float32,
                                    required=False)
    preprocessors = []
    if text_key is not None:  # text source: rekey + tokenize
        preprocessors = [functools.partial(seqio.preprocessors.rekey, key_map={"targets": text_key}),
                         functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False)]
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(name, source=source, output_features=features, preprocessors=preprocessors)
    _MIN_LENGTH[name] = int(min_length)
    return name


# ---------------------------------------------------------------------------- files
def _split_patterns(name: str, patterns: Any) -> dict[str, list[str]]:
    if isinstance(patterns, str):
        patterns = {"train": patterns}
    elif isinstance(patterns, (list, tuple)):
        patterns = {"train": list(patterns)}
    if not isinstance(patterns, Mapping) or not patterns:
        raise ValueError(f"task {name!r}: patterns must be a glob, a list of globs or a "
                         f"{{split: glob(s)}} dict, got {patterns!r}")
    return {split: [p] if isinstance(p, str) else list(p) for split, p in patterns.items()}


def _validate_file(name: str, path: str, fmt: str, text_key: str, tf) -> None:
    if tf.io.gfile.stat(path).length == 0:
        raise ValueError(f"task {name!r}: file {path} is empty")
    if fmt == "tfrecord":
        try:
            rec = next(iter(tf.data.TFRecordDataset(path).take(1)))
            ex = tf.io.parse_single_example(rec, {text_key: tf.io.FixedLenFeature([], tf.string)})
            ex[text_key].numpy().decode("utf-8")
        except Exception as e:  # noqa: BLE001 - any failure here means a bad file
            raise ValueError(f"task {name!r}: file {path} is not a TFRecord of tf.train.Example with "
                             f"a bytes feature {text_key!r}: {type(e).__name__}: {str(e)[:200]}") from None
        return
    with tf.io.gfile.GFile(path, "rb") as f:
        head = f.read(1 << 16)
    try:
        import codecs  # pylint: disable=g-import-not-at-top
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError as e:
        raise ValueError(f"task {name!r}: file {path} is not UTF-8 text ({e})") from None
    if fmt == "jsonl":
        line = head.split(b"\n", 1)[0]
        try:
            obj = json.loads(line)
            assert isinstance(obj, dict) and isinstance(obj[text_key], str)
        except Exception:  # noqa: BLE001
            raise ValueError(f"task {name!r}: first line of {path} is not a JSON object with a "
                             f"string field {text_key!r}: {line[:120]!r}") from None


def _reader(fmt: str, text_key: str, tf, errors: list[str]) -> Callable:
    if fmt == "text":
        return lambda path: tf.data.Dataset.from_tensors({text_key: tf.io.read_file(path)})
    if fmt == "lines":
        return lambda path: tf.data.TextLineDataset(path).map(lambda s: {text_key: s})

    def parse(line, number, path):
        """The text of one JSONL line. A bad line is recorded in ``errors`` (reported by the reader of the
        task as one line, file and line number included) and yields an empty document: an exception raised
        here would make TensorFlow log its traceback and abort its reader threads."""
        try:
            text = json.loads(line.numpy())[text_key]
            if not isinstance(text, str):
                raise TypeError(f"field {text_key!r} is a {type(text).__name__}")
            return text.encode("utf-8")
        except Exception as e:  # noqa: BLE001 - any failure means a bad line
            errors.append(f"{path.numpy().decode()} line {int(number.numpy()) + 1}: not a JSON object with a "
                          f"string field {text_key!r} ({type(e).__name__}: {e}); the line starts "
                          f"{line.numpy()[:80]!r}")
            return b""

    def jsonl(path):
        lines = tf.data.TextLineDataset(path).enumerate().filter(lambda i, s: tf.strings.length(s) > 0)
        return lines.map(lambda i, s: {text_key: tf.reshape(tf.py_function(parse, [s, i, path], tf.string), [])})
    return jsonl


def read_errors(name: str) -> list[str]:
    """Bad records met so far while reading task ``name`` (JSONL lines that are not a JSON object with the
    text field); ``fot.data.sources.TaskDocuments`` raises a DataError with the first one."""
    return _READ_ERRORS.get(name, [])


def tf_error_message(e: BaseException) -> str:
    """One line for an error TensorFlow raised while reading a task's data (the first line of its message)."""
    text = getattr(e, "message", None) or str(e)
    return " ".join(text.strip().splitlines()[:1])[:400]


def register_files_task(name: str, patterns: Any, *, vocabulary: Any, format: str = "text",  # noqa: A002
                        text_key: str = "text", min_length: int = 0, validate: bool = True) -> str:
    """Registers a Task reading local/GCS files.

    Args:
      name: task name. patterns: a glob, a list of globs, or ``{split: glob(s)}`` (a bare
        glob/list is the "train" split).
      vocabulary: ``seqio.Vocabulary`` or path to a SentencePiece model.
      format: "text" | "lines" | "jsonl" | "tfrecord" (see module docstring).
      text_key: JSON field / tf.Example feature holding the text.
      min_length: documents with fewer tokens are skipped (and counted) by the pipeline.
      validate: check now that every glob matches, no file is empty and the first bytes decode.
    Raises ValueError naming the pattern/file for empty globs, empty or undecodable files.
    """
    seqio, tf = import_seqio(), import_tf()
    if format not in FORMATS:
        raise ValueError(f"task {name!r}: format must be one of {FORMATS}, got {format!r}")
    splits = _split_patterns(name, patterns)
    for split, pats in splits.items():
        for p in pats:
            files = tf.io.gfile.glob(p)
            if not files:
                raise ValueError(f"task {name!r}: file pattern {p!r} (split {split!r}) matches no files")
            if validate:
                for path in sorted(files):
                    _validate_file(name, path, format, text_key, tf)
    if format == "tfrecord":
        source = seqio.TFExampleDataSource(
            splits, feature_description={text_key: tf.io.FixedLenFeature([], tf.string)})
    else:
        _READ_ERRORS[name] = []
        source = seqio.FileDataSource(_reader(format, text_key, tf, _READ_ERRORS[name]), splits)
    return _add_task(name, source, vocabulary, text_key=text_key, min_length=min_length)


# ---------------------------------------------------------------------------- TFDS
def register_tfds_task(name: str = "pg19", tfds_name: str = "pg19:0.1.1", *, vocabulary: Any,
                       text_key: str = "book_text", data_dir: str | None = None,
                       splits: Sequence[str] | Mapping[str, str] | None = None,
                       min_length: int = 0) -> str:
    """Registers a Task over a TFDS dataset the user already has (``data_dir``, local or GCS).

    pg19: ``tfds_name="pg19:0.1.1"``, ``text_key="book_text"``, splits train/validation/test.
    Nothing is downloaded; a missing dataset fails when first read, with TFDS's message.
    """
    seqio = import_seqio()
    source = seqio.TfdsDataSource(tfds_name=tfds_name, tfds_data_dir=data_dir, splits=splits)
    return _add_task(name, source, vocabulary, text_key=text_key, min_length=min_length)


# ---------------------------------------------------------------------------- functions
def register_function_task(name: str, dataset_fn: Callable, *, vocabulary: Any,
                           splits: Sequence[str] = ("train", "validation"), text_key: str | None = "text",
                           min_length: int = 0, loss_weights: bool = False) -> str:
    """Registers a Task over ``seqio.FunctionDataSource(dataset_fn)``.

    ``dataset_fn(split, shuffle_files, seed=None) -> tf.data.Dataset`` of dicts. With ``text_key``
    the field is tokenised; with ``text_key=None`` the dataset already holds int32 ``targets``
    (and float32 ``loss_weights`` when ``loss_weights=True``).
    """
    seqio = import_seqio()
    source = seqio.FunctionDataSource(dataset_fn, splits=splits)
    return _add_task(name, source, vocabulary, text_key=text_key, min_length=min_length,
                     extra_features=("loss_weights",) if loss_weights else ())


def register_stdlib_task(name: str = "stdlib", *, vocabulary: Any, root: str | None = None,
                         val_percent: int = 5, min_length: int = 0, echo_rate: float = 0.0) -> str:
    """Registers the Python standard library corpus (``fot.data.stdlib_corpus``) as a Task.

    Splits "train" / "validation" (deterministic by document name). Fields: ``id``, ``text``.
    ``echo_rate`` > 0: "train" documents get copies of earlier line runs (``fot.data.echo``; about
    this fraction of their characters, fixed per document and seed); "validation" is never changed.
    """
    from fot.data import stdlib_corpus  # pylint: disable=g-import-not-at-top
    from fot.data.echo import echo_lines  # pylint: disable=g-import-not-at-top
    echo_lines("", np.random.default_rng(0), echo_rate)  # fail early on a bad rate
    tf = import_tf()

    def dataset_fn(split, shuffle_files, seed=None):
        # Only document indices live in the tf.data graph (the texts are ~30 MB: as a graph
        # constant they would be serialised on every pipeline build); texts come via py_function.
        docs = stdlib_corpus.load_documents(split, root=root, val_percent=val_percent)
        order = np.arange(len(docs))
        if shuffle_files:
            order = np.random.default_rng(0 if seed is None else int(seed)).permutation(len(docs))

        def get(i):
            name, text = docs[int(i.numpy())]
            if echo_rate and split == "train":
                text = echo_lines(text, np.random.default_rng([0 if seed is None else int(seed), int(i.numpy())]),
                                  echo_rate)
            return name.encode(), text.encode("utf-8")

        def load(i):
            name, text = tf.py_function(get, [i], [tf.string, tf.string])
            return {"id": tf.reshape(name, []), "text": tf.reshape(text, [])}

        return tf.data.Dataset.from_tensor_slices(order.astype(np.int64)).map(load)

    stdlib_corpus.load_documents("train", root=root, val_percent=val_percent)  # fail early on bad root
    return register_function_task(name, dataset_fn, vocabulary=vocabulary, text_key="text",
                                  min_length=min_length)


def register_dictionary_task(name: str = "dictionary_lookup", *, docs_per_epoch: int = 4096,
                             seed: int = 0, **spec_kwargs) -> str:
    """The paper's dictionary lookup (``fot.data.dictionary``) as a pre-tokenised function Task.

    Each document is ``doc_len + 1`` tokens; ``loss_weights`` is 1 on the query answers only.
    Use it with ``add_bos=False, add_eos=False`` and ``seq_len * pack == doc_len``, boundary
    "pad", so every k-pack holds exactly one document (as ``DictionaryLookupIterator``).
    ``spec_kwargs`` go to ``DictionarySpec`` (key_len, value_len, vocab_size, doc_len, query_len).
    """
    from fot.data.dictionary import DictionarySpec, generate_documents  # pylint: disable=g-import-not-at-top
    seqio, tf = import_seqio(), import_tf()
    spec = DictionarySpec(**spec_kwargs)
    split_salt = {"train": 0, "validation": 1, "test": 2}

    def dataset_fn(split, shuffle_files, seed_=None):
        del shuffle_files
        rng = np.random.default_rng([seed, split_salt[split], 0 if seed_ is None else int(seed_)])
        docs = generate_documents(rng, docs_per_epoch, spec)
        return tf.data.Dataset.from_tensor_slices(
            {"targets": docs["tokens"].astype(np.int32), "loss_weights": docs["answer"].astype(np.float32)})

    def fn(split, shuffle_files, seed=None):  # seqio wants the exact arg names
        return dataset_fn(split, shuffle_files, seed)

    return register_function_task(name, fn, vocabulary=seqio.PassThroughVocabulary(spec.vocab_size),
                                  splits=tuple(split_salt), text_key=None, loss_weights=True)


# ---------------------------------------------------------------------------- mixtures
def register_mixture(name: str, tasks: Sequence[Any]) -> str:
    """Registers ``seqio.Mixture(name, [(task, rate), ...])`` (rates per document), idempotently.

    Elements may be ``(task_name, rate)`` pairs or ``[task_name, rate]`` lists (gin).
    """
    seqio = import_seqio()
    pairs = []
    for t in tasks:
        if not isinstance(t, (list, tuple)) or len(t) != 2:
            raise ValueError(f"mixture {name!r}: expected (task_name, rate) pairs, got {t!r}")
        task, rate = t
        task = task if isinstance(task, str) else task.name
        if task not in seqio.TaskRegistry.names():
            raise ValueError(f"mixture {name!r}: task {task!r} is not registered")
        if not float(rate) >= 0:
            raise ValueError(f"mixture {name!r}: rate of {task!r} must be >= 0, got {rate!r}")
        pairs.append((task, float(rate)))
    seqio.MixtureRegistry.remove(name)
    seqio.MixtureRegistry.add(name, pairs)
    return name
