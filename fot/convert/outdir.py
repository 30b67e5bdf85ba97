"""Output directories written atomically (``fot.convert.to_hf`` and ``fot.convert.from_hf``).

``prepare_out`` refuses a non-empty directory unless ``overwrite``; ``atomic_dir`` yields a temporary
sibling directory to write into and, only when the block succeeds, renames it into place (replacing an
old directory); on any error the temporary directory is removed and nothing is half-written.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile


def prepare_out(out_dir: str, overwrite: bool, flag: str = "--out") -> str:
    """Absolute ``out_dir``, checked: absent or an empty directory (any directory with ``overwrite``).
    Creates its parent. ValueError naming ``flag`` otherwise."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise ValueError(f"{flag} {out_dir} exists and is not a directory")
        if os.listdir(out_dir) and not overwrite:
            raise ValueError(f"{flag} {out_dir} is not empty (pass --overwrite / overwrite=True to replace it)")
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    return out_dir


@contextlib.contextmanager
def atomic_dir(out_dir: str):
    """Yield a temporary sibling of ``out_dir``; on success rename it to ``out_dir`` (an existing
    ``out_dir`` is moved aside first and deleted after), with the permissions a plain mkdir would give."""
    parent, base = os.path.dirname(out_dir), os.path.basename(out_dir)
    tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        for name in os.listdir(tmp):  # mkdtemp / some writers create owner-only entries
            path = os.path.join(tmp, name)
            os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask)
        os.chmod(tmp, 0o777 & ~umask)
        old = None
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
            os.rename(out_dir, os.path.join(old, "d"))
        os.rename(tmp, out_dir)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
