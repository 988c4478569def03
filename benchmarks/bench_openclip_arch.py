"""One OpenCLIP architecture trained by ``pretrain.train`` and by OpenCLIP's own trainer (issue 13).

    .venv/bin/python benchmarks/bench_openclip_arch.py [--seeds 0,1,2,3] [--steps 100] [--warmup 10] [--batch 32]

The architecture is OpenCLIP's own, from one model-config JSON (``benchmarks/openclip_arch_vit.json``,
model name: the file's stem): a ViT (64 px, patch 8, width 128, depth 4) and OpenCLIP's standard
causal text transformer (width 128, 3 layers, context 32, vocabulary 49,408, pooled at the end of
text), embed 128. One checkpoint is made here by ``open_clip.create_model(NAME, pretrained=None)``
under ``torch.manual_seed(--init-seed)`` and saved as .safetensors; both trainers start from it:

- ``ours``: ``pretrain.train`` with ``model.init_from: {format: open_clip, model, model_config, path}``
  and no ``model.towers`` (towers ``open_clip_image`` / ``open_clip_text`` with ``head: none``,
  OpenCLIP's BPE tokenizer, image size and normalisation follow the checkpoint), DeepSpeed ZeRO-2;
- ``openclip``: ``open_clip_train.main --pretrained FILE`` (DDP; the shims of
  ``benchmarks/openclip_launch.py``: a pandas stand-in, ``device_ids`` dropped on CPU).

Same data: scikit-learn's real 8x8 handwritten digits (upscaled to 64 px PNG, bicubic) with
templated captions ("a handwritten seven", "the digit 7", ...; ``data_tools.demo``'s templates),
``steps x global batch`` samples (each digit 3-4 times, a caption drawn per sample, rows in a
seeded random order), written as 16 webdataset shards (``png`` + ``txt`` members, which OpenCLIP's
webdataset reader takes: ``jpg;png;jpeg;webp`` and ``txt``) by ``data_tools.build.build_shards``.
Each trainer reads every sample exactly once (one epoch: 8 shards per rank, ``steps`` batches).
Same recipe: 2 CPU processes under ``torchrun`` (gloo, ``OMP_NUM_THREADS=1``, one DataLoader worker
per rank), batch ``--batch`` per rank, fp32, AdamW (lr, betas 0.9/0.98, eps 1e-6, weight decay 0.1
on matrices only), linear warmup then cosine to 0 over the run, no gradient clipping, CLIP loss of
each rank's rows against the global batch (gather with gradient; OpenCLIP ``--local-loss
--gather-with-grad``), training augmentation RandomResizedCrop(scale 0.9-1, ratio 3/4-4/3, bicubic)
on both sides (OpenCLIP's default; ours through timm with hflip and colour jitter off).

Measured the same way on both sides: each trainer runs from this file (``--ours-trainer`` /
``--openclip-trainer``, internal), which wraps the CLIP loss to record, per rank and step, the
loss value, the logit scale and ``time.time()`` (nothing else is changed); the curve of a run is
the mean over the ranks (= the loss on the global batch), samples/s = samples of the steps after
``--warmup`` / the wall time between the loss of step ``--warmup`` and that of the last step on
rank 0 (everything in between: data, forward, backward, optimizer, logging). Cross-checks: ours'
own ``metrics.jsonl`` loss (rank mean, ``train.log_every=1``) and OpenCLIP's own log line
(``--log-every-n-steps 1``, rank 0) must agree with the recorded values.

Seed-to-seed noise: every trainer runs once per ``--seeds`` entry (ours ``train.seed``, OpenCLIP
``--seed``: data order and augmentation; the initial weights are the checkpoint's in every run);
one round per seed, the trainers alternate and the order flips every round. Figures: the mean
absolute difference between loss curves of the same trainer (every pair of seeds) and of the two
trainers (every pair of runs), raw per step and averaged over 10-step windows, over all steps and
the last 20; the samples/s ratio of the medians over rounds.

Writes ``--csv`` (per-step losses and logit scales of every run), ``--json`` (every figure) and
``--png`` (the curves, drawn with Pillow) under benchmarks/ by default.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "benchmarks"
MODEL_CONFIG = HERE / "openclip_arch_vit.json"
MODEL = MODEL_CONFIG.stem
WORLD = 2
SHARDS = 16  # 8 per rank: one worker per rank reads whole shards, on both sides
STEP_LOG = "BENCH_STEP_LOG"  # env: the per-rank step record, "{rank}" in the path


# ------------------------------------------------------------------------- inside the trainers


def _record(loss, scale) -> None:
    rank = int(os.environ.get("RANK", "0"))
    with open(os.environ[STEP_LOG].format(rank=rank), "a") as f:
        f.write(json.dumps({"t": time.time(), "loss": float(loss.detach()), "scale": float(scale.detach().reshape(-1)[0])})
                + "\n")


def ours_trainer(argv: list[str]) -> int:
    """``pretrain.train.main`` with the CLIP loss wrapped to record each step (no other change)."""
    sys.path.insert(0, str(ROOT))
    from pretrain.losses.clip import ClipLoss
    from pretrain.train import main

    call = ClipLoss.__call__

    def recorded(self, features, logit_scale, logit_bias=None, masks=None, step=None, **kwargs):
        out = call(self, features, logit_scale, logit_bias, masks=masks, step=step, **kwargs)
        _record(out["loss"], logit_scale)
        return out

    ClipLoss.__call__ = recorded
    return main(argv)


def openclip_trainer(argv: list[str]) -> int:
    """``open_clip_train.main.main`` with this benchmark's model config registered and its CLIP loss
    wrapped to record each step (no other change), after ``openclip_launch``'s two shims."""
    sys.path.insert(0, str(HERE))
    import open_clip
    import openclip_launch  # noqa: F401 - the pandas stand-in and the CPU DDP shim (see its docstring)
    from open_clip.loss import ClipLoss
    from open_clip_train.main import main

    import functools

    import open_clip_train.data as oc_data

    # webdataset >= 0.2.96 (this project needs >= 0.2.100) ends every shard with an end-of-file
    # marker ``{}`` that open_clip_train 3.3's ``group_by_keys_nothrow`` cannot read (KeyError
    # 'fname'; webdataset issue 384, open_clip issue 935; open_clip_train[training] pins webdataset
    # <= 0.2.86). The fix named there: no marker (``eof_value=None``), the old behaviour.
    oc_data.tar_file_expander = functools.partial(oc_data.tar_file_expander, eof_value=None)
    open_clip.add_model_config(MODEL_CONFIG)
    forward = ClipLoss.forward

    def recorded(self, image_features, text_features, logit_scale, output_dict=False):
        out = forward(self, image_features, text_features, logit_scale, output_dict=output_dict)
        _record(sum(out.values()) if isinstance(out, dict) else out, logit_scale)
        return out

    ClipLoss.forward = recorded
    return main(argv)


