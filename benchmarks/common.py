"""What several benchmarks share: timed repeats of a call (best-of, or every time), and the results as one JSON line on stdout and,
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


def timed_calls(fn, state, repeats: int, warmups: int = 1) -> tuple[Any, list[float], list[float]]:
    """``state = fn(state)`` ``warmups`` times (compiling), then ``repeats`` times timed: (final state, wall s
    per timed call, process CPU s per timed call). ``state`` threads a donated buffer from call to call."""
    for _ in range(warmups):
        state = jax.block_until_ready(fn(state))
    walls, cpus = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        state = jax.block_until_ready(fn(state))
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return state, walls, cpus


def best_times(fn, repeats: int) -> tuple[float, float]:
    """(best wall s, best process CPU s) of ``repeats`` calls of ``fn`` after one warm-up (compiling) call."""
    _, walls, cpus = timed_calls(lambda _: fn(), None, repeats)
    return min(walls), min(cpus)
