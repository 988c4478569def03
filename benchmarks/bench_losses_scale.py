"""The loss layer alone on W = 2, 4, 8, 16 gloo processes: time per step in collectives and in
compute, CPU time per rank, and how they grow with W at a fixed per-rank batch.

    python benchmarks/bench_losses_scale.py [--worlds 2 4 8 16] [--batch 128] [--dim 256]
                                            [--steps 8] [--warmup 2] [--rounds 3] [--json PATH]

No loader, no model, no trainer: each rank holds fp32 L2-normalised features (leaves with
gradient) and runs forward + backward of each objective as the trainer's step calls it (``sizes``
given, so no collective learns the batch sizes; the finiteness check off, as the step guards it):

- ``clip`` (M = 2), ``siglip`` with ``exchange: all_gather`` and with ``exchange: ring`` (M = 2),
  ``symile`` with ``negative_sampling: n`` (M = 3; ``n_squared`` costs B x N^(M-1) per rank and is
  left out of a sweep in W).

Each world is one group of W processes with 1 thread each, forked from a forkserver that has
imported torch and the loss layer. Each step starts at a barrier; a rank's step time runs from
there to the end of its backward. The layer's collectives (the flat all-gather, the
reduce-scatter of its backward, the ring's neighbour exchanges) are wrapped, so each rank also
records the wall time spent inside them (its transfer plus any wait for slower ranks), the CPU time
the process spent meanwhile (``time.process_time``: every thread, gloo's included), and the bytes
it received. Per step: the step time is the slowest rank's; collective and compute time (step
minus collectives), CPU time and bytes are means over ranks. Objectives rotate within each step;
worlds run in ascending then descending order in alternate rounds; the first ``--warmup`` steps
of each group are dropped; figures are medians over the remaining steps of all rounds.

On a machine with fewer cores than W the processes share cores: wall times then measure
oversubscription as much as scaling (``wall / CPU`` is about W / cores), while CPU time per rank
is what a rank would spend with a core of its own.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pretrain.distributed as pdist  # noqa: E402
import pretrain.losses.gather as gather  # noqa: E402
from pretrain.distributed import close_distributed, free_port, init_distributed  # noqa: E402
from pretrain.losses import build_loss  # noqa: E402

OBJECTIVES = {  # label -> (loss options, modalities)
    "clip": ({"name": "clip"}, 2),
    "siglip all_gather": ({"name": "siglip", "exchange": "all_gather"}, 2),
    "siglip ring": ({"name": "siglip", "exchange": "ring"}, 2),
    "symile n": ({"name": "symile", "negative_sampling": "n"}, 3),
}
MiB = 1 << 20


class CollectiveClock:
    """Wraps the loss layer's collectives where it calls them: wall time, process CPU time and
    bytes received inside them since the last ``reset``. Bytes received per rank: an all-gather's
    output less its own input, a reduce-scatter's (W - 1) contributions to this rank's shard, a
    ring exchange's incoming block."""

    def __init__(self):
        self.depth = 0
        self.reset()
        self._wrap(pdist, "all_gather_flat", lambda out, inp, *a, **k: out.nbytes - inp.nbytes)
        self._wrap(gather, "reduce_scatter_flat",
                   lambda out, inp, *a, **k: out.nbytes * (dist.get_world_size() - 1))
        self._wrap(gather, "_exchange", lambda x, *a, **k: x.nbytes)
        self._wrap(dist, "all_gather", lambda outs, inp, *a, **k: sum(o.nbytes for o in outs) - inp.nbytes)

    def reset(self):
        self.wall = self.cpu = 0.0
        self.bytes = self.calls = 0

    def _wrap(self, module, name, received):
        inner = getattr(module, name)

        def timed(*args, **kwargs):
            if self.depth:  # a collective inside a wrapped one counts once
                return inner(*args, **kwargs)
            self.depth += 1
            w0, c0 = time.perf_counter(), time.process_time()
            try:
                return inner(*args, **kwargs)
            finally:
                self.wall += time.perf_counter() - w0
                self.cpu += time.process_time() - c0
                self.bytes += received(*args, **kwargs)
                self.calls += 1
                self.depth -= 1

        setattr(module, name, timed)


