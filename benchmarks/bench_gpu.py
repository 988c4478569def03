"""Training throughput on a GPU: our trainer on OpenCLIP's ViT-B/16 in bf16, and OpenCLIP's own
trainer at the same settings beside it.

    python benchmarks/bench_gpu.py [--steps 60] [--warmup 10] [--micro-batch 256] [--out DIR]
    python benchmarks/bench_gpu.py --tiny          # CPU, a tiny OpenCLIP config: the test suite runs it

Runs ``torch.distributed.run`` with one process per visible GPU (one on CPU). Ours: the trainer of
``pretrain.trainer`` (DeepSpeed, ``train.zero_stage`` 1), towers ``open_clip_image`` /
``open_clip_text`` of ``--model`` with ``head: none``, OpenCLIP's tokenizer and preprocessing,
bf16, micro-batch ``--micro-batch`` per GPU, two data sources in turn:

- ``synthetic``: in-memory batches of random pixels (uint8, as the loader gives them: normalised on
  the device by the image decoder's device transform) and token ids handed straight to the loop
  (the model, loss, optimizer and engine alone);
- ``shards``: web-like JPEG shards as img2dataset writes them at 512 px (``python -m
  data_tools.synthetic webimages``, written here on the machine: the carried tree is capped), read
  and decoded by our pipeline with ``--workers`` loader processes per GPU (default: cores - 2 over
  the GPUs) and OpenCLIP's training augmentation (random resized crop, scale 0.9-1, bicubic).

Then a data-only run per decode path (``data``: JPEGs decoded on the CPU by the loader workers;
``data_gpu_decode``: the image decoder's ``gpu_decode``, JPEGs decoded on the GPU, where CUDA is):
the same loader and shards, every batch taken to the device as the step takes it (uint8 pixels
normalised there), no model: the samples/s the input pipeline alone sustains, and per loader worker.

For each: samples/s and step time over the steps after ``--warmup``, MFU and TFLOP/s per device (the
first step's FLOPs counted by PyTorch's FLOP counter, over the device's datasheet peak), the share
of time waiting for data, peak GPU memory. With open_clip_train importable, OpenCLIP's trainer runs
the same model, batch, precision and steps on its synthetic dataset (``--dataset-type synthetic``)
for the ratio. Figures go to ``OUT/bench_gpu.json`` and a table on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY_CONFIG = {"embed_dim": 16,
               "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
               "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


# ----------------------------------------------------------------------------------------- worker


def _synthetic_batches(modalities, micro_batch: int, seed: int):
    """Endless in-memory batches shaped as the decoders' outputs (pinned where a GPU is)."""
    import torch

    from pretrain.data import Batch

    g = torch.Generator().manual_seed(seed)
    image, text = modalities["image"].decoder, modalities["text"].decoder
    if image.dtype == torch.uint8:  # what the loader gives: the step normalises on the device
        pixels = torch.randint(0, 256, (micro_batch, *image.output_shape), generator=g, dtype=torch.uint8)
    else:
        pixels = torch.randn(micro_batch, *image.output_shape, generator=g)
    ids = torch.randint(3, 5000, (micro_batch, *text.output_shape), generator=g)
    ids[:, -1] = text.tokenizer.pad_id
    masks = {"image": torch.ones(micro_batch, dtype=torch.bool), "text": torch.ones(micro_batch, dtype=torch.bool)}
    batch = Batch({"image": pixels, "text": ids}, masks, [f"s{i}" for i in range(micro_batch)])
    if torch.cuda.is_available():
        batch = batch.pin_memory()
    while True:
        yield batch


def worker(args) -> None:
    """One rank: build the trainer from the recipe, optionally swap its data for synthetic batches,
    train, and (rank 0) write the figures."""
    import torch

    from pretrain.config import load_config
    from pretrain.data import build_modalities
    from pretrain.trainer import Trainer

    cfg = load_config(args.recipe, args.override)
    trainer = Trainer(cfg)
    if args.source == "synthetic":
        trainer.batches = _synthetic_batches(build_modalities(cfg.data, train=True), cfg.train.micro_batch_size,
                                             cfg.train.seed + trainer.rank)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    if trainer.rank == 0:
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        Path(args.result).write_text(json.dumps({"peak_gib": peak}))


