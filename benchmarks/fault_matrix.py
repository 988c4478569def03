"""Fault trials that take too long for every CI run, with a figure per row (benchmarks/RESULTS.md).

    python benchmarks/fault_matrix.py kill9 --kills 10            # N kill -9 of a whole 2-rank job
    python benchmarks/fault_matrix.py kill9 --async-checkpoint    # the same, checkpoints written in the background

``kill9``: a 2-rank run (the test-size towers on tests/assets/shards, checkpoints every
``--every`` steps) is killed with SIGKILL, every process of the job at once (the launcher's whole
process group, no clean-up), at ``--kills`` random moments: a seeded random number of steps into each
launch (1 to ``--every``), a seeded random fraction of a second after that step's log line (so
some kills land inside a checkpoint save), never in the last three steps; with ``--first-after K``
the first kill comes no earlier than after step K (so that even a single kill resumes from a checkpoint);
``--reference RUN`` compares with an existing uninterrupted run of the same recipe instead of a new one.
After each kill the same command runs again; it resumes from the newest complete checkpoint, and
its losses must equal an uninterrupted run's at every step it runs (fp32, CPU, 1e-5). Prints
"N of N exact" and writes every kill (step, delay, where the next run resumed) with ``--json``.
tests/test_train_robust.py runs it with one kill after the first checkpoint; this script runs many.
With ``--async-checkpoint`` the job saves with ``train.async_checkpoint`` (a background thread per
rank writes while training goes on, so a kill lands inside a write more often); each kill records
the checkpoint folders it left without COMPLETE (``torn``: a save was in flight), which the resume
must ignore.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers import ASSET_SHARDS, tiny_overrides, torchrun_cmd  # noqa: E402 - the test-size run


def command(out: Path, steps: int, every: int, background: bool = False) -> list[str]:
    """The test-size quickstart on tests/assets/shards, 2 ranks, checkpoints every ``every`` steps
    (``background``: written by train.async_checkpoint)."""
    return torchrun_cmd(tiny_overrides(ASSET_SHARDS, out, steps) + [f"train.checkpoint_every={every}",
                                                                   "train.keep_checkpoints=2", "eval.enabled=false"]
                        + (["train.async_checkpoint=true"] if background else []))


def torn(out: Path) -> list[str]:
    """Checkpoint folders without COMPLETE (a save was in flight when the job died)."""
    ckpts = out / "checkpoints"
    return sorted(p.name for p in ckpts.iterdir() if p.is_dir() and not (p / "COMPLETE").is_file()) \
        if ckpts.is_dir() else []


def logged(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # a line cut by the kill
                continue
            if "loss" in row:
                rows.append(row)
    return rows


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) of every process, from /proc."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            out[int(stat.parent.name)] = (int(fields[1]), fields[0])
        except (OSError, IndexError, ValueError):
            continue
    return out


def job_processes(root: int) -> list[int]:
    """``root`` and all its descendants (torchrun puts each worker in a session of its own, so the
    launcher's process group alone is not the job)."""
    procs, job, grew = _processes(), {root}, True
    while grew:
        more = {pid for pid, (ppid, _) in procs.items() if ppid in job} - job
        job |= more
        grew = bool(more)
    return sorted(job)


def kill_job(root: int, timeout: float = 60) -> int:
    """SIGKILL to every process of the job at once; returns when none is left alive (zombies whose
    parent died count as dead). Returns how many were killed."""
    pids = job_processes(root)
    for pid in reversed(pids):  # the workers first, the launcher last: nobody gets to react
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        procs = _processes()
        if not any(pid in procs and procs[pid][1] not in ("Z", "X") for pid in pids):
            return len(pids)
        time.sleep(0.05)
    raise SystemExit(f"processes {pids} still alive {timeout} s after SIGKILL")


def run_until(out: Path, steps: int, every: int, after: int | None, delay: float, timeout: float = 600,
              at_least: int = 0, background: bool = False) -> dict:
    """One launch; with ``after``, SIGKILL to the whole job ``delay`` s after the launch logged that
    many steps (counted from where it resumed; at the latest after step ``steps - 3``; no earlier
    than after step ``at_least``)."""
    proc = subprocess.Popen(command(out, steps, every, background), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines, resumed, t0, kill_at, killed = [], 0, time.monotonic(), None, 0
    try:
        for line in proc.stdout:
            lines.append(line)
            if "resumed_from=" in line:
                resumed = int(line.split(" at step ")[1].split()[0])
            if after is not None and kill_at is None and line.startswith("[train] world_size="):
                kill_at = min(max(resumed + after, at_least), steps - 3)
                if kill_at <= resumed:
                    kill_job(proc.pid)
                    raise SystemExit(f"resumed at step {resumed} of {steps}: no room left for this kill; raise --steps")
            if kill_at is not None and line.startswith(f"[train] step {kill_at}/"):
                time.sleep(delay)
                killed = kill_job(proc.pid)  # every process of the job: none writes after this
                break
            if time.monotonic() - t0 > timeout:
                raise SystemExit(f"launch did not finish in {timeout} s:\n{''.join(lines[-30:])}")
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            kill_job(proc.pid)
    if after is None and proc.returncode != 0:
        raise SystemExit(f"the run failed (exit {proc.returncode}):\n{''.join(lines[-40:])}")
    if after is not None and not any(line.startswith(f"[train] step {kill_at}/") for line in lines):
        raise SystemExit(f"the run ended before step {kill_at}:\n{''.join(lines[-40:])}")
    return {"resumed_at": resumed, "exit": proc.returncode, "killed_after": kill_at, "processes_killed": killed}


def kill9(args) -> dict:
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    ref, chain = Path(args.reference) if args.reference else out / "reference", out / "chain"
    if not args.reference:
        run_until(ref, args.steps, args.every, None, 0.0, background=args.async_checkpoint)
    want = {r["step"]: r["loss"] for r in logged(ref)}
    if sorted(want) != list(range(1, args.steps + 1)):
        raise SystemExit(f"the reference {ref} logged steps {sorted(want)}, not 1..{args.steps}")
    rng = random.Random(args.seed)
    kills, seen = [], 0
    for i in range(args.kills + 1):
        last = i == args.kills
        after = None if last else rng.randint(1, args.every)  # steps into the launch
        delay = 0.0 if last else round(rng.uniform(0.0, args.max_delay), 3)
        launch = run_until(chain, args.steps, args.every, after, delay, at_least=args.first_after if i == 0 else 0,
                           background=args.async_checkpoint)
        step = launch["killed_after"]
        rows = logged(chain)
        new, seen = rows[seen:], len(rows)
        exact = all(math.isclose(r["loss"], want[r["step"]], rel_tol=1e-5, abs_tol=1e-6) for r in new)
        # this launch continued the kill before it: from a complete checkpoint, equal to the reference
        if i > 0:
            k = kills[-1]["kill_after_step"]
            kills[-1].update(resumed_at=launch["resumed_at"], steps_after=[r["step"] for r in new], exact=exact,
                             resumed_from_checkpoint=launch["resumed_at"] % args.every == 0,
                             # the save of step k had begun but was not complete when the job died
                             in_save=k % args.every == 0 and launch["resumed_at"] < k)
        if step is not None:
            kills.append({"kill_after_step": step, "delay_s": delay, "processes_killed": launch["processes_killed"],
                          "torn": torn(chain)})
        print(f"launch {i + 1}: resumed at step {launch['resumed_at']}, logged steps "
              f"{new[0]['step'] if new else '-'}..{new[-1]['step'] if new else '-'}"
              + (f", killed {delay:.2f} s after step {step}" if step is not None else ", finished")
              + f" ({'exact' if exact else 'NOT EXACT'})", flush=True)
    final = {r["step"]: r["loss"] for r in logged(chain)}
    complete = sorted(final) == list(range(1, args.steps + 1))
    good = sum(1 for k in kills if k.get("exact") and k.get("resumed_from_checkpoint"))
    in_write = sum(1 for k in kills if k["torn"])
    print(f"kill -9 of the whole job: {good} of {len(kills)} exact (every step 1..{args.steps} logged: {complete}); "
          f"{in_write} left a checkpoint folder without COMPLETE"
          + (" (checkpoints written in the background)" if args.async_checkpoint else ""))
    return {"steps": args.steps, "every": args.every, "seed": args.seed, "async_checkpoint": args.async_checkpoint,
            "kills": kills, "exact": good, "total": len(kills), "complete": complete, "torn": in_write}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="trial", required=True)
    k = sub.add_parser("kill9", help="N kill -9 of a whole 2-rank job, each resumed and compared")
    k.add_argument("--kills", type=int, default=10)
    k.add_argument("--steps", type=int, default=60)
    k.add_argument("--every", type=int, default=4, help="checkpoint every N steps (default 4)")
    k.add_argument("--max-delay", type=float, default=0.3, help="kill up to this long after the step's log line")
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--reference", metavar="RUN", help="a finished run of the same recipe and --steps (any "
                   "checkpoint interval) to compare with, instead of running one first")
    k.add_argument("--first-after", type=int, default=0, metavar="K",
                   help="the first kill no earlier than after step K (default 0: anywhere in the first --every steps)")
    k.add_argument("--async-checkpoint", action="store_true",
                   help="save with train.async_checkpoint (written by a background thread while training goes on)")
    k.add_argument("--out", default="runs/fault_matrix")
    k.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    if args.steps < 2 * args.every + 4:
        p.error("--steps must be at least 2 x --every + 4")
    result = kill9(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0 if result["exact"] == result["total"] and result["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
