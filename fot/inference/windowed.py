"""Windowed inference with an external memory (FoT / LongLLaMA style).

A long input ``[B, T]`` is cut into non-overlapping windows of ``window`` tokens. Each window is run
through the Decoder with ``memory={layer: store view}`` (memory layers attend to their causal local
window plus the memory: exact top-k or dense) and ``return_kv=True``; *after* the forward pass the
window's memory-view keys/values (``aux["mem_kv"]``) are appended to the per-layer
:class:`fot.memory.MemoryStore` (update after attention, so a window never sees itself through memory).
Local positions restart at 0 in every window and memory keys sit at position 0 ("as first").

``mode="longllama"`` reproduces LongLLaMA's PyTorch ``_handle_long_input`` (reference §3.2–3.4):
window = ``max_position_embeddings``, the last ``last_context_length`` tokens form the final window
(attending to the memory, not pushed into it: they become the local cache for generation), dense
memory attention, unbounded memory. ``mode="fot"`` allows exact top-k, a bounded FIFO memory and
``last_context_length=0`` (everything streams through memory).

A window shorter than ``window`` (the tail) is right-padded and its padded keys are masked, which is
exactly equivalent to running the short window (causal attention; masked memory slots).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fot import memory as fmem
from fot.model.config import check_token_ids
from fot.inference import prefill

_MODES = ("fot", "longllama")


@dataclasses.dataclass(frozen=True)
class WindowedConfig:
    """Inference settings.

    window: tokens per window (LongLLaMA: ``max_position_embeddings``; FoT: the training length L).
    capacity: memory slots per memory layer (tokens). None = as many as the input needs (no eviction).
    top_k: exact top-k over memory (None = dense memory attention, LongLLaMA).
    last_context_length: tokens of the input kept as the final window / local generation cache.
    mem_dtype: storage dtype of the memory (LongLLaMA ``mem_dtype``, default bf16).
    mode: ``"fot"`` or ``"longllama"`` (dense, unbounded memory; see module docstring).
    use_memory: False runs the same model without memory (each window sees only itself).
    on_overflow: ``"evict"`` (FIFO) or ``"error"`` (ValueError when the input exceeds ``capacity``;
      single-doc evaluation uses this so a result never silently reflects a truncated memory).
    shard_memory_length: with a mesh, shard memory length over ``model`` (else heads over ``model``).
    """

    window: int
    capacity: int | None = None
    top_k: int | None = None
    last_context_length: int = 0
    mem_dtype: str = "bfloat16"
    mode: str = "fot"
    use_memory: bool = True
    on_overflow: str = "evict"
    shard_memory_length: bool = True

    def __post_init__(self):
        if self.mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {self.mode!r}")
        if int(self.window) < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.top_k is not None and int(self.top_k) < 1:
            raise ValueError(f"top_k must be >= 1 (or None for dense memory attention), got {self.top_k}")
        if self.capacity is not None and int(self.capacity) < 1:
            raise ValueError(f"capacity must be >= 1 (or None for unbounded), got {self.capacity}")
        if not 0 <= int(self.last_context_length) <= int(self.window):
            raise ValueError(f"last_context_length must be in [0, window={self.window}], "
                             f"got {self.last_context_length}")
        if self.on_overflow not in ("evict", "error"):
            raise ValueError(f"on_overflow must be 'evict' or 'error', got {self.on_overflow!r}")
        if self.mode == "longllama":
            if int(self.last_context_length) < 1:
                raise ValueError("mode='longllama' needs last_context_length >= 1 (the last tokens form the final "
                                 "window; LongLLaMA's own code fails on every input with 0)")
            if self.top_k is not None:
                raise ValueError("mode='longllama' uses dense memory attention: top_k must be None")
            if self.capacity is not None:
                raise ValueError("mode='longllama' has an unbounded memory: capacity must be None")
        jnp.dtype(self.mem_dtype)

    def plan(self, length: int, last_context_length: int | None = None) -> tuple[list[tuple[int, int]], int]:
        """Window boundaries for an input of ``length`` tokens: ``([(start, end), ...], prefix)``.

        Prefix windows cover ``[0, prefix)`` in steps of ``window``; the final window (if any) is
        ``[prefix, length)`` with ``prefix = max(length - last_context_length, 0)``.
        """
        lcl = self.last_context_length if last_context_length is None else int(last_context_length)
        if lcl < 0:
            raise ValueError(f"last_context_length must be >= 0, got {lcl}")
        w = self.window
        prefix = max(length - lcl, 0)
        bounds = [(s, min(s + w, prefix)) for s in range(0, prefix, w)]
        if prefix < length:
            if length - prefix > w:
                raise ValueError(f"the final window has {length - prefix} tokens > window={w} "
                                 f"(last_context_length={lcl})")
            bounds.append((prefix, length))
        return bounds, prefix

    @classmethod
    def longllama(cls, max_position_embeddings: int = 2048, last_context_length: int = 1024,
                  mem_dtype: str = "bfloat16", **kw) -> "WindowedConfig":
        """LongLLaMA's inference settings (reference §3.2)."""
        return cls(window=max_position_embeddings, last_context_length=last_context_length,
                   mem_dtype=mem_dtype, mode="longllama", **kw)


