"""Data pipeline throughput: ``pretrain.data`` vs plain webdataset on the same shards, and the
share of step time the demo training waits for data.

    .venv/bin/python benchmarks/bench_pipeline.py [--samples 3000] [--repeats 3] [--train-steps 100]

1. Decoded samples/s, side by side, 1 and 2 DataLoader workers, batches of 64. Workload: image+text
   samples (160x160 JPEGs of about 6 KB, one caption each) in 500-sample tar shards; both variants
   do the same work per sample: read the tar, decode the JPEG to an RGB PIL image, timm's eval
   transform to a normalised 3x128x128 tensor, byte-tokenize the caption to 32 ids, stack into
   batches.

   - ``webdataset``: ``WebDataset(urls).decode("pil").to_tuple("jpg", "txt")`` + ``map_tuple(
     transform, tokenizer.encode)`` in a ``DataLoader(batch_size=64, num_workers=N)`` (shards split
     over workers by webdataset).
   - ``pretrain.data``: ``make_loader`` in training mode for one pass (``epochs=1``), shard order
     (``shuffle_buffer: 0``), image + text modalities, no labels: the code path training uses
     (safe tar reading, per-modality decoders, per-batch seeding, loader state on every batch).

   Each figure is the median of ``--repeats`` passes (variants interleaved; the page cache is warm),
   timed from ``iter()`` to the last batch, worker start-up included.

2. Demo training (``configs/quickstart.yaml``: 2 processes, ZeRO-2, micro-batch 64), ``--train-steps``
   steps without eval or checkpoint, twice: as the recipe is (``data.train.workers: 1``, decoding
   in a DataLoader worker per rank) and with ``data.train.workers=0`` (decoding inside the training
   processes); ``data_wait_fraction`` (time in ``next(loader)`` / wall time, mean over ranks) per
   logged window, from ``metrics.jsonl``. Needs the demo shards (``make demo-data``; built here if
   missing).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BATCH = 64
SIZE = 128
CONTEXT = 32


def make_shards(folder: Path, n: int, per_shard: int = 500, side: int = 160, seed: int = 0) -> list[str]:
    import webdataset as wds

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    folder.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(folder / "shard-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(n):
            a, b, c = rng.uniform(0, 255, 3)
            img = np.stack([a * xx + (255 - a) * yy, b * yy, c * (1 - xx)], -1) + rng.normal(0, 6, (side, side, 3))
            buf = __import__("io").BytesIO()
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=85)
            sink.write({"__key__": f"{i:07d}", "jpg": buf.getvalue(), "txt": f"a synthetic gradient, number {i}"})
    return sorted(str(p) for p in folder.glob("shard-*.tar"))


def run_webdataset(urls: list[str], workers: int) -> tuple[int, float]:
    import torch
    import webdataset as wds
    from timm.data import create_transform

    from pretrain.tokenizer import ByteTokenizer

    transform = create_transform(input_size=(3, SIZE, SIZE), is_training=False, crop_pct=1.0, crop_mode="center",
                                 interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3)
    tok = ByteTokenizer(CONTEXT)
    ds = (wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil").to_tuple("jpg", "txt")
          .map_tuple(transform, tok.encode))
    loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, num_workers=workers)
    start, n = time.perf_counter(), 0
    for images, texts in loader:
        n += images.shape[0]
    return n, time.perf_counter() - start


def run_pipeline(urls: list[str], workers: int, total: int) -> tuple[int, float]:
    from pretrain.config import config_from_dict
    from pretrain.data import build_modalities, make_loader

    cfg = config_from_dict({
        "data": {"train": {"urls": urls, "samples": total, "shuffle_buffer": 0, "workers": workers},
                 "modalities": {"image": {"decoder": "image"}, "text": {"decoder": "text"}},
                 "labels": None, "image_size": SIZE, "context_length": CONTEXT},
        "eval": {"enabled": False},
    })
    loader = make_loader(cfg.data.train, build_modalities(cfg.data, train=True), cfg.data, BATCH, rank=0,
                         world_size=1, seed=0, train=True, epochs=1)
    start, n = time.perf_counter(), 0
    for batch in loader:
        n += len(batch)
    return n, time.perf_counter() - start


def throughput(samples: int, repeats: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        urls = make_shards(Path(tmp) / "shards", samples)
        for u in urls:  # warm the page cache
            Path(u).read_bytes()
        rows = []
        for workers in (1, 2):
            times: dict[str, list[float]] = {"webdataset": [], "pretrain.data": []}
            for _ in range(repeats):
                for name in times:
                    n, t = run_webdataset(urls, workers) if name == "webdataset" else run_pipeline(urls, workers, samples)
                    assert n == samples, (name, n)
                    times[name].append(t)
            base = samples / statistics.median(times["webdataset"])
            ours = samples / statistics.median(times["pretrain.data"])
            rows.append({"workers": workers, "webdataset": base, "pretrain.data": ours, "ratio": ours / base,
                         "runs_s": times})
            print(f"workers={workers}: webdataset {base:.0f}/s, pretrain.data {ours:.0f}/s, ratio {ours / base:.2f}",
                  flush=True)
    return rows


def demo_wait(steps: int, workers: int | None = None) -> dict:
    py = sys.executable
    shards = ROOT / "data" / "demo" / "shards"
    if not (shards / "train" / "index.json").is_file() or not (shards / "val" / "index.json").is_file():
        subprocess.run([py, "-m", "data_tools.demo", "--output", "data/demo"], cwd=ROOT, check=True)
        for split in ("train", "val"):
            subprocess.run([py, "-m", "data_tools", "build", "--input", f"data/demo/{split}.jsonl", "--output",
                            f"data/demo/shards/{split}", "--shard-size", "200", "--map", "image=png", "--map",
                            "caption=txt", "--map", "label=cls"], cwd=ROOT, check=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [str(Path(py).parent / "accelerate"), "launch", "--config_file", "configs/accelerate/cpu_2proc.yaml",
               "-m", "pretrain.train", "--config", "configs/quickstart.yaml", f"output_dir={out}",
               f"train.steps={steps}", "eval.enabled=false", "train.checkpoint=false", "train.log_every=25"]
        if workers is not None:
            cmd.append(f"data.train.workers={workers}")
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
        rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    waits = [r["data_wait_fraction"] for r in rows if "data_wait_fraction" in r]
    rates = [r["samples_per_s"] for r in rows if "samples_per_s" in r]
    result = {"steps": steps, "workers": workers, "windows": waits, "mean_all": statistics.mean(waits),
              "mean_after_first": statistics.mean(waits[1:]) if len(waits) > 1 else waits[0],
              "samples_per_s": statistics.median(rates), "wall_s": wall}
    print(f"demo training, {steps} steps, data.train.workers={'config' if workers is None else workers}: data wait {100 * result['mean_all']:.2f}% of step time "
          f"(windows: {', '.join(f'{100 * w:.1f}%' for w in waits)}); {result['samples_per_s']:.0f} samples/s",
          flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=100, help="0: skip the demo training part")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}", flush=True)
    rows = throughput(args.samples, args.repeats)
    print("\n| loader workers | webdataset (samples/s) | pretrain.data (samples/s) | ratio |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['workers']} | {r['webdataset']:.0f} | {r['pretrain.data']:.0f} | {r['ratio']:.2f}x |")
    # the recipe as it is (data.train.workers: 1), then with decoding inside the training processes
    demo = [demo_wait(args.train_steps, w) for w in (None, 0)] if args.train_steps > 0 else None
    if args.json:
        Path(args.json).write_text(json.dumps({"throughput": rows, "demo": demo}, indent=1) + "\n")


if __name__ == "__main__":
    main()
