"""Tokenizer files for an exported directory (``AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)``).

* :func:`spm_files`: a SentencePiece model → ``tokenizer.model`` + ``tokenizer_config.json`` (special
  tokens named by the model's own pieces for fot's ids 0 PAD / 1 EOS / 2 UNK / 3 BOS);
* :func:`id_table_files`: a synthetic task's id table → ``id_table.json`` + ``tokenizer_config.json``
  (:func:`dictionary_id_table` for the dictionary-lookup task);
* :func:`from_run`: whichever of the two the training run (its operative gin config) used;
* :func:`from_import`: for a run imported by ``fot.convert.from_hf`` (or fine-tuned from one through
  ``train.init_from``), the source checkpoint's own tokenizer files and special token ids, unchanged.

The first two come with ``tokenization_fot.py`` (``fot.convert.hf_remote``), the remote tokenizer class, and an
``auto_map`` to it. Each function returns ``{file name: bytes}`` for ``to_hf.export(tokenizer_files=)``.
"""
from __future__ import annotations

import json
import os
import re

from fot.convert import hf_remote

_AUTO_MAP = {"AutoTokenizer": ["tokenization_fot.FotTokenizer", None]}


def _files(vocab_name: str, vocab_bytes: bytes, config: dict) -> dict[str, bytes]:
    config = {"tokenizer_class": "FotTokenizer", "auto_map": _AUTO_MAP, "clean_up_tokenization_spaces": False,
              "model_max_length": 1 << 60, **config}
    with open(os.path.join(hf_remote.DIR, "tokenization_fot.py"), "rb") as f:
        code = f.read()
    return {vocab_name: vocab_bytes, "tokenizer_config.json": json.dumps(config, indent=2).encode(),
            "tokenization_fot.py": code}


def spm_files(model: bytes | str, *, add_bos: bool = True, vocab_size: int | None = None) -> dict[str, bytes]:
    """SentencePiece ``model`` (serialized bytes or a .model path). ``add_bos``: the tokenizer prepends BOS
    (fot's generation CLI and ``ADD_BOS`` LM runs do). ``vocab_size``: the model's, checked against the
    piece count (a larger model vocabulary is fine: padded ids are never produced)."""
    import sentencepiece as spm

    from fot.data.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID
    if isinstance(model, str):
        if not os.path.isfile(model):
            raise ValueError(f"SentencePiece model {model} does not exist")
        with open(model, "rb") as f:
            model = f.read()
    try:
        sp = spm.SentencePieceProcessor(model_proto=model)
    except Exception as e:  # noqa: BLE001 - sentencepiece raises bare RuntimeError
        raise ValueError(f"not a SentencePiece model: {type(e).__name__}: {e}") from None
    n = sp.get_piece_size()
    if vocab_size is not None and n > vocab_size:
        raise ValueError(f"SentencePiece model has {n} pieces > model vocab_size {vocab_size}")
    piece = lambda i: sp.id_to_piece(i) if 0 <= i < n else None  # noqa: E731
    specials = {"pad_token": piece(PAD_ID), "eos_token": piece(EOS_ID), "unk_token": piece(UNK_ID),
                "bos_token": piece(BOS_ID)}
    return _files("tokenizer.model", model, {**specials, "add_bos": bool(add_bos), "add_eos": False})


def id_table_files(tokens: list[str], *, pad_token: str | None = None) -> dict[str, bytes]:
    """Whitespace-separated token names, id = position in ``tokens`` (names unique, no whitespace)."""
    if len(set(tokens)) != len(tokens) or any(not t or t.split() != [t] for t in tokens):
        raise ValueError("id table tokens must be unique, non-empty and free of whitespace")
    table = json.dumps({"tokens": list(tokens)}).encode()
    return _files("id_table.json", table, {"pad_token": pad_token, "add_bos": False, "add_eos": False})


def dictionary_id_table(vocab_size: int) -> list[str]:
    """Names of the dictionary-lookup ids (``fot.data.dictionary``): ``<pad> <k> <v> <q>``, then ``s4``...``"""
    from fot.data.dictionary import NUM_SPECIAL
    return ["<pad>", "<k>", "<v>", "<q>"] + [f"s{i}" for i in range(NUM_SPECIAL, int(vocab_size))]


