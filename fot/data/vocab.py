"""SentencePiece vocabularies: load (``seqio.SentencePieceVocabulary``), train, check sizes; plain
text tokenizers for prompts (:func:`make_tokenizer`: a SentencePiece model file, or the byte-level
fallback — UTF-8 bytes + 3: 0 = PAD, 1 = EOS, 2 = UNK, as seqio's ``ByteVocabulary``).

Trained models follow seqio's id convention: 0 = PAD, 1 = EOS, 2 = UNK, 3 = BOS; BPE with byte
fallback (LLaMA style, so any UTF-8 text — code with newlines and tabs included — round-trips),
identity normalisation and whitespace kept as is.

CLI::

    python -m fot.data.vocab --input='data/*.txt' --vocab_size=8000 --out=/tmp/myvocab
    # writes /tmp/myvocab.model and /tmp/myvocab.vocab
"""
from __future__ import annotations

import glob as globlib
import io
import json
import os
import sys
from typing import Any, Sequence

PAD_ID, EOS_ID, UNK_ID, BOS_ID = 0, 1, 2, 3
_MIN_BYTE_FALLBACK_VOCAB = 256 + 4 + 8


def load_vocabulary(path: str):
    """``seqio.SentencePieceVocabulary`` for a ``.model`` file (local or GCS); clear error if missing."""
    from fot.data.tf_env import import_seqio, import_tf  # pylint: disable=g-import-not-at-top
    tf, seqio = import_tf(), import_seqio()
    if not isinstance(path, str) or not path:
        raise ValueError(f"vocabulary path must be a non-empty string, got {path!r}")
    if not tf.io.gfile.exists(path):
        raise ValueError(f"SentencePiece model {path!r} does not exist (train one with "
                         "`python -m fot.data.vocab --input=GLOB --vocab_size=N --out=PREFIX`)")
    vocab = seqio.SentencePieceVocabulary(path)
    try:
        vocab.load_model()
    except Exception as e:  # noqa: BLE001 - sentencepiece raises bare RuntimeError/OSError
        raise ValueError(f"{path!r} is not a SentencePiece model: {type(e).__name__}: {e}") from None
    return vocab


def _expand_inputs(inputs: str | Sequence[str]) -> list[str]:
    patterns = [p for p in (inputs.split(",") if isinstance(inputs, str) else inputs) if p]
    if not patterns:
        raise ValueError("--input: no file pattern given")
    files = []
    for p in patterns:
        matched = sorted(globlib.glob(p))
        if not matched:
            raise ValueError(f"--input: pattern {p!r} matches no files")
        files.extend(matched)
    for f in files:
        if os.path.isdir(f):
            raise ValueError(f"--input: {f} is a directory, expected text files")
        if os.path.getsize(f) == 0:
            raise ValueError(f"--input: file {f} is empty")
        with open(f, "rb") as fh:
            head = fh.read(1 << 16)
        try:
            import codecs  # pylint: disable=g-import-not-at-top
            codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        except UnicodeDecodeError as e:
            raise ValueError(f"--input: file {f} is not UTF-8 text ({e})") from None
    return files


