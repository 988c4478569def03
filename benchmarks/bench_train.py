"""Training throughput on CPU: ``pretrain.train`` vs OpenCLIP's own trainer, same model sizes and batch.

    .venv/bin/python benchmarks/bench_train.py [--rounds 2] [--steps 30] [--warmup 5] [--batch 32]

Both trainers run on 2 CPU processes under ``torchrun`` (gloo, ``OMP_NUM_THREADS=1``, one DataLoader
worker per rank), fp32, AdamW (betas 0.9/0.98, eps 1e-6, weight decay 0.1), gradient clipping at
1.0, CLIP loss with negatives over the global batch (local rows x global columns, gather with
gradient), no evaluation, no checkpoint during the steps. The model sizes come from
``benchmarks/openclip_bench_vit.json`` (OpenCLIP's model config, registered by
``benchmarks/openclip_launch.py``); ours is built to match it:

- ``ours``: ``python -m pretrain.train`` (DeepSpeed ZeRO-2) reading webdataset shards of 64x64 PNGs
  + captions built here with ``data_tools.build.build_shards``; image tower timm ViT (patch, width,
  depth, heads as in the JSON, ``pre_norm`` like OpenCLIP's ``ln_pre``, class-token pooling);
  text tower ``hf_text`` = transformers' BertModel with OpenCLIP's vocabulary size (49,408) so the
  parameter count matches, over our byte tokenizer (ids < 259), bidirectional, CLS pooling.
- ``openclip``: ``open_clip_train.main`` with ``--dataset-type synthetic`` (one blank image through
  its training transform + its BPE tokenizer per sample), DDP, ``--local-loss --gather-with-grad``;
  text tower bidirectional (``no_causal_mask``), first-token pooling.
- ``ours-byte``: ours with the ``text_transformer`` tower (the same BertModel, over the byte
  vocabulary of 259: 6.3M fewer parameters), to show what OpenCLIP's vocabulary costs.

The variants alternate within a round and the order flips every round (ours, openclip, ours-byte;
ours-byte, openclip, ours; ...). Samples/s of a run = samples of the steps after ``--warmup`` /
their wall time on rank 0: ours from ``metrics.jsonl`` (``train.log_every = --warmup``, windows
after the first), OpenCLIP from its log line of every step (``Batch (t)``, wall time of the step
including its data wait). Figures: median over rounds. Start-up (imports, model and engine
construction, worker start) is left out of samples/s and shown separately as the run's wall time.

Before the runs, the models alone are timed in this process (one thread, no trainer, no
collectives): forward, backward and an AdamW step over all parameters on one rank's batch, to
separate the towers' own cost from the trainers'.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pretrain.distributed import free_port  # noqa: E402

OPENCLIP_CONFIG = ROOT / "benchmarks" / "openclip_bench_vit.json"
WORLD = 2


def sizes() -> dict:
    return json.loads(OPENCLIP_CONFIG.read_text())


# --------------------------------------------------------------------------------------------- data


def make_shards(folder: Path, n: int, side: int, shard_size: int = 256, seed: int = 0) -> str:
    """n image+caption samples (side x side PNG gradients with noise, varied captions) -> shards."""
    from data_tools.build import build_shards

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    raw = folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "grey", "teal"]
    with open(raw / "manifest.jsonl", "w") as f:
        for i in range(n):
            a, b, c = rng.uniform(0, 255, 3)
            img = np.stack([a * xx + (255 - a) * yy, b * yy, c * (1 - xx)], -1) + rng.normal(0, 6, (side, side, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(raw / f"{i:06d}.png")
            caption = f"a {colours[i % 8]} gradient with some noise, number {i}"
            f.write(json.dumps({"key": f"{i:06d}", "image": f"{i:06d}.png", "caption": caption}) + "\n")
    out = folder / "shards"
    index = build_shards(raw / "manifest.jsonl", out, shard_size=shard_size, mapping={"image": "png", "caption": "txt"})
    return str(out / f"shard-{{000000..{len(index['shards']) - 1:06d}}}.tar")  # index.json lies beside them


# ------------------------------------------------------------------------------------------ configs


def our_config(urls: str, out: Path, args, text_vocab: str) -> dict:
    s = sizes()
    v, t = s["vision_cfg"], s["text_cfg"]
    vit = {"patch_size": v["patch_size"], "embed_dim": v["width"], "depth": v["layers"],
           "num_heads": v["width"] // v.get("head_width", 64), "mlp_ratio": v.get("mlp_ratio", 4.0),
           "pre_norm": True}  # OpenCLIP's ViT has ln_pre
    if text_vocab == "openclip":  # transformers' BertModel with OpenCLIP's vocabulary size
        text = {"type": "hf_text", "options": {"pooling": "cls", "config": {
            "model_type": "bert", "vocab_size": t["vocab_size"], "hidden_size": t["width"],
            "num_hidden_layers": t["layers"], "num_attention_heads": t["heads"],
            "intermediate_size": int(t.get("mlp_ratio", 4.0) * t["width"]),
            "max_position_embeddings": t["context_length"], "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0}}}
    else:  # the byte-vocabulary tower (the same BertModel, vocab 259)
        text = {"type": "text_transformer", "options": {"width": t["width"], "layers": t["layers"],
                                                         "heads": t["heads"], "pooling": "cls"}}
    return {
        "output_dir": str(out),
        "data": {
            "train": {"urls": urls, "mode": "epoch", "shuffle_buffer": 256, "workers": args.workers},
            "modalities": {"image": {"decoder": "image"}, "text": {"decoder": "text"}},
            "labels": None,
            "image_size": v["image_size"],
            "context_length": t["context_length"],
        },
        "model": {"embed_dim": s["embed_dim"], "init_temperature": 0.07, "towers": {
            "image": {"type": "timm", "options": {"name": "vit_tiny_patch16_224", "kwargs": vit}},
            "text": text}},
        "loss": {"name": "clip"},
        "train": {"steps": args.steps, "micro_batch_size": args.batch, "seed": 0, "lr": 1e-3,
                  "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.1, "warmup_steps": 2, "grad_clip": 1.0,
                  "zero_stage": 2, "precision": "fp32", "log_every": args.warmup, "checkpoint": False},
        "eval": {"enabled": False},
    }


def count_parameters(urls: str, args) -> dict:
    """Parameters per tower of each model (built on CPU in this process, not trained)."""
    import open_clip
    import torch

    from pretrain.config import config_from_dict
    from pretrain.data import build_modalities
    from pretrain.models import build_model

    open_clip.add_model_config(OPENCLIP_CONFIG)
    oc = open_clip.create_model(OPENCLIP_CONFIG.stem, pretrained=None)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    counts = {"openclip": {"image": n(oc.visual), "text": n(oc) - n(oc.visual), "total": n(oc)}}
    for name, vocab in (("ours", "openclip"), ("ours-byte", "byte")):
        cfg = config_from_dict(our_config(urls, Path("unused"), args, vocab))
        torch.manual_seed(0)
        m = build_model(cfg.model, build_modalities(cfg.data, train=True))
        counts[name] = {"image": n(m.towers["image"]), "text": n(m.towers["text"]), "total": n(m)}
    return counts


def model_check(urls: str, args, variants: list[str], reps: int = 5) -> dict:
    """The models alone, one process, one thread, no trainer: forward (towers + a plain local CLIP
    loss), backward, and AdamW step + zero_grad over all parameters, on one rank's batch of random
    inputs; variants interleaved, order flipped every repetition, medians (seconds)."""
    import open_clip
    import torch
    import torch.nn.functional as F

    from pretrain.config import config_from_dict
    from pretrain.data import build_modalities
    from pretrain.models import build_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    s = sizes()
    side, ctx = s["vision_cfg"]["image_size"], s["text_cfg"]["context_length"]
    open_clip.add_model_config(OPENCLIP_CONFIG)
    models = {}
    for name in variants:
        torch.manual_seed(0)
        if name == "openclip":
            models[name] = open_clip.create_model(OPENCLIP_CONFIG.stem, pretrained=None)
        else:
            cfg = config_from_dict(our_config(urls, Path("unused"), args, "openclip" if name == "ours" else "byte"))
            models[name] = build_model(cfg.model, build_modalities(cfg.data, train=True))
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1)
            for k, m in models.items()}
    g = torch.Generator().manual_seed(0)
    b = args.batch
    images = torch.randn(b, 3, side, side, generator=g)
    ids_bpe = torch.randint(1, s["text_cfg"]["vocab_size"], (b, ctx), generator=g)  # OpenCLIP's vocabulary
    ids_byte = torch.randint(3, 259, (b, ctx), generator=g)  # our byte tokenizer's ids

    def step(name):
        m = models[name]
        t0 = time.perf_counter()
        if name == "openclip":
            fi, ft, scale = m(images, ids_bpe)[:3]
        else:
            f, scale, _ = m({"image": images, "text": ids_byte})
            fi, ft = f["image"], f["text"]
        logits = scale * fi @ ft.T
        labels = torch.arange(b)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opts[name].step()
        opts[name].zero_grad()
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    times: dict[str, list] = {k: [] for k in models}
    for k in models:  # warm-up
        step(k)
    for r in range(reps):
        for k in (list(models) if r % 2 == 0 else list(models)[::-1]):
            times[k].append(step(k))
    torch.set_num_threads(threads)
    return {k: {part: statistics.median(x[i] for x in v) for i, part in enumerate(("forward", "backward", "adamw"))}
            for k, v in times.items()}


# ------------------------------------------------------------------------------------------- runs


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}",
            f"--master_port={free_port()}"]


def run_ours(urls: str, work: Path, args, tag: str, vocab: str) -> dict:
    import yaml

    out = work / tag
    cfg_path = work / f"{tag}.yaml"
    cfg_path.write_text(yaml.safe_dump(our_config(urls, out, args, vocab), sort_keys=False))
    cmd = [*_torchrun(), "-m", "pretrain.train", "--config", str(cfg_path)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=_env())
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{tag} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "samples_per_s" in r]
    measured = [r for r in rows if r["step"] > args.warmup]
    global_batch = args.batch * WORLD
    samples = sum(args.warmup * global_batch for _ in measured)  # every window after the first: log_every steps
    seconds = sum(args.warmup * global_batch / r["samples_per_s"] for r in measured)
    assert measured and measured[-1]["step"] == args.steps, [r["step"] for r in rows]
    return {"samples_per_s": samples / seconds, "seconds": seconds, "steps": len(measured) * args.warmup,
            "data_wait": statistics.mean(r["data_wait_fraction"] for r in measured), "wall_s": wall,
            "windows": [r["samples_per_s"] for r in rows]}


_OC_LINE = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/\d+ .*?\] Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+)")


def run_openclip(work: Path, args, tag: str) -> dict:
    logs = work / tag
    global_batch = args.batch * WORLD
    cmd = [*_torchrun(), "--", str(ROOT / "benchmarks" / "openclip_launch.py"),
           "--model", OPENCLIP_CONFIG.stem, "--dataset-type", "synthetic",
           "--train-num-samples", str(args.steps * global_batch), "--batch-size", str(args.batch), "--epochs", "1",
           "--device", "cpu", "--dist-backend", "gloo", "--workers", str(args.workers), "--precision", "fp32",
           "--lr", "1e-3", "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6", "--wd", "0.1", "--warmup", "2",
           "--grad-clip-norm", "1.0", "--local-loss", "--gather-with-grad", "--log-every-n-steps", "1",
           "--report-to", "", "--logs", str(logs), "--name", "run", "--seed", "0"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=_env())
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{tag} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    steps = []
    for line in (logs / "run" / "out.log").read_text().splitlines():
        m = _OC_LINE.search(line)
        if m:
            steps.append((int(m.group(1)) // global_batch, float(m.group(2)), float(m.group(3))))
    assert [s[0] for s in steps] == list(range(1, args.steps + 1)), [s[0] for s in steps]
    measured = [s for s in steps if s[0] > args.warmup]
    seconds = sum(s[2] for s in measured)
    return {"samples_per_s": len(measured) * global_batch / seconds, "seconds": seconds, "steps": len(measured),
            "data_wait": sum(s[1] for s in measured) / seconds, "wall_s": wall,
            "windows": [global_batch / s[2] for s in steps]}


# ------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out (and ours' log interval)")
    parser.add_argument("--batch", type=int, default=32, help="samples per rank per step")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers per rank (both)")
    parser.add_argument("--samples", type=int, default=1024, help="samples in our shards (read epoch after epoch)")
    parser.add_argument("--variants", default="ours,openclip,ours-byte", help="comma list of ours, openclip, ours-byte")
    parser.add_argument("--no-model-check", dest="model_check", action="store_false",
                        help="skip timing the models alone (one process, no trainer)")
    parser.add_argument("--json", help="also write every figure to this file")
    args = parser.parse_args()
    if args.steps % args.warmup:
        parser.error("--steps must be a multiple of --warmup (ours logs every --warmup steps)")
    variants = args.variants.split(",")
    unknown = set(variants) - {"ours", "openclip", "ours-byte"}
    if unknown:
        parser.error(f"--variants: unknown {sorted(unknown)}")

    s = sizes()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "pretrain"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    print(f"code: commit {commit}" + (" with local changes under pretrain/" if dirty else ""), flush=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}; "
          f"date {date.today()}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        urls = make_shards(work / "data", args.samples, s["vision_cfg"]["image_size"])
        print(f"shards: {args.samples} samples ({s['vision_cfg']['image_size']} px PNG + caption) in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        params = count_parameters(urls, args)
        for name in variants:
            p = params[name]
            print(f"parameters {name}: image {p['image'] / 1e6:.2f}M, text {p['text'] / 1e6:.2f}M "
                  f"(+ logit scale), total {p['total'] / 1e6:.2f}M", flush=True)
        check = model_check(urls, args, variants) if args.model_check else {}
        for name, c in check.items():
            print(f"model alone ({name}, 1 process, 1 thread, batch {args.batch}): forward {1e3 * c['forward']:.0f} ms, "
                  f"backward {1e3 * c['backward']:.0f} ms, AdamW + zero_grad {1e3 * c['adamw']:.0f} ms", flush=True)
        results: dict[str, list[dict]] = {v: [] for v in variants}
        for r in range(args.rounds):
            for v in (variants if r % 2 == 0 else variants[::-1]):
                tag = f"{v}-{r}"
                res = (run_openclip(work, args, tag) if v == "openclip"
                       else run_ours(urls, work, args, tag, "openclip" if v == "ours" else "byte"))
                res["load"] = os.getloadavg()[0]
                results[v].append(res)
                print(f"round {r + 1} {v:<9} {res['samples_per_s']:7.1f} samples/s over {res['steps']} steps "
                      f"({res['seconds']:.1f} s), data wait {100 * res['data_wait']:.1f}%, run wall {res['wall_s']:.0f} s, "
                      f"load {res['load']:.2f}", flush=True)

    med = {v: statistics.median(x["samples_per_s"] for x in rs) for v, rs in results.items()}
    v, t = s["vision_cfg"], s["text_cfg"]
    print(f"\nViT {v['image_size']}px/{v['patch_size']} width {v['width']} depth {v['layers']} heads "
          f"{v['width'] // v.get('head_width', 64)}; text width {t['width']} layers {t['layers']} heads {t['heads']} "
          f"context {t['context_length']}; embed {s['embed_dim']}; batch {args.batch} per rank x {WORLD} ranks; "
          f"{args.steps} steps, first {args.warmup} left out; median of {args.rounds} rounds\n")
    print("| trainer | samples/s (median) | per round | data wait | run wall s (per round) | vs openclip |")
    print("| --- | ---: | --- | ---: | --- | ---: |")
    for name, rs in results.items():
        ratio = f"{med[name] / med['openclip']:.2f}x" if "openclip" in med else "-"
        rounds = ", ".join(f"{x['samples_per_s']:.1f}" for x in rs)
        walls = ", ".join(f"{x['wall_s']:.0f}" for x in rs)
        wait = 100 * statistics.median(x["data_wait"] for x in rs)
        print(f"| {name} | {med[name]:.1f} | {rounds} | {wait:.1f}% | {walls} | {ratio} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "sizes": s, "parameters": params,
                                               "model_check": check, "commit": commit,
                                               "results": results, "median": med}, indent=1) + "\n")


if __name__ == "__main__":
    main()
