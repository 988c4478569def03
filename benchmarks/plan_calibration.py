"""Calibrates ``pretrain.plan``'s activation rule: for towers of the project's recipes, the real
peak memory of one tower's forward and backward against the plan's simulation on the meta device.

    python benchmarks/plan_calibration.py                   # CPU, fp32: the figures in ACTIVATION_CALIBRATION
    python benchmarks/plan_calibration.py --device cuda     # a GPU session: the same towers, measured by CUDA
    python benchmarks/plan_calibration.py --tiny            # seconds: the test suite's sizes (a smoke run)

On the CPU the real peak is counted by the plan's own ``LiveBytes`` tracker on real tensors (every
storage an op makes, until freed); on CUDA by ``torch.cuda.max_memory_allocated`` above what was
allocated before the forward. The simulation is the plan's: the same tower on the meta device,
the same tracker. The ratio real / simulated per tower, with and without gradient checkpointing, is
printed and written as JSON (``--out``); ``ACTIVATION_CALIBRATION`` in ``pretrain/plan.py`` holds the
mean ratio per kind of tower (convolutional, attention, other) of a CPU run, with the date and machine.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pretrain.config import load_config  # noqa: E402
from pretrain.data import build_modalities  # noqa: E402
from pretrain.models import build_model  # noqa: E402
from pretrain.options import ConfigError  # noqa: E402
from pretrain.plan import _kind, _meta_input, count_model, tower_activation_peak  # noqa: E402

TINY_QUICKSTART = ["data.image_size=16", "data.context_length=24", "model.towers.image.options.name=test_resnet",
                   "model.embed_dim=16", "model.towers.text.options.width=32", "model.towers.text.options.layers=1",
                   "model.towers.text.options.heads=2"]
# (label, config, overrides, batch): the towers measured
CASES = [
    ("quickstart resnet10t 64px + BERT 2x128", "configs/quickstart.yaml", ["data.image_size=64"], 32),
    ("OpenCLIP ViT-B-32 (image 224, text 77)", "configs/openclip_vit_b32.yaml", [], 4),
    ("Symile XOR MLPs", "configs/xor_symile.yaml", [], 128),
]
TINY_CASES = [
    ("quickstart, the suite's tiny size", "configs/quickstart.yaml", TINY_QUICKSTART, 8),
    ("Symile XOR MLPs", "configs/xor_symile.yaml", [], 16),
]


def real_input(decoder, rows: int, device) -> torch.Tensor:
    shape = tuple(decoder.output_shape)
    if decoder.dtype.is_floating_point:
        return torch.randn((rows, *shape), device=device)
    high = getattr(getattr(decoder, "tokenizer", None), "vocab_size", 2)
    return torch.randint(0, high, (rows, *shape), device=device, dtype=decoder.dtype)


def measured_peak(tower, x, device: str) -> int:
    if device == "cpu":
        return tower_activation_peak(tower, x)[1]
    for p in tower.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = torch.nn.functional.normalize(tower(x), dim=-1)
    if out.requires_grad:
        out.float().sum().backward()
    del out
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    for p in tower.parameters():
        p.grad = None
    return peak


def calibrate(cases, device: str) -> list[dict]:
    rows = []
    for label, config, overrides, batch in cases:
        cfg = load_config(ROOT / config, ["data.train.urls=unused.tar", *overrides])
        modalities = build_modalities(cfg.data, train=True)
        counted = count_model(cfg, modalities)
        torch.manual_seed(0)
        real_model = build_model(cfg.model, modalities, objective=cfg.loss.build()).to(device).train()
        counted.model.train()
        for m in modalities:
            for checkpointing in (False, True):
                meta_tower, tower = counted.model.towers[m.name], real_model.towers[m.name]
                try:
                    meta_tower.backbone.set_grad_checkpointing(checkpointing)
                    tower.backbone.set_grad_checkpointing(checkpointing)
                except ConfigError:
                    if checkpointing:
                        continue  # a tower type without checkpointing (off, it is measured as it is)
                simulated = tower_activation_peak(meta_tower, _meta_input(m.decoder, batch, torch.float32, "meta"))[1]
                start = time.perf_counter()
                real = measured_peak(tower, real_input(m.decoder, batch, device), device)
                rows.append({"case": label, "modality": m.name, "kind": _kind(tower), "checkpointing": checkpointing,
                             "batch": batch, "simulated": simulated, "measured": real,
                             "ratio": real / simulated if simulated else None,
                             "seconds": round(time.perf_counter() - start, 2)})
                print(f"{label:<42} {m.name:<6} {rows[-1]['kind']:<14} ckpt={'on ' if checkpointing else 'off'} "
                      f"simulated {simulated / 2**20:9.2f} MiB  measured {real / 2**20:9.2f} MiB  "
                      f"ratio {rows[-1]['ratio']:.3f}", flush=True)
    return rows


def summary(rows: list[dict]) -> dict:
    out = {}
    for kind in sorted({r["kind"] for r in rows}):
        for ckpt in (False, True):
            ratios = [r["ratio"] for r in rows if r["kind"] == kind and r["checkpointing"] == ckpt and r["ratio"]]
            if ratios:
                out[f"{kind}/{'checkpointed' if ckpt else 'plain'}"] = round(statistics.mean(ratios), 3)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tiny", action="store_true", help="the test suite's sizes (seconds)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    rows = calibrate(TINY_CASES if args.tiny else CASES, args.device)
    result = {"device": args.device if args.device == "cpu" else torch.cuda.get_device_name(0), "precision": "fp32",
              "machine": platform.machine(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "rows": rows, "mean_ratio": summary(rows)}
    print(json.dumps(result["mean_ratio"], indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