def train_vocabulary(inputs: str | Sequence[str], vocab_size: int, out_prefix: str, *,
                     model_type: str = "bpe", byte_fallback: bool = True,
                     character_coverage: float = 0.9995, input_sentence_size: int = 2_000_000,
                     num_threads: int = 1, max_sentence_length: int = 16384) -> str:
    """Trains a SentencePiece model on text files (globs) and returns ``out_prefix + ".model"``.

    Raises ValueError for empty globs, directories, empty or non-UTF-8 files, a bad vocab size.
    """
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    if not isinstance(vocab_size, int) or vocab_size < 8:
        raise ValueError(f"--vocab_size must be an int >= 8, got {vocab_size!r}")
    if byte_fallback and vocab_size < _MIN_BYTE_FALLBACK_VOCAB:
        raise ValueError(f"--vocab_size={vocab_size} is too small for byte fallback (256 byte pieces + "
                         f"specials): use >= {_MIN_BYTE_FALLBACK_VOCAB} or byte_fallback=False")
    files = _expand_inputs(inputs)
    out_dir = os.path.dirname(os.path.abspath(out_prefix))
    os.makedirs(out_dir, exist_ok=True)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            input=files, model_writer=model, vocab_size=vocab_size, model_type=model_type,
            pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=BOS_ID,
            byte_fallback=byte_fallback, character_coverage=character_coverage,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            split_digits=True, allow_whitespace_only_pieces=True,
            input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
            max_sentence_length=max_sentence_length, num_threads=num_threads,
            hard_vocab_limit=model_type != "unigram", minloglevel=2)
    except RuntimeError as e:
        raise ValueError(f"SentencePiece training on {files[:3]}{'...' if len(files) > 3 else ''} "
                         f"with vocab_size={vocab_size} failed: {e}") from None
    path = out_prefix + ".model"
    with open(path + ".tmp", "wb") as f:
        f.write(model.getvalue())
    os.replace(path + ".tmp", path)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    with open(out_prefix + ".vocab", "w", encoding="utf-8") as f:
        for i in range(sp.get_piece_size()):
            f.write(f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n")
    return path


def vocab_size_of(vocabulary: Any) -> int:
    """Vocabulary size of a seqio vocabulary, a SentencePiece path or an int."""
    if isinstance(vocabulary, int):
        return vocabulary
    if isinstance(vocabulary, str):
        vocabulary = load_vocabulary(vocabulary)
    return int(vocabulary.vocab_size)


def check_vocab_size(vocabulary: Any, model_vocab_size: int, *, allow_larger_model: bool = False) -> int:
    """Raises ValueError unless the tokenizer's vocabulary size equals the model's.

    ``allow_larger_model=True`` accepts a model vocabulary padded beyond the tokenizer's (ids stay
    in range); a tokenizer larger than the model is always an error. Returns the tokenizer size.
    """
    n = vocab_size_of(vocabulary)
    ok = n <= model_vocab_size if allow_larger_model else n == model_vocab_size
    if not ok:
        raise ValueError(f"tokenizer vocabulary size {n} != model vocab_size {model_vocab_size} "
                         f"(ModelConfig.vocab_size must {'be >=' if allow_larger_model else 'equal'} "
                         "the SentencePiece model's piece count)")
    return n


RUN_TOKENIZER = "tokenizer.model"


def run_vocabulary(workdir: str | None):
    """The vocabulary of a run directory: its ``tokenizer.model`` (``fot.convert.from_hf`` copies the imported
    checkpoint's SentencePiece model there). Gin: ``run_vocabulary.workdir = %INIT_FROM`` (the run of
    ``train.init_from``, set by ``fot.train``)."""
    if not workdir:
        raise ValueError("run_vocabulary needs a run directory: set train.init_from = 'W' (e.g. a run imported "
                         "with python -m fot.convert.from_hf)")
    path = os.path.join(workdir, RUN_TOKENIZER)
    if not os.path.isfile(path):
        raise ValueError(f"{path} not found: the run directory {workdir} has no SentencePiece tokenizer "
                         "(fot.convert.from_hf copies the source checkpoint's tokenizer.model)")
    return load_vocabulary(path)


def stdlib_vocabulary(vocab_size: int = 2048, cache_dir: str | None = None, sample_bytes: int = 4 << 20):
    """A SentencePiece vocabulary trained on the stdlib corpus's train split, cached on disk.

    Trained once per (Python version, vocab_size, sample) into ``cache_dir`` (default
    ``$FOT_CACHE`` or ``~/.cache/fot``); later calls load the cached model. Deterministic input.
    """
    import sysconfig  # pylint: disable=g-import-not-at-top
    from fot.data import stdlib_corpus  # pylint: disable=g-import-not-at-top
    cache_dir = cache_dir or os.environ.get("FOT_CACHE") or os.path.expanduser("~/.cache/fot")
    ver = sysconfig.get_python_version()
    prefix = os.path.join(cache_dir, f"stdlib_py{ver}_bpe{vocab_size}_{sample_bytes}")
    if not os.path.exists(prefix + ".model"):
        os.makedirs(cache_dir, exist_ok=True)
        sample = stdlib_corpus.write_text_sample(f"{prefix}.{os.getpid()}.txt", sample_bytes)
        try:
            train_vocabulary(sample, vocab_size, prefix)
        finally:
            os.remove(sample)
    return load_vocabulary(prefix + ".model")


class ByteTokenizer:
    """UTF-8 bytes shifted by 3 (0 = PAD, 1 = EOS, 2 = UNK); no BOS."""

    offset = 3
    vocab_size = 256 + 3
    bos_id = None

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(int(i) - self.offset for i in ids if int(i) >= self.offset).decode("utf-8", "replace")


class SentencePieceTokenizer:
    """A SentencePiece ``.model`` file."""

    def __init__(self, path: str):
        import sentencepiece as spm  # pylint: disable=g-import-not-at-top
        if not os.path.isfile(path):
            raise ValueError(f"SentencePiece model {path!r} does not exist")
        self.sp = spm.SentencePieceProcessor(model_file=path)
        self.vocab_size = int(self.sp.get_piece_size())
        bos = int(self.sp.bos_id())
        self.bos_id = bos if bos >= 0 else None

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def decode(self, ids) -> str:
        """Text of ``ids``; ids past the tokenizer (a model's padded vocabulary rows, which an untrained or
        sampling model can emit) have no text and are skipped."""
        return self.sp.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])


