"""Data pipeline throughput: ``pretrain.data`` vs plain webdataset on the same shards, and the
share of step time the demo training waits for data; and (``--web224``) ours vs OpenCLIP's own
webdataset pipeline at 224 px on web-like JPEGs.

    .venv/bin/python benchmarks/bench_pipeline.py [--samples 3000] [--repeats 3] [--train-steps 100]
    .venv/bin/python benchmarks/bench_pipeline.py --web224 [--samples 2048] [--repeats 3] [--workers 1,2]
        [--transforms train,eval] [--variants openclip,ours] [--profile] [--tiny]

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

``--web224`` (issue 29): web-like JPEGs as img2dataset writes them at 512 px (``python -m
data_tools.synthetic webimages``: short side 256-512, q90, captions; written once under
``--shards``, default ``runs/bench_web``) through a 224 px image-text pipeline, batches of 256:

- ``openclip``: OpenCLIP's own ``open_clip_train.data.get_wds_dataset`` with its transforms
  (``open_clip.image_transform``: training ``RandomResizedCrop(224, scale=(0.9, 1.0))``, bicubic,
  no flip; evaluation resize of the short side to 224, bicubic, centre crop), OpenAI's mean/std,
  its BPE tokenizer at 77 tokens, its ``WebLoader``; in training its shard and sample shuffles.
- ``ours`` and its named configurations (``ours-float``: the float path without decode-time
  downscaling, as before issue 29; see ``OURS``): ``make_loader`` with the image decoder set the
  same way (training ``augment: {scale: [0.9, 1.0], hflip: 0, color_jitter: null}``, bicubic,
  OpenAI's mean/std; evaluation crop_pct 1), the text decoder with ``tokenizer: open_clip``,
  ``shuffle_buffer: 1000`` in training.

Each run is a fresh process (``--one``), timed from ``iter()`` to the last batch (worker start-up
included); variants, transforms and worker counts interleaved, ``--repeats`` rounds, medians. CPU:
the main process's own CPU time over that span plus each loader worker's (utime + stime from
``/proc/PID/stat``, read at every batch; the workers are children listed in
``/proc/PID/task/*/children``). Reported: samples/s, samples/s per loader worker and samples per
CPU-second of all processes. ``--profile``: where our worker's time goes (cProfile of the same work
in one process, grouped: tar read, JPEG decode, resize/crop, to tensor + normalise, tokenize,
collate), and what handing a batch from a worker to the main process costs (the worker's copy
into shared memory and the main process's receipt, measured apart).
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


# --------------------------------------------------------------------------------- web224 (issue 29)

WEB_SIZE, WEB_BATCH, WEB_CONTEXT = 224, 256, 77
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
# our configurations: image decoder options beside the common ones (size, interpolation, mean, std)
OURS: dict[str, dict] = {
    "ours": {},  # the defaults: uint8 batches (normalised on the device), draft decoding in training
    "ours-nodraft": {"draft": False},  # uint8 batches, JPEGs decoded in full
    "ours-float": {"output": "float", "draft": False},  # the float path without draft: as before issue 29
}
TRAIN_ONLY = {"ours-nodraft"}  # draft is a training option: in evaluation these equal "ours"


def web_shards(folder: Path, samples: int, shard_size: int) -> str:
    """The web-like shards (written once per size under ``folder``); their brace pattern."""
    from data_tools.synthetic import write_webimages

    folder = folder / f"web{samples}_{shard_size}"
    summary = folder / "synthetic.json"
    if not summary.is_file():
        print(f"writing {samples} web-like images to {folder} ...", flush=True)
        write_webimages(folder, samples, shard_size, workers=max(1, (os.cpu_count() or 1)))
    doc = json.loads(summary.read_text())
    print(f"shards: {doc['pattern']}: {doc['samples']} images, short side {doc['short_side']['min']}-"
          f"{doc['short_side']['max']} (median {doc['short_side']['median']:.0f}), {doc['mean_megapixels']:.3f} MP, "
          f"{doc['bytes_per_pixel']:.3f} bytes/pixel, PIL decode {doc.get('decode_ms_per_mpix', float('nan')):.1f} ms/MP",
          flush=True)
    return doc["pattern"]


def _openclip_loader(pattern: str, n: int, batch: int, workers: int, train: bool, size: int):
    from types import SimpleNamespace

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import functools

    import open_clip
    import openclip_launch  # noqa: F401 - its pandas stand-in (open_clip_train.data imports pandas)
    import open_clip_train.data as oc_data

    # webdataset's end-of-file marker, which open_clip_train 3.3 cannot read (see bench_openclip_arch.py)
    oc_data.tar_file_expander = functools.partial(oc_data.tar_file_expander, eof_value=None)
    preprocess = open_clip.image_transform(size, is_train=train, mean=OPENAI_MEAN, std=OPENAI_STD)
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    args = SimpleNamespace(train_data=pattern, val_data=pattern, train_num_samples=n, val_num_samples=n,
                           dataset_resampled=False, train_data_upsampling_factors=None, seed=0, batch_size=batch,
                           workers=workers, world_size=1)
    return oc_data.get_wds_dataset(args, preprocess, is_train=train, epoch=0, tokenizer=tokenizer).dataloader


def _our_cfg(pattern: str, n: int, workers: int, train: bool, size: int, image: dict):
    from pretrain.config import config_from_dict

    opts = {"size": size, "interpolation": "bicubic", "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)}
    if train:
        opts["augment"] = {"scale": [0.9, 1.0], "hflip": 0.0, "color_jitter": None}
    opts.update(image)
    split = {"urls": pattern, "samples": n, "shuffle_buffer": 1000 if train else 0, "workers": workers}
    return config_from_dict({
        "data": {"train": split, "val": split,
                 "modalities": {"image": {"decoder": "image", "options": opts},
                                "text": {"decoder": "text", "options": {"tokenizer": "open_clip"}}},
                 "labels": None, "image_size": size, "context_length": WEB_CONTEXT},
        "eval": {"enabled": False},
    })


def _our_loader(pattern: str, n: int, batch: int, workers: int, train: bool, size: int, image: dict):
    from pretrain.data import build_modalities, make_loader

    cfg = _our_cfg(pattern, n, workers, train, size, image)
    mods = build_modalities(cfg.data, train=train)
    return make_loader(cfg.data.train if train else cfg.data.val, mods, cfg.data, batch, rank=0, world_size=1, seed=0,
                       train=train, epochs=1)


def _cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds (/proc/PID/stat)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def one_run(variant: str, train: bool, workers: int, pattern: str, n: int, batch: int, size: int) -> dict:
    """One pass of one variant in this process: samples, wall time, CPU of this process and of its
    loader workers over that span."""
    import torch  # noqa: F401 - imported before the clock starts

    loader = (_openclip_loader(pattern, n, batch, workers, train, size) if variant == "openclip"
              else _our_loader(pattern, n, batch, workers, train, size, OURS[variant]))
    me = os.getpid()
    before = set(_children(me))  # (in-process runs: an earlier run's persistent workers are not this one's)
    worker_cpu: dict[int, float] = {}
    dtypes = set()
    nbytes = 0
    cpu0, start = time.process_time(), time.perf_counter()
    got = 0
    for b in loader:
        if variant == "openclip":
            images, texts = b
        else:
            images, texts = b.modalities["image"], b.modalities["text"]
        got += images.shape[0]
        nbytes += images.numel() * images.element_size()
        dtypes.add(str(images.dtype))
        for c in set(_children(me)) - before:  # a worker's CPU so far (read at every batch: it exits at the end)
            worker_cpu[c] = max(worker_cpu.get(c, 0.0), _cpu_s(c))
    wall = time.perf_counter() - start
    for c in set(_children(me)) - before:
        worker_cpu[c] = max(worker_cpu.get(c, 0.0), _cpu_s(c))
    main_cpu = time.process_time() - cpu0
    shutdown = getattr(getattr(loader, "_iterator", None), "_shutdown_workers", None)
    if shutdown is not None:  # OpenCLIP's WebLoader keeps its workers (persistent_workers)
        shutdown()
    return {"variant": variant, "transform": "train" if train else "eval", "workers": workers, "samples": got,
            "wall_s": wall, "main_cpu_s": main_cpu, "worker_cpu_s": sum(worker_cpu.values()),
            "worker_processes": len(worker_cpu), "image_dtypes": sorted(dtypes), "image_bytes_per_sample": nbytes / max(got, 1)}


def _spawn_one(variant: str, transform: str, workers: int, pattern: str, n: int, batch: int, size: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", variant, "--transform", transform, "--workers",
           str(workers), "--pattern", pattern, "--samples", str(n), "--batch", str(batch), "--size", str(size)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def web224(args) -> dict:
    import torch

    shards = Path(args.shards)
    n, batch, size = args.samples, args.batch, args.size
    pattern = web_shards(shards, n, args.shard_size)
    variants = args.variants.split(",")
    workers_list = [int(w) for w in args.workers.split(",")]
    transforms = args.transforms.split(",")
    load = os.getloadavg()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}, torch "
          f"{torch.__version__}; load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    runs: list[dict] = []
    for rnd in range(args.repeats):
        for workers in workers_list:
            for transform in transforms:
                order = variants if rnd % 2 == 0 else variants[::-1]  # neither always goes first
                for variant in order:
                    if transform == "eval" and variant in TRAIN_ONLY:
                        continue
                    r = (one_run(variant, transform == "train", workers, pattern, n, batch, size) if args.tiny
                         else _spawn_one(variant, transform, workers, pattern, n, batch, size))  # tiny: in-process
                    r["round"] = rnd
                    r["load1"] = os.getloadavg()[0]
                    runs.append(r)
                    print(f"  round {rnd} {variant:<12} {transform:<5} workers={workers}: {r['samples']} samples in "
                          f"{r['wall_s']:.2f} s, CPU main {r['main_cpu_s']:.2f} s + workers {r['worker_cpu_s']:.2f} s "
                          f"(load {r['load1']:.1f})", flush=True)
    rows = []
    for transform in transforms:
        for workers in workers_list:
            for variant in variants:
                mine = [r for r in runs if (r["variant"], r["transform"], r["workers"]) == (variant, transform, workers)]
                if not mine:
                    continue
                rate = statistics.median(r["samples"] / r["wall_s"] for r in mine)
                per_cpu = statistics.median(r["samples"] / (r["main_cpu_s"] + r["worker_cpu_s"]) for r in mine)
                rows.append({"transform": transform, "workers": workers, "variant": variant, "samples_per_s": rate,
                             "per_worker": rate / workers, "per_cpu_s": per_cpu,
                             "main_cpu_per_sample_ms": 1e3 * statistics.median(r["main_cpu_s"] / r["samples"] for r in mine),
                             "image_bytes_per_sample": mine[0]["image_bytes_per_sample"],
                             "image_dtype": ",".join(mine[0]["image_dtypes"]),
                             "walls": [round(r["wall_s"], 2) for r in mine]})
    base = {(r["transform"], r["workers"]): r for r in rows if r["variant"] == "openclip"}
    print("\n| transform | loader workers | pipeline | samples/s | per worker | per CPU-second | vs OpenCLIP per CPU-s "
          "| main CPU ms/sample | image bytes/sample | runs (s) |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        b = base.get((r["transform"], r["workers"]))
        ratio = f"{r['per_cpu_s'] / b['per_cpu_s']:.2f}x" if b else "-"
        print(f"| {r['transform']} | {r['workers']} | {r['variant']} | {r['samples_per_s']:.0f} | {r['per_worker']:.0f} | "
              f"{r['per_cpu_s']:.0f} | {ratio} | {r['main_cpu_per_sample_ms']:.2f} | {r['image_bytes_per_sample']:.0f} "
              f"({r['image_dtype'].replace('torch.', '')}) | {' '.join(map(str, r['walls']))} |")
    load = os.getloadavg()
    print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    out = {"pattern": pattern, "samples": n, "batch": batch, "size": size, "runs": runs, "rows": rows,
           "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count()}
    if args.profile:
        out["profile"] = profile_ours(pattern, min(n, args.profile_samples), batch, size, args.profile_variant)
    return out


# where the time of our worker goes: cProfile's own time per function, grouped
_GROUPS = (
    ("tar read", ("pretrain/data/tarstream.py", "pretrain/member_names.py", "method 'read' of '_io", "built-in method io.open",
                  "method 'readinto'")),
    ("JPEG decode", ("method 'decode' of 'ImagingDecoder", "ImageFile.py", "JpegImagePlugin.py", "Image.py:open",
                     "method 'draft'", "method 'setimage'", "built-in method PIL._imaging.jpeg_decoder")),
    ("resize / crop", ("method 'resize' of 'ImagingCore", "method 'crop' of 'ImagingCore", "functional_pil.py",
                       "transforms.py:get_params", "timm/data/transforms.py")),
    ("convert / copy", ("method 'convert' of 'ImagingCore", "method 'copy' of 'ImagingCore", "Image.py:convert")),
    ("to tensor + normalise", ("method 'div", "method 'sub", "method 'to' of 'torch", "built-in method torch.as_tensor",
                               "built-in method torch.from_numpy", "method 'permute'", "method 'contiguous'",
                               "method 'tobytes'", "built-in method numpy", "method '__array_interface__'",
                               "Image.py:__array_interface__", "method 'view' of 'torch", "functional.py:to_tensor",
                               "functional.py:pil_to_tensor", "functional.py:normalize", "_functional_tensor.py:normalize",
                               "device_transform")),
    ("tokenize", ("open_clip/tokenizer.py", "ftfy", "method 'sub' of 're.Pattern", "method 'findall'", "html/",
                  "pretrain/tokenizer.py", "regex")),
    ("collate", ("pipeline.py:collate", "built-in method torch.stack", "method 'share_memory_'", "_new_shared")),
)


def _group(key: tuple) -> str:
    filename, _, func = key
    where = f"{filename}:{func}"
    for name, needles in _GROUPS:
        if any(needle in where for needle in needles):
            return name
    return "other (Python glue, shuffle, state)"


def profile_ours(pattern: str, n: int, batch: int, size: int, variants: str) -> dict:
    """cProfile of our loader's work in this process (workers: 0), grouped; and the cost of handing a
    batch from a worker to the main process."""
    import cProfile
    import pstats

    import torch

    result = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker (torch sets 1 there)
    for variant, transform in [(v, t) for v in variants.split(",") for t in ("train", "eval")]:
        # the same work without the profiler first: its CPU time per sample (cProfile's own cost falls on
        # the Python-level calls, so their share below is an upper bound)
        loader = _our_loader(pattern, n, batch, 0, transform == "train", size, OURS[variant])
        c0, plain = time.process_time(), 0
        for b in loader:
            plain += len(b)
            if plain >= n:
                break
        loader.close()
        plain_ms = 1e3 * (time.process_time() - c0) / plain
        loader = _our_loader(pattern, n, batch, 0, transform == "train", size, OURS[variant])
        prof = cProfile.Profile(time.process_time)  # CPU time: the machine is shared
        start = time.process_time()
        prof.enable()
        got = 0
        for b in loader:
            got += len(b)
            last = b
            if got >= n:
                break
        prof.disable()
        loader.close()
        wall = time.process_time() - start
        stats = pstats.Stats(prof)
        groups: dict[str, float] = {}
        for key, (cc, nc, tt, ct, callers) in stats.stats.items():
            g = _group(key)
            groups[g] = groups.get(g, 0.0) + tt
        total = sum(groups.values())
        # worker -> main: the batch must end up in shared memory. Stacked, then copied there as the
        # DataLoader does for a plain tensor (before issue 29; webdataset's batched, OpenCLIP's, too), or
        # stacked straight into shared memory (ours since: as torch's default_collate); then pickled as a
        # handle and mapped by the main process. Measured on the last batch's rows.
        from multiprocessing.reduction import ForkingPickler

        reps = 5
        times = {"stack, then copy into shared memory": 0.0, "stack into shared memory": 0.0,
                 "pickle + map (both sides)": 0.0}
        for _ in range(reps):
            for x in last.modalities.values():
                rows = list(x)
                t0 = time.process_time()
                torch.stack(rows).share_memory_()
                t1 = time.process_time()
                out = x.new(x._typed_storage()._new_shared(x.numel(), device=x.device)).resize_(x.shape)
                torch.stack(rows, out=out)
                t2 = time.process_time()
                ForkingPickler.loads(bytes(ForkingPickler.dumps(out)))
                t3 = time.process_time()
                for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                    times[k] += v
        mods = last.modalities
        per = 1e3 / got
        result[f"{variant} {transform}"] = {
            "samples": got, "cpu_ms_per_sample": wall * per, "cpu_ms_per_sample_unprofiled": plain_ms,
            "ms_per_sample": {g: v * per for g, v in sorted(groups.items(), key=lambda kv: -kv[1])},
            "profiled_ms_per_sample": total * per,
            "transfer_ms_per_sample": {k: v * 1e3 / reps / len(last) for k, v in times.items()},
            "image_bytes_per_sample": mods["image"][0].numel() * mods["image"].element_size(),
        }
        print(f"\nwhere our worker's time goes ({variant}, {transform}, {got} samples, cProfile's own time per "
              f"function, CPU time; {wall * per:.2f} ms/sample in all under the profiler, {plain_ms:.2f} without it):")
        for g, v in result[f"{variant} {transform}"]["ms_per_sample"].items():
            print(f"  {g:<36} {v:6.3f} ms/sample ({100 * v / (total * per):4.1f}%)")
        for g, v in result[f"{variant} {transform}"]["transfer_ms_per_sample"].items():
            print(f"  worker -> main: {g:<38} {v:6.3f} ms/sample")
    torch.set_num_threads(threads)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=None, help="default 3000 (issue 5), 2048 (--web224)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=100, help="0: skip the demo training part")
    parser.add_argument("--json", help="also write the figures to this file")
    web = parser.add_argument_group("--web224 (issue 29)")
    web.add_argument("--web224", action="store_true", help="ours vs OpenCLIP's pipeline at 224 px on web-like JPEGs")
    web.add_argument("--variants", default="openclip,ours-float,ours-nodraft,ours",
                     help=f"openclip and any of {', '.join(OURS)}")
    web.add_argument("--workers", default="1,2", help="loader worker counts")
    web.add_argument("--transforms", default="train,eval")
    web.add_argument("--batch", type=int, default=WEB_BATCH)
    web.add_argument("--size", type=int, default=WEB_SIZE)
    web.add_argument("--shard-size", type=int, default=256)
    web.add_argument("--shards", default=str(ROOT / "runs" / "bench_web"), help="folder the shards are written to once")
    web.add_argument("--profile", action="store_true", help="also profile our worker (where the time goes)")
    web.add_argument("--profile-samples", type=int, default=1024)
    web.add_argument("--profile-variant", default="ours-float,ours", help="our configurations to profile")
    web.add_argument("--tiny", action="store_true", help="a few small batches, one round (the test suite)")
    web.add_argument("--one", help=argparse.SUPPRESS)
    web.add_argument("--transform", help=argparse.SUPPRESS)
    web.add_argument("--pattern", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(args.one, args.transform == "train", int(args.workers), args.pattern, args.samples,
                                 args.batch, args.size)))
        return
    if args.web224:
        if args.tiny:  # the test suite: two runs of a few small batches
            args.samples, args.batch, args.shard_size, args.repeats = 32, 8, 8, 1
            args.profile_samples, args.workers, args.transforms, args.variants = 16, "1", "train", "openclip,ours"
        args.samples = args.samples or 2048
        out = web224(args)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        return
    args.samples = args.samples or 3000
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