def _worker(rank, world, port, args, out_path):
    torch.set_num_threads(1)
    init_distributed(rank, world, port, cpu=True)
    clock = CollectiveClock()
    losses = {}
    for label, (opts, m) in OBJECTIVES.items():
        fn = build_loss(opts)
        fn.check_finite = False  # as pretrain.step sets it
        g = torch.Generator().manual_seed(1000 * rank + len(losses))
        feats = {f"m{i}": F.normalize(torch.randn(args.batch, args.dim, generator=g), dim=-1) for i in range(m)}
        losses[label] = (fn, feats)
    scale, bias = torch.tensor([10.0]), torch.tensor([-10.0])
    sizes = (args.batch,) * world
    labels = list(OBJECTIVES)
    records = []
    for step in range(args.warmup + args.steps):
        order = labels[step % len(labels):] + labels[: step % len(labels)]  # who goes first rotates
        for label in order:
            fn, feats = losses[label]
            leaves = {k: v.clone().requires_grad_(True) for k, v in feats.items()}
            s, b = scale.clone().requires_grad_(True), bias.clone().requires_grad_(True)
            dist.barrier()
            clock.reset()
            w0, c0 = time.perf_counter(), time.process_time()
            out = fn(leaves, s, b, sizes=sizes, step=step)
            out["loss"].backward()
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            if step >= args.warmup:
                records.append({"objective": label, "step": step, "rank": rank, "wall": wall, "cpu": cpu,
                                "coll_wall": clock.wall, "coll_cpu": clock.cpu, "bytes": clock.bytes,
                                "calls": clock.calls})
    close_distributed()
    torch.save({"records": records, "cpu": time.process_time()}, f"{out_path}.{rank}")


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def run_world(world: int, args, tmp: Path, rnd: int) -> tuple[list[dict], dict]:
    """Every rank's records of one group, and the group's CPU use: its ranks' and the machine's."""
    path = tmp / f"r{rnd}w{world}"
    busy, t0, c0 = busy_cpu_seconds(), time.perf_counter(), time.process_time()
    mp.start_processes(_worker, args=(world, free_port(), args, str(path)), nprocs=world, start_method="forkserver")
    usage = {"wall": time.perf_counter() - t0, "machine": busy_cpu_seconds() - busy}
    ranks = [torch.load(f"{path}.{rank}") for rank in range(world)]
    usage["ranks"] = sum(r["cpu"] for r in ranks) + time.process_time() - c0  # and this process's
    return [dict(r, world=world, round=rnd) for rank in ranks for r in rank["records"]], usage


def summarise(records: list[dict]) -> dict:
    """(world, objective) -> medians over steps of the per-step figures (see the module docstring)."""
    steps: dict[tuple, list[dict]] = {}
    for r in records:
        steps.setdefault((r["world"], r["objective"], r["round"], r["step"]), []).append(r)
    per: dict[tuple, list[dict]] = {}
    for (world, label, rnd, _), ranks in steps.items():
        mean = lambda key: statistics.fmean(r[key] for r in ranks)  # noqa: E731
        per.setdefault((world, label), []).append({
            "round": rnd, "step": max(r["wall"] for r in ranks), "coll": mean("coll_wall"),
            "compute": statistics.fmean(r["wall"] - r["coll_wall"] for r in ranks), "cpu": mean("cpu"),
            "coll_cpu": mean("coll_cpu"), "compute_cpu": statistics.fmean(r["cpu"] - r["coll_cpu"] for r in ranks),
            "bytes": mean("bytes"), "calls": mean("calls")})
    out = {}
    for key, rows in per.items():
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "round"}
        rounds = sorted({r["round"] for r in rows})
        med["round_steps"] = [statistics.median(r["step"] for r in rows if r["round"] == x) for x in rounds]
        out[key] = med
    return out


