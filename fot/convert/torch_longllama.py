"""Minimal PyTorch re-implementation of LongLLaMA's inference (reference §3.2–3.3), for parity tests.

Built on the weights of transformers' ``LlamaForCausalLM`` (embeddings, RMSNorms, projections, MLP,
LM head); the window loop and the attention are written here in plain torch:

* the input ``[B, T]`` is split as ``_handle_long_input``: ``prefix = max(T - last_context_length, 0)``
  tokens in non-overlapping windows of ``W = max_position_embeddings`` (the last one may be
  shorter), then the remaining tokens as the final window; logits of all windows are concatenated;
* every window is run without a local cache: positions restart at 0, every layer attends causally
  to the window only;
* memory layers additionally attend to their memory: keys rotated "as if first" (RoPE at position
  0), values; the memory logits ``q·k_mem/sqrt(Dh)`` are concatenated with the local logits (masked
  entries clamped at ``max(finfo.min, -1e6)``) and go through ONE float32 softmax, multiplying
  ``[V_local; V_mem]`` (memory cast to the compute dtype);
* after the layer's attention the window's keys (as first) and values are appended to the memory
  in ``mem_dtype`` (update after attention); the final window is not appended;
* ``mem_positionals=False``: no RoPE anywhere in memory layers (queries, local and memory keys).

Generation (``decode`` / greedy ``generate``) follows §3.4: one token at a time into a local
cache of un-rotated keys (positions relative to the cache start); when ``cached + 1 > window`` the
whole cache is flushed before attention (memory layers: into memory, as first; others: dropped).
No padding / attention_mask.
"""
from __future__ import annotations

