"""Exact top-k selection over kept float32 scores as one XLA:CPU custom call (jax.ffi): the selection of
fot.ops.tournament's kept-scores path when the kernel is available.

The C++ source (fot/ops/csrc/topk_select.cc, against the XLA FFI headers of ``jax.ffi.include_dir()``) is
compiled with the system C++ compiler (``$CXX``, default ``g++``; -O3 -shared -fPIC) on first use into a cache
directory keyed by a hash of the source, the flags and the jax/jaxlib versions (``$FOT_FFI_CACHE``, default
``$XDG_CACHE_HOME/fot/ffi`` or ``~/.cache/fot/ffi``), loaded with ctypes and registered for the CPU platform.
No compiler, a failed compilation or ``FOT_TOPK_FFI=0`` in the environment: :func:`available` is False (one
log line when something failed) and the callers keep their XLA path.

Why: at 1024 queries x 4096 keys the tournament's 31 rounds of ~24 small XLA:CPU kernels cost more than the
score matmul itself; a per-row heap with a vectorised early reject reads the scores once (BUILD_NOTES issue 14,
"top-k at 4K with a CPU FFI kernel").
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
import tempfile
import threading

import jax
import jax.numpy as jnp
import jaxlib

SOURCE = pathlib.Path(__file__).resolve().parent / "csrc" / "topk_select.cc"
TARGET = "fot_topk_select"
FLAGS = ("-O3", "-shared", "-fPIC", "-std=c++17", "-w")
ENV_DISABLE = "FOT_TOPK_FFI"  # "0": never use the kernel (the XLA tournament everywhere)

_lock = threading.Lock()
_state: dict = {}  # "ok": bool once tried; "lib": the loaded library (kept alive)


def cache_dir() -> pathlib.Path:
    """Where compiled kernels live: $FOT_FFI_CACHE, else $XDG_CACHE_HOME/fot/ffi, else ~/.cache/fot/ffi."""
    if os.environ.get("FOT_FFI_CACHE"):
        return pathlib.Path(os.environ["FOT_FFI_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "fot" / "ffi"


def library_path(directory: pathlib.Path | None = None) -> pathlib.Path:
    """The shared library's path: a hash of the source, compiler, flags and jax/jaxlib versions names it."""
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(repr((os.environ.get("CXX", "g++"), FLAGS, jax.__version__, jaxlib.__version__)).encode())
    return (directory or cache_dir()) / f"topk_select-{h.hexdigest()[:16]}.so"


def _compile(out: pathlib.Path) -> None:
    """Compile SOURCE into `out` (a temporary file renamed into place: concurrent processes never load a
    half-written library)."""
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        raise RuntimeError(f"no C++ compiler ({os.environ.get('CXX', 'g++')!r} not on PATH)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        cmd = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build_and_register() -> ctypes.CDLL:
    path = library_path()
    if not path.exists():
        try:
            _compile(path)
        except OSError:  # cache directory not writable: a per-user temporary one
            path = library_path(pathlib.Path(tempfile.gettempdir()) / f"fot-ffi-{os.getuid()}")
            if not path.exists():
                _compile(path)
    lib = ctypes.cdll.LoadLibrary(str(path))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.FotTopkSelect), platform="cpu")
    return lib


def available() -> bool:
    """True when the kernel is built, loaded and registered (built on the first call; False, with one log line,
    when that fails, and always False with FOT_TOPK_FFI=0)."""
    if os.environ.get(ENV_DISABLE, "1") == "0":
        return False
    with _lock:
        if "ok" not in _state:
            try:
                _state["lib"] = _build_and_register()
                _state["ok"] = True
            except Exception as e:  # noqa: BLE001 - any failure means: keep the XLA path
                logging.getLogger(__name__).warning("fot top-k CPU kernel unavailable, using the XLA tournament: %s", e)
                _state["ok"] = False
        return _state["ok"]


def topk_select(scores, bias, k: int):
    """Top-k of scores + bias per row, best first, ties to the first position (the order of
    fot.ops.tournament.tournament_topk). scores float32 [N..., R, M]; bias float32 [N..., M] (0 valid, NEG
    masked: masked keys come after every valid one, with value score + NEG); k >= 1 (slots beyond M get -inf
    and index 0). Returns (vals float32, idx int32) [N..., R, k]. CPU only; call :func:`available` first."""
    if scores.dtype != jnp.float32 or bias.dtype != jnp.float32:
        raise TypeError(f"topk_select takes float32 scores and bias, got {scores.dtype} / {bias.dtype}")
    if bias.shape != scores.shape[:-2] + scores.shape[-1:]:
        raise ValueError(f"bias {bias.shape} must be scores {scores.shape} without the row axis")
    out = scores.shape[:-1] + (k,)
    call = jax.ffi.ffi_call(TARGET, (jax.ShapeDtypeStruct(out, jnp.float32), jax.ShapeDtypeStruct(out, jnp.int32)),
                            vmap_method="broadcast_all")
    return call(scores, bias)


def kept_topk(qh, keys, bias, k: int, block: int | None = None):
    """Top-k keys per query by <q, key> (+ bias), scored with XLA's matmul and selected by the kernel, in blocks
    of `block` queries per head so that a block's [B, Hk*block, M] scores are still in cache when the kernel reads
    them. qh [B,Hk,Q,D]; keys [B,M,Hk,D] in qh.dtype; bias float32 [B,M] (0 valid, NEG masked). Returns
    (vals float32, idx int32) [B,Hk,Q,k] as :func:`topk_select`."""
    b, hk, q, d = qh.shape
    m = keys.shape[1]

    def one(qb):  # [B,Hk,n,D] -> [B,Hk,n,k]
        s = jnp.einsum("bhqd,bchd->bhqc", qb, keys, preferred_element_type=jnp.float32)
        vals, idx = topk_select(s.reshape(b, hk * qb.shape[2], m), bias, k)
        return vals.reshape(b, hk, qb.shape[2], k), idx.reshape(b, hk, qb.shape[2], k)

    if block is None or block >= q or q % block:
        return one(qh)
    blocks = jnp.moveaxis(qh.reshape(b, hk, q // block, block, d), 2, 0)
    vals, idx = jax.lax.map(one, blocks)  # [nq, B, Hk, block, k]
    return tuple(jnp.moveaxis(x, 0, 2).reshape(b, hk, q, k) for x in (vals, idx))