def make_tokenizer(spm_path: str | None, model_vocab_size: int, trained_vocab_size: int | None = None):
    """SentencePiece tokenizer if ``spm_path`` else the byte fallback. Its size must equal the model's
    vocab_size, or ``trained_vocab_size`` (the size of the vocabulary the run was trained with, which training
    allows to be smaller than a padded model vocabulary): a tokenizer of another size belongs to another
    model, its ids would mean other tokens."""
    tok = SentencePieceTokenizer(spm_path) if spm_path else ByteTokenizer()
    if tok.vocab_size not in (model_vocab_size, trained_vocab_size):
        raise ValueError(f"tokenizer {spm_path or '(byte-level fallback)'} has {tok.vocab_size} ids but the model's "
                         f"vocab_size is {model_vocab_size}"
                         + (f" (the run was trained with {trained_vocab_size})" if trained_vocab_size else "")
                         + ("" if spm_path else "; the run names no SentencePiece vocabulary: pass the one it was "
                            "trained with (passkey_eval.spm_path / --spm_path)"))
    return tok


def main(argv: Sequence[str] | None = None) -> int:
    from fot.runtime import EXIT_CONFIG, arg_parser, describe_os_error, os_error_code

    parser = arg_parser("fot.data.vocab", __doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="comma-separated globs of UTF-8 text files")
    parser.add_argument("--vocab_size", type=int, required=True)
    parser.add_argument("--out", required=True, help="output prefix (writes PREFIX.model, PREFIX.vocab)")
    parser.add_argument("--model_type", default="bpe", choices=["bpe", "unigram", "char", "word"])
    parser.add_argument("--no_byte_fallback", action="store_true")
    parser.add_argument("--character_coverage", type=float, default=0.9995)
    parser.add_argument("--input_sentence_size", type=int, default=2_000_000)
    parser.add_argument("--num_threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    try:
        path = train_vocabulary(args.input, args.vocab_size, args.out, model_type=args.model_type,
                                byte_fallback=not args.no_byte_fallback,
                                character_coverage=args.character_coverage,
                                input_sentence_size=args.input_sentence_size, num_threads=args.num_threads)
    except ValueError as e:
        print(f"fot.data.vocab: error: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    except OSError as e:  # disk full / unwritable --out (4), a missing --out directory's parent (2)
        print(f"fot.data.vocab: error: {describe_os_error(e)}", file=sys.stderr, flush=True)
        return os_error_code(e)
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    sp = spm.SentencePieceProcessor(model_file=path)
    print(json.dumps({"model": path, "vocab_size": sp.get_piece_size(), "bos_id": sp.bos_id(),
                      "eos_id": sp.eos_id(), "pad_id": sp.pad_id(), "unk_id": sp.unk_id()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
