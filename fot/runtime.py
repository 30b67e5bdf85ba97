"""Process-level settings for fot's command-line tools (train, eval, generate) and benchmarks.

Kept separate from library code: importing ``fot.ops`` / ``fot.model`` never changes global settings.
``XLA_FLAGS`` is read once, when JAX initialises a backend, so :func:`cpu_eigen_dots` must run before the
first device query or computation (``run_app`` does this for the CLIs).
"""
from __future__ import annotations

import os
import sys
from typing import MutableMapping

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


def run_app(main) -> None:
    """``absl.app.run(main)`` for fot's command-line tools: applies :func:`cpu_eigen_dots` (opt-in via
    ``FOT_CPU_EIGEN_DOTS=1``) first and, unless the command line sets a verbosity, runs with
    ``--verbosity=-1`` (orbax and clu log every checkpoint save at INFO through absl; the tools print
    their own progress lines)."""
    from absl import app

    cpu_eigen_dots()
    if not any(a.startswith(("--verbosity", "-v", "--v=")) for a in sys.argv[1:]):
        sys.argv.insert(1, "--verbosity=-1")
    app.run(main)


def fail(prog: str, message, code: int = 2) -> None:
    """Print ``prog: error: message`` on one line to stderr and exit with ``code`` (the CLIs' error path).
    Whitespace is collapsed and gin's trailing "In call to configurable ..." context is dropped."""
    import re

    message = re.sub(r"\s+In call to configurable .*$", "", " ".join(str(message).split()))
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)
