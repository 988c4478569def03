"""What resuming on another layout costs on a ~100M-parameter model (issue 27), and what the
alternative would cost: consolidating a layout-free copy of the state at every save.

    .venv/bin/python benchmarks/bench_relayout.py [--layers 24 --width 2048] [--repeats 2]

The model is a stack of ``--layers`` Linear(width, width) layers (24 x 2048: 100.7M parameters),
trained one AdamW step in fp32 so that every moment exists, by DeepSpeed engines built as the
trainer builds them (``pretrain.engine.build_engine``), over gloo ranks spawned here. Measured:

- ``save``: DeepSpeed's own checkpoint, 2 ranks at ZeRO-2 (what every save costs today), seconds
  and bytes on disk;
- ``resume, same layout``: a new 2-rank ZeRO-2 engine loads it (``load_checkpoint``);
- ``resume, other layout`` (1 rank at ZeRO-3, as ``Checkpointer.resume`` does it): DeepSpeed's
  universal conversion by rank 0 (seconds, and the scratch folder's bytes), reading it back by
  parameter name, and putting it into the new engine (``pretrain.layout``);
- ``consolidate at save`` (the alternative): at every save, gather each parameter's whole fp32
  value and moments from the 2-rank engine (DeepSpeed's ``safe_get_full_*``) and write them, by
  name, beside DeepSpeed's files (rank 0): its extra seconds and bytes per save; and the resume
  from it on another layout (read + ``load_full_state``).
Each figure is the median of ``--repeats`` runs; the machine's load is printed with them.
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


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _model(layers: int, width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])


def _engine(layers: int, width: int, stage: int, world: int):
    from pretrain.config import load_config
    from pretrain.engine import build_engine

    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [f"train.zero_stage={stage}", "train.micro_batch_size=2",
                                                             "train.steps=10", "train.warmup_steps=1"]).train
    return build_engine(_model(layers, width), cfg, world)


def _one_step(engine, width: int) -> None:
    x = torch.randn(2, width, generator=torch.Generator().manual_seed(dist.get_rank()))
    loss = engine.ds(x).square().mean()
    engine.backward(loss)
    engine.step()


def _timed(fn):
    dist.barrier()
    start = time.perf_counter()
    out = fn()
    dist.barrier()
    return time.perf_counter() - start, out


def _consolidate(engine, path: Path) -> None:
    """Every parameter's whole fp32 value and moments, by name (collective), written by rank 0."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    zero = engine.ds.optimizer
    if hasattr(zero, "_hp_optimizer_states_linked"):
        # each parameter's view into the moments: DeepSpeed 0.19 links every group's after the
        # first group's step, when the later groups have no moments yet; link them again now
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()
    state = {}
    for name, p in engine.module.named_parameters():
        entry = {"fp32": safe_get_full_fp32_param(p)}
        for key in ("exp_avg", "exp_avg_sq"):
            entry[key] = safe_get_full_optimizer_state(p, key)
        state[name] = entry
    if dist.get_rank() == 0:
        torch.save(state, path)


def _from_consolidated(path: Path, saved_dir: Path):
    from pretrain.layout import FullState, _model_states

    raw = torch.load(path, map_location="cpu", weights_only=False)
    states = _model_states(saved_dir)
    return FullState({k: v["fp32"] for k, v in raw.items()}, {},
                     {k: {m: v[m] for m in ("exp_avg", "exp_avg_sq")} for k, v in raw.items()},
                     scheduler=states.get("lr_scheduler") or {}, optimizer_steps=1.0)


