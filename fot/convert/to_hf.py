"""Export fot params + ModelConfig to a Hugging Face directory (safetensors + config.json + FoT remote code).

Written files (atomically: a temporary sibling directory renamed into place):
* ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``
  when larger than ``max_shard_bytes``), tensors named as HF ``LlamaForCausalLM`` (memory layers with
  QK-norm / the gate add ``self_attn.qk_scale`` / ``self_attn.gate_bias``, see ``fot.convert.mapping``);
* ``configuration_fot.py``, ``modeling_fot.py``, ``attention_fot.py`` (``fot.convert.hf_remote``) and an
  ``auto_map`` in config.json: ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``
  runs fot's windowed memory inference in PyTorch (dense or top-k memory, QK-norm, gate, FIFO
  capacity, generation across window flushes) with torch + transformers only;
* ``config.json``: a LLaMA config that also carries LongLLaMA's fields (``mem_layers``,
  ``mem_positionals``, ``mem_dtype``, ``last_context_length``, ...), the FoT inference fields
  (``mem_top_k``, ``mem_capacity``, ``qk_norm``, ``mem_gate``, ``longllama_split``) and a ``fot`` block.
  A LLaMA-compatible model (no QK-norm, no gate) keeps ``model_type="llama"`` / ``LlamaForCausalLM``:
  ``transformers`` loads it as plain LLaMA without ``trust_remote_code`` (exact within one window) and
  LongLLaMA's ``LongLlamaForCausalLM.from_pretrained`` reads the memory fields from the same file.
  Other models get ``model_type="fot"`` / ``FotForCausalLM`` so that nothing loads them as LLaMA;
* ``config_longllama.json`` (LLaMA-compatible models only): ``model_type="longllama"``,
  ``LongLlamaForCausalLM`` and an ``auto_map`` to LongLLaMA's remote-code files — rename it to
  ``config.json`` next to ``configuration_longllama.py``/``modeling_longllama.py`` for LongLLaMA's code;
* tokenizer files when given (``fot.convert.tokenizer``).

``mem_positional="none"`` maps to LongLLaMA ``mem_positionals=false`` (no RoPE in memory layers); vanilla
``LlamaForCausalLM`` rotates every layer, so such a model is exact only in FoT/LongLLaMA code (a
warning is returned and written to the config's ``note``).

CLI: ``python -m fot.convert.to_hf --workdir=W --out=DIR [--step=N] [--dtype=float32|bfloat16|float16]
[--max_position_embeddings=L] [--last_context_length=N] [--mem_dtype=bfloat16] [--mem_top_k=K]
[--mem_capacity=N] [--spm_path=M.model] [--overwrite]`` prints one JSON line. A run imported by
``fot.convert.from_hf``, or fine-tuned from one (``train.init_from``, followed back), exports with the
source checkpoint's own tokenizer files and token ids (bos/eos/pad) unless ``--spm_path`` is given.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys

import numpy as np

from fot.convert import hf_remote
from fot.convert.hf_files import np_dtype
from fot.convert.mapping import flatten, param_table, qk_scale_param
from fot.convert.outdir import atomic_dir, prepare_out
from fot.keyword_api import keyword_api

DTYPES = ("float32", "bfloat16", "float16")
# fot's SentencePiece convention (fot.data.vocab): 0 PAD / 1 EOS / 2 UNK / 3 BOS.
FOT_TOKEN_IDS = {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 3}
LONGLLAMA_AUTO_MAP = {"AutoConfig": "configuration_longllama.LongLlamaConfig",
                      "AutoModel": "modeling_longllama.LongLlamaModel",
                      "AutoModelForCausalLM": "modeling_longllama.LongLlamaForCausalLM"}


def _np_dtype(name: str):
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {name!r}")
    return np_dtype(name)


def llama_compatible(cfg) -> bool:
    """True when transformers' LlamaForCausalLM / LongLLaMA code compute this model (no QK-norm, no gate)."""
    return not (cfg.qk_norm and cfg.mem_layers) and not (cfg.mem_gate and cfg.mem_layers)


