"""Start-up and exit of a training run: how long a tiny 2-rank torchrun job takes before its first
step and after its last line, for this checkout and (side by side, alternating) other checkouts.

    python benchmarks/bench_startup.py                       # this checkout, 5 rounds
    python benchmarks/bench_startup.py --other /tmp/old      # and a worktree of another commit

The run is the test suite's: the quickstart recipe with the test-size towers on tests/assets/shards,
2 ranks, 6 steps, checkpoints every 2 steps and a final evaluation (`tests.helpers.tiny_overrides`).
Each launch runs from its checkout's folder (``python -m`` puts it first on ``sys.path``), so each
checkout's own ``pretrain`` package is the one timed. Figures per checkout, medians over the rounds:
seconds from the launch to the ``[train] world_size=`` line (imports, model, engine), to the first
step's line, to the last line, and to the exit of the launcher.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers import ASSET_SHARDS, tiny_overrides, torchrun_cmd  # noqa: E402 - the test-size run

MARKS = ("built", "first_step", "last_line", "exit")


def launch(checkout: Path, out: Path) -> dict[str, float]:
    """One 2-rank run from ``checkout``; seconds from the launch to each mark."""
    cmd = torchrun_cmd(tiny_overrides(ASSET_SHARDS, out, steps=6) + ["train.checkpoint_every=2"])
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=checkout, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    marks: dict[str, float] = {}
    lines = []
    for line in proc.stdout:
        now = time.perf_counter() - t0
        lines.append(line)
        if line.startswith("[train] world_size="):
            marks["built"] = now
        elif line.startswith("[train] step 1/"):
            marks["first_step"] = now
        marks["last_line"] = now
    proc.wait()
    marks["exit"] = time.perf_counter() - t0
    if proc.returncode != 0 or len(marks) != len(MARKS):
        raise SystemExit(f"{checkout}: the run failed (exit {proc.returncode}):\n{''.join(lines[-30:])}")
    return marks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--other", action="append", default=[], metavar="DIR",
                        help="another checkout (e.g. a git worktree of an earlier commit) timed alongside")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    checkouts = [ROOT] + [Path(d).resolve() for d in args.other]
    times: dict[str, list[dict[str, float]]] = {str(c): [] for c in checkouts}
    with tempfile.TemporaryDirectory(prefix="bench_startup_") as tmp:
        for r in range(args.rounds):
            for i, checkout in enumerate(checkouts if r % 2 == 0 else checkouts[::-1]):  # alternate the order
                times[str(checkout)].append(launch(checkout, Path(tmp) / f"r{r}_{i}"))
    result = {"date": time.strftime("%Y-%m-%d"), "rounds": args.rounds, "load_avg_1min": os.getloadavg()[0],
              "checkouts": {c: {m: statistics.median(t[m] for t in runs) for m in MARKS} for c, runs in times.items()}}
    print(f"{'checkout':<40} " + " ".join(f"{m:>10}" for m in MARKS) + "   (seconds from the launch, medians)")
    for c, med in result["checkouts"].items():
        print(f"{c[-40:]:<40} " + " ".join(f"{med[m]:10.2f}" for m in MARKS))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
