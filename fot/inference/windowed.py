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

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fot import memory as fmem
from fot.inference import prefill
from fot.inference.config import WindowedConfig
from fot.model import check_token_ids, run_window

FILL_CALL_TOKENS = 1 << 18  # tokens (all rows) per jitted fill call (one memory layer)
FILL_BLOCK_TOKENS = 4096  # tokens (all rows) per scan step inside a fill call: activations stay in cache
FILL_LAYERS_CALL_TOKENS = 1 << 16  # tokens (all rows) per call of a fill through several memory layers


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
        self.model_config = model.config
        self.mem_layers = tuple(self.model_config.mem_layers) if config.use_memory else ()
        # Reading memory (the forward) and writing it (the append) are separate programs: fused in one,
        # XLA copies the whole store every window (the read and the in-place write alias one buffer).
        self._forward_fn = jax.jit(self._forward_impl, static_argnames=("collect",))
        self._append_fn = jax.jit(self._append_impl, donate_argnums=(0,))
        self._prefix_fn = jax.jit(self._prefix_impl, static_argnames=("hidden",))
        self._mem_kv_fn = jax.jit(self._mem_kv_impl)
        self._fill_fn = jax.jit(self._fill_impl, donate_argnums=(1,), static_argnames=("block",))
        self._fill_layers_fn = jax.jit(self._fill_layers_impl, donate_argnums=(1,), static_argnames=("evicts",))
        self._clear_fn = jax.jit(lambda stores: {i: fmem.clear(s) for i, s in stores.items()}, donate_argnums=(0,))

    # ---------------------------------------------------------------------------------------------
    def init_memory(self, batch_size: int, capacity: int) -> dict[int, fmem.MemoryStore]:
        """Empty stores ``{layer: MemoryStore}`` of ``capacity`` slots for every memory layer, with the static
        pointer alignment windows keep (``fot.memory.for_appends``: one compile per program, not per history)."""
        stores = fmem.stores_for_model(batch_size, capacity, self.mem_layers, self.model_config.num_kv_heads,
                                       self.model_config.head_dim, dtype=self.config.mem_dtype, mesh=self.mesh,
                                       shard_length=self.config.shard_memory_length)
        return fmem.for_appends(stores, self.config.window)

    def empty_memory(self, batch_size: int, capacity: int, reuse=None) -> dict[int, fmem.MemoryStore]:
        """Empty stores as :meth:`init_memory`; ``reuse``: stores (donated) emptied in place instead when they
        have this shape — every slot invalid, pointer and counters at 0, no allocation (a new 16M-slot
        float32 store took 16-28 s to allocate and zero: page faults); otherwise freed first."""
        if reuse is not None and all(s.keys.shape[:2] == (batch_size, capacity) for s in reuse.values()):
            return fmem.for_appends(self._clear_fn(reuse), self.config.window)
        del reuse
        return self.init_memory(batch_size, capacity)

    def _constrain(self, stores):
        return fmem.constrain(stores, self.mesh, shard_length=self.config.shard_memory_length)

    def _forward_impl(self, params, stores, tokens, positions, reset_rows, segment_ids, collect=False):
        """Read-only: the :class:`fot.model.WindowOutput` of one window attending to ``stores`` (rows in
        ``reset_rows`` see an empty memory)."""
        if reset_rows is not None:
            stores = {i: fmem.reset(s, reset_rows) for i, s in stores.items()}
        return run_window(self.model, params, tokens, memory=fmem.memory_views(stores), positions=positions,
                          segment_ids=segment_ids, top_k=self.config.top_k, mesh=self.mesh,
                          collect_mem_mass=collect)

    def _append_impl(self, stores, mem_kv, key_mask, reset_rows=None):
        """Donated, in place: empty ``reset_rows``, then append each layer's window ``mem_kv[layer]``."""
        if reset_rows is not None:
            stores = {i: fmem.reset(s, reset_rows) for i, s in stores.items()}
        return self._constrain({i: fmem.append(s, *mem_kv[i], key_mask) for i, s in stores.items()})

    def step(self, stores, tokens, *, key_mask=None, reset_rows=None, positions=None, segment_ids=None,
             collect_mem_mass: bool = False):
        """One window ``tokens [B, L]`` → ``(logits [B, L, V], new_stores, WindowOutput)``.

        ``reset_rows`` bool [B]: empty these rows' memory first (document start, single-doc).
        ``key_mask`` bool [B, L]: which tokens' keys enter memory (False for padding).
        ``positions`` default ``arange(L)`` (local positions restart at 0 per window).
        ``collect_mem_mass``: ``.mem_mass`` = {layer: [B, L, H]} (softmax mass on memory keys).
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
        stores = fmem.for_appends(stores, length)  # the alignment this step's append keeps: one compile
        out = self._forward_fn(self.params, stores, tokens, jnp.asarray(positions, jnp.int32), rr,
                               None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32),
                               collect=bool(collect_mem_mass))
        if stores:
            stores = self._append_fn(stores, {i: out.mem_kv[i] for i in stores}, jnp.asarray(key_mask, bool), rr)
        return out.logits, stores, out

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
        outputs), ``stores`` (memory after the prefix windows), ``final_kv`` (the final window's
        :class:`fot.model.WindowOutput`: ``.kv`` / ``.mem_kv`` {layer: LayerKV}; or None), ``overflow``
        (capacity / size / evicted per row), ``mem_mass`` (list per window of {layer: [B, L, H]} when collected).
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
        stores = fmem.for_appends(stores, cfg.window)  # the alignment its windows keep (one compile per program)
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
            tok = _pad_to(tokens[:, s:e], length)  # [B, length]
            km = _pad_to(key_mask[:, s:e], length, False)  # [B, length]: padding keys stay out of memory
            if is_final:
                out = final_kv = self._final(stores, tok, collect_mem_mass)
            else:
                _, stores, out = self.step(stores, tok, key_mask=km, collect_mem_mass=collect_mem_mass)
            if collect_mem_mass:
                masses.append(out.mem_mass)
            logits.append(out.logits[:, :n])
        result = {"logits": jnp.concatenate(logits, axis=1), "stores": stores, "final_kv": final_kv,
                  "overflow": fmem.overflow_report(stores)}
        if collect_mem_mass:
            result["mem_mass"] = masses
        return result

    def fill(self, stores, tokens, key_mask=None, *, parallel: bool | None = None,
             windows_per_call: int | None = None, block_tokens: int | None = None, progress=None):
        """Push ``tokens [B, N]`` (N a multiple of ``window``) into memory (memory prefill); no logits.

        Default (``parallel`` None/True): :mod:`fot.inference.prefill` — the windows run as independent
        rows through the layers below the first memory layer; layers above the last memory layer and the
        output head never run. With one memory layer its keys/values follow directly (fully parallel): one
        jitted call per ``windows_per_call`` windows per row (default: ``FILL_CALL_TOKENS`` tokens per call)
        scans blocks of about ``block_tokens`` tokens (default ``FILL_BLOCK_TOKENS``; all rows: the
        activations of a block stay in cache) and appends each block in place — no per-window dispatch,
        no store copy. With several memory layers, see :meth:`_fill_streaming` (calls of
        ``windows_per_call`` windows per row, default ~64K tokens). Exact: the same memory as streaming
        the windows through :meth:`step` (``parallel=False``, the whole model).
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
        if len(self.mem_layers) > 1:
            return self._fill_streaming(stores, tokens, key_mask, windows_per_call, progress)
        stores = fmem.realign(stores)  # static alignment from the write pointer (host read: one sync per store)
        first = stores[self.mem_layers[0]]
        # g windows per row and scan step: a cache-sized block whose appends never straddle the ring's end
        # (store.append's single in-place update needs cap and the pointer to be multiples of the block).
        g = max(1, (block_tokens or FILL_BLOCK_TOKENS) // (b * w))
        while g > 1 and (first.capacity % (g * w) or first.align % (g * w)):
            g //= 2
        stores = fmem.for_appends(stores, g * w)
        per_call = max(1, (windows_per_call or max(1, FILL_CALL_TOKENS // (b * w))) // g) * g
        j = 0
        while j < nw:
            c = min(per_call, nw - j)
            blk = g if c % g == 0 else 1  # a remainder call (c not a multiple of g) goes window by window
            sl = slice(j * w, (j + c) * w)
            stores = self._fill_fn(self.params, stores, jnp.asarray(tokens[:, sl]), jnp.asarray(key_mask[:, sl]),
                                   block=blk)
            j += c
            if progress is not None:
                progress(j * w)
        return fmem.for_appends(stores, w)

    def _fill_impl(self, params, stores, tokens, key_mask, block):
        """One memory layer, donated stores: ``tokens``/``key_mask`` [B, c*w] (c windows, a multiple of
        ``block``) run ``block`` windows per row at a time (a ``lax.scan`` step: the activations of one
        step stay in cache) through the layers below the memory layer; each step's keys/values are
        appended in place, in window order."""
        b, length = tokens.shape
        w, layer = self.config.window, self.mem_layers[0]
        t = block * w
        steps = length // t
        xs = (tokens.reshape(b, steps, t).swapaxes(0, 1), key_mask.reshape(b, steps, t).swapaxes(0, 1))

        def body(store, x):  # x: tokens, key_mask [B, t]
            _, (k, v) = self._prefix_impl(params, x[0].reshape(b * block, w))  # k, v [B*block, w, Hkv, Dh]
            shape = (b, t) + tuple(k.shape[2:])
            return fmem.append(store, k.reshape(shape), v.reshape(shape), x[1]), None

        store, _ = jax.lax.scan(body, fmem.for_appends(stores[layer], t), xs)  # xs: [steps, B, t]
        return self._constrain({layer: store})

    def _fill_streaming(self, stores, tokens, key_mask, windows_per_call, progress):
        """Several memory layers, calls of ``windows_per_call`` windows per row (<= capacity / w if the fill
        evicts): ``prefill.fill_memory_layers``; if the write pointer is not aligned to the window, the layers
        below the first memory layer at once, then ``m0 .. m_last`` window by window."""
        (b, n), w = tokens.shape, self.config.window
        nw = n // w
        per_call = windows_per_call or max(1, FILL_LAYERS_CALL_TOKENS // (b * w))
        stores = fmem.for_appends(fmem.realign(stores), w)  # host read of the pointers
        first = stores[self.mem_layers[0]]  # the batched fill appends w slots per window in place:
        batched = first.capacity >= w and (first.capacity % w or first.align % w == 0)
        if evicts := batched and fmem.would_evict(stores, n):
            per_call = min(per_call, first.capacity // w)
        for j in range(0, nw, per_call):
            c = min(per_call, nw - j)
            rows = jnp.asarray(tokens[:, j * w:(j + c) * w].reshape(b * c, w))  # [B*c, w]: a window per row
            if batched:
                stores = self._fill_layers_fn(self.params, stores, rows, jnp.asarray(key_mask[:, j * w:(j + c) * w]),
                                              evicts=evicts)
            else:
                x, _ = self._prefix_fn(self.params, rows, hidden=True)  # x [B*c, w, D]
                for t in range(c):
                    kv = self._mem_kv_fn(self.params, stores, x.reshape((b, c) + x.shape[1:])[:, t])  # [B, w, D] in
                    stores = self._append_fn(stores, kv, jnp.asarray(key_mask[:, (j + t) * w:(j + t + 1) * w]))
            if progress is not None:
                progress((j + c) * w)
        return stores

    def _positions(self, rows):
        return jnp.broadcast_to(jnp.arange(rows.shape[1], dtype=jnp.int32), rows.shape)

    def _prefix_impl(self, params, rows, hidden=False):
        """rows [R, w] → (input of the first memory layer [R, w, D] if ``hidden``, its (k, v))."""
        pos = self._positions(rows)
        x = prefill.hidden_below(self.model_config, params, rows, pos, self.mem_layers[0], self.mesh)
        return (x if hidden else None), prefill.first_memory_kv(self.model_config, params, x, pos, self.mesh)

    def _fill_layers_impl(self, params, stores, rows, key_mask, evicts=False):
        """Donated stores: :func:`prefill.fill_memory_layers` of windows ``rows`` [B*C, w]."""
        return self._constrain(prefill.fill_memory_layers(self.model_config, params, stores, rows, key_mask,
                                                          self.config.top_k, self.mesh, evicts))

    def _mem_kv_impl(self, params, stores, x):
        """Read-only: memory-view (k, v) of every memory layer for one window x [B, w, D]."""
        pos = self._positions(x[..., 0])
        return prefill.memory_layers_kv(self.model_config, params, x, pos, fmem.memory_views(stores),
                                        self.config.top_k, self.mesh)

    def _final(self, stores, tok, collect):
        """The final window: attends to memory but is not appended to it (becomes the local cache)."""
        return self._forward_fn(self.params, stores, jnp.asarray(tok, jnp.int32), self._positions(tok), None,
                                None, collect=bool(collect))

    def query(self, stores, tokens):
        """Logits ``[B, L, V]`` of one window ``tokens [B, L]`` attending to ``stores``, which are left
        unchanged (not donated, nothing appended): e.g. a query window after :meth:`fill`."""
        return self._final(stores, tokens, False).logits


def num_windows(length: int, window: int) -> int:
    """Number of ``window``-token windows covering ``length`` tokens."""
    return math.ceil(length / window)
