"""Echo augmentation: repeat earlier lines of a document later in it (training data for retrieval).

A language model only gains from a long memory once it copies by content — an induction/copy circuit
that finds the earlier occurrence of the current context and continues it. On a small corpus and a
small compute budget such a circuit may never form (issue 9 item 4: a 1.4M-parameter model trained on
3M stdlib tokens did not copy a repeated span even inside its own window). ``echo_lines`` makes exact
repetition frequent: after an original line, with a probability chosen so that about ``rate`` of the
output characters are copies, it appends a copy of a run of whole earlier output lines (``span``
characters long) that ended ``back`` characters before the current end. Original lines keep their
order; only copies are inserted. Applied to training documents only, never to evaluation data.
"""
from __future__ import annotations

import bisect

import numpy as np


def echo_lines(text: str, rng: np.random.Generator, rate: float, span: tuple[int, int] = (120, 600),
               back: tuple[int, int] = (0, 1500)) -> str:
    """``text`` with copies of earlier line runs inserted (module docstring).

    ``rate`` in [0, 1): target fraction of output characters that are copies (0: ``text`` unchanged).
    ``span`` / ``back``: uniform ranges (characters) of a copy's length and of its distance from the
    current end of the output (0 = the lines right before). A copy is a whole number of lines, at least one.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"echo rate must be in [0, 1), got {rate}")
    if not (0 < span[0] <= span[1] and 0 <= back[0] <= back[1]):
        raise ValueError(f"echo span {span} / back {back}: need 0 < lo <= hi (back lo >= 0)")
    lines = text.splitlines(keepends=True)
    if rate == 0.0 or len(lines) < 2:
        return text
    mean_line = len(text) / len(lines)
    # copies per original line so that copied / total ≈ rate (a copy ≈ the mean span, snapped to lines)
    p = min(1.0, rate / (1.0 - rate) * mean_line / (0.5 * (span[0] + span[1])))
    out: list[str] = []
    ends: list[int] = []  # ends[i] = characters of out[0..i]
    total = 0
    for line in lines:
        out.append(line)
        total += len(line)
        ends.append(total)
        if rng.random() >= p or not line.endswith("\n"):
            continue
        stop = total - int(rng.integers(back[0], back[1] + 1))
        length = int(rng.integers(span[0], span[1] + 1))
        if stop - length < 0:
            continue  # not enough text before: no copy
        j = bisect.bisect_right(ends, stop) - 1  # last whole line ending at or before stop
        start = stop - length
        i = 0 if start <= 0 else bisect.bisect_left(ends, start) + 1  # first line starting at or after it
        if j < i:
            continue
        for piece in out[i:j + 1]:
            out.append(piece)
            total += len(piece)
            ends.append(total)
    return "".join(out)
