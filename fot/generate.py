r"""Text generation with external memory: the ``fot.generate`` API and CLI.

API (re-exported from ``fot.inference.generate``)::

    from fot.generate import generate, Generator, WindowedConfig
    out = generate(model, params, prompt_ids, max_new_tokens=32,
                   config=WindowedConfig(window=2048, last_context_length=1024, top_k=None),
                   temperature=0.0)            # out["tokens"] int32 [B, max_new_tokens]

CLI::

    python -m fot.generate --workdir=W --prompt="text" [--prompt_file=F] [--spm_path=M.model]
        [--max_new_tokens=32] [--temperature=0] [--top_k=K] [--window=L] [--last_context_length=N]
        [--seed=0] [--gin_bindings=...]

Restores the latest checkpoint of ``W`` with its operative config, tokenises the prompt with the run's
own SentencePiece vocabulary (named by its config; ``--spm_path`` overrides; the byte-level fallback only
for a run without one), generates, prints the text and a final JSON line. A tokenizer whose size differs
from the model's vocab_size is refused. Writes nothing. Exit codes as README "Exit codes" (2 bad input,
4 damaged checkpoint).
"""
from __future__ import annotations

import json
import os

from absl import flags

from fot.runtime import EXIT_CONFIG, describe_os_error, fail, os_error_code, run_app

from fot.inference.generate import Generator, generate, sample  # noqa: F401  (public API)
from fot.inference.windowed import WindowedConfig  # noqa: F401

__all__ = ["Generator", "WindowedConfig", "generate", "sample"]

FLAGS = flags.FLAGS


def _define_flags() -> None:
    from fot import train as _train  # noqa: F401  (defines --workdir/--gin_file/--gin_bindings)
    flags.DEFINE_string("prompt", None, "Prompt text.")
    flags.DEFINE_string("prompt_file", None, "Read the prompt from this text file.")
    flags.DEFINE_string("spm_path", None, "SentencePiece model (default: the run's own vocabulary; byte-level "
                        "ids = UTF-8 bytes + 3 for a run without one).")
    flags.DEFINE_integer("max_new_tokens", 32, "Tokens to generate.")
    flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
    flags.DEFINE_integer("top_k", None, "Exact top-k over memory (default dense).")
    flags.DEFINE_integer("window", None, "Window length (default: the training seq_len).")
    flags.DEFINE_integer("last_context_length", None, "Local cache tokens (default window // 2).")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default latest).")


def _fail(message, code: int = EXIT_CONFIG) -> None:
    fail("fot.generate", message, code)


def main(argv) -> None:
    import jax
    import numpy as np

    from fot.eval.restore import EvalError, _train_data_param, load_model, run_tokenizer
    from fot.data.vocab import make_tokenizer
    if len(argv) > 1:
        _fail(f"unexpected positional arguments: {argv[1:]}")
    if FLAGS.prompt_file:
        if not os.path.isfile(FLAGS.prompt_file):
            _fail(f"--prompt_file {FLAGS.prompt_file} does not exist")
        with open(FLAGS.prompt_file) as f:
            prompt = f.read()
    elif FLAGS.prompt is not None:
        prompt = FLAGS.prompt
    else:
        _fail("give --prompt or --prompt_file")
    try:
        model, params, step = load_model(FLAGS.workdir, FLAGS.step, FLAGS.gin_file, FLAGS.gin_bindings,
                                         FLAGS.gin_search_paths)
        import gin
        window = FLAGS.window or _train_data_param(gin, "seq_len")
        if not window:
            raise EvalError("cannot infer the window from the training config; pass --window")
        lcl = FLAGS.last_context_length if FLAGS.last_context_length is not None else max(1, window // 2)
        cfg = WindowedConfig(window=window, last_context_length=lcl, top_k=FLAGS.top_k)
        run_spm, trained = run_tokenizer(gin, FLAGS.workdir)
        tok = make_tokenizer(FLAGS.spm_path or run_spm, model.config.vocab_size, trained)
        ids = tok.encode(prompt)
        if getattr(tok, "bos_id", None) is not None:
            ids = [tok.bos_id] + ids
        if not ids:
            raise EvalError("the prompt is empty after tokenisation")
        out = generate(model, params, np.asarray([ids], np.int32), FLAGS.max_new_tokens, config=cfg,
                       temperature=FLAGS.temperature, rng=jax.random.PRNGKey(FLAGS.seed))
    except (EvalError, ValueError) as e:
        _fail(str(e))
    except OSError as e:  # a damaged checkpoint (exit 4), ...
        _fail(describe_os_error(e), os_error_code(e))
    new = out["tokens"][0].tolist()
    text = tok.decode(new)
    print(text)
    print(json.dumps({"prompt_tokens": len(ids), "generated_tokens": new, "text": text, "checkpoint_step": step,
                      "memory": out["overflow"]}), flush=True)


if __name__ == "__main__":
    _define_flags()
    run_app(main, __doc__)
