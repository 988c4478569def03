"""What a checkpoint save costs the training loop, synchronous vs ``train.async_checkpoint`` (issue 31),
on a ~100M-parameter model.

    .venv/bin/python benchmarks/bench_async_checkpoint.py [--layers 24 --width 2048] [--saves 3]

The model is bench_relayout's: a stack of ``--layers`` Linear(width, width) layers (24 x 2048:
100.7M parameters), fp32 AdamW, trained by DeepSpeed engines built as the trainer builds them
(``pretrain.engine.build_engine``, ZeRO-2) on 2 gloo ranks spawned here, one torch thread each (as
torchrun sets it). Each rank alternates: steps with nothing saved (the baseline), then a save with
``pretrain.checkpoint.save`` (the trainer's own function: DeepSpeed's files, this rank's state file,
checksums, COMPLETE), synchronous or with a ``pretrain.checkpoint_writer.BackgroundWriter``, then
steps until the background write is done (and a few more). Measured, per save (the slowest rank):

- ``stall``: seconds the training thread spends in the save: the whole save when synchronous; the
  barriers, DeepSpeed's state dicts and the snapshot (a memcpy of every tensor) when asynchronous,
  plus the wait for it at the next save if it is still in flight then (here: none, the next save
  comes after it is done);
- ``background``: seconds from the save's start to its commit (COMPLETE written) when asynchronous;
- the step time with a background write in flight against the baseline's: what the writer thread
  costs the training ranks on this machine (2 cores shared by 2 ranks, their loader-less steps and
  the 2 writer threads).
Medians over ``--saves`` saves per mode; the machine's load is printed with them.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402


def _engine(layers: int, width: int, world: int):
    from pretrain.config import load_config
    from pretrain.engine import build_engine

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", ["train.zero_stage=2", "train.micro_batch_size=2",
                                                             "train.steps=1000", "train.warmup_steps=1"]).train
    return build_engine(model, cfg, world)


def _step(engine, width: int, i: int) -> float:
    start = time.perf_counter()
    x = torch.randn(2, width, generator=torch.Generator().manual_seed(1000 * dist.get_rank() + i))
    loss = engine.ds(x).square().mean()
    engine.backward(loss)
    engine.step()
    return time.perf_counter() - start


def _slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _worker(rank: int, world: int, port: int, args: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # torchrun's OMP_NUM_THREADS=1: two ranks on two cores
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from pretrain import checkpoint
    from pretrain.checkpoint_writer import BackgroundWriter
    from pretrain.distributed import rng_state

    engine = _engine(args["layers"], args["width"], world)
    ckpt_dir = Path(args["work"]) / "checkpoints"
    writer = BackgroundWriter(engine.ds, rank, world)
    width, i = args["width"], 0
    rows = {"baseline_step_s": [], "sync": [], "async": []}
    for _ in range(2):  # warm-up: the moments exist, the allocator has its blocks
        _step(engine, width, i)
        i += 1
    for s in range(args["saves"]):
        for mode in ("sync", "async"):
            for _ in range(args["steps"]):  # the baseline, between saves (no write in flight)
                rows["baseline_step_s"].append(_slowest(_step(engine, width, i)))
                i += 1
            dist.barrier()
            start = time.perf_counter()
            checkpoint.save(engine.ds, ckpt_dir, i, rank, lambda: {"step": i, "rng": rng_state()}, keep=1,
                            writer=writer if mode == "async" else None)
            stall = _slowest(time.perf_counter() - start)
            in_flight, after = [], []
            while True:  # steps while the background write goes on, then a few more
                busy = _slowest(float(writer.busy)) > 0
                seconds = _slowest(_step(engine, width, i))
                i += 1
                (in_flight if busy else after).append(seconds)
                if not busy and len(after) >= 2:
                    break
            wait_start = time.perf_counter()
            writer.wait()  # (the next save's wait: the write is done by now)
            stall += _slowest(time.perf_counter() - wait_start)
            background = _slowest(writer.last_write) if mode == "async" else 0.0
            copy = _slowest(writer.last_snapshot) if mode == "async" else 0.0
            rows[mode].append({"stall_s": stall, "snapshot_s": copy, "background_s": background,
                               "steps_in_flight": in_flight, "steps_after": after})
            if rank == 0:
                print(f"save {s + 1} {mode}: stall {stall:.2f} s" + (
                    f" (snapshot {copy:.2f} s), background {background:.2f} s over {len(in_flight)} steps "
                    f"(median {statistics.median(in_flight) if in_flight else float('nan'):.2f} s)"
                    if mode == "async" else ""), flush=True)
    folder = checkpoint.latest_complete(ckpt_dir)
    rows["checkpoint_bytes"] = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--saves", type=int, default=3, help="saves per mode (sync and async alternate)")
    parser.add_argument("--steps", type=int, default=4, help="baseline steps before each save")
    parser.add_argument("--dir", type=Path, default=None, help="where the checkpoints go (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    params = args.layers * (args.width * args.width + args.width)
    work = Path(tempfile.mkdtemp(prefix="bench_async_ckpt_", dir=args.dir))
    load_before = os.getloadavg()
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = work / "figures.json"
    cfg = {"work": str(work), "layers": args.layers, "width": args.width, "saves": args.saves, "steps": args.steps}
    try:
        mp.start_processes(_worker, args=(2, port, cfg, str(out)), nprocs=2, start_method="spawn")
        rows = json.loads(out.read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = statistics.median
    base = med(rows["baseline_step_s"])
    sync_stall = med(r["stall_s"] for r in rows["sync"])
    async_stall = med(r["stall_s"] for r in rows["async"])
    background = med(r["background_s"] for r in rows["async"])
    copy = med(r["snapshot_s"] for r in rows["async"])
    in_flight = [s for r in rows["async"] for s in r["steps_in_flight"]]
    after_sync = [s for r in rows["sync"] for s in r["steps_after"]]
    summary = {"params": params, "checkpoint_bytes": rows["checkpoint_bytes"], "baseline_step_s": base,
               "sync_stall_s": sync_stall, "async_stall_s": async_stall, "async_snapshot_s": copy,
               "async_background_s": background,
               "step_in_flight_s": med(in_flight) if in_flight else None, "steps_in_flight": len(in_flight),
               "step_after_sync_s": med(after_sync), "load_before": load_before, "load_after": os.getloadavg()}
    print(f"\n{params / 1e6:.1f}M parameters, fp32 AdamW, ZeRO-2 x 2 gloo ranks; checkpoint "
          f"{rows['checkpoint_bytes'] / 2**20:.0f} MiB; {platform.machine()}, {os.cpu_count()} cores; load "
          f"{load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after; medians of {args.saves} saves per mode")
    print("| what | seconds |\n|---|---|")
    print(f"| step, nothing saved (baseline) | {base:.2f} |")
    print(f"| stall per save, synchronous (the whole save) | {sync_stall:.2f} |")
    print(f"| stall per save, async (state dicts + snapshot) | {async_stall:.2f} |")
    print(f"| ... of which the snapshot (copying every tensor) | {copy:.2f} |")
    print(f"| async: background write, hash, commit | {background:.2f} |")
    if in_flight:
        print(f"| step with a background write in flight ({len(in_flight)} steps) | {med(in_flight):.2f} "
              f"({100 * (med(in_flight) / base - 1):+.0f}% against the baseline) |")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