# ------------------------------------------------------------------------------------------ driver


def _recipe(args, out: Path, urls: str, model_config: str | None) -> list[str]:
    tiny = args.tiny
    model = "tiny_bench" if tiny else args.model
    opts = {"model": model, **({"model_config": model_config} if model_config else {})}
    towers = {"image": {"type": "open_clip_image", "options": opts, "head": "none"},
              "text": {"type": "open_clip_text", "options": opts, "head": "none"}}
    import open_clip

    if model_config:
        open_clip.add_model_config(model_config)
    oc = open_clip.get_model_config(model)
    return [
        f"output_dir={out}", f"data.train.urls={urls}", "data.val.urls=", "data.labels=null",
        "data.train.shuffle_buffer=256", f"data.train.workers={args.workers}",
        f"data.context_length={oc['text_cfg']['context_length']}",
        "data.modalities={image: {decoder: image, options: {size: %d, interpolation: bicubic, augment: %s}}, "
        "text: {decoder: text, options: {tokenizer: open_clip}}}" % (oc["vision_cfg"]["image_size"], AUGMENT),
        f"model.towers={json.dumps(towers)}", f"model.embed_dim={oc['embed_dim']}",
        f"train.steps={args.steps}", f"train.micro_batch_size={args.micro_batch}", "train.warmup_steps=2",
        f"train.log_every={args.warmup}", f"train.precision={'fp32' if tiny else 'bf16'}",
        f"train.zero_stage={args.zero_stage}", "train.checkpoint=false", "eval.enabled=false",
        "eval.classnames=[]",
    ] + ([f"train.peak_tflops={args.peak_tflops}"] if args.peak_tflops else [])


AUGMENT = "{scale: [0.9, 1.0], hflip: 0.0, color_jitter: null}"  # OpenCLIP's image_train (bicubic)


def _shards(folder: Path, n: int, tiny: bool) -> tuple[str, dict]:
    """``n`` web-like JPEGs with captions (``data_tools.synthetic webimages``: img2dataset's output at
    512 px; in the tiny mode 48-64 px), written once with every core; (brace pattern, summary)."""
    from data_tools.synthetic import write_webimages

    if not (folder / "synthetic.json").is_file():
        size, low = (64, 48) if tiny else (512, 256)
        write_webimages(folder, n, shard_size=64 if tiny else 256, workers=os.cpu_count() or 1, size=size,
                        min_side=low, measure=not tiny)
    summary = json.loads((folder / "synthetic.json").read_text())
    return summary["pattern"], summary


def data_only(args, urls: str, gpu_decode: bool, size: int, model_config: str | None) -> dict:
    """The training loader alone: every batch taken to the device as the step takes it (each
    modality finished by its decoder's device transform), no model; samples/s after ``--warmup``
    batches, for at most ``--data-seconds``."""
    import torch

    from pretrain.config import load_config
    from pretrain.data import build_modalities, make_loader
    from pretrain.data.decoders import to_device

    recipe = _recipe(args, Path("unused"), urls, model_config) + [
        f"data.modalities.image.options.gpu_decode={str(gpu_decode).lower()}", f"data.image_size={size}"]
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [r for r in recipe if not r.startswith("model.")])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mods = build_modalities(cfg.data, train=True)
    transforms = mods.device_transforms()
    loader = make_loader(cfg.data.train, mods, cfg.data, args.micro_batch, 0, 1, 0, train=True)
    start, n, batches = time.perf_counter(), 0, 0
    t0 = None
    for batch in loader:
        inputs = {m: to_device(x, device, torch.bfloat16 if device.type == "cuda" else torch.float32,
                               transforms.get(m), None if cfg.data.modalities[m].required else batch.masks.get(m))
                  for m, x in batch.modalities.items()}
        batches += 1
        if batches == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0, n = time.perf_counter(), 0
        elif t0 is not None:
            n += len(batch)
        if t0 is not None and (time.perf_counter() - t0 > args.data_seconds or batches >= args.warmup + args.steps):
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - (t0 if t0 is not None else start)
    loader.close()
    dec = mods["image"].decoder
    rate = n / wall if n else None
    return {"samples_per_s": rate, "per_worker": rate / max(1, args.workers) if rate else None,
            "workers": args.workers, "batches": batches, "image_dtype": str(inputs["image"].dtype),
            "decode": "gpu" if dec.device_decode is not None else "cpu"}


