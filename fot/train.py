r"""Training entry point: ``python -m fot.train --gin_file=F [--gin_file=G ...] [--gin_bindings=...] --workdir=DIR``.

Gin files compose (run file + size file + options, t5x/meliad style); later files and
``--gin_bindings`` override earlier ones. Library code is gin-free: this module registers the
configurables (``ModelConfig``, the data iterators, optimizer/schedule factories and optax pieces,
curricula, ``train``) with ``gin.external_configurable``. The operative config is written to
``DIR/config.gin``; checkpoints go to ``DIR/checkpoints``; TensorBoard events to ``DIR``; results to
``DIR/results.json`` and as the last stdout line (one JSON object).

Fine-tuning (``train.init_from = 'W'``): the model configuration comes from ``W/config.gin`` (every
``ModelConfig`` field of run W is bound before the gin files, which may then change memory-layer settings
(``INIT_FROM_FIELDS``) and nothing else: a file that changes a parameter's shape or the model's function
is a configuration error). The macro ``INIT_FROM`` holds ``W`` (None without init_from), e.g. for
``run_vocabulary.workdir = %INIT_FROM`` (the imported checkpoint's own tokenizer).

Exit codes (``fot.runtime``; README "Exit codes"): 0 finished; 2 configuration/input error (one line on
stderr); 3 training diverged (the last good checkpoint is kept); 4 I/O failure; 5 preempted (SIGTERM:
checkpoint saved, re-run to resume); 6 workdir locked by another run.
"""
from __future__ import annotations

import dataclasses
import os
import sys

from absl import flags

from fot.runtime import (EXIT_BUSY, EXIT_CONFIG, EXIT_DIVERGED, EXIT_IO, EXIT_PREEMPTED, describe_os_error,
                         fail, os_error_code, run_app)

_REPO_GIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin")

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("gin_file", [], "Gin config files (composed in order).")
flags.DEFINE_multi_string("gin_bindings", [], "Individual gin bindings, e.g. 'train.total_steps = 10'.")
flags.DEFINE_list("gin_search_paths", ["gin", _REPO_GIN], "Directories searched for gin files and includes.")
flags.DEFINE_string("workdir", None, "Run directory (checkpoints, TensorBoard, config.gin, results.json).")
flags.DEFINE_bool("allow_config_change", False, "fot.train: resume a workdir although its model/data "
                  "configuration differs from the saved config.gin (the old one is kept as config.previous.gin).")
# Several processes (jax.distributed). Auto-detected on Cloud TPU pod slices, SLURM and Open MPI; explicit
# for GPU clusters and local multi-process runs (every process gets the same flags but its --process_id).
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "Start jax.distributed: auto = when a coordinate below is given or JAX detects a cluster.")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0's coordinator (multi-process runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes of the run.")
flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
flags.DEFINE_list("local_device_ids", None, "Device ids this process uses (GPU: one process per GPU, e.g. 3).")
flags.DEFINE_integer("distributed_heartbeat_timeout", 30,
                     "Seconds without a heartbeat before the run is declared broken and every process exits.")
flags.DEFINE_integer("distributed_shutdown_timeout", 60, "Seconds the processes wait for each other at exit.")
flags.DEFINE_integer("distributed_initialization_timeout", 300, "Seconds to wait for all processes to join.")

_REGISTERED = False
# ModelConfig fields a run file may change when it fine-tunes run W (train.init_from): memory-layer
# settings and how the same parameters are computed; everything else comes from W/config.gin.
INIT_FROM_FIELDS = ("mem_layers", "mem_positional", "crossbatch_block_rows", "dtype", "remat", "remat_policy")


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
    _includes_as_files_only()
    _REGISTERED = True


def _includes_as_files_only() -> None:
    """Resolve gin files and includes as files under the search paths only (``--gin_search_paths``, with
    ``gin/`` always searched), never through gin's package-path reader (``gin.resource_reader``).

    That reader takes an include such as ``'runs/dictionary.gin'`` as file ``dictionary.gin`` of the Python
    package ``runs``, imports/looks it up with ``importlib``, and crashes with a TypeError when ``runs`` is a
    plain directory on ``sys.path`` (a run directory ``runs/`` in the working directory is found as a
    namespace package without an origin) before the search paths are tried. It would also import a
    package's code just to find a file. gin has no public way to unregister a reader, hence the edit of its
    reader list.
    """
    from gin import config as gin_config
    from gin import resource_reader

    gin_config._FILE_READERS[:] = [r for r in gin_config._FILE_READERS  # pylint: disable=protected-access
                                   if r[0] is not resource_reader.system_path_reader]


