r"""Training entry point: ``python -m fot.train --gin_file=F [--gin_file=G ...] [--gin_bindings=...] --workdir=DIR``.

Gin files compose (run file + size file + options, t5x/meliad style); later files and
``--gin_bindings`` override earlier ones. Library code is gin-free: this module registers the
configurables (``ModelConfig``, the data iterators, optimizer/schedule factories and optax pieces,
curricula, ``train``) with ``gin.external_configurable``. The operative config is written to
``DIR/config.gin``; checkpoints go to ``DIR/checkpoints``; TensorBoard events to ``DIR``; results to
``DIR/results.json`` and as the last stdout line (one JSON object).

Exit codes: 0 = finished (or saved and stopped on SIGTERM); 2 = configuration error (one line on
stderr); 3 = training diverged (NaN/inf loss; the last checkpoint is the last good one).
"""
from __future__ import annotations

import contextlib
import os
import sys

from absl import flags

from fot.runtime import fail, run_app

_REPO_GIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin")

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("gin_file", [], "Gin config files (composed in order).")
flags.DEFINE_multi_string("gin_bindings", [], "Individual gin bindings, e.g. 'train.total_steps = 10'.")
flags.DEFINE_list("gin_search_paths", ["gin", _REPO_GIN], "Directories searched for gin files and includes.")
flags.DEFINE_string("workdir", None, "Run directory (checkpoints, TensorBoard, config.gin, results.json).")

_REGISTERED = False


def register_configurables() -> None:
    """Register every gin configurable used by gin/*.gin (idempotent). Also used by ``fot.eval``."""
    global _REGISTERED
    if _REGISTERED:
        return
    import gin
    import optax

    from fot.data.dictionary import DictionaryLookupIterator
    from fot.model import ModelConfig
    from fot.training import curriculum, loop, optim

    gin.external_configurable(ModelConfig, name="ModelConfig", module="fot.model")
    gin.external_configurable(DictionaryLookupIterator, name="DictionaryLookupIterator", module="fot.data")
    for fn in (optim.make_optimizer, optim.make_schedule, optim.inverse_sqrt_schedule):
        gin.external_configurable(fn, module="fot.training")
    for cls in (curriculum.ConstantD, curriculum.SwitchAtStep, curriculum.SwitchOnAccuracy, curriculum.RandomD):
        gin.external_configurable(cls, module="fot.training")
    gin.external_configurable(loop.train, name="train", module="fot.training")
    from fot.eval import dictionary, distraction, passkey, perplexity
    for task, mod in (("dictionary", dictionary), ("passkey", passkey), ("perplexity", perplexity),
                      ("distraction", distraction)):  # fot.eval's tasks; train.final_eval may use them
        gin.external_configurable(mod.evaluate, name=f"{task}_eval", module="fot.eval")
    for fn in (optax.adamw, optax.adafactor, optax.sgd, optax.chain, optax.clip_by_global_norm,
               optax.warmup_cosine_decay_schedule, optax.linear_schedule, optax.constant_schedule,
               optax.join_schedules):
        gin.external_configurable(fn, module="optax")
    _register_data_pipeline(gin)
    _REGISTERED = True


def _register_data_pipeline(gin) -> None:
    """The seqio pipeline's iterator factories (fot.data), registered only when that module imports."""
    try:
        from fot.data import pipeline  # noqa: F401  (seqio/TF are imported lazily inside its functions)
    except ImportError:
        return
    for name in getattr(pipeline, "GIN_CONFIGURABLES", ()):
        gin.external_configurable(getattr(pipeline, name), name=name, module="fot.data")


def parse_run_config(workdir: str, gin_files=(), gin_bindings=(), search_paths=()) -> None:
    """Parse a run's operative config (``workdir/config.gin``, written by fot.train) plus extra gin files and
    bindings into gin's global config (cleared first; not finalized; unknown configurables skipped).
    Raises gin's own errors (OSError for a missing file)."""
    import gin

    register_configurables()
    for path in search_paths:
        if path and os.path.isdir(path):
            gin.add_config_file_search_path(path)
    gin.clear_config()
    with gin_include_guard(search_paths):
        gin.parse_config_files_and_bindings([os.path.join(workdir, "config.gin"), *gin_files], list(gin_bindings),
                                            skip_unknown=True, finalize_config=False)


