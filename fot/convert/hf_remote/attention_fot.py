"""FoT attention in plain torch: RoPE, joint softmax over local keys and an external memory (dense or
exact top-k), the MT memory gate, and the per-layer memory / local-cache state.

Layout: queries ``[B, Hkv, G, T, Dh]`` (query head ``h = j * G + g`` uses key/value head ``j``, as
transformers' ``repeat_kv``; ``G = 1`` without grouped-query attention), keys and values
``[B, Hkv, S, Dh]``, memory keys/values ``[B, Hkv, M, Dh]`` with a valid mask ``[B, M]``. Grouping
the queries instead of repeating the keys costs nothing for ``G = 1`` and never copies memory.

Every softmax is float32 and built from "parts" ``(m, l, acc)`` (running max ``[..., T]``, sum of
exponentials ``[..., T]``, weighted values ``[..., T, Dh]``) that :func:`combine` merges exactly, so
the memory is streamed in chunks of ``chunk`` slots and no ``[.., T, M]`` score tensor is ever built
for the whole memory (dense: online softmax; top-k: a running ``torch.topk`` merge).
"""
import math

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_CHUNK = 4096


def rope(x, positions, theta):
    """Rotate-half RoPE of x ``[..., T, Dh]`` at ``positions`` long ``[T]``; float32 tables."""
    dh = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, dh // 2, dtype=torch.float32, device=x.device) * 2.0 / dh)
    ang = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    xf = x.float()
    rot = torch.cat([-xf[..., dh // 2:], xf[..., : dh // 2]], dim=-1)
    return (xf * ang.cos() + rot * ang.sin()).to(x.dtype)


def l2_normalize(x, eps=1e-6):
    """x / sqrt(sum(x^2) + eps) over the last axis, float32."""
    xf = x.float()
    return xf * torch.rsqrt((xf * xf).sum(-1, keepdim=True) + eps)


def qk_temperature(param, parametrisation="linear", n_ref=None, keys_in_view=None, beta=0.0, n_train=None):
    """Multiplier of the normalised queries, [H] or [B, H, T]: the exported parameter is the temperature
    itself (``"linear"``, tensor ``qk_scale``) or its logarithm (``"log"``, ``qk_log_scale``); with
    ``n_ref`` it is scaled by ``ln(n) / ln(n_ref)``, with ``beta > 0`` by ``max(1, n / n_train) ** beta``;
    ``keys_in_view`` = n [B, T] (float32)."""
    tau = param.float().exp() if parametrisation == "log" else param.float()
    if n_ref is None and not beta:
        return tau
    f = torch.ones_like(keys_in_view)
    if n_ref is not None:
        f = f * torch.log(keys_in_view) / math.log(n_ref)
    if beta:
        f = f * torch.clamp(keys_in_view / float(n_train), min=1.0) ** float(beta)
    return tau[None, :, None] * f[:, None, :]


# ---------------------------------------------------------------------------------------------------
def _part(scores, weighted):
    """Softmax part of ``scores [..., T, S]`` (-inf = masked); ``weighted(e)`` maps the exponentials
    ``[..., T, S]`` to ``[..., T, Dh]``."""
    m = scores.amax(-1)
    e = torch.exp(scores - torch.where(torch.isfinite(m), m, torch.zeros_like(m))[..., None])
    return m, e.sum(-1), weighted(e)


def combine(parts):
    """Merge softmax parts into the normalised output ``[..., T, Dh]`` (0 for a query that sees no key)."""
    mx = torch.stack([p[0] for p in parts]).amax(0)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    total, acc = 0.0, 0.0
    for m, l, a in parts:
        w = torch.exp(m - mx)  # exp(-inf) = 0 for a part without any visible key
        total = total + w * l
        acc = acc + w[..., None] * a
    return acc / torch.where(total > 0, total, torch.ones_like(total))[..., None]


def local_part(q, k, v, scale):
    """Causal part: q ``[B,n,G,T,Dh]``, k/v ``[B,n,S,Dh]`` with S >= T, queries aligned to the end."""
    t, s = q.shape[-2], k.shape[-2]
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)[:, :, None]) * scale  # [B,n,G,T,S]
    visible = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=s - t)
    scores = scores.masked_fill(~visible, -math.inf)
    return _part(scores, lambda e: torch.matmul(e, v.float()[:, :, None]))


def _chunks(mem_k, mem_v, mem_mask, chunk):
    m = mem_k.shape[-2]
    for start in range(0, m, chunk):
        end = min(start + chunk, m)
        yield start, mem_k[:, :, start:end], mem_v[:, :, start:end], mem_mask[:, start:end]


def _mem_scores(q, mk, mmask, scale):
    """q [B,n,G,T,Dh] · memory keys [B,n,C,Dh] (any dtype, cast per chunk) → [B,n,G,T,C], -inf if masked."""
    s = torch.matmul(q.float(), mk.float().transpose(-1, -2)[:, :, None]) * scale
    return s.masked_fill(~mmask[:, None, None, None, :], -math.inf)


def dense_memory_parts(q, mem_k, mem_v, mem_mask, scale, chunk=DEFAULT_CHUNK):
    """One softmax part per memory chunk (all valid memory keys)."""
    return [_part(_mem_scores(q, mk, mm, scale), lambda e, mv=mv: torch.matmul(e, mv.float()[:, :, None]))
            for _, mk, mv, mm in _chunks(mem_k, mem_v, mem_mask, chunk)]


