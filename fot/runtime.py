"""Process-level settings for fot's command-line tools (train, eval, generate, convert, vocab) and
benchmarks: the exit codes every CLI uses, the one-line error printer, the absl app runner.

Kept separate from library code: importing ``fot.ops`` / ``fot.model`` never changes global settings.
``XLA_FLAGS`` is read once, when JAX initialises a backend, so :func:`cpu_eigen_dots` must run before the
first device query or computation (``run_app`` does this for the CLIs).
"""
from __future__ import annotations

import errno
import os
import sys
from typing import MutableMapping

# Exit codes of every fot command-line tool (README "Exit codes"). A scheduler may retry 4, 5 and 6;
# 2 and 3 need a person (a different config or input; a lower learning rate or an earlier checkpoint).
EXIT_OK = 0          # finished (training: total_steps or max_train_seconds reached)
EXIT_INTERNAL = 1    # an unexpected error, i.e. a bug: Python prints the traceback
EXIT_CONFIG = 2      # configuration or input error: one line on stderr names the flag, binding or file
EXIT_DIVERGED = 3    # training diverged (NaN/inf loss, gradient or parameters); the last good checkpoint is kept
EXIT_IO = 4          # I/O failure (disk full, quota, read-only or unreachable storage, damaged checkpoint)
EXIT_PREEMPTED = 5   # stop signal (SIGTERM) received: a checkpoint was saved; run the same command to resume
EXIT_BUSY = 6        # the workdir is locked by another live fot.train process

EXIT_CODES = {EXIT_OK: "ok", EXIT_INTERNAL: "internal error (bug)", EXIT_CONFIG: "configuration / input error",
              EXIT_DIVERGED: "training diverged", EXIT_IO: "I/O error", EXIT_PREEMPTED: "preempted (resumable)",
              EXIT_BUSY: "workdir busy"}

# errno values that mean "the path named does not exist / is not usable by this user" (the user's to fix: exit 2);
# every other OSError is an I/O failure of the machine or storage (exit 4).
_INPUT_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP, errno.EACCES,
                 errno.EPERM}

# XLA:CPU (jaxlib 0.10) routes dots to a YNNPACK fusion that runs the batched [B*H] attention matmuls of
# 37M-sized models (256x256x64 per slice) on about one core; with the fusion type list empty they go to
# XLA's multi-threaded Eigen path. Measured here (2-core AMD EPYC, f32): batched 256x256x64 dots 68 -> 144
# GFLOP/s, a 8192x64x256 dot 166 -> 192 GFLOP/s, but the tiny quickstart model (d_model 64) trains 13%
# slower (13.0 -> 11.3 steps/s). Hence opt-in for the CLIs; BUILD_NOTES.md "FoT ops" has the figures.
YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type="
ENV = "FOT_CPU_EIGEN_DOTS"


def cpu_eigen_dots(environ: MutableMapping[str, str] | None = None, *, enable: bool | None = None) -> bool:
    """Add YNN_FLAG to ``XLA_FLAGS`` (XLA:CPU dots on multi-threaded Eigen). Returns True when added.

    enable: None reads the ``FOT_CPU_EIGEN_DOTS`` environment variable (``1`` = on; default off).
    Never overrides a value the user set in ``XLA_FLAGS``; no-op when ``JAX_PLATFORMS`` names platforms
    without ``cpu`` (the flag only affects XLA:CPU).
    """
    env = os.environ if environ is None else environ
    if enable is None:
        enable = env.get(ENV, "").strip() == "1"
    if not enable:
        return False
    platforms = env.get("JAX_PLATFORMS", "").strip()
    if platforms and "cpu" not in [p.strip() for p in platforms.split(",")]:
        return False
    current = env.get("XLA_FLAGS", "")
    if YNN_FLAG.rstrip("=") in current:
        return False
    env["XLA_FLAGS"] = f"{current} {YNN_FLAG}".strip()
    return True


HELP_ARGS = ("--help", "-h", "-?", "--helpshort", "--helpfull", "--help=true")


def print_help(doc: str | None) -> None:
    """The tool's docstring and the help of every fot flag it defined (absl's own ``--help`` exits 1 and
    lists only flags defined in the ``__main__`` module, which for ``fot.eval`` / ``fot.generate`` is none)."""
    from absl import flags

    print((doc or "").strip())
    print("\nflags:")
    for module in sorted(flags.FLAGS.flags_by_module_dict()):
        if "fot" in module or module == "__main__":
            print(flags.FLAGS.module_help(module))
    print("\nExit codes: " + ", ".join(f"{c} {what}" for c, what in sorted(EXIT_CODES.items())) + ".")


def run_app(main, doc: str | None = None) -> None:
    """``absl.app.run(main)`` for fot's command-line tools: ``--help`` prints ``doc`` and the tool's flags
    and exits 0; applies :func:`cpu_eigen_dots` (opt-in via
    ``FOT_CPU_EIGEN_DOTS=1``) first and, unless the command line sets a verbosity, runs with
    ``--verbosity=-1`` (orbax and clu log every checkpoint save at INFO through absl; the tools print
    their own progress lines). A non-zero exit leaves with ``os._exit`` after flushing stdout/stderr."""
    from absl import app

    if any(a in HELP_ARGS for a in sys.argv[1:]):
        print_help(doc)
        sys.exit(EXIT_OK)
    cpu_eigen_dots()
    quiet_library_errors()
    if not any(a.startswith(("--verbosity", "-v", "--v=")) for a in sys.argv[1:]):
        sys.argv.insert(1, "--verbosity=-1")
    try:
        app.run(main)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_CONFIG)
        if code == EXIT_OK:
            raise
        # A failure was reported (one line) and everything the tool owns is closed: leave without the
        # interpreter's finalization, where destroying TensorFlow data iterators whose reader threads wait
        # for the GIL can hang forever (issue 15: a bad JSONL line printed its error, then never exited).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    except Exception:  # noqa: BLE001 - a bug: Python's traceback, exit 1, same no-hang exit
        import traceback

        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_INTERNAL)