import json
import math
import os

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class TorchLongLlama:
    """LongLLaMA inference over a ``LlamaForCausalLM`` (``[B, T]`` token ids → logits ``[B, T, V]``).

    Args:
      model: ``transformers.LlamaForCausalLM`` (any dtype; ``compute dtype`` = its parameters' dtype).
      mem_layers: 0-based memory-layer indices. mem_positionals: RoPE in memory layers.
      mem_dtype: storage dtype name of memory keys/values. window: ``max_position_embeddings``.
      last_context_length: tokens of the final window. rope_theta: RoPE base.
    """

    def __init__(self, model, *, mem_layers, mem_positionals: bool = True, mem_dtype: str = "bfloat16",
                 window: int, last_context_length: int = 1024, rope_theta: float = 10000.0):
        cfg = model.config
        self.model = model.eval()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_key_value_heads={self.num_kv_heads} must divide num_attention_heads="
                             f"{self.num_heads}")
        self.mem_layers = tuple(int(i) for i in mem_layers)
        bad = [i for i in self.mem_layers if not 0 <= i < cfg.num_hidden_layers]
        if bad:
            raise ValueError(f"mem_layers {list(mem_layers)} must be in [0, {cfg.num_hidden_layers})")
        self.mem_positionals = bool(mem_positionals)
        if mem_dtype not in _DTYPES:
            raise ValueError(f"mem_dtype must be one of {sorted(_DTYPES)}, got {mem_dtype!r}")
        self.mem_dtype = _DTYPES[mem_dtype]
        self.window = int(window)
        self.last_context_length = int(last_context_length)
        self.inv_freq = 1.0 / (float(rope_theta) ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32)
                                                      / self.head_dim))

    @classmethod
    def from_pretrained(cls, path: str, *, dtype=torch.float32, **overrides) -> "TorchLongLlama":
        """Load an exported directory: weights through ``LlamaForCausalLM.from_pretrained`` (eager
        attention), LongLLaMA fields (mem_layers, mem_positionals, mem_dtype, last_context_length,
        max_position_embeddings, rope_theta) from its config.json; keyword overrides win."""
        from transformers import LlamaForCausalLM

        with open(os.path.join(path, "config.json")) as f:
            conf = json.load(f)
        model = LlamaForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
        rope = conf.get("rope_parameters") or {}
        kw = dict(mem_layers=conf.get("mem_layers", []), mem_positionals=conf.get("mem_positionals", True),
                  mem_dtype=conf.get("mem_dtype", "bfloat16"), window=conf["max_position_embeddings"],
                  last_context_length=conf.get("last_context_length", 1024),
                  rope_theta=rope.get("rope_theta", conf.get("rope_theta", 10000.0)))
        kw.update(overrides)
        return cls(model, **kw)

    # ---------------------------------------------------------------------------------------------
    def _rope(self, x, positions):
        """x [B, H, T, Dh]; positions long [T] → rotate-half RoPE, float32 tables."""
        ang = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((ang, ang), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        return x * cos + _rotate_half(x) * sin

    def _attention(self, layer_idx, attn, x, memory, cache):
        """One attention block; x [B, T, D]; cache (k_raw, v) [B, Hkv, C, Dh] of earlier local tokens or None.

        Returns (out [B, T, D], memory-view (k, v) of the new tokens in mem_dtype (memory layers) or
        None, raw local (k, v) of the new tokens for the cache)."""
        b, t, _ = x.shape
        h, hkv, dh = self.num_heads, self.num_kv_heads, self.head_dim
        shape = lambda y, n: y.view(b, t, n, dh).transpose(1, 2)  # noqa: E731  [B, n, T, Dh]
        q, k, v = shape(attn.q_proj(x), h), shape(attn.k_proj(x), hkv), shape(attn.v_proj(x), hkv)
        k_all, v_all = (k, v) if cache is None else (torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2))
        c = k_all.shape[2] - t
        is_mem = layer_idx in self.mem_layers
        if not is_mem or self.mem_positionals:  # positions relative to the local context's first token
            q_r, k_r = self._rope(q, torch.arange(c, c + t)), self._rope(k_all, torch.arange(c + t))
        else:
            q_r, k_r = q, k_all
        neg = max(torch.finfo(q.dtype).min, -1e6)
        rep = lambda y: torch.repeat_interleave(y, h // hkv, dim=1)  # noqa: E731  GQA: [B, Hkv, .] -> [B, H, .]
        logits = torch.matmul(q_r, rep(k_r).transpose(2, 3)) / math.sqrt(dh)
        causal = torch.ones(t, c + t, dtype=torch.bool).tril(diagonal=c)
        logits = logits + torch.where(causal, 0.0, torch.finfo(q.dtype).min).to(q.dtype)
        logits = torch.clamp(logits, min=neg)
        values = rep(v_all)
        if is_mem and memory is not None:
            mem_k, mem_v = memory
            mem_logits = torch.matmul(q_r, rep(mem_k.to(q.dtype)).transpose(2, 3)) / math.sqrt(dh)
            logits = torch.cat([logits, torch.clamp(mem_logits, min=neg)], dim=-1)
            values = torch.cat([values, rep(mem_v.to(v.dtype))], dim=-2)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, values).transpose(1, 2).reshape(b, t, h * dh)
        return attn.o_proj(out), (self._mem_view(k, v) if is_mem else None), (k, v)

    def _mem_view(self, k_raw, v):
        """Keys "rotated as if first" (RoPE at position 0) unless mem_positionals=False; mem_dtype."""
        if self.mem_positionals:
            k_raw = self._rope(k_raw, torch.zeros(k_raw.shape[2], dtype=torch.long))
        return k_raw.to(self.mem_dtype), v.to(self.mem_dtype)

    @staticmethod
    def _append(memory, i, kv):
        old = memory.get(i)
        memory[i] = kv if old is None else (torch.cat([old[0], kv[0]], 2), torch.cat([old[1], kv[1]], 2))

    def _window(self, tokens, memory, push: bool, cache=None):
        """Run ``tokens [B, t]``; returns (logits [B, t, V] float32, {layer: raw local (k, v)})."""
        m = self.model.model
        x = m.embed_tokens(tokens)
        local = {}
        for i, layer in enumerate(m.layers):
            a, upd, kv = self._attention(i, layer.self_attn, layer.input_layernorm(x), memory.get(i),
                                         None if cache is None else cache[i])
            x = x + a
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            local[i] = kv
            if push and upd is not None:  # memory updated after the layer's attention
                self._append(memory, i, upd)
        return self.model.lm_head(m.norm(x)).to(torch.float32), local

    @torch.no_grad()
    def forward(self, input_ids, last_context_length: int | None = None, return_state: bool = False):
        """input_ids long [B, T] → (logits float32 [B, T, V], memory {layer: (k, v) [B, Hkv, M, Dh]}).

        ``return_state``: also return the generation state (memory, local cache of the final window)."""
        input_ids = torch.as_tensor(input_ids, dtype=torch.long)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        t = input_ids.shape[1]
        lcl = self.last_context_length if last_context_length is None else int(last_context_length)
        prefix = max(t - lcl, 0)
        memory: dict[int, tuple] = {}
        outs = [self._window(input_ids[:, s:min(s + self.window, prefix)], memory, push=True)[0]
                for s in range(0, prefix, self.window)]
        cache = None
        if prefix < t:
            logits, cache = self._window(input_ids[:, prefix:], memory, push=False)
            outs.append(logits)
        logits = torch.cat(outs, dim=1)
        if return_state:
            return logits, memory, {"memory": memory, "cache": cache}
        return logits, memory

    __call__ = forward

    @torch.no_grad()
    def decode(self, state, token):
        """Feed ``token`` long [B] after ``forward(..., return_state=True)``; returns next-token logits
        [B, V]. When the local cache already holds ``window`` tokens it is flushed first, as in
        LongLLaMA (§3.4): memory layers move it into memory (as first), other layers drop it."""
        memory, cache = state["memory"], state["cache"]
        if cache is not None and cache[0][0].shape[2] + 1 > self.window:
            for i in self.mem_layers:
                self._append(memory, i, self._mem_view(*cache[i]))
            cache = None
        tok = torch.as_tensor(token, dtype=torch.long).view(-1, 1)
        logits, kv = self._window(tok, memory, push=False, cache=cache)
        state["cache"] = kv if cache is None else {
            i: (torch.cat([cache[i][0], k], 2), torch.cat([cache[i][1], v], 2)) for i, (k, v) in kv.items()}
        return logits[:, -1]

    def generate(self, input_ids, max_new_tokens: int):
        """Greedy generation: int64 [B, max_new_tokens]."""
        logits, _, state = self.forward(input_ids, return_state=True)
        nxt, out = logits[:, -1], []
        for step in range(int(max_new_tokens)):
            tok = nxt.argmax(-1)
            out.append(tok)
            if step + 1 < max_new_tokens:
                nxt = self.decode(state, tok)
        return torch.stack(out, dim=1)
