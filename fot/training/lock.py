"""An exclusive lock on a training workdir, so two ``fot.train`` processes never write one run.

``WorkdirLock(workdir).acquire()`` takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``workdir/.lock`` and writes
the owner (pid, host, start time) into it. The kernel drops the lock when the owning process exits in
any way (SIGKILL included), so a stale lock file from a dead run never blocks a restart; a second live
process gets ``WorkdirBusyError`` naming the owner. Only local paths are locked (``gs://`` and other
object stores have no such lock; orbax's own multi-host coordination applies there). With several JAX
processes, process 0 alone takes the lock (the loop calls it only there).
"""
from __future__ import annotations

import json
import os
import socket
import time


class WorkdirBusyError(RuntimeError):
    """Another live process holds the workdir's lock."""


class WorkdirLock:
    """``acquire()`` / ``close()`` (idempotent); ``path`` = ``workdir/.lock``."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, ".lock")
        self._fd: int | None = None

    def acquire(self) -> "WorkdirLock":
        if "://" in self.path:
            return self
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            owner = _read_owner(fd)
            os.close(fd)
            raise WorkdirBusyError(
                f"workdir {os.path.dirname(self.path)} is in use by another fot.train process ({owner}); "
                "wait for it to finish, stop it, or use another --workdir") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def close(self) -> None:
        """Release the lock (the file stays; its content is only informative)."""
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _read_owner(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode() or "{}")
        return f"pid {info['pid']} on host {info['host']}, since {info['since']}"
    except (OSError, ValueError, KeyError):
        return "owner unknown"
