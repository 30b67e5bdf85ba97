"""Pure mapping table between fot's Flax param tree and Hugging Face LLaMA tensor names.

fot's RoPE already uses HF's rotate-half layout, so no q/k row permutation is needed (unlike the
EasyLM export of the reference, §5.2): every Dense kernel ``[in, out]`` is transposed to torch's
``[out, in]``; embeddings and RMSNorm scales are copied as they are. Grouped-query attention: k/v
projections have ``num_kv_heads * head_dim`` outputs (HF ``num_key_value_heads``), heads in the same
order (query head h reads kv head h // G in both).

One :class:`ParamMap` per tensor: fot path (tuple of keys), HF name, fot shape, HF shape and the two
hook functions (numpy → numpy) that convert between them.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

Hook = Callable[[np.ndarray], np.ndarray]


def identity(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x)


def transpose(x: np.ndarray) -> np.ndarray:
    """Flax Dense kernel ``[in, out]`` ↔ torch Linear weight ``[out, in]`` (its own inverse)."""
    return np.ascontiguousarray(np.swapaxes(x, 0, 1))


def _t_shape(shape):
    return tuple(reversed(shape))


@dataclasses.dataclass(frozen=True)
class ParamMap:
    fot_path: tuple[str, ...]
    hf_name: str
    fot_shape: tuple[int, ...]
    to_hf: Hook
    from_hf: Hook

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return _t_shape(self.fot_shape) if self.to_hf is transpose else tuple(self.fot_shape)


# (fot sub-path, HF suffix, hook, shape key) — the table itself; shapes are resolved per config.
GLOBAL_RULES = (
    (("embed", "embedding"), "model.embed_tokens.weight", identity, ("V", "D")),
    (("final_norm", "scale"), "model.norm.weight", identity, ("D",)),
    (("lm_head", "kernel"), "lm_head.weight", transpose, ("D", "V")),
)
LAYER_RULES = (
    (("attn_norm", "scale"), "input_layernorm.weight", identity, ("D",)),
    (("attn", "q", "kernel"), "self_attn.q_proj.weight", transpose, ("D", "HD")),
    (("attn", "k", "kernel"), "self_attn.k_proj.weight", transpose, ("D", "KD")),
    (("attn", "v", "kernel"), "self_attn.v_proj.weight", transpose, ("D", "KD")),
    (("attn", "o", "kernel"), "self_attn.o_proj.weight", transpose, ("HD", "D")),
    (("mlp_norm", "scale"), "post_attention_layernorm.weight", identity, ("D",)),
    (("mlp", "gate", "kernel"), "mlp.gate_proj.weight", transpose, ("D", "F")),
    (("mlp", "up", "kernel"), "mlp.up_proj.weight", transpose, ("D", "F")),
    (("mlp", "down", "kernel"), "mlp.down_proj.weight", transpose, ("F", "D")),
)
# Memory-layer extras of fot.model.attention, with no LLaMA equivalent (read by the exported remote
# code, fot.convert.hf_remote), named as in fot: (config flag, param name, hook, shape key).
MEMORY_RULES = (
    ("qk_norm", "qk_scale", identity, ("H",)),  # "qk_log_scale" with ModelConfig.qk_scale_param="log"
    ("mem_gate", "gate_bias", identity, ("H",)),
)


def qk_scale_param(cfg) -> str:
    """How the QK-norm temperature is stored ("linear": qk_scale, "log": qk_log_scale)."""
    return getattr(cfg, "qk_scale_param", "linear")


def param_table(cfg) -> list[ParamMap]:
    """Every tensor of a fot ``ModelConfig``, in HF order (memory-layer extras after each layer's own)."""
    dims = {"V": cfg.vocab_size, "D": cfg.d_model, "HD": cfg.num_heads * cfg.head_dim,
            "KD": cfg.num_kv_heads * cfg.head_dim, "F": cfg.mlp_dim, "H": cfg.num_heads}
    shape = lambda key: tuple(dims[k] for k in key)
    out = []
    for path, name, hook, key in GLOBAL_RULES[:2]:
        out.append(ParamMap(path, name, shape(key), hook, hook))
    for i in range(cfg.num_layers):
        for path, suffix, hook, key in LAYER_RULES:
            out.append(ParamMap((f"layers_{i}",) + path, f"model.layers.{i}.{suffix}", shape(key), hook, hook))
        for flag, name, hook, key in MEMORY_RULES:
            if getattr(cfg, flag) and cfg.is_memory_layer(i):
                if name == "qk_scale" and qk_scale_param(cfg) == "log":
                    name = "qk_log_scale"
                out.append(ParamMap((f"layers_{i}", "attn", name), f"model.layers.{i}.self_attn.{name}",
                                    shape(key), hook, hook))
    if not cfg.tie_embeddings:
        path, name, hook, key = GLOBAL_RULES[2]
        out.append(ParamMap(path, name, shape(key), hook, hook))
    return out


def flatten(tree, prefix=()) -> dict[tuple[str, ...], object]:
    """Nested dict → {path tuple: leaf}."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) or hasattr(v, "items"):
            out.update(flatten(v, prefix + (str(k),)))
        else:
            out[prefix + (str(k),)] = v
    return out


def unflatten(flat: dict[tuple[str, ...], object]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return out
