"""Patch dropout's step time at ViT-B/16 size on CPU (issue 30): one image tower as the trainer
builds it (``model.towers.image``: timm ``vit_base_patch16_224``, linear head to 512), forward and
backward of a micro-batch, with ``patch_dropout`` 0, 0.5 and 0.75, the variants interleaved.

    .venv/bin/python benchmarks/bench_patch_dropout.py [--batch 8] [--repeats 3] [--threads 2]

Prints the median seconds per step and the ratio to p = 0 (no GPU figure: ratios only).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def tower(p: float, name: str):
    from pretrain.models import EncoderTower, TowerConfig, TowerContext

    cfg = TowerConfig(type="timm", options={"name": name}, patch_dropout=p)
    torch.manual_seed(0)
    return EncoderTower(cfg, 512, TowerContext("image", "model.towers.image", (3, 224, 224), torch.float32, None)).train()


def step(model, x) -> float:
    start = time.perf_counter()
    out = model.head(model.backbone(x))
    out.square().mean().backward()
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--probs", type=float, nargs="+", default=[0.0, 0.5, 0.75])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = {p: tower(p, args.model) for p in args.probs}
    x = torch.randn(args.batch, 3, 224, 224)
    for m in models.values():
        step(m, x)  # warm-up
    times = {p: [] for p in args.probs}
    for _ in range(args.repeats):
        for p, m in models.items():
            m.zero_grad(set_to_none=True)
            times[p].append(step(m, x))
    base = statistics.median(times[args.probs[0]])
    print(f"{args.model}, batch {args.batch}, fp32, {args.threads} threads; {platform.machine()}, "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}; median of {args.repeats}")
    print("| patch_dropout | tokens kept | s/step | vs 0 |\n|---|---|---|---|")
    for p in args.probs:
        med = statistics.median(times[p])
        kept = 1 + max(1, int(196 * (1 - p)))
        print(f"| {p} | {kept} of 197 | {med:.2f} | {base / med:.2f}x faster |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
