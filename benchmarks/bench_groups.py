"""What many optimizer groups cost under ZeRO (issue 30): DeepSpeed keeps one flat fp32 partition
per group, so layer decay (a group per depth, decayed and not) multiplies them. ``--compare ema``:
what ``train.ema`` (every step) costs instead.

    .venv/bin/python benchmarks/bench_groups.py [--steps 30] [--repeats 2] [--stage 2] [--compare ema]

The test-size quickstart with a 12-layer text tower on 2 ranks, ``--steps`` steps, run with the two
default groups and with ``model.towers.text.optim.layer_decay=0.8`` plus an image-head and a loss
group (30 groups), interleaved ``--repeats`` times; the median step time over the steps after the
first five (metrics.jsonl: the rank-mean of each logged window).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers import ASSET_SHARDS, ok, tiny_overrides, torchrun  # noqa: E402

GROUPS = ["model.towers.text.optim={layer_decay: 0.8}", "model.towers.image.head_optim={lr: 0.001}",
          "loss.optim={lr: 0.001}"]


def run(out: Path, steps: int, stage: int, extra: list[str]) -> tuple[float, int]:
    ok(torchrun(tiny_overrides(ASSET_SHARDS, out, steps=steps) + [
        f"train.zero_stage={stage}", "model.towers.text.options.layers=12", "eval.enabled=false",
        "train.checkpoint=false", "data.train.workers=1"] + extra))
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r and r["step"] > 5]
    groups = max((len([k for k in r if k.startswith("lr/")]) for r in rows), default=0)
    return statistics.median(r["global_batch"] / r["samples_per_s"] for r in rows), groups


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("--compare", choices=["groups", "ema"], default="groups")
    args = p.parse_args(argv)
    other = ("layer decay + head + loss groups", GROUPS) if args.compare == "groups" else (
        "train.ema every step", ["train.ema={decay: 0.999}"])
    times = {"2 groups (default)": [], other[0]: []}
    base = Path(tempfile.mkdtemp(prefix="bench_groups_"))
    for i in range(args.repeats):
        for name, extra in (("2 groups (default)", []), other):
            t, _ = run(base / f"{i}_{len(extra)}", args.steps, args.stage, extra)
            times[name].append(t)
    from pretrain.config import load_config
    from pretrain.data import build_modalities
    from pretrain.models import build_model
    from pretrain.optim import param_groups
    from tests.helpers import QUICKSTART, TINY_MODEL

    cfg = load_config(QUICKSTART, TINY_MODEL + ["model.towers.text.options.layers=12"] + GROUPS)
    model = build_model(cfg.model, build_modalities(cfg.data, train=True), objective=cfg.loss.build())
    count = len([g for g in param_groups(model, cfg.train) if g["params"]])
    ref = statistics.median(times["2 groups (default)"])
    print(f"ZeRO-{args.stage}, 2 ranks, load {os.getloadavg()[0]:.1f}; median s/step over steps 6-{args.steps}, "
          f"runs interleaved x{args.repeats}")
    for name, ts in times.items():
        groups = 2 if name.startswith("2") or args.compare == "ema" else count
        print(f"| {name} | {groups} | {statistics.median(ts):.3f} | {statistics.median(ts) / ref:.2f}x | {[round(t, 3) for t in ts]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