def print_tables(summary: dict, args, loads: list, usage: list) -> None:
    worlds = sorted({w for w, _ in summary})
    wall, machine, ours = (sum(u[k] for u in usage) for k in ("wall", "machine", "ranks"))
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, GPU: {torch.cuda.is_available()}; "
          f"torch {torch.__version__}, python {platform.python_version()}; date {date.today()}; "
          f"load average before / after: {' '.join(f'{x:.2f}' for x in loads[0])} / "
          f"{' '.join(f'{x:.2f}' for x in loads[1])}")
    print(f"while the groups ran ({wall:.0f} s, start-up included): the machine busy {machine:.1f} CPU-s, "
          f"the ranks and this script {ours:.1f} CPU-s, everything else {max(machine - ours, 0):.1f} CPU-s "
          f"({max(machine - ours, 0) / wall:.2f} cores on average)")
    print(f"per-rank batch B = {args.batch}, d = {args.dim}, fp32, 1 thread per rank; {args.rounds} rounds x "
          f"{args.steps} steps after {args.warmup} warm-up; medians. ms per step; x: relative to W = {worlds[0]}.")
    for label in OBJECTIVES:
        opts, m = OBJECTIVES[label]
        print(f"\n#### {label} (M = {m})\n")
        print("| W | step ms | in collectives ms (share) | CPU ms/rank | of it collectives | of it compute "
              "| MiB in/rank | calls | step x | collectives CPU x | compute CPU x | MiB x | step / CPU | each round's step ms |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
        base = summary[(worlds[0], label)]
        for w in worlds:
            s = summary[(w, label)]
            share = s["coll"] / (s["coll"] + s["compute"])
            print(f"| {w} | {s['step'] * 1e3:.1f} | {s['coll'] * 1e3:.1f} ({share:.0%}) | {s['cpu'] * 1e3:.1f} | "
                  f"{s['coll_cpu'] * 1e3:.1f} | {s['compute_cpu'] * 1e3:.1f} | {s['bytes'] / MiB:.2f} | {s['calls']:.0f} | "
                  f"{s['step'] / base['step']:.1f}x | {s['coll_cpu'] / base['coll_cpu']:.1f}x | "
                  f"{s['compute_cpu'] / base['compute_cpu']:.1f}x | {s['bytes'] / max(base['bytes'], 1):.1f}x | "
                  f"{s['step'] / s['cpu']:.1f} | {' '.join(f'{x * 1e3:.0f}' for x in s['round_steps'])} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--batch", type=int, default=128, help="per-rank batch")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8, help="measured steps per group and objective")
    parser.add_argument("--warmup", type=int, default=2, help="steps dropped at the start of each group")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write every rank's per-step records here")
    args = parser.parse_args()
    # the ranks fork from a server that has imported these once (16 spawned imports of torch on 2
    # cores would take longer than the measurements)
    multiprocessing.set_forkserver_preload(["torch", "torch.distributed", "pretrain.losses"])
    server = multiprocessing.get_context("forkserver").Process(target=os.getpid)
    server.start()  # the server's own start-up (its imports) before anything is measured
    server.join()
    loads = [os.getloadavg()]
    records, usage = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            for world in (args.worlds if rnd % 2 == 0 else args.worlds[::-1]):
                recs, use = run_world(world, args, Path(tmp), rnd)
                records += recs
                usage.append(use)
                print(f"round {rnd} W={world}: {use['wall']:.1f} s", file=sys.stderr, flush=True)
    loads.append(os.getloadavg())
    if args.json:
        args.json.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "json"},
                                         "load": loads, "usage": usage, "records": records}))
    print_tables(summarise(records), args, loads, usage)


if __name__ == "__main__":
    main()
