"""``fot.memory.append`` micro-benchmark: one window into a large store, jitted with the store donated.

    python -m benchmarks.memory_append            # store [1, 262144, 4, 64], windows of 4096 (~1 min, 2 cores)
    python -m benchmarks.memory_append --capacity 65536 --window 1024 --repeats 10

Cases (each: float32 and bfloat16 storage; median and best of ``--repeats`` appends, each on the previous
call's output store, after two warm-up calls):

* ``aligned``: appends of ``window`` slots from an empty store (capacity a multiple of the window): the
  pointer is provably a multiple of the window, the single in-place update-slice.
* ``mixed``: the same appends after one append of ``window - 96`` slots: the pointer is not a multiple of
  the window, the ring-wrapping (general) path.
* ``odd``: appends of ``window - 1`` slots (capacity not a multiple of the length): the general path.

Target: the aligned bf16 append stays in place — within 4x of the aligned float32 append (a whole-store
copy of 256 MiB costs ~100 ms here, ~200x the in-place write).
"""
from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import emit, timed_calls
from benchmarks.topk import _load
from fot import memory as fmem


def _median_ms(step, store, k, v, repeats):
    """Median / best wall ms and median process-CPU ms of ``repeats`` donated appends after 2 warm-ups."""
    _, walls, cpus = timed_calls(lambda s: step(s, k, v), store, repeats, warmups=2)
    return (round(statistics.median(walls) * 1e3, 3), round(min(walls) * 1e3, 3),
            round(statistics.median(cpus) * 1e3, 3))


def run(capacity: int, window: int, heads: int, head_dim: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    kv = lambda t: [jnp.asarray(rng.standard_normal((1, t, heads, head_dim)), jnp.float32) for _ in "kv"]  # noqa: E731
    step = jax.jit(fmem.append, donate_argnums=(0,))
    rows = {}
    for dtype in ("float32", "bfloat16"):
        for case, prefix, t in (("aligned", 0, window), ("mixed", window - 96, window), ("odd", 0, window - 1)):
            store = fmem.init_store(1, capacity, heads, head_dim, dtype=dtype)
            if prefix:
                store = step(store, *kv(prefix))
            med, best, cpu = _median_ms(step, store, *kv(t), repeats)
            rows[f"{case} {dtype}"] = {"median ms": med, "best ms": best, "median CPU ms": cpu}
            print(f"[append] {case:>7} {dtype:>8}: median {med} ms, best {best} ms, CPU {cpu} ms ({_load()})",
                  flush=True)
    ratio = rows["aligned bfloat16"]["median ms"] / rows["aligned float32"]["median ms"]
    met = "target met" if ratio <= 4 else "target NOT met"
    print(f"aligned bf16 / f32 append: {ratio:.2f}x (<= 4x, in place): {met}")
    return {"store": [1, capacity, heads, head_dim], "window": window, "repeats": repeats, "cases": rows,
            "aligned bf16 / f32": round(ratio, 3), "load": _load()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--capacity", type=int, default=262144)
    p.add_argument("--window", type=int, default=4096)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)
    emit(run(a.capacity, a.window, a.heads, a.head_dim, a.repeats), a.json)


if __name__ == "__main__":
    main()