def _worker(rank: int, world: int, port: int, phase: str, args: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from pretrain import layout

    work = Path(args["work"])
    layers, width = args["layers"], args["width"]
    figures = {}
    if phase == "save":
        engine = _engine(layers, width, 2, world)
        _one_step(engine, width)
        figures["save_s"], _ = _timed(lambda: engine.ds.save_checkpoint(str(work / "ckpt"), tag="step1"))
        figures["consolidate_s"], _ = _timed(lambda: _consolidate(engine, work / "ckpt" / "step1" / "full.pt"))
    elif phase == "same":
        engine = _engine(layers, width, 2, world)
        figures["resume_same_s"], _ = _timed(lambda: engine.ds.load_checkpoint(str(work / "ckpt"), tag="step1"))
    elif phase == "other":
        engine = _engine(layers, width, 3, world)
        folder, scratch = work / "ckpt" / "step1", work / "scratch"
        names = [n for n, _ in engine.module.named_parameters()]
        figures["convert_s"], _ = _timed(lambda: layout._convert(folder, scratch / "u") if rank == 0 else None)
        figures["scratch_bytes"] = _bytes(scratch / "u")
        t_read, parts = _timed(lambda: layout._read_universal(scratch / "u" / "zero"))
        params, moments, steps = parts
        full = layout.FullState(params, {}, moments, scheduler=layout._model_states(folder).get("lr_scheduler") or {},
                                optimizer_steps=steps)
        figures["read_s"] = t_read
        figures["load_s"], _ = _timed(lambda: layout.load_full_state(engine, full))
        shutil.rmtree(scratch, ignore_errors=True)
        t_read2, full2 = _timed(lambda: _from_consolidated(folder / "full.pt", folder))
        figures["consolidated_read_s"] = t_read2
        figures["consolidated_load_s"], _ = _timed(lambda: layout.load_full_state(engine, full2))
        for name in names:  # the two routes hold the same state
            assert torch.equal(full.params[name].reshape(-1), full2.params[name].reshape(-1)), name
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(full.moments[name][key].reshape(-1), full2.moments[name][key].reshape(-1)), (name, key)
    if rank == 0:
        Path(out).write_text(json.dumps(figures))
    dist.destroy_process_group()


def _phase(phase: str, world: int, args: dict) -> dict:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = Path(args["work"]) / f"{phase}.json"
    mp.start_processes(_worker, args=(world, port, phase, args, str(out)), nprocs=world, start_method="spawn")
    return json.loads(out.read_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    params = args.layers * (args.width * args.width + args.width)
    runs = []
    for i in range(args.repeats):
        work = Path(tempfile.mkdtemp(prefix="bench_relayout_"))
        cfg = {"work": str(work), "layers": args.layers, "width": args.width}
        row = _phase("save", 2, cfg)
        row["checkpoint_bytes"] = _bytes(work / "ckpt" / "step1") - (work / "ckpt" / "step1" / "full.pt").stat().st_size
        row["consolidated_bytes"] = (work / "ckpt" / "step1" / "full.pt").stat().st_size
        row.update(_phase("same", 2, cfg))
        row.update(_phase("other", 1, cfg))
        runs.append(row)
        shutil.rmtree(work, ignore_errors=True)
        print(f"run {i + 1}: " + ", ".join(f"{k} {v:.2f}" if k.endswith("_s") else f"{k} {v / 2**20:.0f} MiB"
                                           for k, v in row.items()), flush=True)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    other = med["convert_s"] + med["read_s"] + med["load_s"]
    print(f"\n{params / 1e6:.1f}M parameters, fp32 AdamW; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}; median of {args.repeats}")
    print(f"| what | seconds | disk |\n|---|---|---|")
    print(f"| save, DeepSpeed's files (2 ranks, ZeRO-2) | {med['save_s']:.2f} | {med['checkpoint_bytes'] / 2**20:.0f} MiB |")
    print(f"| resume, same layout (DeepSpeed's load) | {med['resume_same_s']:.2f} | |")
    print(f"| resume, other layout (1 rank, ZeRO-3): universal conversion | {med['convert_s']:.2f} | "
          f"{med['scratch_bytes'] / 2**20:.0f} MiB scratch, removed after |")
    print(f"| ... read by name | {med['read_s']:.2f} | |")
    print(f"| ... into the new engine | {med['load_s']:.2f} | |")
    print(f"| ... total | {other:.2f} | |")
    print(f"| alternative: consolidate at every save (extra per save) | {med['consolidate_s']:.2f} | "
          f"{med['consolidated_bytes'] / 2**20:.0f} MiB more per checkpoint |")
    print(f"| alternative: resume on other layout from it | "
          f"{med['consolidated_read_s'] + med['consolidated_load_s']:.2f} | |")
    if args.json:
        args.json.write_text(json.dumps({"params": params, "runs": runs, "median": med}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
