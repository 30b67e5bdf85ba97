"""Export fot params + ModelConfig to a Hugging Face LLaMA directory (safetensors + config.json).

Written files (atomically: a temporary sibling directory renamed into place):
* ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``
  when larger than ``max_shard_bytes``), tensors named as HF ``LlamaForCausalLM``;
* ``config.json``: a vanilla LLaMA config (``model_type="llama"``, ``LlamaForCausalLM``) that also
  carries LongLLaMA's fields (``mem_layers``, ``mem_positionals``, ``mem_dtype``,
  ``last_context_length``, ...) and a ``fot`` block — ``transformers`` loads it as plain LLaMA, and
  LongLLaMA's ``LongLlamaForCausalLM.from_pretrained`` reads the memory fields from the same file;
* ``config_longllama.json``: the same with ``model_type="longllama"``, ``LongLlamaForCausalLM`` and an
  ``auto_map`` to LongLLaMA's remote-code files — rename it to ``config.json`` next to
  ``configuration_longllama.py``/``modeling_longllama.py`` for ``trust_remote_code`` loading.

Only models with an HF/LongLLaMA equivalent are exported: ``qk_norm`` and ``mem_gate`` models raise
ValueError. ``mem_positional="none"`` maps to LongLLaMA ``mem_positionals=false`` (no RoPE in memory
layers); vanilla ``LlamaForCausalLM`` rotates every layer, so such a model is exact only in LongLLaMA
code (a warning is returned and written to the config's ``note``).

CLI: ``python -m fot.convert.to_hf --workdir=W --out=DIR [--step=N] [--dtype=float32|bfloat16|float16]
[--max_position_embeddings=L] [--last_context_length=N] [--mem_dtype=bfloat16] [--overwrite]``
prints one JSON line.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

import numpy as np

from fot.convert.mapping import UNMAPPABLE, flatten, param_table

DTYPES = ("float32", "bfloat16", "float16")
# fot's SentencePiece convention (fot.data.vocab): 0 PAD / 1 EOS / 2 UNK / 3 BOS.
FOT_TOKEN_IDS = {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 3}
LONGLLAMA_AUTO_MAP = {"AutoConfig": "configuration_longllama.LongLlamaConfig",
                      "AutoModel": "modeling_longllama.LongLlamaModel",
                      "AutoModelForCausalLM": "modeling_longllama.LongLlamaForCausalLM"}


def _np_dtype(name: str):
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {name!r}")
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def check_exportable(cfg) -> list[str]:
    """Raise ValueError for configs without an HF equivalent; return warnings for lossy-in-vanilla ones."""
    if cfg.qk_norm:
        raise ValueError("cannot export a model with ModelConfig.qk_norm=True: HF LLaMA / LongLLaMA have no "
                         "QK normalisation or per-head temperature (params attn/qk_scale)")
    if cfg.mem_gate:
        raise ValueError("cannot export a model with ModelConfig.mem_gate=True: HF LLaMA / LongLLaMA have no "
                         "memory gate (params attn/gate_bias)")
    if cfg.d_model % cfg.num_heads:
        raise ValueError(f"cannot export: HF LlamaConfig requires hidden_size={cfg.d_model} divisible by "
                         f"num_attention_heads={cfg.num_heads}")
    warnings = []
    if cfg.num_heads * cfg.head_dim != cfg.d_model:
        warnings.append(f"head_dim={cfg.head_dim} != d_model/num_heads: loadable by transformers (head_dim "
                        "field) but not by LongLLaMA's code, which derives head_dim = hidden/heads")
    if cfg.mem_layers and cfg.mem_positional == "none":
        warnings.append("mem_positional='none': memory layers use no RoPE; exact in LongLLaMA code "
                        "(mem_positionals=false) but NOT in vanilla LlamaForCausalLM, which rotates every layer")
    if float(cfg.rope_theta) != 10000.0:
        warnings.append(f"rope_theta={cfg.rope_theta}: needs a LongLLaMA code version that reads rope_theta "
                        "(early versions hard-code RoPE base 10000); transformers reads it")
    return warnings


def hf_config(cfg, *, max_position_embeddings: int, last_context_length: int | None = None,
              mem_dtype: str = "bfloat16", dtype: str = "float32", token_ids: dict | None = None,
              longllama: bool = False, extra: dict | None = None) -> dict:
    """config.json contents for ``cfg`` (see module docstring). ``longllama=True``: the
    ``config_longllama.json`` variant."""
    warnings = check_exportable(cfg)
    w = int(max_position_embeddings)
    if w < 1:
        raise ValueError(f"max_position_embeddings must be >= 1, got {max_position_embeddings}")
    lcl = min(1024, w // 2) if last_context_length is None else int(last_context_length)
    if not 0 <= lcl <= w:
        raise ValueError(f"last_context_length must be in [0, max_position_embeddings={w}], got {lcl}")
    _np_dtype(dtype)
    if mem_dtype not in DTYPES:
        raise ValueError(f"mem_dtype must be one of {DTYPES}, got {mem_dtype!r}")
    theta = float(cfg.rope_theta)
    conf = {
        "architectures": ["LongLlamaForCausalLM" if longllama else "LlamaForCausalLM"],
        "model_type": "longllama" if longllama else "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "rms_norm_eps": float(cfg.norm_eps), "rope_theta": theta,
        "max_position_embeddings": w, "initializer_range": float(cfg.init_std),
        "tie_word_embeddings": bool(cfg.tie_embeddings), "attention_bias": False, "mlp_bias": False,
        "torch_dtype": dtype, "use_cache": True, **(token_ids or FOT_TOKEN_IDS),
        # LongLLaMA (configuration_longllama.LongLlamaConfig) fields:
        "mem_layers": list(cfg.mem_layers), "mem_positionals": cfg.mem_positional == "as_first",
        "mem_dtype": mem_dtype, "last_context_length": lcl, "mem_attention_grouping": None,
        "torch_attention": False, "gradient_checkpoint_every_ith": 1,
        "fot": {"mem_positional": cfg.mem_positional, "window": w, **(extra or {})},
        "note": ("Exported by fot.convert.to_hf. max_position_embeddings is LongLLaMA's window; memory "
                 "layers need LongLLaMA's inference code (or fot.convert.torch_longllama) beyond one "
                 "window." + "".join(" WARNING: " + m + "." for m in warnings)),
    }
    if longllama:
        conf["auto_map"] = dict(LONGLLAMA_AUTO_MAP)
    else:
        conf["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    return conf


def to_hf_tensors(params, cfg, dtype: str = "float32") -> dict[str, np.ndarray]:
    """fot params tree → {HF name: numpy array [torch layout]}, cast to ``dtype``.

    Raises ValueError naming the offending tensor on a missing, unexpected or mis-shaped param."""
    check_exportable(cfg)
    npd = _np_dtype(dtype)
    try:  # params straight from Decoder.init carry LogicallyPartitioned boxes
        import flax.linen as nn
        params = nn.meta.unbox(params)
    except ImportError:
        pass
    flat = flatten(params["params"] if "params" in params and len(params) == 1 else params)
    table = param_table(cfg)
    out, seen = {}, set()
    for m in table:
        if m.fot_path not in flat:
            raise ValueError(f"param {'/'.join(m.fot_path)} (for {m.hf_name}) is missing from the fot params")
        x = np.asarray(flat[m.fot_path])
        if tuple(x.shape) != m.fot_shape:
            raise ValueError(f"param {'/'.join(m.fot_path)} has shape {tuple(x.shape)}, expected "
                             f"{m.fot_shape} for this ModelConfig")
        out[m.hf_name] = m.to_hf(x.astype(np.float32)).astype(npd)
        seen.add(m.fot_path)
    extra = sorted("/".join(p) for p in flat if p not in seen)
    if extra:
        why = {k: v for k, v in UNMAPPABLE.items() if any(p.endswith(k) for p in extra)}
        raise ValueError(f"fot params without an HF equivalent: {extra}" + (f" ({why})" if why else ""))
    return out


def _shards(tensors: dict[str, np.ndarray], max_shard_bytes: int) -> list[dict[str, np.ndarray]]:
    shards, cur, size = [], {}, 0
    for name, x in tensors.items():
        if cur and size + x.nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = x
        size += x.nbytes
    shards.append(cur)
    return shards


def _prepare_out(out_dir: str, overwrite: bool) -> str:
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise ValueError(f"--out {out_dir} exists and is not a directory")
        if os.listdir(out_dir) and not overwrite:
            raise ValueError(f"--out {out_dir} is not empty (pass --overwrite / overwrite=True to replace it)")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    return out_dir


def export(params, cfg, out_dir: str, *, max_position_embeddings: int, last_context_length: int | None = None,
           mem_dtype: str = "bfloat16", dtype: str = "float32", overwrite: bool = False,
           max_shard_bytes: int = 5 * 2**30, token_ids: dict | None = None, extra: dict | None = None) -> dict:
    """Write ``out_dir`` (see module docstring). Returns a summary dict (files, tensors, bytes, warnings)."""
    from safetensors.numpy import save_file

    out_dir = _prepare_out(out_dir, overwrite)
    kw = dict(max_position_embeddings=max_position_embeddings, last_context_length=last_context_length,
              mem_dtype=mem_dtype, dtype=dtype, token_ids=token_ids, extra=extra)
    conf = hf_config(cfg, **kw)
    conf_ll = hf_config(cfg, longllama=True, **kw)
    tensors = to_hf_tensors(params, cfg, dtype)
    shards = _shards(tensors, int(max_shard_bytes))
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=os.path.dirname(out_dir))
    try:
        files = []
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = ("model.safetensors" if len(shards) == 1
                     else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
            save_file(shard, os.path.join(tmp, fname), metadata={"format": "pt"})
            files.append(fname)
            weight_map.update({n: fname for n in shard})
        if len(shards) > 1:
            index = {"metadata": {"total_size": int(sum(x.nbytes for x in tensors.values()))},
                     "weight_map": weight_map}
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)
            files.append("model.safetensors.index.json")
        for name, c in (("config.json", conf), ("config_longllama.json", conf_ll)):
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(c, f, indent=2)
            files.append(name)
        umask = os.umask(0)
        os.umask(umask)
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
        os.chmod(tmp, 0o777 & ~umask)
        old = None
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=os.path.dirname(out_dir))
            os.rename(out_dir, os.path.join(old, "d"))
        os.rename(tmp, out_dir)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": out_dir, "files": files, "num_tensors": len(tensors),
            "bytes": int(sum(x.nbytes for x in tensors.values())), "dtype": dtype,
            "warnings": check_exportable(cfg)}


def _training_window(workdir: str):
    """Training ``seq_len`` of the run (gin holds its operative config after fot.train.load_run)."""
    try:
        import gin

        from fot.eval.restore import _train_data_param
        return _train_data_param(gin, "seq_len")
    except Exception:  # noqa: BLE001 - optional default only
        return None


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m fot.convert.to_hf", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="fot training run directory (config.gin + checkpoints/)")
    p.add_argument("--out", required=True, help="output directory (must be empty or absent)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--max_position_embeddings", type=int, default=None,
                   help="LongLLaMA window (default: the run's training seq_len)")
    p.add_argument("--last_context_length", type=int, default=None,
                   help="default min(1024, window // 2) (LongLLaMA: 1024)")
    p.add_argument("--mem_dtype", default="bfloat16", choices=DTYPES)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    try:
        workdir = os.path.abspath(args.workdir)
        if not os.path.isdir(workdir):
            raise ValueError(f"--workdir {workdir} does not exist")
        if not os.path.isfile(os.path.join(workdir, "config.gin")):
            raise ValueError(f"{workdir}/config.gin not found (the operative config written by fot.train)")
        _prepare_out(args.out, args.overwrite)  # fail before the (slow) restore
        from fot.train import load_run
        try:
            cfg, params, step = load_run(workdir, args.step)
        except FileNotFoundError as e:
            raise ValueError(f"no checkpoint to export: {e}") from None
        except Exception as e:  # noqa: BLE001 - orbax raises various errors for a missing step
            raise ValueError(f"cannot restore checkpoint (step={args.step}) under {workdir}: "
                             f"{type(e).__name__}: {e}") from None
        window = args.max_position_embeddings or _training_window(workdir)
        if window is None:
            raise ValueError("--max_position_embeddings not given and the run's seq_len is unknown")
        summary = export(params, cfg, args.out, max_position_embeddings=int(window),
                         last_context_length=args.last_context_length, mem_dtype=args.mem_dtype,
                         dtype=args.dtype, overwrite=args.overwrite,
                         extra={"source_workdir": workdir, "step": int(step)})
    except ValueError as e:
        print(f"fot.convert.to_hf: error: {e}", file=sys.stderr, flush=True)
        return 2
    summary["step"] = int(step)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
