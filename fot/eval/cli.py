r"""Evaluation entry point: ``python -m fot.eval --workdir=W --task=T [--gin_bindings=...]``.

Restores the latest checkpoint of ``W`` (``W/checkpoints``, orbax) with the run's operative config
(``W/config.gin``), runs the task, prints ONE JSON line and writes ``W/results_<task>.json`` and
``W/eval_<task>.png``. Nothing else in ``W`` is written. Several processes (``--coordinator_address`` ...
or a detected TPU pod / SLURM job, as ``fot.train``): every process evaluates, process 0 alone writes.

Tasks (library functions in ``fot.eval.<task>``; their keyword arguments are gin-configurable as
``dictionary_eval.*``, ``passkey_eval.*``, ``perplexity_eval.*``, ``distraction_eval.*``):
  dictionary   accuracy vs dictionary tokens in memory: FoT top-k, FoT dense, the same model with its
               memory off, and with --baseline_workdir=B a standard transformer (run B) reading the
               whole document as local context
  passkey      Landmark/LongLLaMA passkey prompt, exact match per context length
  perplexity   single-doc / multi-doc NLL vs memory size (``--tokens_file=F.npy`` or ``--seqio_task``)
  distraction  positive attention mass r_d in a memory layer

Defaults not bound in gin come from the training config: ``window`` = the training ``seq_len``;
dictionary ``key_len``/``value_len``/``vocab_size`` from the training dictionary iterator; passkey's
tokenizer = the run's SentencePiece vocabulary (its size must equal the model's). ``--seqio_task`` may name
any task the run registered (its config is read, the tasks registered again); its documents get the BOS /
EOS the run was trained with. ``--tokens_file`` ids must lie in [0, vocab_size).
Exit codes (README "Exit codes"): 0 ok; 2 bad input (one line on stderr); 4 damaged checkpoint / I/O.
"""
from __future__ import annotations

import json
import os

from absl import flags

from fot.runtime import EXIT_CONFIG, describe_os_error, fail, os_error_code, run_app

TASKS = ("dictionary", "passkey", "perplexity", "distraction")

# fot.train defines --workdir, --gin_file (here: extra files parsed after the operative config),
# --gin_bindings (e.g. 'dictionary_eval.sizes = [512, 1024]') and --gin_search_paths.
from fot import train as _train  # noqa: E402  (defines the shared absl flags once)

from fot.eval.restore import (EvalError, _bound, _resolve, _train_data_param, load_model,  # noqa: E402
                              run_tokenizer)

