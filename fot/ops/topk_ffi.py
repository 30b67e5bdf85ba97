"""Exact top-k selection over kept float32 scores as one XLA:CPU custom call (jax.ffi): the selection of
fot.ops.tournament's kept-scores path when the kernel is available.

The C++ source (fot/ops/csrc/topk_select.cc, against the XLA FFI headers of ``jax.ffi.include_dir()``) is
compiled with the system C++ compiler (``$CXX``, default ``g++``; -O3 -shared -fPIC) on first use into a cache
directory keyed by a hash of the source, the flags and the jax/jaxlib versions (``$FOT_FFI_CACHE``, default
``$XDG_CACHE_HOME/fot/ffi`` or ``~/.cache/fot/ffi``), loaded with ctypes and registered for the CPU platform.
No compiler, a failed compilation or ``FOT_TOPK_FFI=0`` in the environment: :func:`available` is False (one
log line when something failed) and the callers keep their XLA path.

Why: at 1024 queries x 4096 keys the tournament's 31 rounds of ~24 small XLA:CPU kernels cost more than the
score matmul itself; the kernel scores a few queries at a time against all keys (fused multiply-adds, AVX2 where
the CPU has it) and selects each row's top-k while its scores are in cache: group maxima, the k-th largest of
them as a threshold, a sort of the few values above it (BUILD_NOTES issue 14, "top-k at 4K with a CPU FFI
kernel").
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
TARGET = "fot_topk_select"  # selection of given scores
SCORE_TARGET = "fot_topk_score_select"  # scores computed in the kernel
PANEL = 16  # keys per packed panel of SCORE_TARGET
FLAGS = ("-O3", "-shared", "-fPIC", "-std=c++17", "-w", "-Wno-psabi")
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
        os.chmod(tmp, 0o755)  # mkstemp's 0600 would keep other users of a shared cache out
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
    jax.ffi.register_ffi_target(SCORE_TARGET, jax.ffi.pycapsule(lib.FotTopkScoreSelect), platform="cpu")
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


def _call(target, out_shape, *args, vmap_method="broadcast_all"):
    out = (jax.ShapeDtypeStruct(out_shape, jnp.float32), jax.ShapeDtypeStruct(out_shape, jnp.int32))
    return jax.ffi.ffi_call(target, out, vmap_method=vmap_method)(*args)


def topk_select(scores, bias, k: int):
    """Top-k of scores + bias per row, best first, ties to the first position (the order of
    fot.ops.tournament.tournament_topk). scores float32 [N..., R, M]; bias float32 [N..., M] (0 valid, NEG
    masked: masked keys come after every valid one, with value score + NEG); k >= 1 (slots beyond M get -inf
    and index 0). Returns (vals float32, idx int32) [N..., R, k]. CPU only; call :func:`available` first."""
    if scores.dtype != jnp.float32 or bias.dtype != jnp.float32:
        raise TypeError(f"topk_select takes float32 scores and bias, got {scores.dtype} / {bias.dtype}")
    if bias.shape != scores.shape[:-2] + scores.shape[-1:]:
        raise ValueError(f"bias {bias.shape} must be scores {scores.shape} without the row axis")
    return _call(TARGET, scores.shape[:-1] + (k,), scores, bias)


def score_select(qh, keys, bias, k: int):
    """:func:`topk_select` of the scores <q, key> computed inside the kernel, a few query rows at a time, so they
    never leave the cache (at 1024 queries x 4096 keys the [Q, M] scores are 16 MiB: written by XLA's matmul and
    read back by the selection they cost more than the selection itself). qh float32 [B,H,Q,D]; keys float32
    [B,M,H,D] with M a multiple of 16 (repacked here to [B,H,M/16,D,16]: one copy of the keys); bias float32
    [B,M]. Returns (vals float32, idx int32) [B,H,Q,k]; vals are float32 fused multiply-adds over D in order."""
    b, h, q, d = qh.shape
    m = keys.shape[1]
    if qh.dtype != jnp.float32 or keys.dtype != jnp.float32 or m % PANEL:
        raise ValueError(f"score_select takes float32 q and keys with M % {PANEL} == 0, got {qh.dtype} "
                         f"{keys.dtype} M = {m}")
    packed = keys.reshape(b, m // PANEL, PANEL, h, d).transpose(0, 3, 1, 4, 2)  # [B, H, M/16, D, 16]
    return _call(SCORE_TARGET, (b, h, q, k), qh, packed, bias.astype(jnp.float32), vmap_method="sequential")


def kept_topk(qh, keys, bias, k: int):
    """Top-k keys per query by <q, key> + bias through the kernel: :func:`score_select` for float32 queries and
    keys with M % 16 == 0, else XLA's matmul of all [B, H*Q, M] scores then :func:`topk_select`. qh [B,Hk,Q,D];
    keys [B,M,Hk,D] in qh.dtype; bias float32 [B,M] (0 valid, NEG masked). Returns (vals float32, idx int32)
    [B,Hk,Q,k]."""
    b, hk, q, _ = qh.shape
    m = keys.shape[1]
    if qh.dtype == jnp.float32 and keys.dtype == jnp.float32 and m % PANEL == 0:
        return score_select(qh, keys, bias, k)
    s = jnp.einsum("bhqd,bchd->bhqc", qh, keys, preferred_element_type=jnp.float32)
    vals, idx = topk_select(s.reshape(b, hk * q, m), bias, k)
    return vals.reshape(b, hk, q, k), idx.reshape(b, hk, q, k)
