"""Checkpoint failures as typed errors: I/O (an ``OSError`` with the errno; one line), damaged, mismatched."""
from __future__ import annotations

import errno


class CheckpointIOError(OSError):
    """Writing or reading a checkpoint failed for an I/O reason; ``errno`` is set, ``str()`` is one line."""

    def __init__(self, code: int, message: str):
        super().__init__(code, message)

    def __str__(self) -> str:
        return self.strerror


class CheckpointDamagedError(CheckpointIOError):
    """A checkpoint's files cannot be read (truncated or missing data / metadata)."""

    def __init__(self, message: str):
        super().__init__(errno.EIO, message)


class CheckpointMismatchError(ValueError):
    """A readable checkpoint does not fit the configured model / optimizer (a configuration error)."""


def first_line(e: BaseException, limit: int = 240) -> str:
    text = " ".join(str(e).split("\n")[0].split())
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"