FLAGS = flags.FLAGS
flags.DEFINE_string("task", None, f"One of {TASKS}.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
flags.DEFINE_integer("top_k", None, "Override top_k of the task (must be >= 1).")
flags.DEFINE_float("temperature_scale", None, "Multiply the memory layers' QK-norm temperature by this "
                   "factor (> 0) for the evaluation: how much sharper a softmax the memory size wants.")
flags.DEFINE_string("tokens_file", None, "perplexity/distraction: 1-D .npy of token ids.")
flags.DEFINE_integer("doc_separator", None, "Split --tokens_file into documents after this id.")
flags.DEFINE_string("seqio_task", None, "perplexity/distraction: registered seqio task/mixture name.")
flags.DEFINE_string("split", "validation", "Split of --seqio_task.")
flags.DEFINE_string("baseline_workdir", None, "dictionary: a run without memory (e.g. gin/runs/"
                    "dictionary_baseline_cpu.gin) evaluated with the whole document as local context.")
flags.DEFINE_integer("baseline_step", None, "Checkpoint step of --baseline_workdir (default: latest).")


def _fail(message, code: int = EXIT_CONFIG) -> None:
    fail("fot.eval", message, code)


def _documents(gin, model, window: int):
    """Documents for perplexity/distraction: --tokens_file, --seqio_task, or synthetic dictionary docs."""
    from fot.eval import perplexity
    if FLAGS.tokens_file:
        try:
            docs = perplexity.load_tokens_file(FLAGS.tokens_file, FLAGS.doc_separator)
        except (ValueError, OSError, EOFError) as e:
            raise EvalError(f"--tokens_file {FLAGS.tokens_file}: {e}") from None
        return _checked(docs, model.config.vocab_size, f"--tokens_file {FLAGS.tokens_file}")
    if FLAGS.seqio_task:
        return _seqio_documents(gin, model)
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


def _seqio_documents(gin, model):
    """Documents of ``--seqio_task`` after registering the run's own tasks, wrapped in the BOS / EOS the run
    was trained with (``make_iterator.add_bos`` / ``add_eos`` of its training data)."""
    import numpy as np

    from fot import runconfig
    from fot.data import pipeline
    from fot.data.tf_env import import_seqio
    from fot.eval import perplexity
    try:
        registered = runconfig.register_run_tasks(gin)
    except ValueError as e:
        raise EvalError(f"cannot register the run's seqio tasks: {e}") from None
    seqio = import_seqio()
    name = FLAGS.seqio_task
    if name not in seqio.TaskRegistry.names() and name not in seqio.MixtureRegistry.names():
        raise EvalError(f"--seqio_task={name!r} is not a registered seqio task or mixture; this run registers "
                        f"{registered or 'none (it was not trained on a seqio task)'}")
    sel = runconfig.train_data_selector(gin) or ""
    add_bos = runconfig.peek(gin, f"{sel}.add_bos") if sel.endswith("make_iterator") else None
    add_eos = runconfig.peek(gin, f"{sel}.add_eos") if sel.endswith("make_iterator") else None
    try:
        bos, eos = pipeline._special_ids(  # pylint: disable=protected-access
            name, True if add_bos is None else bool(add_bos), True if add_eos is None else bool(add_eos))
        docs = perplexity.task_documents(name, FLAGS.split)
    except ValueError as e:
        raise EvalError(f"--seqio_task={name!r}: {e}") from None
    head = [bos] if bos is not None else []
    tail = [eos] if eos is not None else []
    docs = [np.concatenate([np.asarray(head, np.int32), d, np.asarray(tail, np.int32)]) for d in docs]
    return _checked(docs, model.config.vocab_size, f"--seqio_task={name!r}")


def _checked(docs, vocab_size: int, what: str):
    """``docs`` after checking every id lies in [0, vocab_size) (EvalError naming the document otherwise)."""
    from fot.model import check_token_ids
    for i, d in enumerate(docs):
        try:
            check_token_ids(d, vocab_size, f"{what} (document {i})")
        except ValueError as e:
            raise EvalError(str(e)) from None
    return docs


def _check_flags(task: str) -> None:
    if task not in TASKS:
        raise EvalError(f"unknown --task={task!r}; choose one of {', '.join(TASKS)}")
    if FLAGS.top_k is not None and FLAGS.top_k <= 0:
        raise EvalError(f"--top_k must be >= 1, got {FLAGS.top_k}")
    if FLAGS.temperature_scale is not None and not FLAGS.temperature_scale > 0:
        raise EvalError(f"--temperature_scale must be > 0, got {FLAGS.temperature_scale}")
    if FLAGS.baseline_workdir and task != "dictionary":
        raise EvalError("--baseline_workdir applies to --task=dictionary only")


def _load(task: str, workdir: str):
    """(model, params, step, baseline (model, params) or None, baseline step); the run's gin config stays active."""
    baseline = b_step = None
    if task == "dictionary" and FLAGS.baseline_workdir:
        # Loaded first: loading a run replaces the gin config, and the evaluated run's must stay active.
        b_model, b_params, b_step = load_model(FLAGS.baseline_workdir, FLAGS.baseline_step)
        baseline = (b_model, b_params)
    model, params, step = load_model(workdir, FLAGS.step, FLAGS.gin_file, FLAGS.gin_bindings,
                                     FLAGS.gin_search_paths)
    if FLAGS.temperature_scale is not None:
        from fot.model import scale_memory_temperatures
        if not model.config.qk_norm:
            raise EvalError("--temperature_scale needs a model with qk_norm (a learned memory-layer temperature)")
        params = scale_memory_temperatures(model.config, params, FLAGS.temperature_scale)
    return model, params, step, baseline, b_step


def _derived(gin, task: str, model, workdir: str) -> dict:
    """Task settings inferred from the training config (module docstring), before gin bindings."""
    from fot.eval import dictionary
    seq_len = _train_data_param(gin, "seq_len")
    derived = {"window": seq_len}
    if task == "dictionary":
        for k in ("key_len", "value_len"):
            derived[k] = _train_data_param(gin, k)
        derived["vocab_size"] = model.config.vocab_size
        if seq_len is not None:
            kv = (derived["key_len"] or 4, derived["value_len"] or 4, model.config.vocab_size)
            derived["sizes"] = [n for n in (seq_len * 2 ** i for i in range(0, 10))
                                if dictionary.size_fits(n, seq_len, *kv)]
    if task == "passkey" and seq_len is not None:
        derived["last_context_length"] = seq_len // 2
        derived["context_lengths"] = [seq_len * 2 ** i for i in (1, 2, 3, 4)]
    if task == "passkey":
        spm_path, trained = run_tokenizer(gin, workdir)
        derived["trained_vocab_size"] = trained
        if not _bound(gin, "passkey_eval.spm_path"):
            derived["spm_path"] = spm_path
    if task == "perplexity" and seq_len is not None:
        derived["sizes"] = [0] + [seq_len * 2 ** i for i in (0, 1, 2, 3, 4)]
    return derived


def _task_kwargs(gin, task: str, model, workdir: str) -> dict:
    """Keyword arguments of ``<task>_eval``: what the training config implies and gin does not bind, --top_k."""
    name = f"{task}_eval"
    kwargs = {k: v for k, v in _derived(gin, task, model, workdir).items()
              if v is not None and not _bound(gin, f"{name}.{k}")}
    if FLAGS.top_k is not None:
        if task == "distraction":
            raise EvalError("--top_k does not apply to --task=distraction (dense mass statistics)")
        kwargs["top_k"] = FLAGS.top_k
    missing = [k for k in ("window",) if k not in kwargs and not _bound(gin, f"{name}.{k}")]
    if missing:
        raise EvalError(f"cannot infer {missing} from the training config; bind {name}.{missing[0]}")
    return kwargs


def run(task: str, workdir: str) -> dict:
    """Evaluate ``task`` on run ``workdir`` (module docstring); process 0 writes the results and the plot."""
    _check_flags(task)
    model, params, step, baseline, b_step = _load(task, workdir)
    import gin

    from fot.eval import dictionary, distraction, passkey, perplexity
    mod = {"dictionary": dictionary, "passkey": passkey, "perplexity": perplexity,
           "distraction": distraction}[task]
    name = f"{task}_eval"
    kwargs = _task_kwargs(gin, task, model, workdir)
    if baseline is not None:
        kwargs["baseline"] = baseline
    args = (model, params)
    if task in ("perplexity", "distraction"):
        win = kwargs.get("window") or _resolve(gin, gin.query_parameter(f"{name}.window"))
        args = (model, params, _documents(gin, model, win))
    try:
        result = gin.get_configurable(f"fot.eval.{name}")(*args, **kwargs)
    except ValueError as e:
        raise EvalError(str(e)) from None
    result["checkpoint_step"] = step
    if FLAGS.temperature_scale is not None:
        result["temperature_scale"] = FLAGS.temperature_scale
    if baseline is not None:
        result["baseline_workdir"], result["baseline_step"] = os.path.abspath(FLAGS.baseline_workdir), b_step
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
    except OSError as e:  # a damaged checkpoint (exit 4), an unwritable workdir, ...
        if os.environ.get("FOT_DEBUG"):
            raise
        _fail(describe_os_error(e), os_error_code(e))
    from fot.parallel import multihost
    if multihost.is_primary():
        print(json.dumps(result), flush=True)


def entry() -> None:
    run_app(main, __doc__)
