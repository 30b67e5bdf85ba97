"""Process-level XLA settings applied by fot's entry points (train, eval, generate, benchmarks).

Kept separate from library code: importing ``fot.ops`` / ``fot.model`` never changes global settings.
Call :func:`tune_cpu_xla` before JAX initialises a backend (i.e. before the first device query or
computation); ``XLA_FLAGS`` is read once, at backend initialisation.
"""
from __future__ import annotations

import os
from typing import MutableMapping

# XLA:CPU (jaxlib 0.10) routes dots to a YNNPACK fusion that runs the batched [B*H] small matmuls of
# attention on about one core; with the fusion type list empty they go to XLA's multi-threaded Eigen
# path. Measured (2-core AMD EPYC, B=4, L=256, H=8, Dh=64 f32): batched 256x256x64 dots 68 -> 144
# GFLOP/s, a 8192x64x256 dot 166 -> 192 GFLOP/s; BUILD_NOTES.md "FoT ops" has the train-step figures.
YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type="
OPT_OUT = "FOT_KEEP_XLA_DEFAULTS"


def tune_cpu_xla(environ: MutableMapping[str, str] | None = None) -> bool:
    """Add fot's XLA:CPU flag (see YNN_FLAG) to ``XLA_FLAGS``. Returns True when it was added.

    No-op when ``FOT_KEEP_XLA_DEFAULTS=1``, when ``XLA_FLAGS`` already sets the option (the user's value
    wins), or when ``JAX_PLATFORMS`` names platforms without ``cpu`` (the flag only affects XLA:CPU).
    """
    env = os.environ if environ is None else environ
    if env.get(OPT_OUT, "").strip() not in ("", "0"):
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
    """``absl.app.run(main)`` for fot's command-line tools: applies :func:`tune_cpu_xla` first and, unless
    the command line sets a verbosity, runs with ``--verbosity=-1`` (orbax and clu log every checkpoint
    save at INFO through absl; the tools print their own progress lines)."""
    import sys

    from absl import app

    tune_cpu_xla()
    if not any(a.startswith(("--verbosity", "-v", "--v=")) for a in sys.argv[1:]):
        sys.argv.insert(1, "--verbosity=-1")
    app.run(main)
