"""Loss-layer benchmark: forward+backward time and peak memory, side by side in one run.

    python benchmarks/bench_losses.py clip     # ours vs open_clip ClipLoss(local_loss, gather_with_grad), W=2 gloo
    python benchmarks/bench_losses.py symile   # ours vs symile.Symile("n_squared"), M=3, one process

Peak memory is the rise of the process's resident high-water mark (VmHWM, reset through
/proc/self/clear_refs before each measurement) over its resident size just before the step, so
it counts what the step allocates. The script re-executes itself with a fixed glibc mmap threshold
(MALLOC_MMAP_THRESHOLD_=65536) and trims the heap before each step, so freed tensors go back to the
OS and one implementation's freed pages cannot hide the next one's peak. Implementations alternate
within each repetition, and which goes first alternates between repetitions; medians.
Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.distributed import close_distributed, free_port, init_distributed  # noqa: E402
from pretrain.losses import build_loss  # noqa: E402

MiB = 1 << 20


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _trim() -> None:
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure(fn) -> tuple[float, float]:
    """(seconds, peak MiB above the resident size before) of one call of fn."""
    _trim()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    return seconds, (_status_kib("VmHWM") - before) / 1024


# ---------------------------------------------------------------------------------------------
# CLIP vs open_clip on W gloo ranks
# ---------------------------------------------------------------------------------------------


def _clip_worker(rank, world, port, sizes, dim, reps, out_path):
    torch.set_num_threads(1)
    init_distributed(rank, world, port, cpu=True)
    from open_clip.loss import ClipLoss as OpenClipLoss

    ours = build_loss({"name": "clip"})
    ref = OpenClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    rows = []
    for b in sizes:
        g = torch.Generator().manual_seed(rank)
        img = F.normalize(torch.randn(b, dim, generator=g), dim=-1)
        txt = F.normalize(torch.randn(b, dim, generator=g), dim=-1)
        scale = torch.tensor([14.3])

        def step(which):
            i, t, s = img.clone().requires_grad_(True), txt.clone().requires_grad_(True), scale.clone().requires_grad_(True)
            dist.barrier()
            if which == "ours":
                loss = ours({"image": i, "text": t}, s)["loss"]
            else:
                loss = ref(i, t, s)
            loss.backward()
            dist.barrier()

        results = {"ours": [], "open_clip": []}
        for which in results:  # warm-up
            step(which)
        for rep in range(reps):
            order = list(results) if rep % 2 == 0 else list(results)[::-1]  # who goes first alternates
            for which in order:
                results[which].append(measure(lambda: step(which)))
        med = {k: (statistics.median(v[0] for v in vals), statistics.median(v[1] for v in vals))
               for k, vals in results.items()}
        rows.append((b, med))
    torch.save(rows, f"{out_path}.{rank}")
    close_distributed()


def bench_clip(args) -> None:
    import tempfile

    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:  # each rank's rows
        path = Path(tmp) / "clip"
        mp.spawn(_clip_worker, args=(args.world, port, args.sizes, args.dim, args.reps, str(path)), nprocs=args.world)
        per_rank = [torch.load(f"{path}.{r}") for r in range(args.world)]
    print(f"\nCLIP fwd+bwd, W={args.world} gloo ranks x 1 thread, d={args.dim}, fp32, median of {args.reps} "
          f"(time: slowest rank; memory: largest rank)\n")
    print("| B_local | ours s | open_clip s | time ratio | ours peak MiB | open_clip peak MiB | memory ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for i, b in enumerate(args.sizes):
        t = {k: max(r[i][1][k][0] for r in per_rank) for k in ("ours", "open_clip")}
        m = {k: max(r[i][1][k][1] for r in per_rank) for k in ("ours", "open_clip")}
        print(f"| {b} | {t['ours']:.3f} | {t['open_clip']:.3f} | {t['ours'] / t['open_clip']:.2f}x | "
              f"{m['ours']:.0f} | {m['open_clip']:.0f} | {m['ours'] / max(m['open_clip'], 1e-9):.2f}x |")


# ---------------------------------------------------------------------------------------------
# Symile n_squared vs the symile package, one process
# ---------------------------------------------------------------------------------------------


def bench_symile(args) -> None:
    import symile

    ours = build_loss({"name": "symile", "negative_sampling": "n_squared"})
    ref = symile.Symile(negative_sampling="n_squared")
    print(f"\nSymile n_squared fwd+bwd, M=3, d={args.dim}, fp32, one process x {torch.get_num_threads()} threads\n")
    print("| B | ours s | package s | time ratio | ours peak MiB | package peak MiB | memory ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for b in args.sizes:
        g = torch.Generator().manual_seed(0)
        feats = [F.normalize(torch.randn(b, args.dim, generator=g), dim=-1) for _ in range(3)]
        scale = torch.tensor([10.0])

        def step(which):
            leaves = [f.clone().requires_grad_(True) for f in feats]
            s = scale.clone().requires_grad_(True)
            if which == "ours":
                loss = ours(dict(zip("abc", leaves)), s)["loss"]
            else:
                loss = ref(leaves, s)
            loss.backward()

        run_ref = b <= args.package_max
        res = {"ours": measure(lambda: step("ours"))}
        if run_ref:
            res["package"] = measure(lambda: step("package"))
        o_t, o_m = res["ours"]
        if run_ref:
            p_t, p_m = res["package"]
            print(f"| {b} | {o_t:.2f} | {p_t:.2f} | {o_t / p_t:.2f}x | {o_m:.0f} | {p_m:.0f} | {o_m / p_m:.3f}x |")
        else:
            print(f"| {b} | {o_t:.2f} | not run | - | {o_m:.0f} | not run (needs ~30 GiB) | - |")
        sys.stdout.flush()


def main() -> None:
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="which", required=True)
    c = sub.add_parser("clip")
    c.add_argument("--world", type=int, default=2)
    c.add_argument("--dim", type=int, default=512)
    c.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096])
    c.add_argument("--reps", type=int, default=5)
    s = sub.add_parser("symile")
    s.add_argument("--dim", type=int, default=256)
    s.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512, 1024])
    s.add_argument("--package-max", type=int, default=512, help="largest B to run the package at")
    args = parser.parse_args()
    bench_clip(args) if args.which == "clip" else bench_symile(args)


if __name__ == "__main__":
    main()
