"""Model configuration (plain frozen dataclass; gin registration lives in the entry points)."""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp

from fot.ops.crossbatch import check_block_rows
from fot.ops.fused import check_implementation

_POSITIONAL = ("as_first", "none")
_QK_SCALE_PARAMS = ("linear", "log")
_REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable",
                   "everything_saveable")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """LLaMA-style decoder with FoT memory layers.

    Attributes:
      vocab_size, d_model, num_layers, num_heads, mlp_dim: the usual sizes.
      head_dim: per-head width; ``None`` resolves to ``d_model // num_heads`` at construction.
      num_kv_heads: key/value heads (grouped-query attention, HF ``num_key_value_heads``); must divide
        ``num_heads``: query head h reads kv head ``h // (num_heads // num_kv_heads)``; 1 = multi-query.
        ``None`` resolves to ``num_heads`` (multi-head) at construction.
      mem_layers: 0-based indices of memory layers, each in ``[0, num_layers)``.
      mem_positional: ``"as_first"`` (LongLLaMA: local RoPE, memory keys at position 0) or
        ``"none"`` (paper's small models: no RoPE in memory layers).
      qk_norm: memory layers L2-normalise q and k per head and scale logits by a learnable per-head
        temperature tau (init ``qk_scale_init`` or ``sqrt(head_dim)``), stored as ``qk_scale_param`` says.
      qk_scale_param: how tau is stored: ``"linear"`` (param ``attn/qk_scale`` [H] = tau; the
        optimizer moves tau additively, ~lr per step with Adam) or ``"log"`` (param
        ``attn/qk_log_scale`` [H] = log tau, tau = exp(param): moves multiplicatively, as the paper's
        scale under Adafactor's parameter-scaled updates).
      qk_scale_n_ref: None (default: tau alone) or an int n_ref > 1: with ``qk_norm`` the memory
        layers' temperature becomes ``tau * ln(n) / ln(n_ref)``, n = the keys in the query's view
        (its causal local keys + the crossbatch extra keys in training / the filled memory slots at
        inference, counted before top-k), so the softmax sharpens as the memory grows (log-n
        "scalable softmax" scaling; n_ref ~ the keys in view in training gives a factor ~1 there).
      qk_scale_extrapolation: beta >= 0 (default 0: off); with ``qk_norm`` and ``qk_scale_n_train`` the
        memory layers' temperature is further multiplied by ``max(1, n / n_train) ** beta`` (n as for
        ``qk_scale_n_ref``): nothing changes for the keys-in-view counts training saw, and the softmax
        sharpens by a power law beyond them. An inference-time setting: beta is calibrated after
        training on training documents (``fot.eval --gin_bindings=ModelConfig.qk_scale_extrapolation=...``).
      qk_scale_n_train: keys in view of a training query (recipe: ``(D + 1) * WINDOW``), the point
        past which ``qk_scale_extrapolation`` applies; None = unset (required when beta > 0).
      mem_gate: MT-style gate in memory layers: ``g = sigmoid(attn/gate_bias[h])``,
        ``out = g * memory_only + (1 - g) * local_only`` (``g = 0`` for a row without any visible
        memory key). Off by default (FoT uses one joint softmax); dense memory only (no ``top_k``).
      mem_key_smear: "smeared keys" in memory layers (Olsson et al. 2022, "In-context learning and
        induction heads"): before normalisation and RoPE each key mixes in the previous token's key,
        ``k'_t = s * k_t + (1 - s) * k_{t-1}``, ``s = sigmoid(attn/key_smear[hkv])`` (param init 0:
        s = 0.5). A query then matches a key by the token BEFORE it — a one-layer copy (induction)
        circuit, which a small model trained briefly does not form by composing two layers. The mix
        runs inside each call's window (the window's first token and a token starting a new segment
        keep their own key), so it is defined for window-by-window processing (training, memory fill,
        windowed evaluation); token-by-token generation and HF export refuse such models. Off by default
        (not a LLaMA model).
      rope_theta: RoPE base. norm_eps: RMSNorm epsilon. tie_embeddings: LM head = embedding^T.
      dtype: compute dtype name; param_dtype: params dtype name (float32).
      remat: ``False``/``True`` (every layer) or a sequence of layer indices to rematerialise.
      remat_policy: name in ``jax.checkpoint_policies`` used by remat.
      init_std: std of the Normal init of every Dense/Embed kernel.
      crossbatch_block_rows: extra contexts per online-softmax block of crossbatch attention in memory
        layers (``fot.ops.crossbatch_attention(block_rows=...)``; ``None`` = the op's default: 1 on CPU,
        1024 // context length on accelerators). Exact for any value; only speed and memory (which grows
        with it, not with the number of extra contexts) change.
      attention_impl: local causal attention kernel of non-memory layers (``fot.ops.causal_attention(
        implementation=...)``): ``"auto"`` (cuDNN flash attention on GPU for bf16/f16 compute, fot's
        blockwise kernel elsewhere), ``"blockwise"``, ``"xla"`` or ``"cudnn"``. Same results to the dtype's
        tolerance; memory layers' joint softmax always uses the blockwise kernel.
    """

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    head_dim: int | None = None
    num_kv_heads: int | None = None
    mem_layers: Sequence[int] = ()
    mem_positional: str = "as_first"
    qk_norm: bool = False
    mem_gate: bool = False
    mem_key_smear: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool | Sequence[int] = False
    remat_policy: str = "nothing_saveable"
    init_std: float = 0.02
    qk_scale_init: float | None = None
    qk_scale_param: str = "linear"
    qk_scale_n_ref: int | None = None
    qk_scale_extrapolation: float = 0.0
    qk_scale_n_train: int | None = None
    crossbatch_block_rows: int | None = None
    attention_impl: str = "auto"

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "mlp_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {v!r}")
        head_dim = self.head_dim
        if head_dim is None:
            if self.d_model % self.num_heads:
                raise ValueError(f"d_model={self.d_model} not divisible by num_heads={self.num_heads}; "
                                 "set head_dim explicitly")
            head_dim = self.d_model // self.num_heads
        if head_dim < 2 or head_dim % 2:
            raise ValueError(f"head_dim must be an even int >= 2 (RoPE rotate-half), got {head_dim}")
        object.__setattr__(self, "head_dim", int(head_dim))
        kv = self.num_heads if self.num_kv_heads is None else self.num_kv_heads
        if not isinstance(kv, int) or isinstance(kv, bool) or kv < 1 or self.num_heads % kv:
            raise ValueError(f"ModelConfig.num_kv_heads={self.num_kv_heads!r} must be a positive int dividing "
                             f"num_heads={self.num_heads}")
        object.__setattr__(self, "num_kv_heads", int(kv))
        mem = tuple(int(i) for i in self.mem_layers)
        bad = [i for i in mem if not 0 <= i < self.num_layers]
        if bad or len(set(mem)) != len(mem):
            raise ValueError(f"mem_layers={list(self.mem_layers)} must be distinct indices in "
                             f"[0, num_layers={self.num_layers})")
        object.__setattr__(self, "mem_layers", tuple(sorted(mem)))
        if self.mem_positional not in _POSITIONAL:
            raise ValueError(f"mem_positional must be one of {_POSITIONAL}, got {self.mem_positional!r}")
        if self.qk_scale_param not in _QK_SCALE_PARAMS:
            raise ValueError(f"qk_scale_param must be one of {_QK_SCALE_PARAMS}, got {self.qk_scale_param!r}")
        if self.qk_scale_init is not None and not self.qk_scale_init > 0:
            raise ValueError(f"qk_scale_init must be > 0, got {self.qk_scale_init}")
        if self.qk_scale_n_ref is not None:
            if isinstance(self.qk_scale_n_ref, bool) or not isinstance(self.qk_scale_n_ref, int) \
                    or self.qk_scale_n_ref < 2:
                raise ValueError(f"qk_scale_n_ref must be None or an int >= 2, got {self.qk_scale_n_ref!r}")
            if not self.qk_norm:
                raise ValueError("qk_scale_n_ref scales the QK-norm temperature: it needs qk_norm=True")
        beta, n_train = self.qk_scale_extrapolation, self.qk_scale_n_train
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta >= 0:
            raise ValueError(f"qk_scale_extrapolation must be a number >= 0, got {beta!r}")
        if n_train is not None and (isinstance(n_train, bool) or not isinstance(n_train, int) or n_train < 1):
            raise ValueError(f"qk_scale_n_train must be None or an int >= 1, got {n_train!r}")
        if beta > 0 and (not self.qk_norm or n_train is None):
            raise ValueError(f"qk_scale_extrapolation={beta} scales the QK-norm temperature beyond the keys in "
                             "view of training: it needs qk_norm=True and qk_scale_n_train")
        if isinstance(self.remat, bool):
            remat = self.remat
        else:
            remat = tuple(int(i) for i in self.remat)
            bad = [i for i in remat if not 0 <= i < self.num_layers]
            if bad:
                raise ValueError(f"remat layer indices {list(remat)} must be in [0, num_layers={self.num_layers})")
        object.__setattr__(self, "remat", remat)
        if self.remat_policy not in _REMAT_POLICIES:
            raise ValueError(f"remat_policy must be one of {_REMAT_POLICIES}, got {self.remat_policy!r}")
        for name in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError as e:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r} is not a dtype name") from e
        check_block_rows(self.crossbatch_block_rows, "ModelConfig.crossbatch_block_rows")
        check_implementation(self.attention_impl, "ModelConfig.attention_impl")
        if self.rope_theta <= 0 or self.norm_eps <= 0 or self.init_std <= 0:
            raise ValueError("rope_theta, norm_eps and init_std must be > 0, got "
                             f"{self.rope_theta}, {self.norm_eps}, {self.init_std}")

    # Derived helpers -----------------------------------------------------------------------------
    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self):
        return jnp.dtype(self.param_dtype)

    @property
    def kv_groups(self) -> int:
        """Query heads per key/value head (1 = multi-head attention)."""
        return self.num_heads // self.num_kv_heads

    @property
    def smears_memory_keys(self) -> bool:
        """Memory layers smear their keys (``mem_key_smear`` with ``mem_layers``): the model is defined
        window by window only, so token-by-token generation and HF export (not a LLaMA model) refuse it."""
        return bool(self.mem_key_smear and self.mem_layers)

    @property
    def scales_temperature_by_n(self) -> bool:
        """The memory layers' temperature depends on the keys in view n (``qk_scale_n_ref`` or
        ``qk_scale_extrapolation``): the memory slots must be counted."""
        return bool(self.qk_norm and (self.qk_scale_n_ref is not None or self.qk_scale_extrapolation > 0))

    @property
    def qk_scale_default(self) -> float:
        return float(self.qk_scale_init) if self.qk_scale_init is not None else math.sqrt(self.head_dim)

    def is_memory_layer(self, i: int) -> bool:
        return i in self.mem_layers

    def remat_layer(self, i: int) -> bool:
        return self.remat if isinstance(self.remat, bool) else i in self.remat

    def checkpoint_policy(self):
        return getattr(jax.checkpoint_policies, self.remat_policy)

    def replace(self, **changes) -> "ModelConfig":
        """``dataclasses.replace``; when d_model/num_heads change and head_dim equals d_model // num_heads
        (the implicit default), head_dim is re-derived; likewise num_kv_heads when it equals num_heads."""
        if ("d_model" in changes or "num_heads" in changes) and "head_dim" not in changes:
            d, h = changes.get("d_model", self.d_model), changes.get("num_heads", self.num_heads)
            if self.head_dim == self.d_model // self.num_heads:
                changes["head_dim"] = None if d % h == 0 else self.head_dim
        if "num_heads" in changes and "num_kv_heads" not in changes and self.num_kv_heads == self.num_heads:
            changes["num_kv_heads"] = None
        return dataclasses.replace(self, **changes)


def check_token_ids(tokens, vocab_size: int, what: str = "tokens") -> None:
    """Raise ValueError naming the first token id outside ``[0, vocab_size)`` in ``tokens`` (any int array).

    An embedding lookup of such an id silently gives NaN (ids >= vocab) or another token's row (negative
    ids wrap around), so every path that feeds ids to a model checks them on the host first."""
    import numpy as np

    arr = np.asarray(tokens)
    if arr.size == 0:
        return
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what}: token ids must be integers, got dtype {arr.dtype}")
    bad = (arr < 0) | (arr >= vocab_size)
    if bad.any():
        pos = tuple(int(i) for i in np.argwhere(bad)[0])
        where = pos[0] if len(pos) == 1 else pos
        raise ValueError(f"{what}: token id {int(arr[pos])} at position {where} is outside [0, {vocab_size}) "
                         f"(the model's vocab_size); {int(bad.sum())} such id(s)")
