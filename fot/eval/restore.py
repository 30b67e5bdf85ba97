"""Restore a training run for evaluation/generation: operative gin config + latest orbax checkpoint.

Used by ``python -m fot.eval`` and ``python -m fot.generate`` (defines no flags).
"""
from __future__ import annotations

import os


class EvalError(ValueError):
    """Bad input to the eval CLI (reported as one line, exit 2)."""


def _bound(gin, selector: str) -> bool:
    try:
        gin.query_parameter(selector)
        return True
    except ValueError:
        return False


def _resolve(gin, value):
    """Evaluate macro references (``%WINDOW``) in a queried gin value."""
    ref_type = gin.config.ConfigurableReference
    while isinstance(value, ref_type) and value.evaluate:
        value = value.scoped_configurable_fn()
    if isinstance(value, (list, tuple)):
        return type(value)(_resolve(gin, v) for v in value)
    return value


def _train_data_param(gin, name: str):
    """Value of ``name`` bound on the training data iterator (``train.train_data``), or None."""
    try:
        ref = gin.query_parameter("fot.training.train.train_data")
    except ValueError:
        return None
    scope = "/".join(getattr(ref, "scopes", []) or [])
    for sel in (ref.selector, ref.selector.split(".")[-1]):
        try:
            return _resolve(gin, gin.query_parameter(f"{scope}/{sel}.{name}" if scope else f"{sel}.{name}"))
        except ValueError:
            continue
    return None


def load_run(workdir: str, step: int | None = None, gin_files=(), gin_bindings=(), search_paths=()):
    """(ModelConfig, params as numpy arrays, step) of a training run (or one imported by fot.convert.from_hf):
    parses its config (``fot.train.parse_run_config``, plus extra gin files / bindings) and restores the
    checkpoint at ``step`` (default latest); gin holds the run's operative config afterwards.

    ``EvalError`` (a ValueError, one line) for a missing workdir / config / checkpoint or a bad config;
    ``CheckpointDamagedError`` (an OSError) for a damaged checkpoint, naming its step."""
    if not workdir:
        raise EvalError("--workdir is required")
    workdir = os.path.abspath(workdir)
    if not os.path.isdir(workdir):
        raise EvalError(f"workdir {workdir} does not exist")
    cfg_path = os.path.join(workdir, "config.gin")
    if not os.path.isfile(cfg_path):
        raise EvalError(f"{cfg_path} not found (the operative config written by fot.train)")
    ckpt = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt) or not any(n.isdigit() for n in os.listdir(ckpt)):
        raise EvalError(f"no checkpoint under {ckpt}")
    import gin

    from fot import train as _train
    from fot.training.checkpoint_errors import CheckpointDamagedError
    from fot.training.checkpoint_params import load_params
    try:
        _train.parse_run_config(workdir, gin_files, gin_bindings, search_paths)
    except (OSError, IOError) as e:
        raise EvalError(f"gin file not found: {e}") from None
    except Exception as e:  # noqa: BLE001 - gin raises many exception types for bad bindings
        raise EvalError(f"bad gin config: {type(e).__name__}: {e}") from None
    try:
        config = gin.get_configurable("fot.model.ModelConfig")()
    except Exception as e:  # noqa: BLE001
        raise EvalError(f"cannot build ModelConfig from {cfg_path}: {e}") from None
    try:
        params, step = load_params(workdir, step)
    except FileNotFoundError as e:
        raise EvalError(str(e)) from None
    except CheckpointDamagedError:
        raise  # an OSError: the CLIs report it with exit 4, naming the damaged step
    except Exception as e:  # noqa: BLE001 - orbax errors for a missing/corrupt step
        raise EvalError(f"cannot restore checkpoint step {step} under {ckpt}: {type(e).__name__}: {e}") from None
    return config, params, step


def load_model(workdir: str, step: int | None = None, gin_files=(), gin_bindings=(), search_paths=()):
    """(Decoder, params as device arrays, step): ``load_run`` for evaluation and generation."""
    import jax
    import jax.numpy as jnp

    from fot.model import Decoder
    config, params, step = load_run(workdir, step, gin_files, gin_bindings, search_paths)
    return Decoder(config), jax.tree.map(jnp.asarray, params), step


def run_tokenizer(gin, workdir: str | None = None) -> tuple[str | None, int | None]:
    """(SentencePiece model file, vocabulary size) the run was trained with — the vocabulary its config
    names, else ``workdir/tokenizer.model`` (a run imported by fot.convert.from_hf); (None, None) when there
    is none (fot.eval's passkey tokenizer and fot.generate's default)."""
    from fot import runconfig
    from fot.data.vocab import RUN_TOKENIZER, load_vocabulary
    try:
        vocab = runconfig.run_vocabulary(gin)
        if vocab is None and workdir and os.path.isfile(os.path.join(workdir, RUN_TOKENIZER)):
            vocab = load_vocabulary(os.path.join(workdir, RUN_TOKENIZER))
    except ValueError as e:
        raise EvalError(f"cannot load the run's vocabulary: {e}") from None
    if vocab is None:
        return None, None
    return runconfig.spm_model_path(vocab), int(vocab.vocab_size)