# fot.data's seqio pipeline: iterator, task / mixture registration and vocabulary functions (short names in gin).
DATA_CONFIGURABLES = ("make_iterator", "register_files_task", "register_tfds_task", "register_stdlib_task",
                      "register_dictionary_task", "register_mixture", "load_vocabulary", "stdlib_vocabulary",
                      "run_vocabulary")


def _register_data_pipeline(gin) -> None:
    """The seqio pipeline's functions (``DATA_CONFIGURABLES``), registered only when that module imports."""
    try:
        from fot.data import pipeline  # noqa: F401  (seqio/TF are imported lazily inside its functions)
    except ImportError:
        return
    for name in DATA_CONFIGURABLES:
        gin.external_configurable(getattr(pipeline, name), name=name, module="fot.data")


def model_config_bindings(config) -> list[str]:
    """Gin bindings that rebuild ``config`` (a ``ModelConfig``): one ``ModelConfig.<field> = <value>`` per field."""
    return [f"ModelConfig.{f.name} = {getattr(config, f.name)!r}" for f in dataclasses.fields(config)]


def parse_run_config(workdir: str, gin_files=(), gin_bindings=(), search_paths=()) -> None:
    """Parse a run's operative config (``workdir/config.gin``, written by fot.train) plus extra gin files and
    bindings into gin's global config (cleared first; not finalized; unknown configurables skipped).

    The run's file is untrusted: ``fot.runconfig.load_config`` binds only its model/data configuration and
    never imports or calls anything from it. ``gin_files``/``gin_bindings`` are the caller's own and parse
    normally. Raises gin's own errors (OSError for a missing file)."""
    import gin

    from fot import runconfig

    register_configurables()
    for path in search_paths:
        if path and os.path.isdir(path):
            gin.add_config_file_search_path(path)
    gin.clear_config()
    runconfig.load_config(os.path.join(workdir, "config.gin"))
    if gin_files or gin_bindings:
        gin.parse_config_files_and_bindings(list(gin_files), list(gin_bindings), skip_unknown=True,
                                            finalize_config=False)


def _fail(message, code: int = EXIT_CONFIG) -> None:
    fail("fot.train", message, code)


def _query(gin, selector: str):
    try:
        return gin.query_parameter(selector)
    except ValueError:
        return None


def init_from_model(workdir: str, search_paths=()):
    """The ModelConfig of run ``workdir`` (parsed from its config.gin; gin's config is cleared after)."""
    import gin

    if not os.path.isfile(os.path.join(workdir, "config.gin")):
        raise ValueError(f"train.init_from = {workdir!r}: no config.gin there (expected a run directory of "
                         "fot.train or fot.convert.from_hf)")
    try:
        parse_run_config(workdir, search_paths=search_paths)
        return gin.get_configurable("fot.model.ModelConfig")()
    except Exception as e:  # noqa: BLE001 - gin / ModelConfig errors
        raise ValueError(f"train.init_from = {workdir!r}: cannot build its ModelConfig from config.gin: {e}") from None
    finally:
        gin.clear_config()


def check_init_from_model(base, run) -> None:
    """ValueError naming the first ModelConfig field (outside INIT_FROM_FIELDS) the run files changed."""
    for f in dataclasses.fields(base):
        a, b = getattr(base, f.name), getattr(run, f.name)
        if f.name not in INIT_FROM_FIELDS and a != b:
            raise ValueError(f"with train.init_from the model comes from that run's config.gin, but the gin files "
                             f"change ModelConfig.{f.name} ({a!r} there, {b!r} here); a fine-tuning run file may "
                             f"change only {', '.join(INIT_FROM_FIELDS)}")


def _parse(gin, gin_files, gin_bindings, init_from) -> None:
    gin.clear_config()
    gin.parse_config(f"INIT_FROM = {init_from!r}")
    gin.parse_config_files_and_bindings(gin_files, gin_bindings, finalize_config=False)