def check_exportable(cfg) -> list[str]:
    """Raise ValueError for configs HF cannot describe; return warnings for lossy-in-vanilla ones."""
    if cfg.d_model % cfg.num_heads:
        raise ValueError(f"cannot export: HF LlamaConfig requires hidden_size={cfg.d_model} divisible by "
                         f"num_attention_heads={cfg.num_heads}")
    if cfg.smears_memory_keys:
        raise ValueError("cannot export: ModelConfig.mem_key_smear=True has no HF/PyTorch implementation")
    warnings = []
    if not llama_compatible(cfg):
        warnings.append("memory layers with " + " and ".join(
            n for n, on in (("QK-norm", cfg.qk_norm), ("the memory gate", cfg.mem_gate)) if on)
            + ": not a LLaMA model (model_type='fot'); load it with AutoModelForCausalLM.from_pretrained("
            "DIR, trust_remote_code=True)")
    if cfg.num_heads * cfg.head_dim != cfg.d_model:
        warnings.append(f"head_dim={cfg.head_dim} != d_model/num_heads: loadable by transformers (head_dim "
                        "field) but not by LongLLaMA's code, which derives head_dim = hidden/heads")
    if cfg.mem_layers and cfg.mem_positional == "none" and llama_compatible(cfg):
        warnings.append("mem_positional='none': memory layers use no RoPE; exact in FoT/LongLLaMA code "
                        "(mem_positionals=false) but NOT in vanilla LlamaForCausalLM, which rotates every layer")
    if float(cfg.rope_theta) != 10000.0 and llama_compatible(cfg):
        warnings.append(f"rope_theta={cfg.rope_theta}: needs a LongLLaMA code version that reads rope_theta "
                        "(early versions hard-code RoPE base 10000); transformers reads it")
    return warnings


