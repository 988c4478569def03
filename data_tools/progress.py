"""Terminal progress bar (only on a terminal, never under CI) and plain-text tables."""
from __future__ import annotations

import os
import sys
import time


def progress_wanted(stream) -> bool:
    if os.environ.get("CI") or os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """``done/total rows  pct |bar| N samples/s  ETA m:ss`` redrawn in place on stderr."""

    def __init__(self, total: int, enabled: bool | None = None, stream=None, label: str = "building"):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = progress_wanted(self.stream) if enabled is None else enabled
        self.total, self.label = total, label
        self.t0 = time.monotonic()
        self.first: int | None = None  # rows already done when we started (a resumed build)
        self.last_draw = 0.0
        self.done = 0
        self.drawn = False

    def update(self, done: int, force: bool = False) -> None:
        self.done = done
        if self.first is None:
            self.first = done
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self.last_draw < 0.2:
            return
        self.last_draw = now
        elapsed = now - self.t0
        rate = (done - self.first) / elapsed if elapsed > 0 else 0.0
        pct = 100.0 * done / self.total if self.total else 100.0
        width = 24
        fill = int(width * done / self.total) if self.total else width
        eta = _clock((self.total - done) / rate) if rate > 0 else "--:--"
        line = (f"\r{self.label} {done}/{self.total} rows {pct:5.1f}% |{'#' * fill}{'.' * (width - fill)}| "
                f"{rate:,.0f} samples/s  ETA {eta} ")
        self.stream.write(line)
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.enabled and self.drawn:
            self.stream.write("\n")
            self.stream.flush()


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def table(header: list[str], rows: list[list], right: tuple = ()) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def fmt(r):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    lines = [fmt(cells[0]), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in cells[1:]]
    return "\n".join(lines)