# ---------------------------------------------------------------------------------------- data


def make_data(folder: Path, n: int, side: int = 64, seed: int = 0) -> str:
    """n digit images (1,797 real 8x8 digits, upscaled) + templated captions -> SHARDS shards."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    from data_tools.build import build_shards
    from data_tools.demo import CAPTION_TEMPLATES, WORDS

    digits = load_digits()
    raw = folder / "raw"
    (raw / "images").mkdir(parents=True, exist_ok=True)
    for i, pixels in enumerate(digits.images):
        img = Image.fromarray(np.round(pixels * (255.0 / 16.0)).astype(np.uint8))  # white on black, mode L
        img.resize((side, side), Image.BICUBIC).save(raw / "images" / f"digit{i:05d}.png")
    rng = random.Random(seed)
    pairs = [(c, i) for c in range(math.ceil(n / len(digits))) for i in range(len(digits))]
    rng.shuffle(pairs)
    with open(raw / "manifest.jsonl", "w") as f:
        for c, i in pairs[:n]:
            label = int(digits.target[i])
            caption = rng.choice(CAPTION_TEMPLATES).format(word=WORDS[label], num=label)
            f.write(json.dumps({"key": f"c{c}d{i:05d}", "image": f"images/digit{i:05d}.png", "caption": caption}) + "\n")
    index = build_shards(raw / "manifest.jsonl", folder / "shards", shard_size=n // SHARDS,
                         mapping={"image": "png", "caption": "txt"})
    assert len(index["shards"]) == SHARDS and all(s["samples"] == n // SHARDS for s in index["shards"]), index["shards"]
    return str(folder / "shards" / f"shard-{{000000..{SHARDS - 1:06d}}}.tar")


def make_checkpoint(path: Path, seed: int) -> dict:
    """OpenCLIP's random initialisation of the architecture, saved as .safetensors."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    open_clip.add_model_config(MODEL_CONFIG)
    torch.manual_seed(seed)
    model = open_clip.create_model(MODEL, pretrained=None)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"image": n(model.visual), "text": n(model) - n(model.visual) - 1, "total": n(model)}