def load_run(workdir: str, step: int | None = None, gin_files=(), gin_bindings=(), search_paths=()):
    """(ModelConfig, params, step) of a training run: parses its config (parse_run_config) and restores the
    params of the checkpoint at ``step`` (default latest) as numpy arrays. For evaluation / inference /
    export code; gin holds the run's config afterwards. ``fot.eval.restore.load_run`` adds CLI checks."""
    import gin

    from fot.training.checkpoint import load_params

    parse_run_config(workdir, gin_files, gin_bindings, search_paths)
    config = gin.get_configurable("fot.model.ModelConfig")()
    params, step = load_params(workdir, step)
    return config, params, step


def _fail(message, code: int = 2) -> None:
    fail("fot.train", message, code)


@contextlib.contextmanager
def gin_include_guard(search_paths=()):
    """Parse gin with the gin trees' folder names blocked as Python packages.

    gin's package-path reader reads an include such as ``'runs/dictionary.gin'`` as file
    ``dictionary.gin`` of Python package ``runs``; a plain directory of that name on ``sys.path`` (a
    run directory ``runs/`` in the working directory, or in the repository when it is on PYTHONPATH)
    is then found as a namespace package without an origin, and gin crashes with a TypeError instead
    of trying its search paths. While parsing, every top-level folder name of ``gin/`` and of
    ``search_paths`` that is not an imported module is set to ``None`` in ``sys.modules``, so
    ``importlib.util.find_spec`` reports it missing and gin moves on to its search paths.
    """
    names = set()
    for root in (_REPO_GIN, *search_paths):
        if root and os.path.isdir(root):
            names.update(n for n in os.listdir(root) if n.isidentifier() and os.path.isdir(os.path.join(root, n)))
    blocked = [n for n in sorted(names) if n not in sys.modules]
    for n in blocked:
        sys.modules[n] = None
    try:
        yield
    finally:
        for n in blocked:
            if sys.modules.get(n, 0) is None:
                del sys.modules[n]


def parse_gin(gin_files, gin_bindings, search_paths) -> None:
    """Parse and finalize gin files and bindings; one-line error and exit 2 on any problem."""
    import gin

    register_configurables()
    for path in search_paths:
        if path and os.path.isdir(path):
            gin.add_config_file_search_path(path)
    if not gin_files:
        _fail("no --gin_file given (e.g. --gin_file=gin/quickstart.gin)")
    from absl import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.FATAL)  # gin's resource reader logs an error for every search-path miss
    try:
        with gin_include_guard(search_paths):
            gin.parse_config_files_and_bindings(gin_files, gin_bindings, finalize_config=True)
    except (OSError, IOError) as e:
        _fail(f"gin file not found: {e}")
    except Exception as e:  # gin raises ValueError/KeyError/SyntaxError subclasses for bad bindings
        _fail(f"bad gin config: {type(e).__name__}: {e}")
    finally:
        logging.set_verbosity(verbosity)


def main(argv) -> None:
    if len(argv) > 1:
        _fail(f"unexpected positional arguments: {argv[1:]}")
    if not FLAGS.workdir:
        _fail("--workdir is required")
    parse_gin(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.gin_search_paths)
    import gin

    from fot.training.loop import ConfigError, StopSignal, TrainingDivergedError, train

    def write_config(workdir: str) -> None:
        with open(os.path.join(workdir, "config.gin"), "w") as f:
            f.write(gin.operative_config_str())

    stop = StopSignal()
    try:
        gin.get_configurable("fot.training.train")(workdir=FLAGS.workdir, config_writer=write_config, should_stop=stop)
    except ConfigError as e:
        _fail(str(e))
    except TrainingDivergedError as e:
        _fail(str(e), code=3)
    except ValueError as e:
        # Validation errors of configured objects (ModelConfig, iterators, optimizer factories) are
        # user-facing; gin prefixes them with the configurable that raised.
        if os.environ.get("FOT_DEBUG"):
            raise
        _fail(f"invalid configuration: {e} (set FOT_DEBUG=1 for the traceback)")
    finally:
        stop.restore()


def run() -> None:
    run_app(main)


if __name__ == "__main__":
    run()