# config.json token ids that go with each vocabulary (generate() stops at eos_token_id).
SPM_TOKEN_IDS = {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 3}  # fot.data.vocab's convention
ID_TABLE_TOKEN_IDS = {"pad_token_id": 0, "eos_token_id": None, "bos_token_id": None}


def from_run(gin, model_vocab_size: int) -> tuple[dict[str, bytes] | None, dict | None, str]:
    """Tokenizer files of the run whose operative config ``gin`` holds (after ``fot.eval.restore.load_run``):
    the dictionary id table for ``DictionaryLookupIterator`` runs, the seqio task's SentencePiece
    vocabulary for ``make_iterator`` runs. Returns ``(files or None, config.json token ids or None,
    description)``."""
    from fot.eval.restore import _train_data_param
    try:
        ref = gin.query_parameter("fot.training.train.train_data")
        selector = getattr(ref, "selector", "")
    except ValueError:
        return None, None, "no training data in the run's config"
    if selector.endswith("DictionaryLookupIterator"):
        files = id_table_files(dictionary_id_table(model_vocab_size), pad_token="<pad>")
        return files, dict(ID_TABLE_TOKEN_IDS), "dictionary id table"
    task = _train_data_param(gin, "task")
    if not isinstance(task, str):
        return None, None, f"training data {selector!r} has no seqio task"
    from fot.data.tf_env import import_seqio
    vocab = import_seqio().get_mixture_or_task(task).output_features["targets"].vocabulary
    model = getattr(vocab, "sp_model", None)
    if model is None:
        return None, None, f"seqio task {task!r} has no SentencePiece vocabulary ({type(vocab).__name__})"
    add_bos = _train_data_param(gin, "add_bos")
    files = spm_files(model, add_bos=True if add_bos is None else bool(add_bos), vocab_size=model_vocab_size)
    return files, dict(SPM_TOKEN_IDS), f"SentencePiece vocabulary of seqio task {task!r}"


def import_source(workdir: str, max_hops: int = 16) -> tuple[str, dict] | None:
    """(run directory, its hf_source.json) of the imported run ``workdir`` descends from: ``workdir`` itself
    (written by fot.convert.from_hf) or the run its config.gin names in ``train.init_from``, followed back.
    None for runs trained from scratch."""
    seen = set()
    for _ in range(max_hops):
        workdir = os.path.abspath(workdir)
        if workdir in seen:
            return None
        seen.add(workdir)
        src = os.path.join(workdir, "hf_source.json")
        if os.path.isfile(src):
            with open(src) as f:
                return workdir, json.load(f)
        try:
            with open(os.path.join(workdir, "config.gin")) as f:
                text = re.sub(r"\\\n\s*", "", f.read())  # gin continues long values on the next line
        except OSError:
            return None
        m = re.search(r"^train\.init_from\s*=\s*['\"](.+?)['\"]\s*$", text, re.MULTILINE)
        if m is None:
            return None
        workdir = m.group(1)
    return None


def from_import(workdir: str) -> tuple[dict[str, bytes], dict | None, str] | None:
    """``(files, config.json token ids, description)`` of the Hugging Face checkpoint that ``workdir`` was
    imported from (see :func:`import_source`): its tokenizer files as they are and its bos/eos/pad ids; None
    for a run without an import in its lineage. ValueError naming a tokenizer file that has gone missing."""
    source = import_source(workdir)
    if source is None:
        return None
    src_dir, info = source
    files = {}
    for name in info.get("tokenizer_files", []):
        path = os.path.join(src_dir, name)
        if not os.path.isfile(path):
            raise ValueError(f"{path}, a tokenizer file of the imported run {src_dir}, is missing")
        with open(path, "rb") as f:
            files[name] = f.read()
    token_ids = {k: v for k, v in info.get("token_ids", {}).items() if v is not None} or None
    return files or None, token_ids, f"the tokenizer of the imported checkpoint {info.get('hf_dir', src_dir)}"