def topk_memory_part(q, mem_k, mem_v, mem_mask, top_k, scale, chunk=DEFAULT_CHUNK):
    """The ``top_k`` valid memory keys with the largest scores per (b, head, t) as one softmax part
    (exact; fewer valid keys → all valid ones). A running ``torch.topk`` over memory chunks."""
    best = idx = None
    for start, mk, _, mm in _chunks(mem_k, mem_v, mem_mask, chunk):
        s = _mem_scores(q, mk, mm, scale)
        pos = torch.arange(start, start + s.shape[-1], device=q.device).expand(s.shape)
        if best is not None:
            s, pos = torch.cat([best, s], -1), torch.cat([idx, pos], -1)
        best, sel = torch.topk(s, min(top_k, s.shape[-1]), dim=-1)
        idx = torch.gather(pos, -1, sel)
    b, n = mem_v.shape[:2]
    bi = torch.arange(b, device=q.device).view(b, 1, 1, 1, 1)
    ni = torch.arange(n, device=q.device).view(1, n, 1, 1, 1)
    sel_v = mem_v[bi, ni, idx].float()  # [B,n,G,T,K,Dh]
    return _part(best, lambda e: torch.einsum("bngtk,bngtkd->bngtd", e, sel_v))


def memory_parts(q, memory, top_k, scale, chunk=DEFAULT_CHUNK):
    """Softmax parts over a layer's memory ``(mem_k, mem_v, mem_mask)`` (none when it is empty)."""
    if memory is None or memory[0].shape[-2] == 0:
        return []
    if top_k is None:
        return dense_memory_parts(q, *memory, scale, chunk)
    return [topk_memory_part(q, *memory, top_k, scale, chunk)]


def gate_mix(gate, mem_out, local_out, has_memory):
    """MT gate: ``g * memory_only + (1 - g) * local_only``; gate [n, G] (sigmoid of the bias), outputs
    [B,n,G,T,Dh], has_memory bool [B] (g = 0 for a row without a valid memory key)."""
    g = gate[None, :, :, None, None] * has_memory.float()[:, None, None, None, None]
    return g * mem_out + (1.0 - g) * local_out


# ---------------------------------------------------------------------------------------------------
class LayerState:
    """State of one layer: local cache (keys as attention consumes them, values) ``[B, n, C, Dh]``; for
    memory layers the memory-view keys of the cached tokens (``pending``) and the memory itself."""

    def __init__(self):
        self.k = self.v = None  # local cache
        self.pending_k = None  # memory-view keys of the cached tokens (memory layers)
        self.mem_k = self.mem_v = self.mem_mask = None  # memory [B,n,M,Dh] x2, [B,M]

    def memory(self):
        return None if self.mem_k is None else (self.mem_k, self.mem_v, self.mem_mask)

    def extend(self, k, v, k_mem=None):
        """Append a window's local keys/values (and memory-view keys) to the cache."""
        cat = lambda old, new: new if old is None else torch.cat([old, new], dim=-2)  # noqa: E731
        self.k, self.v = cat(self.k, k), cat(self.v, v)
        if k_mem is not None:
            self.pending_k = cat(self.pending_k, k_mem)

    def flush(self, dtype, capacity=None, pad_to=None):
        """Move the cache into memory (memory layers; FIFO beyond ``capacity`` slots) and empty it.
        ``pad_to``: also add masked slots up to that many (fot pads a short window to a full one)."""
        if self.pending_k is not None:
            k, v = self.pending_k.to(dtype), self.v.to(dtype)
            b, n, c, dh = k.shape
            mask = torch.ones(b, c, dtype=torch.bool, device=k.device)
            if pad_to is not None and pad_to > c:
                z = k.new_zeros(b, n, pad_to - c, dh)
                k, v = torch.cat([k, z], -2), torch.cat([v, z], -2)
                mask = torch.cat([mask, mask.new_zeros(b, pad_to - c)], -1)
            if self.mem_k is not None:
                k, v = torch.cat([self.mem_k, k], -2), torch.cat([self.mem_v, v], -2)
                mask = torch.cat([self.mem_mask, mask], -1)
            if capacity is not None and k.shape[-2] > capacity:
                k, v, mask = k[:, :, -capacity:], v[:, :, -capacity:], mask[:, -capacity:]
            self.mem_k, self.mem_v, self.mem_mask = k, v, mask
        self.k = self.v = self.pending_k = None

    def select_rows(self, rows):
        """Keep batch rows ``rows`` (long [B']) — beam search reordering."""
        for name in ("k", "v", "pending_k", "mem_k", "mem_v", "mem_mask"):
            x = getattr(self, name)
            if x is not None:
                setattr(self, name, x.index_select(0, rows.to(x.device)))


class FotState:
    """Inference state of the whole model: one :class:`LayerState` per layer, ``n`` tokens in the local
    cache (the current window), ``seen`` tokens consumed since the state was created."""

    def __init__(self, num_layers):
        self.layers = [LayerState() for _ in range(num_layers)]
        self.n = 0
        self.seen = 0

    def flush(self, dtype, capacity=None, pad_to=None):
        for layer in self.layers:
            layer.flush(dtype, capacity, pad_to)
        self.n = 0

    def memory_size(self):
        """Valid memory slots per row (first memory layer), long [B], or None without memory."""
        for layer in self.layers:
            if layer.mem_mask is not None:
                return layer.mem_mask.sum(-1)
        return None

    def reorder(self, beam_idx):
        for layer in self.layers:
            layer.select_rows(beam_idx)
        return self