def _pad_to(x: np.ndarray, length: int, value=0) -> np.ndarray:
    pad = length - x.shape[1]
    if pad <= 0:
        return x
    return np.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=value)


class MemoryInference:
    """Runs a ``fot.model.Decoder`` over long inputs with per-layer memory stores.

    Args:
      model: a ``Decoder`` (its ``config`` gives heads, head_dim and ``mem_layers``).
      params: the ``params`` tree.
      config: :class:`WindowedConfig`.
      mesh: optional ``jax.sharding.Mesh``: memory stores are sharded (batch over ``data``, memory
        length over ``model``) and the mesh is forwarded to the model / fot.ops.
    """

    def __init__(self, model, params, config: WindowedConfig, *, mesh=None):
        self.model, self.params, self.config, self.mesh = model, params, config, mesh
        self.mcfg = model.config
        self.mem_layers = tuple(self.mcfg.mem_layers) if config.use_memory else ()
        # Reading memory (the forward) and writing it (the append) are separate programs: fused in one,
        # XLA copies the whole store every window (the read and the in-place write alias one buffer).
        self._forward_fn = jax.jit(self._forward_impl, static_argnames=("collect",))
        self._append_fn = jax.jit(self._append_impl, donate_argnums=(0,))
        self._prefix_fn = jax.jit(self._prefix_impl, static_argnames=("hidden",))
        self._mem_kv_fn = jax.jit(self._mem_kv_impl)

    # ---------------------------------------------------------------------------------------------
    def init_memory(self, batch_size: int, capacity: int) -> dict[int, fmem.MemoryStore]:
        """Empty stores ``{layer: MemoryStore}`` of ``capacity`` slots for every memory layer."""
        return fmem.stores_for_model(batch_size, capacity, self.mem_layers, self.mcfg.num_kv_heads,
                                     self.mcfg.head_dim, dtype=self.config.mem_dtype, mesh=self.mesh,
                                     shard_length=self.config.shard_memory_length)

    def _constrain(self, stores):
        if self.mesh is None:
            return stores
        out = {}
        for i, s in stores.items():
            sh = fmem.store_sharding(self.mesh, s.keys.shape, shard_length=self.config.shard_memory_length)
            k = jax.lax.with_sharding_constraint(s.keys, sh)
            v = jax.lax.with_sharding_constraint(s.values, sh)
            out[i] = dataclasses.replace(s, keys=k, values=v)
        return out

    def _forward_impl(self, params, stores, tokens, positions, reset_rows, segment_ids, collect=False):
        """Read-only: ``(logits, aux)`` of one window attending to ``stores`` (rows in ``reset_rows``
        see an empty memory)."""
        if reset_rows is not None:
            stores = {i: fmem.reset(s, reset_rows) for i, s in stores.items()}
        memory = fmem.memory_views(stores) if stores else None
        return self.model.apply(
            {"params": params}, tokens, positions=positions, segment_ids=segment_ids, memory=memory,
            top_k=self.config.top_k if memory else None, return_kv=True, mesh=self.mesh,
            collect_mem_mass=collect)

    def _append_impl(self, stores, mem_kv, key_mask, reset_rows=None):
        """Donated, in place: empty ``reset_rows``, then append each layer's window ``mem_kv[layer]``."""
        if reset_rows is not None:
            stores = {i: fmem.reset(s, reset_rows) for i, s in stores.items()}
        return self._constrain({i: fmem.append(s, *mem_kv[i], key_mask) for i, s in stores.items()})

    def step(self, stores, tokens, *, key_mask=None, reset_rows=None, positions=None, segment_ids=None,
             collect_mem_mass: bool = False):
        """One window ``tokens [B, L]`` → ``(logits [B, L, V], new_stores, aux)``.

        ``reset_rows`` bool [B]: empty these rows' memory first (document start, single-doc).
        ``key_mask`` bool [B, L]: which tokens' keys enter memory (False for padding).
        ``positions`` default ``arange(L)`` (local positions restart at 0 per window).
        ``collect_mem_mass``: aux["mem_mass"] = {layer: [B, L, H]} (softmax mass on memory keys).
        The input ``stores`` are donated (do not reuse them).
        """
        if isinstance(tokens, np.ndarray):  # host input: check ids without a device round trip
            check_token_ids(tokens, self.model.config.vocab_size, "MemoryInference.step tokens")
        tokens = jnp.asarray(tokens, jnp.int32)
        b, length = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
        if key_mask is None:
            key_mask = jnp.ones((b, length), bool)
        rr = None if reset_rows is None else jnp.asarray(reset_rows, bool)
        logits, aux = self._forward_fn(self.params, stores, tokens, jnp.asarray(positions, jnp.int32), rr,
                                       None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32),
                                       collect=bool(collect_mem_mass))
        if stores:
            stores = self._append_fn(stores, {i: aux["mem_kv"][i] for i in stores},
                                     jnp.asarray(key_mask, bool), rr)
        return logits, stores, aux

    # ---------------------------------------------------------------------------------------------
    def plan(self, length: int, last_context_length: int | None = None) -> tuple[list[tuple[int, int]], int]:
        """See :meth:`WindowedConfig.plan`."""
        return self.config.plan(length, last_context_length)

    def capacity_for(self, length: int, last_context_length: int | None = None) -> int:
        """Memory slots needed to hold every prefix window of an input of ``length`` (padded windows)."""
        bounds, prefix = self.plan(length, last_context_length)
        n = sum(1 for s, e in bounds if e <= prefix)
        return max(n, 1) * self.config.window

    def forward(self, tokens, *, key_mask=None, stores=None, last_context_length: int | None = None,
                collect_mem_mass: bool = False, bounds: list[tuple[int, int]] | None = None) -> dict[str, Any]:
        """Process a whole input ``tokens [B, T]`` (numpy or jax, int).

        ``bounds`` overrides :meth:`plan`: explicit contiguous windows ``[(0, e0), (e0, e1), ..., (s, T)]``
        of at most ``window`` tokens; with ``last_context_length > 0`` the last one is the final window
        (e.g. to replay a generation whose local cache was flushed into memory).

        Returns a dict: ``logits`` float32 [B, T, V] (every token, as LongLLaMA concatenates window
        outputs), ``stores`` (memory after the prefix windows), ``final_kv`` (aux of the final window:
        ``{"kv": {layer: (k, v)}, "mem_kv": {...}}`` or None), ``overflow`` (capacity / size / evicted
        per row), ``mem_mass`` (list per window of {layer: [B, L, H]} when collected).
        """
        cfg = self.config
        check_token_ids(tokens, self.model.config.vocab_size, "MemoryInference.forward tokens")
        tokens = np.asarray(tokens, np.int32)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
        b, t = tokens.shape
        if key_mask is None:
            key_mask = np.ones((b, t), bool)
        key_mask = np.asarray(key_mask, bool)
        if key_mask.shape != (b, t):
            raise ValueError(f"key_mask must have shape {(b, t)}, got {key_mask.shape}")
        if bounds is None:
            bounds, prefix = self.plan(t, last_context_length)
        else:
            bounds = [(int(a), int(z)) for a, z in bounds]
            ends = [0] + [z for _, z in bounds]
            if [a for a, _ in bounds] != ends[:-1] or ends[-1] != t or any(
                    not 0 < z - a <= cfg.window for a, z in bounds):
                raise ValueError(f"bounds must tile [0, {t}) with windows of 1..{cfg.window} tokens, got {bounds}")
            lcl = cfg.last_context_length if last_context_length is None else int(last_context_length)
            prefix = bounds[-1][0] if lcl > 0 else t
        if stores is None:
            cap = cfg.capacity if cfg.capacity is not None else max(
                1, sum(1 for _, e in bounds if e <= prefix)) * cfg.window
            stores = self.init_memory(b, cap)
        if cfg.on_overflow == "error" and self.mem_layers:
            cap = next(iter(stores.values())).capacity
            need = sum(cfg.window for s, e in bounds if e <= prefix)
            if need > cap:
                raise ValueError(f"input needs {need} memory slots ({prefix} prefix tokens in windows of "
                                 f"{cfg.window}) but the memory capacity is {cap} (on_overflow='error', "
                                 "single-document mode)")
        logits, masses, final_kv = [], [], None
        w = cfg.window
        for s, e in bounds:
            is_final = e > prefix or (s >= prefix)
            n = e - s
            length = n if is_final else w
            tok = _pad_to(tokens[:, s:e], length)
            km = _pad_to(key_mask[:, s:e], length, False)
            if is_final:
                out, _, aux = self._final(stores, tok, km, collect_mem_mass)
                final_kv = aux
            else:
                out, stores, aux = self.step(stores, tok, key_mask=km, collect_mem_mass=collect_mem_mass)
            if collect_mem_mass:
                masses.append(aux.get("mem_mass", {}))
            logits.append(out[:, :n])
        result = {"logits": jnp.concatenate(logits, axis=1), "stores": stores, "final_kv": final_kv,
                  "overflow": fmem.overflow_report(stores)}
        if collect_mem_mass:
            result["mem_mass"] = masses
        return result

    def fill(self, stores, tokens, key_mask=None, *, parallel: bool | None = None,
             windows_per_call: int | None = None, progress=None):
        """Push ``tokens [B, N]`` (N a multiple of ``window``) into memory (memory prefill); no logits.

        Default (``parallel`` None/True): :mod:`fot.inference.prefill` — the windows run as independent
        rows of large batches through the layers below the first memory layer (``windows_per_call``
        windows per row and call; default: ~64K tokens per call); with one memory layer its keys/values
        follow directly (fully parallel), with several the memory layers stream window by window with
        memory; layers above the last memory layer and the output head never run. Exact: the same memory
        as streaming the windows through :meth:`step` (``parallel=False``, the whole model).
        ``progress(tokens_done)`` is called after every call (per row: tokens of one row).
        Returns the new stores (the input ``stores`` are donated).
        """
        check_token_ids(tokens, self.model.config.vocab_size, "MemoryInference.fill tokens")
        tokens = np.asarray(tokens, np.int32)
        b, n = tokens.shape
        w = self.config.window
        if n % w:
            raise ValueError(f"fill: length {n} is not a multiple of window={w}")
        key_mask = np.ones((b, n), bool) if key_mask is None else np.asarray(key_mask, bool)
        if key_mask.shape != (b, n):
            raise ValueError(f"fill: key_mask must have shape {(b, n)}, got {key_mask.shape}")
        if not self.mem_layers or n == 0:
            return stores
        if parallel is False:
            for s in range(0, n, w):
                _, stores, _ = self.step(stores, tokens[:, s:s + w], key_mask=key_mask[:, s:s + w])
                if progress is not None:
                    progress(s + w)
            return stores
        nw = n // w
        per_call = windows_per_call or max(1, (1 << 16) // (b * w))
        several = len(self.mem_layers) > 1
        first = stores[self.mem_layers[0]]
        pos, cap = int(first.write_pos), first.capacity  # host copy of the write pointer (one sync)
        for j in range(0, nw, per_call):
            c = min(per_call, nw - j)
            rows = jnp.asarray(tokens[:, j * w:(j + c) * w].reshape(b * c, w))
            x, (k, v) = self._prefix_fn(self.params, rows, hidden=several)
            if several:
                x = x.reshape((b, c) + x.shape[1:])
                for t in range(c):
                    s = (j + t) * w
                    kv = self._mem_kv_fn(self.params, stores, x[:, t])
                    stores = self._append_fn(stores, kv, jnp.asarray(key_mask[:, s:s + w]))
            else:
                shape = (b, c * w) + tuple(k.shape[2:])
                k, v, km = k.reshape(shape), v.reshape(shape), key_mask[:, j * w:(j + c) * w]
                # Pieces that end at the ring's end: every token lands in the slot a window-by-window
                # append gives it, and a write never wraps (store.append's contiguous path).
                off = 0
                while off < c * w:
                    piece = min(c * w - off, cap - pos)
                    sl = slice(off, off + piece)
                    stores = self._append_fn(stores, {self.mem_layers[0]: (k[:, sl], v[:, sl])},
                                             jnp.asarray(km[:, sl]))
                    pos, off = (pos + piece) % cap, off + piece
            if progress is not None:
                progress((j + c) * w)
        return stores

    def _positions(self, rows):
        return jnp.broadcast_to(jnp.arange(rows.shape[1], dtype=jnp.int32), rows.shape)

    def _prefix_impl(self, params, rows, hidden=False):
        """rows [R, w] → (input of the first memory layer [R, w, D] if ``hidden``, its (k, v))."""
        pos = self._positions(rows)
        x = prefill.hidden_below(self.mcfg, params, rows, pos, self.mem_layers[0], self.mesh)
        return (x if hidden else None), prefill.first_memory_kv(self.mcfg, params, x, pos, self.mesh)

    def _mem_kv_impl(self, params, stores, x):
        """Read-only: memory-view (k, v) of every memory layer for one window x [B, w, D]."""
        pos = self._positions(x[..., 0])
        return prefill.memory_layers_kv(self.mcfg, params, x, pos, fmem.memory_views(stores),
                                        self.config.top_k, self.mesh)

    def _final(self, stores, tok, km, collect):
        """The final window: attends to memory but is not appended to it (becomes the local cache)."""
        b, length = tok.shape
        pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
        logits, aux = self._forward_fn(self.params, stores, jnp.asarray(tok, jnp.int32), pos, None, None,
                                       collect=bool(collect))
        return logits, stores, aux

    def query(self, stores, tokens):
        """Logits ``[B, L, V]`` of one window ``tokens [B, L]`` attending to ``stores``, which are left
        unchanged (not donated, nothing appended): e.g. a query window after :meth:`fill`."""
        return self._final(stores, tokens, None, False)[0]


def num_windows(length: int, window: int) -> int:
    """Number of ``window``-token windows covering ``length`` tokens."""
    return math.ceil(length / window)
