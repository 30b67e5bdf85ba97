"""A long-document corpus present on every machine: the Python standard library sources.

Like the paper's GitHub data (files of one repository directory concatenated), a document is
one package directory: its own ``.py`` files (not sub-directories', which are documents of their
own) concatenated in sorted file-name order, each preceded by a ``# file: <relpath>`` line. The
two directories that are collections rather than packages — the stdlib root and its ``test``
directory — contribute one document per top-level module instead. ``site-packages`` and
``__pycache__`` are excluded. Text is decoded as UTF-8 (invalid bytes → U+FFFD).

The split is deterministic: a document (named by its relative path) is in "validation" when
``crc32(name) % 100 < val_percent``, else in "train". The corpus depends on the Python version
(``sysconfig`` stdlib path); pass ``root`` to pin another tree. Pure Python, no TensorFlow.
"""
from __future__ import annotations

import functools
import os
import sysconfig
import zlib

SPLITS = ("train", "validation")
_EXCLUDE_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_COLLECTIONS = ("", "test")  # relative dirs whose modules are documents each


def stdlib_root() -> str:
    """The running interpreter's standard library directory."""
    return sysconfig.get_paths()["stdlib"]


def _read(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


@functools.lru_cache(maxsize=4)
def document_files(root: str | None = None) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Sorted ``(name, (relative .py paths...))`` for every document of the corpus."""
    root = os.path.abspath(root or stdlib_root())
    if not os.path.isdir(root):
        raise ValueError(f"stdlib corpus root {root!r} is not a directory")
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDE_DIRS and not d.startswith("."))
        rel = os.path.relpath(dirpath, root)
        rel = "" if rel == "." else rel
        py = sorted(f for f in filenames if f.endswith(".py"))
        if not py:
            continue
        if rel in _COLLECTIONS:
            docs.extend((os.path.join(rel, f), (os.path.join(rel, f),)) for f in py)
        else:
            docs.append((rel, tuple(os.path.join(rel, f) for f in py)))
    if not docs:
        raise ValueError(f"stdlib corpus root {root!r} holds no .py files")
    return tuple(sorted(docs))


def split_of(name: str, val_percent: int = 5) -> str:
    """"validation" or "train" for a document name (deterministic)."""
    return "validation" if zlib.crc32(name.encode()) % 100 < val_percent else "train"


@functools.lru_cache(maxsize=8)
def load_documents(split: str = "train", root: str | None = None,
                   val_percent: int = 5) -> tuple[tuple[str, str], ...]:
    """``(name, text)`` of every document of ``split``, in sorted name order."""
    if split not in SPLITS:
        raise ValueError(f"stdlib corpus split must be one of {SPLITS}, got {split!r}")
    if not 0 <= val_percent <= 100:
        raise ValueError(f"val_percent must be in [0, 100], got {val_percent}")
    base = os.path.abspath(root or stdlib_root())
    out = []
    for name, files in document_files(root):
        if split_of(name, val_percent) != split:
            continue
        parts = [f"# file: {rel}\n{_read(os.path.join(base, rel))}" for rel in files]
        text = "\n".join(parts)
        if text.strip():
            out.append((name, text))
    if not out:
        raise ValueError(f"stdlib corpus at {base!r} has no documents in split {split!r}")
    return tuple(out)


def write_text_sample(path: str, max_bytes: int = 4 << 20, split: str = "train",
                      root: str | None = None) -> str:
    """Writes about ``max_bytes`` of the split's text to ``path``: an equal share from the start of
    every document (so the sample covers all packages), for vocabulary training."""
    docs = load_documents(split, root)
    share = max(1, max_bytes // len(docs))
    with open(path, "w", encoding="utf-8") as f:
        for _, text in docs:
            f.write(text[:share] + "\n")
    return path