def parse_gin(gin_files, gin_bindings, search_paths) -> None:
    """Parse and finalize gin files and bindings (with ``train.init_from``: on top of that run's model,
    see the module docstring); one-line error and exit 2 on any problem."""
    import gin

    register_configurables()
    for path in search_paths:
        if path and os.path.isdir(path):
            gin.add_config_file_search_path(path)
    if not gin_files:
        _fail("no --gin_file given (e.g. --gin_file=gin/quickstart.gin)")
    from absl import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.FATAL)  # gin logs an error for every search-path miss
    try:
        _parse(gin, gin_files, gin_bindings, None)
        init_from = _query(gin, "fot.training.train.init_from")
        if init_from:
            init_from = os.path.abspath(str(init_from))
            try:
                base = init_from_model(init_from, search_paths)
                _parse(gin, [], model_config_bindings(base) + ["train.model_config = @ModelConfig()"], init_from)
                gin.parse_config_files_and_bindings(gin_files, gin_bindings, finalize_config=False)
                check_init_from_model(base, gin.get_configurable("fot.model.ModelConfig")())
            except ValueError as e:
                _fail(e)
        gin.finalize()
    except (OSError, IOError) as e:
        _fail(f"gin file not found: {e}")
    except Exception as e:  # gin raises ValueError/KeyError/SyntaxError subclasses for bad bindings
        _fail(f"bad gin config: {type(e).__name__}: {e}")
    finally:
        logging.set_verbosity(verbosity)


def init_distributed(prog: str) -> bool:
    """Start jax.distributed from the flags above (``fot.parallel.multihost.initialize``); one-line error
    and exit 2 on bad flags, 4 when the coordinator does not answer. Returns True for a multi-process run."""
    from fot.parallel import multihost

    try:
        ids = [int(i) for i in FLAGS.local_device_ids] if FLAGS.local_device_ids is not None else None
    except ValueError:
        fail(prog, f"--local_device_ids must be integers, got {FLAGS.local_device_ids}")
    try:
        return multihost.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, ids,
                                    mode=FLAGS.distributed, heartbeat_timeout=FLAGS.distributed_heartbeat_timeout,
                                    shutdown_timeout=FLAGS.distributed_shutdown_timeout,
                                    initialization_timeout=FLAGS.distributed_initialization_timeout)
    except ValueError as e:
        fail(prog, e)
    except RuntimeError as e:  # the coordinator or the other processes did not answer: retryable
        fail(prog, e, EXIT_IO)


def main(argv) -> None:
    if len(argv) > 1:
        _fail(f"unexpected positional arguments: {argv[1:]}")
    if not FLAGS.workdir:
        _fail("--workdir is required")
    parse_gin(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.gin_search_paths)
    init_distributed("fot.train")
    import gin

    from fot.data.documents import DataError
    from fot.training.lock import WorkdirBusyError
    from fot.training.loop import ConfigError, StopSignal, TrainingDivergedError, train

    def write_config(workdir: str) -> None:
        """Write the operative config; on a resume, refuse a changed model/data configuration (issue 15)."""
        from fot import runconfig
        path = os.path.join(workdir, "config.gin")
        text = gin.operative_config_str()
        ckpts = os.path.join(workdir, "checkpoints")
        if os.path.isfile(path) and os.path.isdir(ckpts) and any(n.isdigit() for n in os.listdir(ckpts)):
            with open(path) as f:
                saved = f.read()
            changes = runconfig.data_and_model_changes(saved, text, runconfig.gin_default)
            if changes and not FLAGS.allow_config_change:
                raise ConfigError(
                    f"{workdir} holds checkpoints of a run with another model/data configuration: "
                    + "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
                    + f" (saved config: {path}); resume with the same configuration, or pass "
                      "--allow_config_change to resume with this one")
            if changes:
                with open(os.path.join(workdir, "config.previous.gin"), "w") as f:
                    f.write(saved)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)

    stop = StopSignal()
    try:
        results = gin.get_configurable("fot.training.train")(workdir=FLAGS.workdir, config_writer=write_config,
                                                             should_stop=stop)
    except ConfigError as e:
        _fail(str(e))
    except TrainingDivergedError as e:
        _fail(str(e), code=EXIT_DIVERGED)
    except WorkdirBusyError as e:
        _fail(str(e), code=EXIT_BUSY)
    except DataError as e:  # a bad line / file in the training data
        _fail(f"bad input data: {e}")
    except OSError as e:  # disk full, quota, read-only storage, damaged checkpoint (exit 4); missing path (2)
        if os.environ.get("FOT_DEBUG"):
            raise
        _fail(describe_os_error(e), code=os_error_code(e))
    except (ValueError, TypeError) as e:
        # Validation errors of configured objects (ModelConfig, iterators, optimizer factories) are
        # user-facing (a TypeError: a binding of the wrong type); gin prefixes them with the configurable.
        if os.environ.get("FOT_DEBUG"):
            raise
        _fail(f"invalid configuration: {e} (set FOT_DEBUG=1 for the traceback)")
    finally:
        stop.restore()
    if results.get("stopped") == "preempted":
        sys.exit(EXIT_PREEMPTED)  # not 0: the run is unfinished, a scheduler must run the same command again


def run() -> None:
    run_app(main, __doc__)


if __name__ == "__main__":
    run()
