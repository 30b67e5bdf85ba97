"""The files of a Hugging Face LLaMA directory, read one tensor at a time.

* ``read_config(dir)``: config.json as a dict;
* ``TensorSource(dir)``: the weights of ``model.safetensors``, of the shards listed in
  ``model.safetensors.index.json``, or (legacy, only when no safetensors exist) of ``pytorch_model.bin`` /
  the shards of ``pytorch_model.bin.index.json`` through ``torch.load(weights_only=True, mmap=True)``.
  Every file is checked when the source opens (an index naming an absent file, a missing, truncated or
  corrupt shard: ValueError naming the file), before anything is converted. ``get(name)`` reads one
  tensor: safetensors headers are parsed with the ``safetensors`` library (which also validates them)
  and each tensor's bytes are read with a positioned read into a fresh numpy array, so the process
  holds one tensor of the checkpoint at a time (a memory map would keep every touched page resident);
* ``tokenizer_files(dir)`` / ``tokenizer_size(dir)``: the tokenizer files to carry into a run directory
  and the number of ids the tokenizer produces.
"""
from __future__ import annotations

import json
import os
import struct

import numpy as np

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
TORCH_BIN, TORCH_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def np_dtype(name: str) -> np.dtype:
    """numpy dtype for a dtype name (bfloat16 through ml_dtypes)."""
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def read_config(path: str) -> dict:
    """``path/config.json`` as a dict (ValueError naming the file when absent or not JSON)."""
    if not os.path.exists(path):
        raise ValueError(f"{path} does not exist")
    if not os.path.isdir(path):
        raise ValueError(f"{path} is not a directory")
    cpath = os.path.join(path, "config.json")
    if not os.path.isfile(cpath):
        raise ValueError(f"{cpath} not found (a Hugging Face model directory has a config.json)")
    try:
        with open(cpath) as f:
            conf = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{cpath} is not valid JSON: {e}") from None
    if not isinstance(conf, dict):
        raise ValueError(f"{cpath} must hold a JSON object")
    return conf


def _index_files(path: str, index_name: str) -> dict[str, str]:
    ipath = os.path.join(path, index_name)
    try:
        with open(ipath) as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{ipath} is not a valid index (JSON with a weight_map): {e}") from None
    for fname in sorted(set(weight_map.values())):
        if not os.path.isfile(os.path.join(path, fname)):
            raise ValueError(f"{index_name} names shard {fname}, which is missing from {path}")
    return dict(weight_map)


