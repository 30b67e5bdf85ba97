"""Import a Hugging Face LLaMA directory (safetensors + config.json) as fot params + ModelConfig.

The inverse of :mod:`fot.convert.to_hf`: ``load_hf(dir) -> (ModelConfig, params)`` — like
``fot.train.load_run``, ``params`` is the tree passed as ``{"params": params}`` to ``Decoder.apply``
(float32 numpy leaves). Reads ``model.safetensors`` or the shards listed in
``model.safetensors.index.json``. Every tensor is checked against the shape the config implies; a
missing, unexpected or mis-shaped tensor raises ValueError naming it. LongLLaMA fields
(``mem_layers``, ``mem_positionals``) become ``ModelConfig.mem_layers`` / ``mem_positional``; FoT exports'
``qk_norm`` / ``mem_gate`` (tensors ``self_attn.qk_scale`` / ``self_attn.gate_bias``) come back as they were.
"""
from __future__ import annotations

import json
import os

import numpy as np

from fot.convert.mapping import param_table, unflatten


def config_from_hf(conf: dict):
    """HF/LongLLaMA config dict → fot ``ModelConfig``."""
    from fot.model import ModelConfig

    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in conf]
    if missing:
        raise ValueError(f"config.json lacks {missing}")
    heads = int(conf["num_attention_heads"])
    kv = conf.get("num_key_value_heads") or heads
    if int(kv) != heads:
        raise ValueError(f"num_key_value_heads={kv} != num_attention_heads={heads}: fot has no GQA/MQA")
    for flag in ("attention_bias", "mlp_bias"):
        if conf.get(flag):
            raise ValueError(f"config.json has {flag}=true: fot's LLaMA has no biases")
    if conf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={conf['hidden_act']!r}: fot's MLP is SwiGLU (silu)")
    rope = conf.get("rope_parameters") or conf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"RoPE scaling {rope} is not supported (fot uses plain RoPE)")
    theta = rope.get("rope_theta", conf.get("rope_theta", 10000.0))
    hidden = int(conf["hidden_size"])
    fot_block = conf.get("fot") or {}
    positional = fot_block.get("mem_positional") or ("as_first" if conf.get("mem_positionals", True) else "none")
    log_scale = {"qk_scale_param": "log"} if conf.get("qk_scale_param", "linear") == "log" else {}
    return ModelConfig(vocab_size=int(conf["vocab_size"]), d_model=hidden,
                       num_layers=int(conf["num_hidden_layers"]), num_heads=heads,
                       mlp_dim=int(conf["intermediate_size"]),
                       head_dim=int(conf.get("head_dim") or hidden // heads),
                       mem_layers=tuple(int(i) for i in conf.get("mem_layers") or ()),
                       mem_positional=positional, rope_theta=float(theta),
                       qk_norm=bool(conf.get("qk_norm", False)), mem_gate=bool(conf.get("mem_gate", False)),
                       qk_scale_init=fot_block.get("qk_scale_init"),
                       norm_eps=float(conf.get("rms_norm_eps", 1e-6)),
                       tie_embeddings=bool(conf.get("tie_word_embeddings", False)),
                       init_std=float(conf.get("initializer_range", 0.02)), **log_scale)


def read_tensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of an HF directory (single file or sharded with an index) as numpy arrays."""
    from safetensors.numpy import load_file

    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(single):
        files = ["model.safetensors"]
    else:
        raise ValueError(f"no model.safetensors or model.safetensors.index.json in {path} "
                         "(only safetensors checkpoints are supported)")
    out = {}
    for fname in files:
        fpath = os.path.join(path, fname)
        if not os.path.isfile(fpath):
            raise ValueError(f"shard {fname} listed in the index is missing from {path}")
        out.update(load_file(fpath))
    return out


def from_hf_tensors(tensors: dict[str, np.ndarray], cfg) -> dict:
    """{HF name: array} → fot params tree (float32), validating names and shapes."""
    tensors = dict(tensors)
    tensors.pop("model.rotary_emb.inv_freq", None)
    for i in range(cfg.num_layers):  # RoPE buffers some old exports carry
        tensors.pop(f"model.layers.{i}.self_attn.rotary_emb.inv_freq", None)
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    flat = {}
    for m in param_table(cfg):
        if m.hf_name not in tensors:
            raise ValueError(f"tensor {m.hf_name} is missing from the checkpoint")
        x = tensors.pop(m.hf_name)
        if tuple(x.shape) != m.hf_shape:
            raise ValueError(f"tensor {m.hf_name} has shape {tuple(x.shape)}, expected {m.hf_shape} "
                             f"from config.json (fot param {'/'.join(m.fot_path)} {m.fot_shape})")
        flat[m.fot_path] = m.from_hf(np.asarray(x).astype(np.float32))
    if tensors:
        raise ValueError(f"unexpected tensors in the checkpoint: {sorted(tensors)[:8]}"
                         + (f" (+{len(tensors) - 8} more)" if len(tensors) > 8 else ""))
    return unflatten(flat)


def load_hf(path: str):
    """HF directory → (ModelConfig, params tree of float32 numpy arrays), as ``fot.train.load_run``."""
    if not os.path.isdir(path):
        raise ValueError(f"{path} is not a directory")
    cpath = os.path.join(path, "config.json")
    if not os.path.isfile(cpath):
        raise ValueError(f"{cpath} not found")
    with open(cpath) as f:
        conf = json.load(f)
    cfg = config_from_hf(conf)
    return cfg, from_hf_tensors(read_tensors(path), cfg)