def _check_fot_inference(mem_top_k, mem_capacity, cfg):
    for name, v in (("mem_top_k", mem_top_k), ("mem_capacity", mem_capacity)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be None or an int >= 1, got {v!r}")
    if mem_top_k is not None and cfg.mem_gate:
        raise ValueError("mem_top_k is not supported with ModelConfig.mem_gate=True (the gated memory path "
                         "is dense)")


def hf_config(cfg, *, max_position_embeddings: int, last_context_length: int | None = None,
              mem_dtype: str = "bfloat16", dtype: str = "float32", token_ids: dict | None = None,
              longllama: bool = False, extra: dict | None = None, mem_top_k: int | None = None,
              mem_capacity: int | None = None) -> dict:
    """config.json contents for ``cfg`` (see module docstring). ``longllama=True``: the
    ``config_longllama.json`` variant. ``mem_top_k`` / ``mem_capacity``: the FoT remote code's
    default memory attention (None = dense) and FIFO capacity (None = unbounded)."""
    warnings = check_exportable(cfg)
    w = int(max_position_embeddings)
    if w < 1:
        raise ValueError(f"max_position_embeddings must be >= 1, got {max_position_embeddings}")
    lcl = min(1024, w // 2) if last_context_length is None else int(last_context_length)
    if not 1 <= lcl <= w:
        raise ValueError(f"last_context_length must be in [1, max_position_embeddings={w}], got {lcl} (LongLLaMA's "
                         "code keeps the last tokens as the final window and fails on every input with 0)")
    _np_dtype(dtype)
    if mem_dtype not in DTYPES:
        raise ValueError(f"mem_dtype must be one of {DTYPES}, got {mem_dtype!r}")
    _check_fot_inference(mem_top_k, mem_capacity, cfg)
    llama = llama_compatible(cfg)
    if longllama and not llama:
        raise ValueError("no LongLLaMA config for a model with QK-norm or the memory gate")
    arch, model_type = (("LongLlamaForCausalLM", "longllama") if longllama else
                        ("LlamaForCausalLM", "llama") if llama else ("FotForCausalLM", "fot"))
    theta = float(cfg.rope_theta)
    conf = {
        "architectures": [arch], "model_type": model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "rms_norm_eps": float(cfg.norm_eps), "rope_theta": theta,
        "max_position_embeddings": w, "initializer_range": float(cfg.init_std),
        "tie_word_embeddings": bool(cfg.tie_embeddings), "attention_bias": False, "mlp_bias": False,
        "torch_dtype": dtype, "use_cache": True, **(FOT_TOKEN_IDS if token_ids is None else token_ids),
        # LongLLaMA (configuration_longllama.LongLlamaConfig) fields:
        "mem_layers": list(cfg.mem_layers), "mem_positionals": cfg.mem_positional == "as_first",
        "mem_dtype": mem_dtype, "last_context_length": lcl, "mem_attention_grouping": None,
        "torch_attention": False, "gradient_checkpoint_every_ith": 1,
        # FoT remote code (fot.convert.hf_remote.configuration_fot.FotConfig) fields:
        "mem_top_k": mem_top_k, "mem_capacity": mem_capacity, "qk_norm": bool(cfg.qk_norm),
        "qk_scale_param": qk_scale_param(cfg), "qk_scale_n_ref": getattr(cfg, "qk_scale_n_ref", None),
        "qk_scale_extrapolation": float(cfg.qk_scale_extrapolation), "qk_scale_n_train": cfg.qk_scale_n_train,
        "mem_gate": bool(cfg.mem_gate), "longllama_split": False,
        "fot": {"mem_positional": cfg.mem_positional, "window": w, "qk_scale_init": cfg.qk_scale_init, **(extra or {})},
        "note": ("Exported by fot.convert.to_hf. max_position_embeddings is the window; beyond one window "
                 "memory layers need FoT's remote code (AutoModelForCausalLM.from_pretrained(DIR, "
                 "trust_remote_code=True)) or LongLLaMA's." + "".join(" WARNING: " + m + "." for m in warnings)),
    }
    if longllama:
        conf["auto_map"] = dict(LONGLLAMA_AUTO_MAP)
    else:
        conf["auto_map"] = dict(hf_remote.AUTO_MAP)
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
        raise ValueError(f"fot params that this ModelConfig does not have (wrong config for these params?): "
                         f"{extra}")
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


@dataclasses.dataclass(frozen=True)
class ConfigOptions:
    """The config.json settings of an export: :func:`hf_config`'s keyword arguments (``dtype`` is also the
    dtype the weights are written in)."""

    max_position_embeddings: int
    last_context_length: int | None = None
    mem_dtype: str = "bfloat16"
    dtype: str = "float32"
    token_ids: dict | None = None
    extra: dict | None = None
    mem_top_k: int | None = None
    mem_capacity: int | None = None


def write_export(params, cfg, out_dir: str, *, options: ConfigOptions, overwrite: bool = False,
                 max_shard_bytes: int = 5 * 2**30, tokenizer_files: dict[str, bytes] | None = None) -> dict:
    """Write ``out_dir`` (see module docstring). Returns a summary dict (files, tensors, bytes, warnings).
    :func:`export` is this function with the fields of :class:`ConfigOptions` as keyword arguments.

    ``tokenizer_files``: {file name: bytes} written beside the weights (``fot.convert.tokenizer``)."""
    from safetensors.numpy import save_file

    out_dir = prepare_out(out_dir, overwrite)
    dtype = options.dtype
    kw = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
    configs = {"config.json": hf_config(cfg, **kw)}
    if llama_compatible(cfg):
        configs["config_longllama.json"] = hf_config(cfg, longllama=True, **kw)
    tensors = to_hf_tensors(params, cfg, dtype)
    shards = _shards(tensors, int(max_shard_bytes))
    files = []
    with atomic_dir(out_dir) as tmp:
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
        for name, c in configs.items():
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(c, f, indent=2)
            files.append(name)
        for name in hf_remote.FILES:
            shutil.copyfile(os.path.join(hf_remote.DIR, name), os.path.join(tmp, name))
            files.append(name)
        for name, data in (tokenizer_files or {}).items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
            files.append(name)
    return {"out": out_dir, "files": files, "num_tensors": len(tensors),
            "bytes": int(sum(x.nbytes for x in tensors.values())), "dtype": dtype,
            "warnings": check_exportable(cfg)}


export = keyword_api(write_export, "export", options=ConfigOptions)


def _training_window(workdir: str):
    """Training ``seq_len`` of the run (gin holds its operative config after fot.eval.restore.load_run)."""
    try:
        import gin

        from fot.eval.restore import _train_data_param
        return _train_data_param(gin, "seq_len")
    except Exception:  # noqa: BLE001 - optional default only
        return None


def _run_tokenizer(args, cfg):
    """(files, config token ids, description) of the tokenizer to export (see fot.convert.tokenizer)."""
    from fot.convert import tokenizer
    if args.no_tokenizer:
        return None, None, "none (--no_tokenizer)"
    if args.spm_path:
        files = tokenizer.spm_files(args.spm_path, vocab_size=cfg.vocab_size)
        return files, dict(tokenizer.SPM_TOKEN_IDS), f"SentencePiece model {args.spm_path}"
    imported = tokenizer.from_import(args.workdir)  # a run imported by from_hf, or fine-tuned from one
    if imported is not None:
        return imported
    import gin
    try:
        return tokenizer.from_run(gin, cfg.vocab_size)
    except Exception as e:  # noqa: BLE001 - detection is best effort; the weights still export
        return None, None, f"none: the run's vocabulary could not be read ({type(e).__name__}: {e}); pass --spm_path"


def main(argv=None) -> int:
    from fot.runtime import EXIT_CONFIG, arg_parser, describe_os_error, one_line, os_error_code

    p = arg_parser("fot.convert.to_hf", __doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="fot training run directory (config.gin + checkpoints/)")
    p.add_argument("--out", required=True, help="output directory (must be empty or absent)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--max_position_embeddings", type=int, default=None,
                   help="LongLLaMA window (default: the run's training seq_len)")
    p.add_argument("--last_context_length", type=int, default=None,
                   help="default min(1024, window // 2) (LongLLaMA: 1024)")
    p.add_argument("--mem_dtype", default="bfloat16", choices=DTYPES)
    p.add_argument("--mem_top_k", type=int, default=None,
                   help="FoT remote code: exact top-k memory attention (default dense)")
    p.add_argument("--mem_capacity", type=int, default=None,
                   help="FoT remote code: memory slots per memory layer, FIFO (default unbounded)")
    p.add_argument("--spm_path", default=None,
                   help="SentencePiece model to export as the tokenizer (default: the run's own vocabulary)")
    p.add_argument("--no_tokenizer", action="store_true", help="export no tokenizer")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    try:
        workdir = os.path.abspath(args.workdir)
        if not os.path.isdir(workdir):
            raise ValueError(f"--workdir {workdir} does not exist")
        if not os.path.isfile(os.path.join(workdir, "config.gin")):
            raise ValueError(f"{workdir}/config.gin not found (the operative config written by fot.train)")
        prepare_out(args.out, args.overwrite)  # fail before the (slow) restore
        from fot.eval.restore import EvalError, load_run
        try:
            cfg, params, step = load_run(workdir, args.step)
        except EvalError as e:  # no checkpoint, an unreadable step, a bad config: one line
            raise ValueError(f"cannot export {workdir}: {e}") from None
        window = args.max_position_embeddings or _training_window(workdir)
        if window is None:
            raise ValueError("--max_position_embeddings not given and the run's seq_len is unknown")
        tok_files, token_ids, tok_note = _run_tokenizer(args, cfg)
        summary = export(params, cfg, args.out, max_position_embeddings=int(window),
                         last_context_length=args.last_context_length, mem_dtype=args.mem_dtype,
                         dtype=args.dtype, overwrite=args.overwrite, mem_top_k=args.mem_top_k,
                         mem_capacity=args.mem_capacity, tokenizer_files=tok_files, token_ids=token_ids,
                         extra={"source_workdir": workdir, "step": int(step)})
        summary["tokenizer"] = tok_note
    except ValueError as e:
        print(f"fot.convert.to_hf: error: {one_line(e)}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    except OSError as e:  # damaged checkpoint (4), disk full writing --out (4), ...
        print(f"fot.convert.to_hf: error: {describe_os_error(e)}", file=sys.stderr, flush=True)
        return os_error_code(e)
    summary["step"] = int(step)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