class _SafetensorsFile:
    """One safetensors file: name -> (dtype, shape, byte range), read with positioned reads."""

    def __init__(self, fpath: str):
        from safetensors import safe_open

        self.path = fpath
        try:  # the library validates the header (length, JSON, offsets covering the whole file)
            with safe_open(fpath, framework="numpy") as f:
                names = list(f.keys())
        except Exception as e:  # noqa: BLE001 - SafetensorError and OS errors
            raise ValueError(f"shard {os.path.basename(fpath)} in {os.path.dirname(fpath)} is truncated or not "
                             f"a safetensors file: {e}") from None
        with open(fpath, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        self.base = 8 + n
        self.entries = {k: header[k] for k in names}

    def shape(self, name):
        return tuple(self.entries[name]["shape"])

    def read(self, name) -> np.ndarray:
        e = self.entries[name]
        if e["dtype"] not in _ST_DTYPES:
            raise ValueError(f"tensor {name} in {os.path.basename(self.path)} has unsupported dtype {e['dtype']}")
        start, end = e["data_offsets"]
        out = np.empty(tuple(e["shape"]), np_dtype(_ST_DTYPES[e["dtype"]]))
        buf = memoryview(out.reshape(-1).view(np.uint8))
        with open(self.path, "rb") as f:
            f.seek(self.base + start)
            if f.readinto(buf) != end - start:
                raise ValueError(f"shard {os.path.basename(self.path)} ended inside tensor {name} (truncated)")
        return out


class _TorchBinFile:
    """Legacy pytorch_model*.bin: torch.load(weights_only=True, mmap=True) (no pickled code runs)."""

    def __init__(self, fpath: str):
        try:
            import torch
        except ImportError:
            raise ValueError(f"{fpath}: legacy PyTorch weights need torch installed (pip install torch), or "
                             "convert them to safetensors") from None
        self.path = fpath
        try:
            self.state = torch.load(fpath, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 - pickle/zip/weights_only errors
            raise ValueError(f"shard {os.path.basename(fpath)} in {os.path.dirname(fpath)} is truncated, corrupt "
                             f"or not loadable with torch.load(weights_only=True): {type(e).__name__}: {e}") from None
        if not isinstance(self.state, dict):
            raise ValueError(f"{fpath} does not hold a state dict (got {type(self.state).__name__})")
        self.entries = self.state

    def shape(self, name):
        return tuple(self.state[name].shape)

    def read(self, name) -> np.ndarray:
        import torch

        t = self.state[name].detach()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().copy().view(np_dtype("bfloat16"))
        return t.numpy().copy()


class TensorSource:
    """All tensors of an HF directory by name; ``get(name)`` reads one (see module docstring)."""

    def __init__(self, path: str):
        self.path = path
        has = lambda n: os.path.isfile(os.path.join(path, n))  # noqa: E731
        if has(SAFETENSORS_INDEX):
            weight_map, opener = _index_files(path, SAFETENSORS_INDEX), _SafetensorsFile
        elif has(SAFETENSORS):
            weight_map, opener = None, _SafetensorsFile
            files = [SAFETENSORS]
        elif has(TORCH_BIN_INDEX):
            weight_map, opener = _index_files(path, TORCH_BIN_INDEX), _TorchBinFile
        elif has(TORCH_BIN):
            weight_map, opener = None, _TorchBinFile
            files = [TORCH_BIN]
        else:
            raise ValueError(f"no weights in {path}: expected {SAFETENSORS}, {SAFETENSORS_INDEX}, {TORCH_BIN} or "
                             f"{TORCH_BIN_INDEX}")
        if weight_map is not None:
            files = sorted(set(weight_map.values()))
        self.files = {f: opener(os.path.join(path, f)) for f in files}
        self.location = {}
        for fname, fobj in self.files.items():
            for name in fobj.entries:
                if weight_map is not None and weight_map.get(name) not in (None, fname):
                    continue  # the index decides where a duplicated name is read from
                self.location[name] = fname
        if weight_map is not None:
            lost = sorted(n for n, f in weight_map.items() if n not in self.files[f].entries)
            if lost:
                raise ValueError(f"tensor {lost[0]} is listed in the index under {weight_map[lost[0]]}, which does "
                                 f"not contain it" + (f" (+{len(lost) - 1} more)" if len(lost) > 1 else ""))

    def names(self) -> set[str]:
        return set(self.location)

    def where(self, name: str) -> str:
        return self.location[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.files[self.location[name]].shape(name)

    def get(self, name: str) -> np.ndarray:
        return self.files[self.location[name]].read(name)

    def size_bytes(self) -> int:
        return int(sum(os.path.getsize(os.path.join(self.path, f)) for f in self.files))


def tokenizer_files(path: str) -> list[str]:
    """The tokenizer files (TOKENIZER_FILES) present in ``path``."""
    return [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(path, f))]


def tokenizer_size(path: str) -> int | None:
    """Number of token ids the tokenizer of ``path`` produces: the SentencePiece model's pieces
    (``tokenizer.model``), else the vocabulary plus added tokens of ``tokenizer.json``; None without
    either. Raises ValueError naming an unreadable file."""
    spm_path = os.path.join(path, "tokenizer.model")
    if os.path.isfile(spm_path):
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        try:
            sp.Load(spm_path)
        except Exception as e:  # noqa: BLE001 - sentencepiece raises OSError/RuntimeError
            raise ValueError(f"{spm_path} is not a SentencePiece model: {e}") from None
        return int(sp.get_piece_size())
    tj = os.path.join(path, "tokenizer.json")
    if os.path.isfile(tj):
        try:
            with open(tj) as f:
                tok = json.load(f)
            vocab = (tok.get("model") or {}).get("vocab") or {}
            ids = set(vocab.values()) if isinstance(vocab, dict) else set(range(len(vocab)))  # BPE / Unigram
        except (OSError, ValueError, AttributeError) as e:
            raise ValueError(f"{tj} is not a tokenizers JSON file: {e}") from None
        ids |= {int(t["id"]) for t in tok.get("added_tokens") or []}
        return max(ids) + 1 if ids else 0
    return None
