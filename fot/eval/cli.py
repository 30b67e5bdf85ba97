r"""Evaluation entry point: ``python -m fot.eval --workdir=W --task=T [--gin_bindings=...]``.

Restores the latest checkpoint of ``W`` (``W/checkpoints``, orbax) with the run's operative config
(``W/config.gin``), runs the task, prints ONE JSON line and writes ``W/results_<task>.json`` and
``W/eval_<task>.png``. Nothing else in ``W`` is written. Several processes (``--coordinator_address`` ...
or a detected TPU pod / SLURM job, as ``fot.train``): every process evaluates, process 0 alone writes.

Tasks (library functions in ``fot.eval.<task>``; their keyword arguments are gin-configurable as
``dictionary_eval.*``, ``passkey_eval.*``, ``perplexity_eval.*``, ``distraction_eval.*``):
  dictionary   accuracy vs dictionary tokens in memory, FoT vs the same model without memory
  passkey      Landmark/LongLLaMA passkey prompt, exact match per context length
  perplexity   single-doc / multi-doc NLL vs memory size (``--tokens_file=F.npy`` or ``--seqio_task``)
  distraction  positive attention mass r_d in a memory layer

Defaults not bound in gin come from the training config: ``window`` = the training ``seq_len``;
dictionary ``key_len``/``value_len``/``vocab_size`` from the training dictionary iterator.
Exit codes: 0 ok; 2 bad input (one line on stderr).
"""
from __future__ import annotations

import json
import os

from absl import flags

from fot.runtime import fail, run_app

TASKS = ("dictionary", "passkey", "perplexity", "distraction")

# fot.train defines --workdir, --gin_file (here: extra files parsed after the operative config),
# --gin_bindings (e.g. 'dictionary_eval.sizes = [512, 1024]') and --gin_search_paths.
from fot import train as _train  # noqa: E402  (defines the shared absl flags once)

from fot.eval.restore import EvalError, _bound, _resolve, _train_data_param, load_run  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("task", None, f"One of {TASKS}.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
flags.DEFINE_integer("top_k", None, "Override top_k of the task (must be >= 1).")
flags.DEFINE_string("tokens_file", None, "perplexity/distraction: 1-D .npy of token ids.")
flags.DEFINE_integer("doc_separator", None, "Split --tokens_file into documents after this id.")
flags.DEFINE_string("seqio_task", None, "perplexity/distraction: registered seqio task/mixture name.")
flags.DEFINE_string("split", "validation", "Split of --seqio_task.")


def _fail(message, code: int = 2) -> None:
    fail("fot.eval", message, code)


def _documents(gin, model, window: int):
    """Documents for perplexity/distraction: --tokens_file, --seqio_task, or synthetic dictionary docs."""
    from fot.eval import perplexity
    if FLAGS.tokens_file:
        return perplexity.load_tokens_file(FLAGS.tokens_file, FLAGS.doc_separator)
    if FLAGS.seqio_task:
        return perplexity.task_documents(FLAGS.seqio_task, FLAGS.split)
    key_len = _train_data_param(gin, "key_len")
    if key_len is None:
        raise EvalError("no documents: pass --tokens_file=F.npy or --seqio_task=NAME (the run was not "
                        "trained on the dictionary task)")
    import numpy as np

    from fot.data.dictionary import DictionarySpec, generate_documents
    spec = DictionarySpec(key_len=key_len, value_len=_train_data_param(gin, "value_len") or 4,
                          vocab_size=model.config.vocab_size, doc_len=4 * window, query_len=window)
    toks = generate_documents(np.random.default_rng(12345), 64, spec)["tokens"][:, :-1]
    return list(toks)


def run(task: str, workdir: str) -> dict:
    if task not in TASKS:
        raise EvalError(f"unknown --task={task!r}; choose one of {', '.join(TASKS)}")
    if FLAGS.top_k is not None and FLAGS.top_k <= 0:
        raise EvalError(f"--top_k must be >= 1, got {FLAGS.top_k}")
    model, params, step = load_run(workdir, FLAGS.step, FLAGS.gin_bindings, FLAGS.gin_file,
                                   FLAGS.gin_search_paths)
    import gin

    from fot.eval import dictionary, distraction, passkey, perplexity
    mod = {"dictionary": dictionary, "passkey": passkey, "perplexity": perplexity,
           "distraction": distraction}[task]
    name = f"{task}_eval"
    fn = gin.get_configurable(f"fot.eval.{name}")
    seq_len = _train_data_param(gin, "seq_len")
    derived = {"window": seq_len}
    if task == "dictionary":
        for k in ("key_len", "value_len"):
            derived[k] = _train_data_param(gin, k)
        derived["vocab_size"] = model.config.vocab_size
        if seq_len is not None:
            derived["sizes"] = [seq_len * 2 ** i for i in range(0, 10)]
    if task == "passkey" and seq_len is not None:
        derived["last_context_length"] = seq_len // 2
        derived["context_lengths"] = [seq_len * 2 ** i for i in (1, 2, 3, 4)]
    if task == "perplexity" and seq_len is not None:
        derived["sizes"] = [0] + [seq_len * 2 ** i for i in (0, 1, 2, 3, 4)]
    kwargs = {k: v for k, v in derived.items() if v is not None and not _bound(gin, f"{name}.{k}")}
    if FLAGS.top_k is not None:
        if task == "distraction":
            raise EvalError("--top_k does not apply to --task=distraction (dense mass statistics)")
        kwargs["top_k"] = FLAGS.top_k
    missing = [k for k in ("window",) if k not in kwargs and not _bound(gin, f"{name}.{k}")]
    if missing:
        raise EvalError(f"cannot infer {missing} from the training config; bind {name}.{missing[0]}")
    args = (model, params)
    if task in ("perplexity", "distraction"):
        win = kwargs.get("window") or _resolve(gin, gin.query_parameter(f"{name}.window"))
        args = (model, params, _documents(gin, model, win))
    try:
        result = fn(*args, **kwargs)
    except ValueError as e:
        raise EvalError(str(e)) from None
    result["checkpoint_step"] = step
    result["workdir"] = os.path.abspath(workdir)
    from fot.parallel import multihost
    if multihost.is_primary():  # several processes (a pod slice) all evaluate; process 0 alone writes
        out_json = os.path.join(os.path.abspath(workdir), f"results_{task}.json")
        with open(out_json, "w") as f:
            json.dump(result, f, indent=1)
        mod.plot(result, os.path.join(os.path.abspath(workdir), f"eval_{task}.png"))
    return result


def main(argv) -> None:
    if len(argv) > 1:
        _fail(f"unexpected positional arguments: {argv[1:]}")
    if not FLAGS.task:
        _fail(f"--task is required (one of {', '.join(TASKS)})")
    _train.init_distributed("fot.eval")
    try:
        result = run(FLAGS.task, FLAGS.workdir)
    except EvalError as e:
        if os.environ.get("FOT_DEBUG"):
            raise
        _fail(str(e))
    from fot.parallel import multihost
    if multihost.is_primary():
        print(json.dumps(result), flush=True)


def entry() -> None:
    run_app(main)
