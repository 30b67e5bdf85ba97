"""One PNG line plot (matplotlib, Agg backend): the shared scaffold of every eval task's plot."""
from __future__ import annotations

from typing import Sequence


def line_plot(path: str, series: Sequence[tuple[Sequence[float], Sequence[float], str, str | None]], *,
              xlabel: str, ylabel: str, title: str, ylim: tuple[float, float] | None = None,
              log2_x: bool = True) -> None:
    """Writes a PNG with one line per ``(xs, ys, matplotlib format, legend label or None)``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for xs, ys, fmt, label in series:
        ax.plot(xs, ys, fmt, label=label)
    if log2_x:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    if any(label for *_, label in series):
        ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
