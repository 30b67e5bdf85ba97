"""Multi-head attention (no biases) with the FoT memory-layer variants.

Layout ``[batch, length, heads, head_dim]``. Params: ``q`` kernel ``[D, H*Dh]``, ``k, v`` kernels
``[D, Hkv*Dh]`` (``Hkv = cfg.num_kv_heads``: grouped-query / multi-query attention; the ops group the queries
over the kv heads without repeating them), ``o`` kernel ``[H*Dh, D]``; memory layers with ``qk_norm`` add
``qk_scale`` [H] (or ``qk_log_scale`` [H], see ``ModelConfig.qk_scale_param``); with ``mem_gate``
``gate_bias`` [H]; with ``mem_key_smear`` ``key_smear`` [Hkv]. Keys/values (caches, crossbatch extra keys, the inference memory) have Hkv heads.

Key encodings (what the caches hold):
* local keys (``aux["kv"]``, the generation cache): exactly what the layer's local attention consumes —
  RoPE-rotated at their positions, except memory layers with ``mem_positional="none"`` (raw keys);
  with ``qk_norm`` they are L2-normalised.
* memory-view keys (``aux["mem_kv"]``, crossbatch extra keys, inference memory): ``as_first`` ⇒
  un-rotated (RoPE at position 0 is the identity), ``none`` ⇒ raw (L2-normalised with ``qk_norm``).
With ``qk_norm`` the per-head temperature multiplies the queries, and the ops get ``scale=1``.

Structure: :meth:`Attention.__call__` projects (:meth:`Attention._project` → :class:`Projected`), then
runs one of :func:`local_attention`, :func:`crossbatch_attention` (training: extra contexts from other
rows of the batch) or :func:`memory_attention` (inference: the layer's ``LayerMemory``); with
``mem_gate`` :func:`gated` wraps a memory-only attention and the local one (MT gate).
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from fot import ops
from fot.model.config import ModelConfig
from fot.model.layers import dense
from fot.model.state import FillMemory, LayerInputs, LayerKV, LayerMemory, memory_slots, windows_first
from fot.model.temperature import keys_in_view, n_scaling, temperature_from_param, temperature_param_name
from fot.parallel import with_logical_constraint

_HEADS = ("batch", "length", "heads", "head_dim")
_KV_HEADS = ("batch", "length", "kv_heads", "head_dim")


def _l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)


def smear_keys(k: jax.Array, s: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    """Smeared keys ``k'_t = s * k_t + (1 - s) * k_{t-1}`` inside the window (``ModelConfig.mem_key_smear``).

    k [B,T,Hkv,Dh]; s [Hkv] in (0, 1); segment_ids [B,T] or None. Position 0 and a token whose segment
    differs from its predecessor's mix with themselves (keep k_t). Returns [B,T,Hkv,Dh] in k's dtype.
    """
    k32 = k.astype(jnp.float32)
    prev = jnp.concatenate([k32[:, :1], k32[:, :-1]], axis=1)  # [B, T, Hkv, Dh]: k_{t-1} (k_0 at t = 0)
    if segment_ids is not None:
        same = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                                segment_ids[:, 1:] == segment_ids[:, :-1]], axis=1)  # [B, T]
        prev = jnp.where(same[:, :, None, None], prev, k32)
    s = s[None, None, :, None]  # [1, 1, Hkv, 1]
    return (s * k32 + (1.0 - s) * prev).astype(k.dtype)


class Projected(NamedTuple):
    """One window's projected heads, encoded as the attention variants consume them.

    q [B,T,H,Dh] (RoPE'd unless ``mem_positional="none"``; times tau with ``qk_norm``); k [B,T,Hkv,Dh]
    local keys (the cache encoding); v [B,T,Hkv,Dh]; k_mem [B,T,Hkv,Dh] memory-view keys; scale: the
    ops' softmax scale (None = Dh**-0.5; 1.0 with ``qk_norm``).
    """

    q: jax.Array
    k: jax.Array
    v: jax.Array
    k_mem: jax.Array
    scale: float | None


def _with_cache(cfg: ModelConfig, p: Projected, inputs: LayerInputs, cache: LayerKV | None):
    """Local keys/values/segment ids with the cache in front: [B,C+T,Hkv,Dh] x2, [B,C+T] (C = 0 without)."""
    if cache is None:
        return p.k, p.v, inputs.segment_ids
    dt = cfg.compute_dtype
    k_all = jnp.concatenate([cache.keys.astype(dt), p.k], axis=1)  # [B, C+T, Hkv, Dh]
    v_all = jnp.concatenate([cache.values.astype(dt), p.v], axis=1)  # [B, C+T, Hkv, Dh]
    return k_all, v_all, inputs.cache_segment_ids


def local_attention(cfg: ModelConfig, p: Projected, inputs: LayerInputs, cache: LayerKV | None = None):
    """Causal attention over the cache (if any) and the window's own keys → [B,T,H,Dh]."""
    k_all, v_all, seg_all = _with_cache(cfg, p, inputs, cache)
    return ops.causal_attention(p.q, k_all, v_all, segment_ids=seg_all, scale=p.scale,
                                implementation=cfg.attention_impl)


def crossbatch_attention(cfg: ModelConfig, p: Projected, inputs: LayerInputs, mesh=None, *,
                         include_local: bool = True, collect: bool = False):
    """Training memory attention: local keys and the extra rows' memory-view keys in one softmax
    (only the extra keys with ``include_local=False``) → (out [B,T,H,Dh], stats or None)."""
    res = ops.crossbatch_attention(p.q, p.k, p.v, p.k_mem, p.v, inputs.extra_rows,
                                   extra_key_mask=inputs.extra_key_mask, segment_ids=inputs.segment_ids,
                                   scale=p.scale, mesh=mesh, return_stats=collect,
                                   block_rows=cfg.crossbatch_block_rows, include_local=include_local)
    return res if collect else (res, None)


def fill_memory_attention(p: Projected, fill: FillMemory, mesh=None, top_k: int | None = None,
                          collect: bool = False, include_local: bool = True):
    """Memory attention of a memory-prefill call (rows = windows, see :class:`FillMemory`): a scan over
    the C windows, window t running ``fot.ops.memory_attention`` on its rows of every batch row against the
    store with ``fill.window_mask(t)`` (what it saw streaming) → (out [B*C,w,H,Dh], stats or None)."""
    mem = fill.view()  # [B, M (+ C*w), ...]
    b = mem.mask.shape[0]
    r, w = p.q.shape[:2]
    c = r // b

    def window(_, xs):
        t, q, k, v = xs  # q [B,w,H,Dh], k, v [B,w,Hkv,Dh]
        o, stats = ops.memory_attention(q, k, v, mem.keys, mem.values, mem_mask=fill.window_mask(t, c, w),
                                        top_k=top_k, scale=p.scale, mesh=mesh, include_local=include_local,
                                        return_stats=True)
        return None, (o, stats["mem_mass"])

    xs = (jnp.arange(c, dtype=jnp.int32),) + tuple(windows_first(x, b) for x in (p.q, p.k, p.v))  # [C, B, w, ...]
    _, (o, mass) = jax.lax.scan(window, None, xs)
    merge = lambda x: jnp.swapaxes(x, 0, 1).reshape((r,) + x.shape[2:])  # noqa: E731  [C,B,...] -> [B*C,...]
    return merge(o), ({"mem_mass": merge(mass)} if collect else None)


def memory_attention(cfg: ModelConfig, p: Projected, inputs: LayerInputs, memory: LayerMemory | FillMemory,
                     cache: LayerKV | None = None, mesh=None, top_k: int | None = None, collect: bool = False):
    """Inference memory attention: causal local keys (cache included) and the valid memory slots
    (exact top-k of them with ``top_k``) in one softmax → (out [B,T,H,Dh], stats or None)."""
    if isinstance(memory, FillMemory):
        return fill_memory_attention(p, memory, mesh, top_k, collect)
    k_all, v_all, seg_all = _with_cache(cfg, p, inputs, cache)
    res = ops.memory_attention(p.q, k_all, v_all, memory.keys, memory.values, mem_mask=memory.mask,
                               top_k=top_k, segment_ids=seg_all, scale=p.scale, mesh=mesh,
                               return_stats=collect)
    return res if collect else (res, None)


def memory_only_attention(cfg: ModelConfig, p: Projected, inputs: LayerInputs,
                          memory: LayerMemory | FillMemory | None, mesh=None, slots: jax.Array | None = None):
    """Attention to the memory keys alone (no local keys; the gate's memory half) →
    (out [B,T,H,Dh], has_memory bool [B]: the row sees at least one valid memory key). ``slots``: float32
    [B], ``memory_slots`` of ``memory`` (required with a memory; None in training)."""
    if isinstance(memory, FillMemory):
        out, _ = fill_memory_attention(p, memory, mesh, include_local=False)
        return out, slots > 0
    if memory is None:  # training: the extra rows
        out, _ = crossbatch_attention(cfg, p, inputs, mesh, include_local=False)
        b = p.q.shape[0]
        mask = jnp.ones(p.q.shape[:2], bool) if inputs.extra_key_mask is None else inputs.extra_key_mask
        rows = inputs.extra_rows
        rows_ok = jnp.take(mask.any(-1), jnp.clip(rows, 0, b - 1), axis=0) & (rows >= 0)  # [B, d]
        return out, rows_ok.any(-1)
    own_row = jnp.arange(p.q.shape[0], dtype=jnp.int32)[:, None]  # [B, 1]
    # Row b's memory as the one "extra row" of row b, no local keys.
    out = ops.crossbatch_attention(p.q, p.k, p.v, memory.keys, memory.values, own_row,
                                   extra_key_mask=memory.mask, scale=p.scale, mesh=mesh, include_local=False)
    return out, slots > 0


def gated(gate: jax.Array, memory_only: tuple[jax.Array, jax.Array], local: jax.Array):
    """MT gate: ``g * memory_only + (1 - g) * local`` with g = ``gate`` [H, 1] for rows that see memory,
    0 otherwise (then the output is the local attention). Returns (out [B,T,H,Dh], g [B,1,H,1])."""
    mem_out, has_memory = memory_only
    g = gate * has_memory[:, None, None, None]  # [B, 1, H, 1]
    mixed = g * mem_out.astype(jnp.float32) + (1.0 - g) * local.astype(jnp.float32)
    return mixed.astype(local.dtype), g


class Attention(nn.Module):
    """Self-attention of one decoder layer (local, crossbatch, or memory attention).

    Attributes: ``config`` (ModelConfig); ``is_memory`` (FoT memory layer); ``mesh`` (forwarded to fot.ops and used for
    activation constraints); ``top_k`` (inference memory top-k); ``collect_stats`` (ask the ops for
    ``mem_mass``).
    """

    config: ModelConfig
    is_memory: bool = False
    mesh: Any = None
    top_k: int | None = None
    collect_stats: bool = False

    @nn.compact
    def __call__(self, x, inputs: LayerInputs, memory: LayerMemory | None = None, cache: LayerKV | None = None):
        """x [B,T,D]; ``inputs`` (``LayerInputs``: crossbatch fields only for memory layers); memory
        (memory layers, inference) and cache of this layer, or None.

        Returns (out [B,T,D], aux) with aux["kv"] = LayerKV(local keys, v) [B,T,Hkv,Dh], and for memory
        layers aux["mem_kv"] = LayerKV(memory-view keys, v); aux["mem_mass"] [B,T,H] when collected.
        """
        cfg = self.config
        b, t, _ = x.shape
        slots = None  # float32 [B]: valid memory slots each row sees, counted once for the temperature and gate
        if self.is_memory and memory is not None and (cfg.mem_gate or cfg.scales_temperature_by_n):
            slots = memory_slots(memory, b, t)
        p = self._project(x, inputs, slots)
        aux: dict[str, Any] = {"kv": LayerKV(p.k, p.v)}
        if self.is_memory:
            aux["mem_kv"] = LayerKV(p.k_mem, p.v)
        uses_memory = self.is_memory and (inputs.extra_rows is not None or memory is not None)
        gate = self._gate() if self.is_memory and cfg.mem_gate else None  # [H, 1]
        stats = None
        if uses_memory and gate is not None:
            mem_only = memory_only_attention(cfg, p, inputs, memory, self.mesh, slots)
            out, g = gated(gate, mem_only, local_attention(cfg, p, inputs, cache))
            if self.collect_stats:  # the gate is the memory's share of the output
                stats = {"mem_mass": jnp.broadcast_to(g[..., 0], (b, t, cfg.num_heads)).astype(jnp.float32)}
        elif uses_memory and inputs.extra_rows is not None:
            out, stats = crossbatch_attention(cfg, p, inputs, self.mesh, collect=self.collect_stats)
        elif uses_memory:
            out, stats = memory_attention(cfg, p, inputs, memory, cache, self.mesh, self.top_k,
                                          self.collect_stats)
        else:
            out = local_attention(cfg, p, inputs, cache)
        if self.collect_stats and stats is not None:
            aux["mem_mass"] = stats["mem_mass"]
        out = with_logical_constraint(out.astype(cfg.compute_dtype), _HEADS, self.mesh)  # [B, T, H, Dh]
        out = out.reshape(b, t, cfg.num_heads * cfg.head_dim)
        return dense(cfg.d_model, ("heads", "embed"), cfg, "o")(out), aux

    def _project(self, x, inputs: LayerInputs, slots: jax.Array | None) -> Projected:
        """Params ``q, k, v`` (and the temperature); x [B,T,D] → :class:`Projected`; ``slots`` float32 [B]:
        the memory slots each row sees (``memory_slots``; the ln(n) temperature scaling), or None."""
        cfg = self.config
        b, t, _ = x.shape
        h, hkv, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        dt = cfg.compute_dtype

        def proj(name, heads, names):
            y = dense(heads * dh, ("embed", names[2]), cfg, name)(x).reshape(b, t, heads, dh)
            return with_logical_constraint(y, names, self.mesh)

        q = proj("q", h, _HEADS)  # [B, T, H, Dh]
        k, v = proj("k", hkv, _KV_HEADS), proj("v", hkv, _KV_HEADS)  # [B, T, Hkv, Dh]
        if self.is_memory and cfg.mem_key_smear:
            k = smear_keys(k, self._smear(), inputs.segment_ids)  # [B, T, Hkv, Dh]
        scale = None
        if self.is_memory and cfg.qk_norm:
            tau = self._temperature()[None, None, :, None]  # [1, 1, H, 1]
            if cfg.scales_temperature_by_n:
                n = keys_in_view(inputs.positions, inputs.extra_rows, inputs.extra_key_mask, slots)  # [B, T]
                tau = tau * n_scaling(cfg, n)[:, :, None, None]
            q = (_l2_normalize(q) * tau).astype(dt)
            k = _l2_normalize(k).astype(dt)
            scale = 1.0
        k_mem = k  # memory view: as_first ⇒ rotation at position 0 = identity; none ⇒ raw
        if not (self.is_memory and cfg.mem_positional == "none"):
            q = ops.apply_rope(q, inputs.positions, theta=cfg.rope_theta)
            k = ops.apply_rope(k, inputs.positions, theta=cfg.rope_theta)
        return Projected(q, k, v, k_mem, scale)

    def _smear(self) -> jax.Array:
        """Smeared-key mix s [Hkv] = sigmoid(param ``key_smear`` [Hkv]) (float32; init 0 ⇒ 0.5)."""
        logit = self.param("key_smear", nn.with_logical_partitioning(nn.initializers.zeros, ("kv_heads",)),
                           (self.config.num_kv_heads,), self.config.params_dtype)
        return jax.nn.sigmoid(logit.astype(jnp.float32))

    def _gate(self) -> jax.Array:
        """MT gate g [H, 1] = sigmoid(param ``gate_bias`` [H]) (float32)."""
        bias = self.param("gate_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("heads",)),
                          (self.config.num_heads,), self.config.params_dtype)
        return jax.nn.sigmoid(bias.astype(jnp.float32))[:, None]

    def _temperature(self) -> jax.Array:
        """Per-head QK-norm temperature tau [H] (float32) from param ``qk_scale`` (tau) or
        ``qk_log_scale`` (log tau), see ``ModelConfig.qk_scale_param``."""
        cfg = self.config
        init = math.log(cfg.qk_scale_default) if cfg.qk_scale_param == "log" else cfg.qk_scale_default
        param = self.param(temperature_param_name(cfg), nn.with_logical_partitioning(
            nn.initializers.constant(init), ("heads",)), (cfg.num_heads,), cfg.params_dtype)
        return temperature_from_param(cfg, param)
