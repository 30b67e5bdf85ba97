"""Host resources for the long evaluations: available RAM (refuse before starting), peak RSS, and a
progress line with tokens/s and ETA (stderr)."""
from __future__ import annotations

import os
import resource
import sys
import time

GIB = float(1 << 30)


def available_ram_bytes() -> int:
    """RAM a new allocation can get now: ``MemAvailable`` of /proc/meminfo (Linux), else physical RAM."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def check_fits(need_bytes: float, what: str, available: int | None = None) -> None:
    """ValueError naming the estimate when ``need_bytes`` exceeds the available RAM."""
    avail = available_ram_bytes() if available is None else int(available)
    if need_bytes > avail:
        raise ValueError(f"{what} needs about {need_bytes / GIB:.1f} GiB of RAM (estimate) but only "
                         f"{avail / GIB:.1f} GiB are available")


def _clock(seconds: float) -> str:
    s = int(max(seconds, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """``update(n)`` adds ``n`` processed tokens; prints ``prefix: done/total tokens, tokens/s, ETA`` to
    ``stream`` at most every ``every`` seconds (and on ``close``). ``tokens_per_second`` for results."""

    def __init__(self, total: int, prefix: str, *, every: float = 10.0, stream=None, enabled: bool = True):
        self.total, self.prefix, self.every, self.enabled = int(total), prefix, float(every), enabled
        self.stream = sys.stderr if stream is None else stream
        self.done = 0
        self.start = self._last = time.perf_counter()

    @property
    def tokens_per_second(self) -> float:
        return self.done / max(time.perf_counter() - self.start, 1e-9)

    def line(self, note: str = "") -> str:
        rate = self.tokens_per_second
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        pct = 100.0 * self.done / max(self.total, 1)
        return (f"{self.prefix}: {self.done:,}/{self.total:,} tokens ({pct:.0f}%), {rate:,.0f} tokens/s, "
                f"ETA {_clock(eta) if eta != float('inf') else '?'}" + (f" | {note}" if note else ""))

    def update(self, n: int, note: str = "") -> None:
        self.done += int(n)
        now = time.perf_counter()
        if self.enabled and now - self._last >= self.every:
            self._last = now
            print(self.line(note), file=self.stream, flush=True)

    def close(self, note: str = "") -> None:
        if self.enabled:
            print(self.line(note), file=self.stream, flush=True)
