"""Progress bar (tqdm; only on a terminal, never under CI) and plain-text tables."""
from __future__ import annotations

import os
import sys


def progress_wanted(stream) -> bool:
    if os.environ.get("CI") or os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """A tqdm bar of rows done on stderr: shown when ``enabled`` (None: ``progress_wanted``).
    ``initial``: rows already done when it starts (a resumed build), left out of the rate."""

    def __init__(self, total: int, initial: int = 0, enabled: bool | None = None, stream=None,
                 label: str = "building"):
        stream = stream if stream is not None else sys.stderr
        self.bar = None
        if progress_wanted(stream) if enabled is None else enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=label, unit="row", file=stream, mininterval=0.2,
                            dynamic_ncols=True)

    def update(self, done: int) -> None:
        """``done`` rows in all (not a step)."""
        if self.bar is not None:
            self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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