def _figures(run: Path, warmup: int) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r and r["step"] > warmup]
    if not rows:
        return {}

    def med(key):
        vals = [r[key] for r in rows if key in r]
        return statistics.median(vals) if vals else None

    sps = med("samples_per_s")
    return {"samples_per_s": sps, "mfu": med("mfu"), "tflops_per_device": med("tflops_per_device"),
            "data_wait_fraction": med("data_wait_fraction"), "loss_last": rows[-1]["loss"]}


def _launch(nproc: int, argv: list[str], env: dict, timeout: int) -> subprocess.CompletedProcess:
    from pretrain.distributed import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", *argv]
    # a session of its own: past the timeout the launcher and its workers all end (a worker left
    # behind would hold the GPU through the next run); the run counts as failed, the others go on
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err += f"\nbench_gpu: timed out after {timeout} s; the launcher and its workers were killed"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _openclip(args, nproc: int, work: Path, model_config: str | None, env: dict) -> dict:
    """OpenCLIP's trainer on its synthetic dataset at the same settings: samples/s from its log."""
    try:
        import open_clip_train  # noqa: F401
    except ImportError:
        return {"skipped": "open_clip_train is not importable"}
    logs = work / "openclip_logs"
    argv = ["--", str(ROOT / "benchmarks" / "openclip_launch.py"), "--model", "tiny_bench" if args.tiny else args.model,
            "--dataset-type", "synthetic", "--train-num-samples", str(args.steps * args.micro_batch * nproc),
            "--batch-size", str(args.micro_batch), "--epochs", "1", "--precision", "fp32" if args.tiny else "amp_bf16",
            "--lr", "5e-4", "--wd", "0.2", "--warmup", "2", "--workers", str(args.workers), "--logs", str(logs),
            "--log-every-n-steps", "1", "--local-loss", "--gather-with-grad", "--save-frequency", "0"]
    if args.tiny:
        argv += ["--device", "cpu", "--dist-backend", "gloo"]
    proc = _launch(nproc, argv, {**env, "OPENCLIP_MODEL_CONFIG": model_config or ""}, args.timeout)
    if proc.returncode != 0:
        return {"failed": proc.stderr[-2000:]}
    times = []
    for log in logs.glob("*/out.log"):
        for line in log.read_text().splitlines():
            if "Batch (t):" in line:
                times.append(float(line.split("Batch (t):")[1].split(",")[0].strip().split()[0]))
    times = times[args.warmup:]
    if not times:
        return {"failed": "no step times in its log"}
    step = statistics.median(times)
    return {"samples_per_s": args.micro_batch * nproc / step, "step_time_s": step}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the figures (and the log interval)")
    parser.add_argument("--micro-batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=0, help="loader processes per GPU (default: cores - 2 over the GPUs)")
    parser.add_argument("--data-seconds", type=float, default=45.0, help="at most this long per data-only run")
    parser.add_argument("--zero-stage", type=int, default=1)
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="the device's peak (0: its datasheet's)")
    parser.add_argument("--sources", default="synthetic,shards,data,data_gpu_decode")
    parser.add_argument("--no-openclip", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="CPU, a tiny config, a few steps (the test suite)")
    parser.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "runs" / "bench_gpu")))
    parser.add_argument("--timeout", type=int, default=540)
    # a rank of the launched job
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--recipe", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--override", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    import torch

    nproc = max(1, torch.cuda.device_count()) if not args.tiny else 1
    if args.tiny:
        args.steps, args.warmup, args.micro_batch, args.workers = 6, 2, 4, 0
    elif args.workers <= 0:
        args.workers = max(1, ((os.cpu_count() or 1) - 2) // nproc)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:  # shards and runs; the figures go to --out
        return _measure(args, out, nproc, Path(tmp))


def _measure(args, out: Path, nproc: int, work: Path) -> int:
    import torch

    model_config = None
    if args.tiny:
        model_config = str(work / "tiny_bench.json")
        Path(model_config).write_text(json.dumps(TINY_CONFIG))
    size = TINY_CONFIG["vision_cfg"]["image_size"] if args.tiny else 224
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4")}
    results = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "gpus": nproc,
               "model": "tiny" if args.tiny else args.model, "micro_batch": args.micro_batch, "steps": args.steps,
               "warmup": args.warmup, "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
               "workers": args.workers, "runs": {}}
    t0 = time.perf_counter()
    # enough for the steps, up to 8192 (the loader goes on into further epochs)
    urls, summary = _shards(work / "shards", min(max(args.steps * args.micro_batch * nproc, 256), 8192), args.tiny)
    results["shards"] = {k: summary.get(k) for k in ("samples", "shards", "mean_megapixels", "bytes_per_pixel",
                                                     "decode_ms_per_mpix", "short_side")}
    results["shards"]["written_s"] = time.perf_counter() - t0
    print(f"shards: {summary['samples']} web-like JPEGs written in {results['shards']['written_s']:.0f} s "
          f"({summary['bytes_per_pixel']:.3f} bytes/pixel)", flush=True)
    for source in args.sources.split(","):
        if source.startswith("data"):
            try:
                results["runs"][source] = data_only(args, urls, source == "data_gpu_decode", size, model_config)
            except Exception as err:  # noqa: BLE001 - the call goes on to the next run
                results["runs"][source] = {"failed": f"{type(err).__name__}: {err}"}
            (out / "bench_gpu.json").write_text(json.dumps(results, indent=1) + "\n")
            continue
        run = work / f"ours_{source}"
        result = work / f"ours_{source}.json"
        recipe = _recipe(args, run, urls, model_config)
        worker_argv = [str(Path(__file__).resolve()), "--worker", "--source", source, "--recipe",
                       str(ROOT / "configs" / "quickstart.yaml"), "--result", str(result)]
        for o in recipe:
            worker_argv += ["--override", o]
        t0 = time.perf_counter()
        proc = _launch(nproc, worker_argv, env, args.timeout)
        if proc.returncode != 0:
            results["runs"][f"ours_{source}"] = {"failed": proc.stderr[-3000:]}
        else:
            figures = _figures(run, args.warmup)
            figures.update(json.loads(result.read_text()), wall_s=time.perf_counter() - t0)
            if figures.get("samples_per_s"):
                figures["step_time_s"] = args.micro_batch * nproc / figures["samples_per_s"]
            results["runs"][f"ours_{source}"] = figures
        # after each run: a device call cut off at its limit still brings back the runs done
        (out / "bench_gpu.json").write_text(json.dumps(results, indent=1) + "\n")
    if not args.no_openclip:
        results["runs"]["openclip_synthetic"] = _openclip(args, nproc, work, model_config, env)
    ours, theirs = results["runs"].get("ours_synthetic", {}), results["runs"]["openclip_synthetic"] \
        if "openclip_synthetic" in results["runs"] else {}
    if ours.get("samples_per_s") and theirs.get("samples_per_s"):
        results["ratio_vs_openclip"] = ours["samples_per_s"] / theirs["samples_per_s"]
    (out / "bench_gpu.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"{'run':<22} {'samples/s':>10} {'step s':>8} {'MFU':>6} {'TFLOP/s':>8} {'data wait':>9} {'peak GiB':>8}"
          f"   (loader workers per GPU: {args.workers})")
    for name, r in results["runs"].items():
        if "samples_per_s" not in r:
            print(f"{name:<22} {str(r)[:100]}")
            continue
        f = lambda v, fmt: format(v, fmt) if isinstance(v, (int, float)) else "-"  # noqa: E731
        print(f"{name:<22} {f(r['samples_per_s'], '10.1f')} {f(r.get('step_time_s'), '8.3f')} "
              f"{f(r.get('mfu'), '6.1%')} {f(r.get('tflops_per_device'), '8.1f')} "
              f"{f(r.get('data_wait_fraction'), '9.1%')} {f(r.get('peak_gib'), '8.2f')}")
    if "ratio_vs_openclip" in results:
        print(f"ours / OpenCLIP (synthetic): {results['ratio_vs_openclip']:.2f}x")
    print(f"figures: {out / 'bench_gpu.json'}")
    return 0 if all("failed" not in r for r in results["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
