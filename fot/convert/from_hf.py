"""Import a Hugging Face LLaMA-family checkpoint into fot: a run directory (CLI) or (ModelConfig, params).

CLI::

    python -m fot.convert.from_hf --hf_dir=DIR --workdir=W [--mem_layers=6,12,18] [--mem_positional=as_first]
        [--dtype=float32|bfloat16] [--overwrite]

writes the run directory ``W`` that every fot tool accepts (``fot.train`` with ``train.init_from='W'``,
``fot.eval``, ``fot.generate``, ``fot.convert.to_hf``):

* ``W/checkpoints/0``: an orbax params-only checkpoint (``fot.training.checkpoint_params.save_params``),
  params in ``--dtype`` (``ModelConfig.param_dtype``; float32 by default, the training dtype);
* ``W/config.gin``: the operative config derived from config.json: every ``ModelConfig`` field (sizes,
  ``num_kv_heads``, ``rope_theta``, ``norm_eps``, tied embeddings, vocab size, memory layers) and the
  window (``max_position_embeddings``, LongLLaMA's window) as the run's ``seq_len``;
* the tokenizer files (``tokenizer.model``, ``tokenizer.json``, ...) as they are: ``W/tokenizer.model`` is
  the run's vocabulary (``fot.data.vocab.run_vocabulary``);
* ``W/hf_source.json``: the source directory, its config.json and token ids (``to_hf`` carries them back).

The weights are read one tensor at a time (``fot.convert.hf_files``: safetensors, a sharded index, or
legacy ``pytorch_model*.bin`` through ``torch.load(weights_only=True)``), converted through the mapping
table and checked against the shapes config.json implies. Everything is checked before anything is
written, and ``W`` is written as a temporary sibling renamed into place: a failed import leaves nothing.
Unsupported configs (``model_type`` other than llama/longllama, ``rope_scaling`` of any type, attention or
MLP biases, ``hidden_act`` other than silu, attention dropout) and bad input (missing config.json, a
missing or truncated shard, an index naming an absent file, a tokenizer with more ids than the model's
vocabulary) print one line naming the field or file and exit with code 2 (``fot.runtime.EXIT_CONFIG``;
an I/O failure while writing: 4, ``EXIT_IO``).

A LongLLaMA directory imports with its ``mem_layers`` / ``mem_positionals``; ``--mem_layers`` and
``--mem_positional`` override them (a fine-tune run file may change them again). fot's own exports
(``fot.convert.to_hf``) come back as they were, QK-norm / gated memory layers (``model_type`` fot) included.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time

from fot.convert.hf_files import TensorSource, np_dtype, read_config, tokenizer_files, tokenizer_size
from fot.convert.mapping import flatten, param_table, unflatten
from fot.convert.outdir import atomic_dir, prepare_out
from fot.runtime import EXIT_CONFIG, EXIT_OK, describe_os_error, one_line, os_error_code

MODEL_TYPES = ("llama", "longllama", "fot")  # "fot": to_hf's export of QK-norm / gated memory layers
PARAM_DTYPES = ("float32", "bfloat16")
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def check_supported(conf: dict) -> None:
    """ValueError naming the first config.json field fot cannot represent exactly."""
    model_type = conf.get("model_type", "llama")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"config.json: model_type={model_type!r} is not supported (fot imports the LLaMA "
                         f"architecture: model_type {' or '.join(MODEL_TYPES)})")
    missing = [k for k in _REQUIRED if k not in conf]
    if missing:
        raise ValueError(f"config.json lacks {missing[0]}" + (f" (and {missing[1:]})" if len(missing) > 1 else ""))
    if conf.get("rope_scaling"):
        raise ValueError(f"config.json: rope_scaling={conf['rope_scaling']} is not supported (fot implements "
                         "plain RoPE with rope_theta)")
    rope = conf.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"config.json: rope_parameters.rope_type={rope_type!r} is not supported (fot implements "
                         "plain RoPE with rope_theta)")
    for flag in ("attention_bias", "mlp_bias"):
        if conf.get(flag):
            raise ValueError(f"config.json: {flag}=true is not supported (fot's LLaMA has no biases)")
    if conf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act={conf['hidden_act']!r} is not supported (fot's MLP is SwiGLU "
                         "with silu)")
    if float(conf.get("attention_dropout") or 0.0) != 0.0:
        raise ValueError(f"config.json: attention_dropout={conf['attention_dropout']} is not supported (fot "
                         "has no dropout)")
    heads, kv = int(conf["num_attention_heads"]), int(conf.get("num_key_value_heads") or conf["num_attention_heads"])
    if kv < 1 or heads % kv:
        raise ValueError(f"config.json: num_key_value_heads={kv} must divide num_attention_heads={heads}")


def config_from_hf(conf: dict, *, mem_layers=None, mem_positional: str | None = None,
                   param_dtype: str = "float32"):
    """HF / LongLLaMA config dict → fot ``ModelConfig`` (ValueError for unsupported fields).

    mem_layers / mem_positional: override LongLLaMA's ``mem_layers`` / ``mem_positionals`` (plain LLaMA:
    no memory layers unless given)."""
    from fot.model import ModelConfig

    check_supported(conf)
    heads = int(conf["num_attention_heads"])
    rope = conf.get("rope_parameters") or {}
    theta = rope.get("rope_theta", conf.get("rope_theta", 10000.0))
    hidden = int(conf["hidden_size"])
    if mem_positional is None:
        mem_positional = ((conf.get("fot") or {}).get("mem_positional")
                          or ("as_first" if conf.get("mem_positionals", True) else "none"))
    if mem_layers is None:
        mem_layers = conf.get("mem_layers") or ()
    fot_block = conf.get("fot") or {}
    # temperature options of newer ModelConfigs, passed only when set (older configs lack the fields)
    log_scale = {"qk_scale_param": "log"} if conf.get("qk_scale_param", "linear") == "log" else {}
    if conf.get("qk_scale_n_ref") is not None:
        log_scale["qk_scale_n_ref"] = int(conf["qk_scale_n_ref"])
    if conf.get("qk_scale_extrapolation"):
        log_scale["qk_scale_extrapolation"] = float(conf["qk_scale_extrapolation"])
        log_scale["qk_scale_n_train"] = int(conf["qk_scale_n_train"])
    return ModelConfig(vocab_size=int(conf["vocab_size"]), d_model=hidden,
                       num_layers=int(conf["num_hidden_layers"]), num_heads=heads,
                       num_kv_heads=int(conf.get("num_key_value_heads") or heads),
                       mlp_dim=int(conf["intermediate_size"]),
                       head_dim=int(conf.get("head_dim") or hidden // heads),
                       mem_layers=tuple(int(i) for i in mem_layers), mem_positional=mem_positional,
                       rope_theta=float(theta), norm_eps=float(conf.get("rms_norm_eps", 1e-6)),
                       qk_norm=bool(conf.get("qk_norm", False)), mem_gate=bool(conf.get("mem_gate", False)),
                       qk_scale_init=fot_block.get("qk_scale_init"),
                       tie_embeddings=bool(conf.get("tie_word_embeddings", False)),
                       init_std=float(conf.get("initializer_range", 0.02)), param_dtype=param_dtype, **log_scale)


def _ignorable(name: str, cfg) -> bool:
    """Tensors HF checkpoints may carry that are not parameters: RoPE buffers, a tied LM head."""
    return name.endswith("rotary_emb.inv_freq") or (cfg.tie_embeddings and name == "lm_head.weight")


def convert_tensors(source: TensorSource, cfg, dtype: str = "float32") -> dict:
    """fot params tree (numpy, ``dtype``) from ``source``, one tensor at a time. Names and shapes are all
    checked before any data is read (ValueError naming the tensor and its file)."""
    npd = np_dtype(dtype)
    table = param_table(cfg)
    names = source.names()
    missing = [m.hf_name for m in table if m.hf_name not in names]
    if missing:
        raise ValueError(f"tensor {missing[0]} is missing from the checkpoint in {source.path}"
                         + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = sorted(n for n in names - {m.hf_name for m in table} if not _ignorable(n, cfg))
    if extra:
        raise ValueError(f"unexpected tensors in the checkpoint: {extra[:8]}"
                         + (f" (+{len(extra) - 8} more)" if len(extra) > 8 else "")
                         + f" (not part of a {cfg.num_layers}-layer LLaMA as config.json describes)")
    for m in table:
        shape = source.shape(m.hf_name)
        if shape != m.hf_shape:
            raise ValueError(f"tensor {m.hf_name} in {source.where(m.hf_name)} has shape {shape}, expected "
                             f"{m.hf_shape} from config.json (fot param {'/'.join(m.fot_path)} {m.fot_shape})")
    flat = {}
    for m in table:
        flat[m.fot_path] = m.from_hf(source.get(m.hf_name)).astype(npd, copy=False)
    return unflatten(flat)


def load_hf(path: str, dtype: str = "float32"):
    """HF directory → (ModelConfig, params tree of numpy arrays in ``dtype``), as ``fot.eval.restore.load_run``."""
    cfg = config_from_hf(read_config(path), param_dtype=dtype)
    return cfg, convert_tensors(TensorSource(path), cfg, dtype)


def run_config_text(cfg, *, window: int, source: str, tokenizer: list[str], workdir: str) -> str:
    """``W/config.gin`` of an imported run: every ModelConfig field and the window as ``seq_len``."""
    from fot.train import model_config_bindings

    lines = [
        "# fot run directory imported from a Hugging Face checkpoint by fot.convert.from_hf",
        f"#   source: {source}",
        f"#   tokenizer files: {', '.join(tokenizer) or 'none'}",
        "# Fine-tune it in a new run directory (the model configuration is read from this file):",
        "#   python -m fot.train --gin_file=gin/runs/finetune_tiny.gin "
        f"--gin_bindings=\"train.init_from = '{workdir}'\" --workdir=W2",
        *model_config_bindings(cfg),
        "train.model_config = @ModelConfig()",
        "# The checkpoint's window (max_position_embeddings): the evaluation tools' default window.",
        "train.train_data = @train_data/make_iterator()",
        f"train_data/make_iterator.seq_len = {int(window)}",
    ]
    return "\n".join(lines) + "\n"


def import_run(hf_dir: str, workdir: str, *, mem_layers=None, mem_positional: str | None = None,
               dtype: str = "float32", overwrite: bool = False) -> dict:
    """Write the run directory ``workdir`` from ``hf_dir`` (see module docstring); returns a summary.
    ValueError (nothing written) for unsupported or bad input."""
    from fot.training.checkpoint_params import save_params

    t0 = time.perf_counter()
    if dtype not in PARAM_DTYPES:
        raise ValueError(f"--dtype must be one of {PARAM_DTYPES}, got {dtype!r}")
    hf_dir = os.path.abspath(hf_dir)
    conf = read_config(hf_dir)
    cfg = config_from_hf(conf, mem_layers=mem_layers, mem_positional=mem_positional, param_dtype=dtype)
    tok = tokenizer_files(hf_dir)
    n_tok = tokenizer_size(hf_dir)
    if n_tok is not None and n_tok > cfg.vocab_size:
        which = "tokenizer.model" if "tokenizer.model" in tok else "tokenizer.json"
        raise ValueError(f"{os.path.join(hf_dir, which)} produces {n_tok} token ids but config.json has vocab_size="
                         f"{cfg.vocab_size}: ids >= {cfg.vocab_size} would fall outside the embedding")
    window = int(conf.get("max_position_embeddings") or 2048)
    workdir = prepare_out(workdir, overwrite, "--workdir")
    source = TensorSource(hf_dir)  # every weight file checked here
    params = convert_tensors(source, cfg, dtype)
    with atomic_dir(workdir) as tmp:
        save_params(tmp, params, step=0)
        with open(os.path.join(tmp, "config.gin"), "w") as f:
            f.write(run_config_text(cfg, window=window, source=hf_dir, tokenizer=tok, workdir=workdir))
        for name in tok:
            shutil.copyfile(os.path.join(hf_dir, name), os.path.join(tmp, name))
        token_ids = {k: conf.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in conf}
        with open(os.path.join(tmp, "hf_source.json"), "w") as f:
            json.dump({"hf_dir": hf_dir, "config": conf, "token_ids": token_ids, "tokenizer_files": tok,
                       "weight_files": sorted(source.files), "dtype": dtype}, f, indent=2)
    n_params = int(sum(x.size for x in flatten(params).values()))
    return {"workdir": workdir, "step": 0, "params": n_params,
            "bytes": int(sum(x.nbytes for x in flatten(params).values())), "dtype": dtype,
            "source_bytes": source.size_bytes(), "weight_files": sorted(source.files),
            "num_kv_heads": cfg.num_kv_heads, "num_heads": cfg.num_heads, "mem_layers": list(cfg.mem_layers),
            "mem_positional": cfg.mem_positional, "window": window, "vocab_size": cfg.vocab_size,
            "tokenizer_size": n_tok, "tokenizer_files": tok, "seconds": round(time.perf_counter() - t0, 2)}


def _parse_layers(text: str | None):
    if text is None:
        return None
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--mem_layers must be comma-separated layer indices such as 6,12,18, got {text!r}") from None


def main(argv=None) -> int:
    from fot.runtime import arg_parser

    p = arg_parser("fot.convert.from_hf", __doc__.split("\n")[0])  # a bad flag: one line, exit 2
    p.add_argument("--hf_dir", required=True, help="Hugging Face model directory (config.json + weights)")
    p.add_argument("--workdir", required=True, help="run directory to write (must be empty or absent)")
    p.add_argument("--mem_layers", default=None, help="memory layers, e.g. 6,12,18 (default: config.json's)")
    p.add_argument("--mem_positional", default=None, choices=["as_first", "none"])
    p.add_argument("--dtype", default="float32", choices=PARAM_DTYPES, help="params dtype (training: float32)")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    try:
        summary = import_run(args.hf_dir, args.workdir, mem_layers=_parse_layers(args.mem_layers),
                             mem_positional=args.mem_positional, dtype=args.dtype, overwrite=args.overwrite)
    except ValueError as e:
        return _error(e, EXIT_CONFIG)
    except OSError as e:  # e.g. a full disk while writing: nothing was renamed into place
        return _error(describe_os_error(e), os_error_code(e))
    print(json.dumps(summary), flush=True)
    return EXIT_OK


def _error(message, code: int) -> int:
    print(f"fot.convert.from_hf: error: {one_line(message)}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
