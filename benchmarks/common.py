"""What several benchmarks share: best-of-repeats timing, and the results as one JSON line on stdout and,
optionally, a JSON file."""
from __future__ import annotations

import json
import time
from typing import Any

import jax


def emit(results: dict[str, Any], json_path: str | None = None) -> None:
    """Write ``results`` to ``json_path`` (indented; when given), then print them as one JSON line."""
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)
    print(json.dumps(results))


def best_times(fn, repeats: int) -> tuple[float, float]:
    """(best wall s, best process CPU s) of ``repeats`` calls of ``fn`` after one warm-up (compiling) call."""
    jax.block_until_ready(fn())
    wall = cpu = float("inf")
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn())
        wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
    return wall, cpu