# ------------------------------------------------------------------------------------ configs


def our_config(urls: str, out: Path, ckpt: Path, args, seed: int) -> dict:
    return {
        "output_dir": str(out),
        "data": {
            "train": {"urls": urls, "mode": "epoch", "shuffle_buffer": 1000, "workers": args.workers},
            "modalities": {
                # OpenCLIP's training transform: RandomResizedCrop(scale 0.9-1, ratio 3/4-4/3, bicubic)
                "image": {"decoder": "image", "options": {"augment": {
                    "scale": [0.9, 1.0], "ratio": [0.75, 4 / 3], "hflip": 0.0, "color_jitter": None}}},
                "text": {"decoder": "text"},
            },
            "labels": None,
        },
        "model": {"init_from": {"format": "open_clip", "model": MODEL, "model_config": str(MODEL_CONFIG),
                                "path": str(ckpt)}},
        "loss": {"name": "clip"},
        "train": {"steps": args.steps, "micro_batch_size": args.batch, "seed": seed, "lr": args.lr,
                  "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.1, "warmup_steps": args.lr_warmup,
                  "schedule": "cosine", "grad_clip": 0.0, "zero_stage": args.zero_stage, "precision": "fp32",
                  "log_every": 1, "checkpoint": False, "deepspeed": json.loads(args.deepspeed),
                  **json.loads(getattr(args, "train", None) or "{}")},
        "eval": {"enabled": False},
    }


def openclip_args(urls: str, logs: Path, ckpt: Path, args, seed: int) -> list[str]:
    return ["--model", MODEL, "--pretrained", str(ckpt), "--train-data", urls, "--dataset-type", "webdataset",
            "--train-num-samples", str(args.steps * args.batch * WORLD), "--batch-size", str(args.batch),
            "--epochs", "1", "--device", "cpu", "--dist-backend", "gloo", "--workers", str(args.workers),
            "--precision", "fp32", "--lr", str(args.lr), "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6",
            "--wd", "0.1", "--warmup", str(args.lr_warmup), "--lr-scheduler", "cosine", "--local-loss",
            "--gather-with-grad", "--log-every-n-steps", "1", "--report-to", "", "--logs", str(logs),
            "--name", "run", "--seed", str(seed)]


