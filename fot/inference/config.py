"""Settings of windowed inference with memory (:class:`WindowedConfig`) and its window plan."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

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
