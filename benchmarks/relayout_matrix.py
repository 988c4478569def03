"""Every pair of layouts, resumed (issue 27): a checkpoint from each ZeRO stage x ranks x precision,
continued at each stage x ranks (loader workers changing with them); not for CI (tests/test_layout.py
runs a chain through every stage and rank count in the suite).

    python benchmarks/relayout_matrix.py --json benchmarks/relayout_matrix.json
    python benchmarks/relayout_matrix.py --sources 2x2:fp32 --targets 0x1 3x4      # a slice

A source is the test-size quickstart (tests/assets/shards, 48-sample epochs, micro-batch 6) trained
at stage S on W ranks until 24 samples of epoch 0 are read, then saved. Each target copies it and
resumes at stage S' on W' ranks (1 rank: 2 loader workers, else 1; the source the same way), in
the source's precision, until the two runs have read two epochs' worth of samples (micro-batch
kept, so the global batch changes with W'; new slots that inherit nothing of epoch 0 start epoch 1:
the README's rule).
A cell is
  exact    the state the new engine loaded (tests.faults' save_after_resume probe, DeepSpeed's own
           writer) equals the checkpoint's, read back by pretrain.layout: every weight, both Adam
           moments, the optimizer's step count, the buffers, the schedule; and the sample keys the
           two runs logged (with the epoch each was read in) hold each of the 48 samples exactly
           once in epoch 0, and none twice in a later epoch;
  refused  the resume stopped with a message (the cell shows its last line);
  WRONG    anything else: a state or data difference, or a crash without a message.
Prints a table per precision and the counts; exits 1 if any cell is WRONG.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from tests.helpers import ASSET_SHARDS, run_cmd, tiny_overrides, torchrun_cmd  # noqa: E402

EPOCH, MICRO, SAVED = 48, 6, 24  # samples per epoch, per micro-batch, read before the save
READ = 2 * EPOCH  # the source and the target read two epochs together


def _workers(ranks: int) -> int:
    return 2 if ranks == 1 else 1


def _args(out: Path, stage: int, ranks: int, precision: str, steps: int) -> list[str]:
    return tiny_overrides(ASSET_SHARDS, out, steps=steps, micro_batch=MICRO) + [
        f"train.zero_stage={stage}", f"train.precision={precision}", f"data.train.workers={_workers(ranks)}",
        f"train.checkpoint_every={SAVED // (MICRO * ranks)}", "train.log_keys=true", "eval.enabled=false"]


def _refusal(proc) -> str:
    """The one-line message the training CLI stops with (``error: ...``), or ''."""
    for line in (proc.stdout + proc.stderr).splitlines():
        if re.search(r"(^|: )(config )?error: ", line):
            return line.strip()[-240:]
    return ""


def _tail(proc) -> str:
    lines = [l.strip() for l in (proc.stdout + proc.stderr).splitlines() if l.strip() and "it/s" not in l]
    return _refusal(proc) or " | ".join(lines[-3:])[-400:] or f"exit {proc.returncode}"


def make_source(base: Path, stage: int, ranks: int, precision: str) -> tuple[Path, str]:
    out = base / f"src_z{stage}x{ranks}_{precision}"
    steps = SAVED // (MICRO * ranks)
    proc = run_cmd(torchrun_cmd(_args(out, stage, ranks, precision, steps), nproc=ranks))
    return out, ("" if proc.returncode == 0 else _tail(proc))


def _keys(run: Path) -> list[tuple[str, int]]:
    """(key, epoch) of every sample the run (and the run it resumed) trained on."""
    out = []
    for path in sorted((run / "keys").glob("rank*.jsonl")):
        rows = {}
        for line in path.read_text().splitlines():  # a resumed run appends: the later line of a step wins
            row = json.loads(line)
            rows[row["step"]] = list(zip(row["keys"], row["epochs"]))
        out += [k for keys in rows.values() for k in keys]
    return out


def _every_key() -> set[str]:
    from pretrain.data.tarstream import iter_shard

    return {raw.key for shard in sorted((ASSET_SHARDS / "train").glob("*.tar"))
            for raw in iter_shard(str(shard), None, lambda i: True, lambda *a: None, 2**20)}


def _names(run: Path) -> list[str]:
    from pretrain.config import load_config
    from pretrain.data import build_modalities
    from pretrain.models import build_model
    from pretrain.optim import optimized_names

    cfg = load_config(run / "config.yaml")
    return optimized_names(build_model(cfg.model, build_modalities(cfg.data, train=True), objective=cfg.loss.build()))


def _state_difference(saved: Path, resumed: Path, names: list[str], scratch: Path) -> str:
    from pretrain.layout import read_full_state

    a, b = read_full_state(saved, scratch, names), read_full_state(resumed, scratch, names)
    if a.params.keys() != b.params.keys() or a.buffers.keys() != b.buffers.keys():
        return "other parameter or buffer names"
    for k in a.params:
        if not torch.equal(a.params[k].reshape(-1), b.params[k].reshape(-1)):
            return f"weight {k}"
        for m in ("exp_avg", "exp_avg_sq"):
            if not torch.equal(a.moments[k][m].reshape(-1), b.moments[k][m].reshape(-1)):
                return f"{m} of {k}"
    for k in a.buffers:
        if not torch.equal(a.buffers[k], b.buffers[k]):
            return f"buffer {k}"
    if a.optimizer_steps != b.optimizer_steps:
        return f"optimizer steps {a.optimizer_steps} -> {b.optimizer_steps}"
    if a.scheduler.get("last_epoch") != b.scheduler.get("last_epoch"):
        return "schedule position"
    return ""


def resume_cell(source: Path, base: Path, stage: int, ranks: int, precision: str, names: list[str],
                every: set[str]) -> dict:
    saved_steps = SAVED // (MICRO * int(source.name.split("x")[1].split("_")[0]))
    run = base / f"{source.name}_to_z{stage}x{ranks}"
    shutil.copytree(source, run)
    probe = base / f"{run.name}_probe"
    steps = saved_steps + (READ - SAVED) // (MICRO * ranks)
    start = time.perf_counter()
    proc = run_cmd(torchrun_cmd(_args(run, stage, ranks, precision, steps), nproc=ranks, module="tests.faults"),
                   env={"PRETRAIN_FAULT": f"save_after_resume:{probe}"})
    cell = {"stage": stage, "ranks": ranks, "workers": _workers(ranks), "seconds": round(time.perf_counter() - start, 1)}
    if proc.returncode != 0:
        cell.update(result="refused" if _refusal(proc) else "WRONG", detail=_tail(proc))
        return cell
    diff = _state_difference(source / "checkpoints" / f"step{saved_steps:06d}", probe / "resumed", names, base / "scratch")
    counts = Counter(_keys(run))
    first = {k for k, e in counts if e == 0}
    if not diff and (first != every or set(counts.values()) != {1}):
        diff = (f"data: {len(every - first)} samples of epoch 0 never read, "
                f"{sum(c > 1 for c in counts.values())} read twice in one epoch")
    cell.update(result="WRONG" if diff else "exact", detail=diff, resumed_steps=steps - saved_steps)
    if not diff:  # (a wrong one stays in --work to be looked at)
        shutil.rmtree(run, ignore_errors=True)
        shutil.rmtree(probe, ignore_errors=True)
    return cell


def _parse(spec: str) -> tuple[int, int, str]:
    layout, _, precision = spec.partition(":")
    stage, _, ranks = layout.partition("x")
    return int(stage), int(ranks), precision or "fp32"


def default_sources() -> list[str]:
    return [f"{s}x{w}:{p}" for p in ("fp32", "bf16") for s in range(4) for w in (1, 2)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", nargs="+", default=default_sources(), help="STAGExRANKS[:PRECISION]")
    parser.add_argument("--targets", nargs="+", default=[f"{s}x{w}" for s in range(4) for w in (1, 2, 4)],
                        help="STAGExRANKS (in the source's precision)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    base = Path(args.work or tempfile.mkdtemp(prefix="relayout_"))
    base.mkdir(parents=True, exist_ok=True)
    every = _every_key()
    cells, started = [], time.time()
    for spec in args.sources:
        stage, ranks, precision = _parse(spec)
        source, error = make_source(base, stage, ranks, precision)
        row = {"source": f"ZeRO-{stage} x{ranks} {precision}", "source_error": error, "cells": []}
        if not error:
            names = _names(source)
            for target in args.targets:
                t_stage, t_ranks, _ = _parse(target)
                cell = resume_cell(source, base, t_stage, t_ranks, precision, names, every)
                row["cells"].append(cell)
                print(f"{row['source']} -> ZeRO-{t_stage} x{t_ranks}: {cell['result']} {cell['detail']} "
                      f"({cell['seconds']} s)", flush=True)
        else:
            print(f"{row['source']}: the source run failed: {error}", flush=True)
        cells.append(row)
        if not any(c["result"] == "WRONG" for c in row["cells"]):
            shutil.rmtree(source, ignore_errors=True)
    counts = Counter(c["result"] for row in cells for c in row["cells"])
    print(f"\n{sum(counts.values())} resumes: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
          + f" ({(time.time() - started) / 60:.1f} min)")
    for row in cells:
        marks = " ".join(f"z{c['stage']}x{c['ranks']}:{c['result'][0]}" for c in row["cells"])
        print(f"  {row['source']:<18} {marks or row['source_error']}")
    if args.json:
        args.json.write_text(json.dumps({"epoch": EPOCH, "micro_batch": MICRO, "saved_after": SAVED,
                                         "rows": cells, "counts": counts}, indent=1))
    if args.work is None:
        shutil.rmtree(base, ignore_errors=True)
    return 1 if counts.get("WRONG") or any(r["source_error"] for r in cells) else 0


if __name__ == "__main__":
    raise SystemExit(main())