def check_same_start(urls: str, ckpt: Path, args) -> dict:
    """Both models at step 0, built as each trainer builds them (ours from the recipe with
    ``init_from``, OpenCLIP's ``create_model(pretrained=FILE)``): parameters, tokens of the
    captions, and the normalised features and logit scale of one batch must agree."""
    import open_clip
    import torch

    from pretrain.config import config_from_dict
    from pretrain.data import build_modalities
    from pretrain.models import build_model

    cfg = config_from_dict(our_config(urls, Path("unused"), ckpt, args, 0))
    modalities = build_modalities(cfg.data, train=False)
    ours = build_model(cfg.model, modalities).eval()
    open_clip.add_model_config(MODEL_CONFIG)
    theirs = open_clip.create_model(MODEL, pretrained=str(ckpt)).eval()
    captions = ["a handwritten seven", "the digit 7", "a photo of the number three", "handwritten 0",
                "a scan of a nine", "the number 4 written by hand"]
    ours_tokens = modalities["text"].decoder.tokenizer(captions)
    their_tokens = open_clip.get_tokenizer(MODEL)(captions)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(len(captions), 3, 64, 64, generator=g)
    with torch.no_grad():
        f, scale, _ = ours({"image": images, "text": ours_tokens})
        image_features, text_features, their_scale = theirs(images, their_tokens)[:3]
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"tokens_equal": bool(torch.equal(ours_tokens, their_tokens.long())),
            "image_features_max_abs_diff": float((f["image"] - image_features).abs().max()),
            "text_features_max_abs_diff": float((f["text"] - text_features).abs().max()),
            "logit_scale": [float(scale), float(their_scale)],
            "parameters": {"ours": n(ours), "openclip": n(theirs)},
            "text_decoder": cfg.data.modalities["text"].options,
            "image_decoder": {k: v for k, v in cfg.data.modalities["image"].options.items()},
            "towers": {m: {"type": t.type, "options": t.options, "head": t.head} for m, t in cfg.model.towers.items()}}


# ---------------------------------------------------------------------------------------- runs


def _env(record: Path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", STEP_LOG: str(record / "rank{rank}.jsonl")}


def _torchrun() -> list[str]:
    sys.path.insert(0, str(ROOT))
    from pretrain.distributed import free_port

    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}", f"--master_port={free_port()}"]


def _read_record(folder: Path, steps: int) -> dict:
    ranks = []
    for r in range(WORLD):
        rows = [json.loads(line) for line in (folder / f"rank{r}.jsonl").read_text().splitlines()]
        assert len(rows) == steps, f"{folder}: rank {r} recorded {len(rows)} steps, expected {steps}"
        ranks.append(rows)
    return {"loss": [statistics.fmean(ranks[r][i]["loss"] for r in range(WORLD)) for i in range(steps)],
            "loss_rank0": [x["loss"] for x in ranks[0]],
            "scale": [x["scale"] for x in ranks[0]],
            "t": [x["t"] for x in ranks[0]]}


def _throughput(rec: dict, args) -> float:
    t = rec["t"]
    return (args.steps - args.warmup) * args.batch * WORLD / (t[args.steps - 1] - t[args.warmup - 1])


def run_ours(urls: str, work: Path, ckpt: Path, args, seed: int, tag: str) -> dict:
    import yaml

    out, record = work / tag, work / f"{tag}-record"
    record.mkdir()
    cfg_path = work / f"{tag}.yaml"
    cfg_path.write_text(yaml.safe_dump(our_config(urls, out, ckpt, args, seed), sort_keys=False))
    cmd = [*_torchrun(), str(Path(__file__).resolve()), "--ours-trainer", "--config", str(cfg_path)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=_env(record))
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{tag} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    rec = _read_record(record, args.steps)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "samples_per_s" in r]
    assert [r["step"] for r in rows] == list(range(1, args.steps + 1)), [r["step"] for r in rows]
    # its own log (rank mean, as written) must be the recorded curve
    own = max(abs(r["loss"] - x) for r, x in zip(rows, rec["loss"]))
    assert own < 1e-4, f"{tag}: metrics.jsonl loss differs from the recorded one by {own}"
    own_timer = sum(args.batch * WORLD / r["samples_per_s"] for r in rows[args.warmup:])
    return {**rec, "samples_per_s": _throughput(rec, args), "wall_s": wall, "lr": [r["lr"] for r in rows],
            "own_log_max_abs_diff": own,
            "own_timer_samples_per_s": (args.steps - args.warmup) * args.batch * WORLD / own_timer,
            "data_wait": statistics.fmean(r["data_wait_fraction"] for r in rows[args.warmup:])}