def quiet_library_errors(environ: MutableMapping[str, str] | None = None) -> bool:
    """Keep a failure at one line: drop orbax's and clu's absl log records (a failed async checkpoint or
    TensorBoard write logs each failing thread's traceback; fot reports the failure itself, once), TF's
    C++ warnings, and the "RuntimeError: Event
    loop is closed" tracebacks tensorstore's C++ callbacks report (``sys.unraisablehook``) when they finish
    after orbax closed its event loop. No-op with ``FOT_DEBUG=1``. Returns True when installed."""
    import logging

    env = os.environ if environ is None else environ
    if env.get("FOT_DEBUG"):
        return False
    def closed_loop(exc_type, value) -> bool:
        return exc_type is not None and issubclass(exc_type, RuntimeError) and str(value) == "Event loop is closed"

    previous_hook, previous_unraisable = sys.excepthook, sys.unraisablehook

    def hook(exc_type, value, tb):
        if not closed_loop(exc_type, value):
            previous_hook(exc_type, value, tb)

    def unraisable(info):
        if not closed_loop(info.exc_type, info.exc_value):
            previous_unraisable(info)

    sys.excepthook, sys.unraisablehook = hook, unraisable

    class _NoOrbaxClu(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            path = record.pathname or ""
            return f"{os.sep}orbax{os.sep}" not in path and f"{os.sep}clu{os.sep}" not in path

    logging.getLogger("absl").addFilter(_NoOrbaxClu())
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ warnings (a failed events-file flush)
    return True


def arg_parser(prog: str, description: str | None = None):
    """``argparse.ArgumentParser`` for the argparse CLIs (fot.convert.*, fot.data.vocab) whose errors are one
    line ``prog: error: ...`` with exit 2, like the absl CLIs (argparse prints the usage block first)."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            fail(prog, f"{message} (see --help)", EXIT_CONFIG)

    return Parser(prog=f"python -m {prog}", description=description,
                  epilog="Exit codes: " + ", ".join(f"{c} {w}" for c, w in sorted(EXIT_CODES.items())) + ".")


def one_line(message) -> str:
    """``message`` on one line: whitespace collapsed, gin's trailing "In call to configurable ..." dropped."""
    import re

    return re.sub(r"\s+In call to configurable .*$", "", " ".join(str(message).split()))


def fail(prog: str, message, code: int = EXIT_CONFIG) -> None:
    """Print ``prog: error: message`` on one line to stderr and exit with ``code`` (the CLIs' error path)."""
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    sys.exit(code)


def unwrap_os_error(e: BaseException) -> BaseException:
    """The OSError behind gin's re-raise: an exception raised inside a gin configurable (``fot.train`` calls
    ``train`` through gin) comes back as an instance of a subclass of its type whose ``errno`` /
    ``strerror`` / ``filename`` are None; the original is its ``__context__``."""
    while (isinstance(e, OSError) and e.errno is None and isinstance(e.__context__, OSError)
           and isinstance(e, type(e.__context__))):
        e = e.__context__
    return e


def os_error_code(e: OSError) -> int:
    """EXIT_CONFIG for a path that does not exist / is not a file or directory as named, else EXIT_IO."""
    return EXIT_CONFIG if getattr(unwrap_os_error(e), "errno", None) in _INPUT_ERRNOS else EXIT_IO


_ERRNO_TEXT = (("No space left on device", errno.ENOSPC), ("Disk quota exceeded", errno.EDQUOT),
               ("Read-only file system", errno.EROFS), ("Input/output error", errno.EIO),
               ("Permission denied", errno.EACCES))


def errno_of(e: BaseException) -> int | None:
    """The errno behind an exception: an OSError's own, the one tensorstore writes into orbax's errors
    (``[os_error_code='28']``), or one recognised from the OS message inside a TensorFlow / clu error
    ("No space left on device", ...). None when it is not an I/O failure."""
    import re

    e = unwrap_os_error(e)
    if isinstance(e, OSError) and isinstance(e.errno, int):
        return e.errno
    text = str(e)
    m = re.search(r"os_error_code='?(\d+)", text)
    if m:
        return int(m.group(1))
    for phrase, code in _ERRNO_TEXT:
        if phrase in text:
            return code
    return None


def describe_os_error(e: OSError) -> str:
    """``"No space left on device (ENOSPC): /path"`` for an OSError (one whose class writes its own message,
    such as ``CheckpointIOError``: that message)."""
    e = unwrap_os_error(e)
    if type(e).__str__ is not OSError.__str__:
        return str(e)
    code = getattr(e, "errno", None)
    name = errno.errorcode.get(code, "") if isinstance(code, int) else ""
    what = e.strerror or str(e)
    path = f": {e.filename}" if getattr(e, "filename", None) else ""
    return f"{what}{f' ({name})' if name and name not in what else ''}{path}"
