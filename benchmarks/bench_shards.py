"""Shard building throughput: ``data_tools`` build vs a plain loop feeding webdataset's ShardWriter.

    .venv/bin/python benchmarks/bench_shards.py [--samples 8000] [--repeats 3]

Workload: image+text samples (256x256 JPEGs of about 15 KB, one caption each) listed in a JSONL
manifest; no re-encoding. Every variant reads the same manifest and files (the page cache is warmed
first) and writes 1000-sample shards to a fresh folder:

- ``plain loop``: ``json.loads`` each line, read the image, ``ShardWriter.write({"jpg", "txt"})``.
- ``build, N proc``: ``build_shards(..., workers=N)``, with the default fast decode check of every
  image (JPEG marker walk through end-of-image) and with ``--no-decode-check``; includes reading the
  manifest, planning, worker start-up, index/sizes/failures files.

Prints samples/s (median and best of the repeats, runs interleaved) and the ratios to the plain loop.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset  # imported before any timing
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_tools.build import build_shards  # noqa: E402
from data_tools.members import Processing  # noqa: E402


def make_dataset(folder: Path, n: int, side: int = 256, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    manifest = folder / "manifest.jsonl"
    with open(manifest, "w") as f:
        for i in range(n):
            a, b, c = rng.uniform(0, 255, 3)
            img = np.stack([a * xx + (255 - a) * yy, b * yy, c * (1 - xx)], -1)
            img += rng.normal(0, 6, img.shape)
            rel = f"images/{i:07d}.jpg"
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / rel, quality=85)
            f.write(json.dumps({"key": f"{i:07d}", "image": rel, "caption": f"a synthetic gradient, number {i}"}) + "\n")
    return manifest


def plain_loop(manifest: Path, out: Path, shard_size: int) -> int:
    base = manifest.parent
    n = 0
    with webdataset.ShardWriter(str(out / "plain-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
        with open(manifest) as lines:
            for line in lines:
                row = json.loads(line)
                with open(base / row["image"], "rb") as f:
                    image = f.read()
                sink.write({"__key__": row["key"], "jpg": image, "txt": row["caption"]})
                n += 1
    return n


def ours(manifest: Path, out: Path, shard_size: int, workers: int, check: bool) -> int:
    index = build_shards(manifest, out, shard_size=shard_size, mapping={"image": "jpg", "caption": "txt"},
                         workers=workers, progress=False,
                         processing=Processing(decode_check="fast" if check else "off"))
    return index["total_samples"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=8000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--workdir", help="where to put the data (default: a temporary folder)")
    args = ap.parse_args()
    tmp = Path(args.workdir or tempfile.mkdtemp(prefix="bench_shards_"))
    t0 = time.perf_counter()
    manifest = make_dataset(tmp / "raw", args.samples)
    files = sorted((tmp / "raw" / "images").iterdir())
    total_bytes = sum(p.stat().st_size for p in files)
    for p in files:  # warm the page cache
        p.read_bytes()
    print(f"dataset: {args.samples} JPEG+caption samples, {total_bytes / args.samples / 1024:.1f} KiB per image "
          f"(made in {time.perf_counter() - t0:.1f} s)")

    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    variants = {
        "plain loop (webdataset.ShardWriter)": lambda out: plain_loop(manifest, out, args.shard_size),
        "build, 1 proc": lambda out: ours(manifest, out, args.shard_size, 1, True),
        "build, 2 proc": lambda out: ours(manifest, out, args.shard_size, 2, True),
        "build, 1 proc, --no-decode-check": lambda out: ours(manifest, out, args.shard_size, 1, False),
        "build, 2 proc, --no-decode-check": lambda out: ours(manifest, out, args.shard_size, 2, False),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(args.repeats):
        for name, fn in variants.items():
            out = tmp / f"out-{rep}-{len(times[name])}-{abs(hash(name))}"
            out.mkdir()
            t = time.perf_counter()
            n = fn(out)
            times[name].append(time.perf_counter() - t)
            assert n == args.samples, (name, n)
            shutil.rmtree(out)
    plain = times["plain loop (webdataset.ShardWriter)"]
    base_med, base_best = args.samples / statistics.median(plain), args.samples / min(plain)
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
          f"load average before: {load_before}")
    print(f"{'variant':<36} {'samples/s':>10} {'vs plain':>9} {'best':>8} {'vs plain':>9}   all runs (s)")
    for name, ts in times.items():
        med, best = args.samples / statistics.median(ts), args.samples / min(ts)
        print(f"{name:<36} {med:>10,.0f} {med / base_med:>8.2f}x {best:>8,.0f} {best / base_best:>8.2f}x   "
              f"{' '.join(f'{t:.2f}' for t in ts)}")
    print(f"(samples/s: median of {args.repeats} interleaved runs; best: the fastest run of each)")
    if not args.workdir:
        shutil.rmtree(tmp)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