_OC_LINE = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/\d+ .*?\] Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+).*?"
                      r"LR: ([\d.]+) Logit Scale: ([\d.]+) .*? Loss: ([\d.]+) ")


def run_openclip(urls: str, work: Path, ckpt: Path, args, seed: int, tag: str) -> dict:
    logs, record = work / tag, work / f"{tag}-record"
    record.mkdir()
    cmd = [*_torchrun(), "--", str(Path(__file__).resolve()), "--openclip-trainer",
           *openclip_args(urls, logs, ckpt, args, seed)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=_env(record))
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{tag} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    rec = _read_record(record, args.steps)
    steps = []
    for line in (logs / "run" / "out.log").read_text().splitlines():
        m = _OC_LINE.search(line)
        if m:
            steps.append((int(m.group(1)) // (args.batch * WORLD), *map(float, m.groups()[1:])))
    assert [s[0] for s in steps] == list(range(1, args.steps + 1)), [s[0] for s in steps]
    # its own log line (rank 0's loss, 5 significant digits) must be the recorded rank-0 value
    own = max(abs(s[5] - x) / max(abs(x), 1e-9) for s, x in zip(steps, rec["loss_rank0"]))
    assert own < 1e-4, f"{tag}: out.log loss differs from the recorded one by {own} (relative)"
    own_timer = sum(s[2] for s in steps[args.warmup:])
    return {**rec, "samples_per_s": _throughput(rec, args), "wall_s": wall, "lr": [s[3] for s in steps],
            "own_log_max_rel_diff": own,
            "own_timer_samples_per_s": (args.steps - args.warmup) * args.batch * WORLD / own_timer,
            "data_wait": sum(s[1] for s in steps[args.warmup:]) / own_timer}


# ------------------------------------------------------------------------------------ analysis


def _mad(a: list[float], b: list[float], lo: int, hi: int) -> float:
    return statistics.fmean(abs(x - y) for x, y in zip(a[lo:hi], b[lo:hi]))


def _windows(curve: list[float], w: int = 10) -> list[float]:
    return [statistics.fmean(curve[i:i + w]) for i in range(0, len(curve), w)]


def compare(curves: dict[str, list[list[float]]], steps: int) -> dict:
    """Mean |difference| between curves, within a trainer (pairs of seeds) and between trainers."""
    ranges = {"all": (0, steps), "last20": (steps - 20, steps)}
    out = {}
    for kind, prep in (("per_step", lambda c: c), ("window10", _windows)):
        for rname, (lo, hi) in ranges.items():
            if kind == "window10":
                lo, hi = lo // 10, math.ceil(hi / 10)
            fig = {}
            for name, runs in curves.items():
                pairs = list(itertools.combinations(runs, 2))
                fig[f"within_{name}"] = statistics.fmean(_mad(prep(a), prep(b), lo, hi) for a, b in pairs) if pairs else None
            fig["between"] = statistics.fmean(_mad(prep(a), prep(b), lo, hi)
                                              for a in curves["ours"] for b in curves["openclip"])
            out[f"{kind}_{rname}"] = fig
    means = {name: [statistics.fmean(c[i] for c in runs) for i in range(steps)] for name, runs in curves.items()}
    diff = [a - b for a, b in zip(means["ours"], means["openclip"])]
    last = {name: [statistics.fmean(c[-20:]) for c in runs] for name, runs in curves.items()}
    out["mean_curve_difference"] = {"all": statistics.fmean(diff), "last20": statistics.fmean(diff[-20:])}
    out["last20_mean_per_run"] = last
    if all(len(v) > 1 for v in last.values()):  # the difference of the two trainers' means vs its standard error
        se = math.sqrt(sum(statistics.variance(v) / len(v) for v in last.values()))
        out["last20_difference_of_means"] = {"value": statistics.fmean(last["ours"]) - statistics.fmean(last["openclip"]),
                                             "standard_error": se,
                                             "sd_per_trainer": {k: statistics.stdev(v) for k, v in last.items()}}
    out["first_step"] = {name: [c[0] for c in runs] for name, runs in curves.items()}
    return out


# ---------------------------------------------------------------------------------------- plot


def plot(path: Path, curves: dict[str, list[list[float]]], seeds: list[int], title: str) -> None:
    from PIL import Image, ImageDraw, ImageFont

    W, H, left, right, top, bottom = 1060, 560, 70, 230, 40, 50
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=13)  # Pillow >= 10.1 (FreeType)
    except TypeError:
        font = ImageFont.load_default()
    all_y = [y for runs in curves.values() for c in runs for y in c]
    y0, y1 = math.floor(min(all_y) * 2) / 2, math.ceil(max(all_y) * 2) / 2
    steps = len(next(iter(curves.values()))[0])
    px = lambda s: left + (s - 1) / max(1, steps - 1) * (W - left - right)  # noqa: E731
    py = lambda y: top + (y1 - y) / (y1 - y0) * (H - top - bottom)  # noqa: E731
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    y = y0
    while y <= y1 + 1e-9:
        d.line([left - 4, py(y), W - right, py(y)], fill=(225, 225, 225))
        d.text((left - 40, py(y) - 6), f"{y:.1f}", fill="black", font=font)
        y += 0.5
    for s in range(0, steps + 1, 10):
        s = max(s, 1)
        d.line([px(s), H - bottom, px(s), H - bottom + 4], fill="black")
        d.text((px(s) - 8, H - bottom + 8), str(s), fill="black", font=font)
    d.text((left + (W - left - right) / 2 - 20, H - 20), "step", fill="black", font=font)
    d.text((10, top - 25), title, fill="black", font=font)
    palette = {"ours": [(31, 119, 180), (110, 180, 235), (60, 90, 210), (140, 200, 200)],
               "openclip": [(214, 39, 40), (255, 127, 14), (235, 160, 90), (200, 80, 130)]}
    mean_colour = {"ours": (10, 40, 110), "openclip": (120, 0, 0)}
    legend_y = top + 5
    for name, runs in curves.items():
        for k, c in enumerate(runs):
            colour = palette[name][k % 4]
            d.line([(px(i + 1), py(v)) for i, v in enumerate(c)], fill=colour, width=1)
            d.line([W - right + 15, legend_y + 6, W - right + 40, legend_y + 6], fill=colour, width=2)
            d.text((W - right + 45, legend_y), f"{name} seed {seeds[k]}", fill="black", font=font)
            legend_y += 16
        mean = [statistics.fmean(c[i] for c in runs) for i in range(steps)]
        smooth = [statistics.fmean(mean[max(0, i - 4):i + 5]) for i in range(steps)]
        colour = mean_colour[name]
        d.line([(px(i + 1), py(v)) for i, v in enumerate(smooth)], fill=colour, width=3)
        d.line([W - right + 15, legend_y + 6, W - right + 40, legend_y + 6], fill=colour, width=3)
        d.text((W - right + 45, legend_y), f"{name} mean, 9-step avg", fill="black", font=font)
        legend_y += 22
    img.save(path)


# ---------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2,3", help="data-order seeds: one round per seed, both trainers")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per run (a multiple of 10)")
    parser.add_argument("--warmup", type=int, default=10, help="first steps left out of samples/s")
    parser.add_argument("--batch", type=int, default=32, help="samples per rank per step")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--lr-warmup", type=int, default=10, help="linear learning-rate warmup steps")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers per rank (both)")
    parser.add_argument("--zero-stage", type=int, default=2, help="ours: DeepSpeed ZeRO stage (train.zero_stage)")
    parser.add_argument("--deepspeed", default="{}", help="ours: extra DeepSpeed settings (train.deepspeed), JSON")
    parser.add_argument("--train", default="{}", help='ours: more train.* settings, JSON (e.g. \'{"overlap_grad_reduce": false}\')')
    parser.add_argument("--init-seed", type=int, default=0, help="torch seed of the shared initial checkpoint")
    parser.add_argument("--csv", default=str(HERE / "openclip_arch_curves.csv"))
    parser.add_argument("--json", default=str(HERE / "openclip_arch_results.json"))
    parser.add_argument("--png", default=str(HERE / "openclip_arch_curves.png"))
    parser.add_argument("--keep", help="keep the data, checkpoint and run folders here (default: a temporary folder)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.steps % 10 or args.steps < 20 or not 0 < args.warmup < args.steps:
        parser.error("--steps: a multiple of 10, >= 20; --warmup: between 0 and --steps")

    sys.path.insert(0, str(ROOT))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "pretrain"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    import deepspeed
    import open_clip
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
                "open_clip": open_clip.__version__}
    loads = [os.getloadavg()]
    print(f"code: commit {commit}" + (" with local changes under pretrain/" if dirty else ""), flush=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; {versions}; date {date.today()}; "
          f"load average {' '.join(f'{x:.2f}' for x in loads[0])}", flush=True)
    start_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_openclip_arch_") as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        n = args.steps * args.batch * WORLD
        urls = make_data(work / "data", n)
        print(f"data: {n} samples (1,797 digits, 64 px PNG + caption) in {SHARDS} shards, "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        ckpt = work / "init.safetensors"
        params = make_checkpoint(ckpt, args.init_seed)
        print(f"checkpoint: {MODEL} (image {params['image'] / 1e6:.2f}M, text {params['text'] / 1e6:.2f}M, "
              f"total {params['total'] / 1e6:.2f}M parameters) -> {ckpt.name}", flush=True)
        start = check_same_start(urls, ckpt, args)
        print(f"step 0: tokens equal {start['tokens_equal']}; features max |diff| image "
              f"{start['image_features_max_abs_diff']:.2e}, text {start['text_features_max_abs_diff']:.2e}; "
              f"logit scale {start['logit_scale']}; parameters {start['parameters']}", flush=True)
        runs: dict[str, list[dict]] = {"ours": [], "openclip": []}
        for r, seed in enumerate(seeds):
            for name in (["ours", "openclip"] if r % 2 == 0 else ["openclip", "ours"]):
                tag = f"{name}-seed{seed}"
                fn = run_ours if name == "ours" else run_openclip
                res = fn(urls, work, ckpt, args, seed, tag)
                res["seed"], res["load"] = seed, os.getloadavg()
                loads.append(res["load"])
                runs[name].append(res)
                print(f"round {r + 1} {name:<8} seed {seed}: {res['samples_per_s']:6.1f} samples/s over steps "
                      f"{args.warmup + 1}-{args.steps} (own timer {res['own_timer_samples_per_s']:.1f}), data wait "
                      f"{100 * res['data_wait']:.1f}%, run wall {res['wall_s']:.0f} s; loss step 1 {res['loss'][0]:.3f}, "
                      f"last 20 {statistics.fmean(res['loss'][-20:]):.3f}; load {res['load'][0]:.2f}", flush=True)

    curves = {name: [x["loss"] for x in rs] for name, rs in runs.items()}
    cmp = compare(curves, args.steps)
    med = {name: statistics.median(x["samples_per_s"] for x in rs) for name, rs in runs.items()}
    ratio = med["ours"] / med["openclip"]
    total_min = (time.perf_counter() - start_all) / 60

    # files
    with open(args.csv, "w") as f:
        cols = [f"{name}_seed{x['seed']}" for name, rs in runs.items() for x in rs]
        f.write("step," + ",".join(f"{c}_loss" for c in cols) + "," + ",".join(f"{c}_logit_scale" for c in cols)
                + ",lr\n")
        for i in range(args.steps):
            vals = [f"{x['loss'][i]:.6f}" for rs in runs.values() for x in rs]
            vals += [f"{x['scale'][i]:.5f}" for rs in runs.values() for x in rs]
            f.write(f"{i + 1}," + ",".join(vals) + f",{runs['ours'][0]['lr'][i]:.4e}\n")
    plot(Path(args.png), curves, seeds, f"{MODEL}: CLIP loss per step (global batch {args.batch * WORLD}), "
                                        f"ours (blue) vs OpenCLIP's trainer (red), seeds {seeds}")
    summary = {"args": vars(args), "commit": commit, "pretrain_dirty": bool(dirty), "date": str(date.today()),
               "versions": versions, "model_config": json.loads(MODEL_CONFIG.read_text()), "parameters": params,
               "step0_check": start, "load_averages": loads, "total_minutes": total_min,
               "median_samples_per_s": med, "ratio_ours_vs_openclip": ratio, "curves": cmp,
               "runs": {name: [{k: v for k, v in x.items() if k not in ("t", "loss", "loss_rank0", "scale", "lr")}
                               for x in rs] for name, rs in runs.items()}}
    Path(args.json).write_text(json.dumps(summary, indent=1, default=str) + "\n")

    # tables
    print(f"\n{MODEL}: {params['total'] / 1e6:.2f}M parameters; batch {args.batch} per rank x {WORLD} ranks; "
          f"{args.steps} steps; lr {args.lr}, warmup {args.lr_warmup}, cosine; ours ZeRO-{args.zero_stage}; seeds {seeds}; "
          f"{total_min:.1f} min in all\n")
    print("| trainer | samples/s (median) | per round | own timer (median) | data wait | run wall s | vs OpenCLIP |")
    print("| --- | ---: | --- | ---: | ---: | --- | ---: |")
    for name, rs in runs.items():
        rounds = ", ".join(f"{x['samples_per_s']:.1f}" for x in rs)
        walls = ", ".join(f"{x['wall_s']:.0f}" for x in rs)
        own = statistics.median(x["own_timer_samples_per_s"] for x in rs)
        wait = 100 * statistics.median(x["data_wait"] for x in rs)
        print(f"| {name} | {med[name]:.1f} | {rounds} | {own:.1f} | {wait:.1f}% | {walls} | "
              f"{med[name] / med['openclip']:.2f}x |")
    print("\nMean |difference| between loss curves (per step; and of 10-step means)\n")
    print("| | steps 1-N, per step | last 20, per step | steps 1-N, 10-step means | last 20, 10-step means |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for key, label in (("within_ours", "ours vs ours (seeds)"), ("within_openclip", "OpenCLIP vs OpenCLIP (seeds)"),
                       ("between", "ours vs OpenCLIP")):
        vals = [cmp[k][key] for k in ("per_step_all", "per_step_last20", "window10_all", "window10_last20")]
        print(f"| {label} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in vals) + " |")
    for name in runs:
        last = cmp["last20_mean_per_run"][name]
        first = cmp["first_step"][name]
        print(f"{name}: step-1 loss {', '.join(f'{x:.3f}' for x in first)}; mean of the last 20 steps "
              f"{', '.join(f'{x:.3f}' for x in last)}")
    print(f"mean curve ours - OpenCLIP: {cmp['mean_curve_difference']['all']:+.3f} (all steps), "
          f"{cmp['mean_curve_difference']['last20']:+.3f} (last 20)")
    if "last20_difference_of_means" in cmp:
        d = cmp["last20_difference_of_means"]
        sd = ", ".join(f"{k} {v:.3f}" for k, v in d["sd_per_trainer"].items())
        print(f"last-20 mean, ours - OpenCLIP: {d['value']:+.3f} +- {d['standard_error']:.3f} (standard error from "
              f"the seed-to-seed spread; sd over seeds: {sd})")
    print(f"\nwrote {args.csv}, {args.json}, {args.png}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--ours-trainer":
        sys.exit(ours_trainer(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "--openclip-trainer":
        sys.exit(openclip_trainer(sys.argv[2:]))
    main()
