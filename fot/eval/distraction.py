"""Distraction: positive attention mass r_d in a memory layer (FoT paper §3.3, Fig. "distraction issue").

For a document δ with consecutive windows (p, c), the memory layer ℓ of window c sees its local
context plus d extra contexts: p (the positive, its own previous window) and d − 1 windows of other
documents (negatives), as in FoT training. With softmax weights w on the extra keys,
``r_d = Σ_{keys of p} w / Σ_{all d contexts} w`` (then averaged over queries, heads and documents);
``r_d ≈ 1/d`` for a model that does not tell documents apart.

Computed exactly from the model's ``mem_mass`` statistic (softmax mass on memory keys) of two passes
that give memory only to layer ℓ — so everything below ℓ is identical in both:
  pass A: memory = p only           →  m_A = Z_p / (Z_loc + Z_p)
  pass B: memory = p and negatives  →  m_B = (Z_p + Z_n) / (Z_loc + Z_p + Z_n)
  r_d = Z_p / (Z_p + Z_n) = (m_A / (1 − m_A)) / (m_B / (1 − m_B)), per (query, head).
Extra contexts' keys are the windows' memory-view keys of layer ℓ computed without memory.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fot.eval.plotting import line_plot
from fot.model import LayerMemory, run_window


def _windows_from_docs(docs: Sequence[np.ndarray], window: int) -> list[np.ndarray]:
    """Per document, its full windows ``[n_w, window]`` (documents with < 2 windows dropped)."""
    out = []
    for d in docs:
        n = len(d) // window
        if n >= 2:
            out.append(np.asarray(d[: n * window], np.int32).reshape(n, window))
    return out


def evaluate(model, params, docs: Sequence[np.ndarray], *, window: int, ds: Sequence[int] = (1, 2, 4, 8, 16),
             layer: int | None = None, num_samples: int = 32, seed: int = 0, mesh=None) -> dict[str, Any]:
    """r_d for every d in ``ds`` over ``num_samples`` (document, window) samples."""
    model_config = model.config
    if not model_config.mem_layers:
        raise ValueError("distraction needs a model with memory layers (mem_layers is empty)")
    layer = model_config.mem_layers[0] if layer is None else int(layer)
    if layer not in model_config.mem_layers:
        raise ValueError(f"layer {layer} is not a memory layer {list(model_config.mem_layers)}")
    if not ds or min(ds) < 1:
        raise ValueError(f"ds must be integers >= 1, got {list(ds)}")
    wins = _windows_from_docs(docs, window)
    if len(wins) < 2:
        raise ValueError(f"distraction needs >= 2 documents with >= 2 windows of {window} tokens, "
                         f"got {len(wins)}")
    max_d = max(ds)
    rng = np.random.default_rng(seed)
    cur, pos, neg = [], [], []
    for _ in range(num_samples):
        i = int(rng.integers(len(wins)))
        j = int(rng.integers(1, wins[i].shape[0]))
        cur.append(wins[i][j])
        pos.append(wins[i][j - 1])
        others = [o for o in range(len(wins)) if o != i]
        picks = rng.choice(others, size=max_d - 1, replace=len(others) < max_d - 1) if max_d > 1 else []
        neg.append([wins[o][int(rng.integers(wins[o].shape[0]))] for o in picks])
    cur, pos = np.stack(cur), np.stack(pos)  # [S, window] current windows, their previous windows
    neg = np.asarray(neg, np.int32).reshape(num_samples, max_d - 1, window)  # [S, max_d - 1, window]

    @jax.jit
    def kv(rows):  # rows int [R, window] → memory-view LayerKV of ``layer`` [R, window, Hkv, Dh]
        return run_window(model, params, rows, mesh=mesh).mem_kv[layer]

    @jax.jit
    def mass(tokens, mem_k, mem_v):  # mem_k/v [B, M, Hkv, Dh] all valid → mem_mass [B, window, H]
        memory = {layer: LayerMemory(mem_k, mem_v, jnp.ones(mem_k.shape[:2], bool))}
        return run_window(model, params, tokens, memory=memory, mesh=mesh, collect_mem_mass=True).mem_mass[layer]

    pk, pv = kv(jnp.asarray(pos))  # [S, window, Hkv, Dh]
    b, h, dh = num_samples, model_config.num_kv_heads, model_config.head_dim
    if max_d > 1:
        nk, nv = kv(jnp.asarray(neg.reshape(-1, window)))
        nk = nk.reshape(b, (max_d - 1) * window, h, dh)  # [S, (max_d - 1) * window, Hkv, Dh]
        nv = nv.reshape(b, (max_d - 1) * window, h, dh)
    m_a = np.asarray(mass(jnp.asarray(cur), pk, pv), np.float64)  # [S, window, H]
    odds_a = m_a / np.maximum(1.0 - m_a, 1e-30)
    r = []
    for d in ds:
        if d == 1:
            r.append(1.0)
            continue
        mk = jnp.concatenate([pk, nk[:, : (d - 1) * window]], axis=1)
        mv = jnp.concatenate([pv, nv[:, : (d - 1) * window]], axis=1)
        m_b = np.asarray(mass(jnp.asarray(cur), mk, mv), np.float64)
        odds_b = m_b / np.maximum(1.0 - m_b, 1e-30)
        r.append(float(np.mean(odds_a / np.maximum(odds_b, 1e-30))))
    return {"task": "distraction", "d": [int(d) for d in ds], "r_d": r, "one_over_d": [1.0 / d for d in ds],
            "layer": layer, "window": window, "num_samples": num_samples,
            "positive_mass_local_ratio": float(np.mean(m_a))}


def plot(result: dict[str, Any], path: str) -> None:
    """Positive attention mass r_d vs d, against 1/d (a model that does not focus)."""
    line_plot(path, [(result["d"], result["r_d"], "o-", "model"),
                     (result["d"], result["one_over_d"], "k--", "1/d (no focus)")],
              xlabel="d (contexts in memory: 1 positive + d-1 negatives)", ylabel="positive attention mass r_d",
              ylim=(0, 1.05), title=f"Distraction (memory layer {result['layer']})")
