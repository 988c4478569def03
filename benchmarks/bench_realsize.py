"""Real-size OpenCLIP models trained on 2 CPU ranks, measured beside ``pretrain.plan`` (issue 28).

    .venv/bin/python benchmarks/bench_realsize.py                      # every case below, ~25 min
    .venv/bin/python benchmarks/bench_realsize.py --cases b16-0,b16-3i  # some of them
    .venv/bin/python benchmarks/bench_realsize.py --cap-gib 20 --out benchmarks/realsize.json
    .venv/bin/python benchmarks/bench_realsize.py --table benchmarks/realsize.json   # RESULTS.md's table

Cases: OpenCLIP's ViT-B-16 (``configs/openclip_vit_b16.yaml``, both towers, 150M parameters) at ZeRO
0, 1, 2, 3 and 3 with ``train.zero3_init``; ViT-L-14 (428M) at ZeRO-3 with ``zero3_init`` only (at
ZeRO 0-2 every rank holds the whole model and a resume would pass this machine's 24 GiB: the plan
gives those). Each trains on 2 gloo ranks (torchrun) in fp32 at micro-batch 2, one loader worker
per rank, on web-like JPEG shards (``data_tools.synthetic webimages``, 512 px, cropped to 224):

1. a run of 2 steps with a checkpoint at the end;
2. the same command with 3 steps: it resumes from that checkpoint (``train.resume: auto``), steps
   once and saves again;
3. ``python -m pretrain.export`` of the last checkpoint.

Measured per case, per rank: the engine's model states by part (every tensor it holds after the
first step, unique storages: ``tests.faults``' ``record_memory`` probe, as ``tests/test_plan.py``
reads it at tiny size), the rank's peak resident memory (the kernel's high-water mark, per phase of each step: forward
and backward, the optimizer's update) and its resident memory
just before the model is built (the interpreter, torch, DeepSpeed: what the plan does not count),
the peak of the rank and its loader worker together (summed proportional set size, polled every
0.2 s from here: shared pages counted once), the checkpoint's save and resume seconds (inside the
trainer: ``pretrain.checkpoint.save`` and ``Checkpointer.resume``, the slower rank), bytes on disk,
and the export's seconds, bytes and peak memory. Beside them, ``pretrain.plan --json`` for the same
config and overrides on 2 ranks. Targets (issue 28): weights, gradients and optimizer states within
15% of the engine's partitions; activations within 30% of the peak less the model states.

Guards: free disk is checked before each case (twice the plan's checkpoint size, plus the export
and 2 GiB), and available memory (twice the plan's total per rank and 3 GiB, waited for up to 10
minutes while other work holds it); the summed memory of the job is polled and the job killed above ``--cap-gib`` (the case
is then reported as stopped at the cap). Times depend on the machine's load, printed with them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PY = sys.executable
GIB, MIB = 2**30, 2**20
CONFIG = ROOT / "configs" / "openclip_vit_b16.yaml"
# name: (open_clip architecture, embed_dim, ZeRO stage, zero3_init, more overrides)
# ViT-L-14: DeepSpeed's reduction bucket at 1e8 elements instead of 5e8 (400 MB, not 2 GB, per rank: the
# default's 1.7 GB of gradients written into it put 2 ranks over 24 GiB; the plan reads the same setting)
SMALL_BUCKET = "train.deepspeed={zero_optimization: {reduce_bucket_size: 100000000}}"
CASES = {
    "b16-0": ("ViT-B-16", 512, 0, False, []),
    "b16-1": ("ViT-B-16", 512, 1, False, []),
    "b16-2": ("ViT-B-16", 512, 2, False, []),
    "b16-3": ("ViT-B-16", 512, 3, False, []),
    "b16-3i": ("ViT-B-16", 512, 3, True, []),
    "l14-3i": ("ViT-L-14", 768, 3, True, [SMALL_BUCKET]),
}
# the plan's parts that the engine's record measures, and the record's names for them
STATE_PARTS = [("weights", "weights"), ("masters", "masters"), ("gradients", "grads_held"),
               ("gradient_copies", "grads_update"), ("optimizer", "optimizer")]


# ------------------------------------------------------------------------------ inside each rank


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _rss() -> int:
    return _status("VmRSS")


def _fresh_peak() -> int:
    """Gives freed heap pages back (glibc keeps them otherwise, hiding the next phase's growth),
    restarts the kernel's peak counter (VmHWM) and returns the resident bytes now."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _rss()


def rank_main(record: str, argv: list[str]) -> int:
    """One rank of a case: the trainer with the ``record_memory`` probe and timers around model
    building, checkpoint saving and resuming; writes ``<record>.timings.<rank>`` at the end."""
    from tests import faults

    faults.install(f"record_memory:{record}")
    import torch.distributed as dist

    from pretrain import checkpoint, train, trainer

    figures: dict = {"save_s": []}
    build, save, resume = trainer.build_model, checkpoint.save, checkpoint.Checkpointer.resume

    def timed_build(*args, **kwargs):
        figures["rss_before_model"] = _rss()
        model = build(*args, **kwargs)
        figures["rss_after_model"] = _rss()
        return model

    def timed_save(*args, **kwargs):
        start = time.perf_counter()
        out = save(*args, **kwargs)
        figures["save_s"].append(time.perf_counter() - start)
        return out

    def timed_resume(self, state):
        start = time.perf_counter()
        out = resume(self, state)
        if out is not None:
            figures["resume_s"] = time.perf_counter() - start
        return out

    trainer.build_model, checkpoint.save, checkpoint.Checkpointer.resume = timed_build, timed_save, timed_resume

    # each step's phases: resident bytes at its start, the peak of its forward and backward, at the
    # optimizer's update (entered after the backward), the peak of the update
    from pretrain.engine import Engine
    from pretrain.step import ContrastiveStep

    call, update = ContrastiveStep.__call__, Engine.step
    figures["steps"] = []

    def step_phases(self, *args, **kwargs):
        phase = {"start": _fresh_peak()}
        figures["steps"].append(phase)
        out = call(self, *args, **kwargs)
        phase["end"] = _rss()
        return out

    def update_phases(self):  # one micro-batch per step here: every call updates
        phase = figures["steps"][-1] if figures["steps"] else {}
        phase["peak_forward_backward"] = _status("VmHWM")
        phase["before_update"] = _fresh_peak()
        out = update(self)
        phase["peak_update"] = _status("VmHWM")
        return out

    ContrastiveStep.__call__, Engine.step = step_phases, update_phases
    rank = int(os.environ.get("RANK", "0"))
    try:
        return train.main(argv)
    finally:
        # the kernel's peak restarts with every phase (clear_refs resets ru_maxrss too): the largest of them
        figures["maxrss"] = max([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024]
                                + [v for p in figures["steps"] for k, v in p.items() if k.startswith("peak")])
        figures["rank"] = dist.get_rank() if dist.is_initialized() else rank
        Path(f"{record}.timings.{rank}").write_text(json.dumps(figures))


# ------------------------------------------------------------------------------ watching a job


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    return kids


def _tree(pid: int, kids: dict[int, list[int]]) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _rank_of(pid: int) -> int | None:
    try:
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"LOCAL_RANK="):
            return int(item.split(b"=", 1)[1])
    return None


def watch(cmd: list[str], env: dict, cap: int, log: Path, timeout: float) -> dict:
    """Runs ``cmd`` in its own process group; polls the summed PSS of every process under it, and
    of each rank's subtree (the rank and its loader workers). Kills the group above ``cap`` bytes."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        peak_total, peak_rank, capped = 0, {}, False
        while proc.poll() is None:
            kids = _children()
            procs = _tree(proc.pid, kids)
            total = sum(_pss(p) for p in procs)
            peak_total = max(peak_total, total)
            for p in procs:
                r = _rank_of(p)
                if r is not None and p != proc.pid and _rank_of(_parent(p)) is None:  # a rank, not its worker
                    peak_rank[r] = max(peak_rank.get(r, 0), sum(_pss(q) for q in _tree(p, kids)))
            if total > cap or time.perf_counter() - start > timeout:
                capped = total > cap
                for p in procs:  # torchrun starts its ranks in sessions of their own: every process, not the group
                    try:
                        os.kill(p, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                proc.wait()
                break
            time.sleep(0.2)
    return {"rc": proc.returncode, "seconds": time.perf_counter() - start, "peak_pss_job": peak_total,
            "peak_pss_rank_and_workers": [peak_rank[r] for r in sorted(peak_rank)], "capped": capped}


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ------------------------------------------------------------------------------ one case


def overrides(arch: str, embed: int, stage: int, init: bool, extra: list[str], shards: str, run: Path,
              steps: int) -> list[str]:
    return [f"output_dir={run}", f"data.train.urls={shards}", "data.train.workers=1", "data.train.shuffle_buffer=16",
            f"model.embed_dim={embed}", f"model.towers.image.options.model={arch}",
            f"model.towers.text.options.model={arch}", "train.micro_batch_size=2", "train.precision=fp32",
            f"train.zero_stage={stage}", f"train.zero3_init={str(init).lower()}", f"train.steps={steps}",
            "train.checkpoint_every=2", "train.keep_checkpoints=2", "train.warmup_steps=1", "train.log_every=1",
            "train.collective_timeout=1800", *extra]


def plan_for(over: list[str]) -> dict:
    res = subprocess.run([PY, "-m", "pretrain.plan", "--config", str(CONFIG), "--gpus-per-node", "2", "--json", *over],
                         capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(res.stdout)


def run_case(name: str, work: Path, shards: str, cap: int) -> dict:
    from tests.faults import measured_parts
    import torch

    arch, embed, stage, init, extra = CASES[name]
    run, record = work / name, work / f"{name}.mem"
    plan = plan_for(overrides(arch, embed, stage, init, extra, shards, run, 2))
    planned = plan["stages"][str(stage)]
    need = 2 * planned["checkpoint_bytes"] + plan["parameters"]["total"] * 4 + 2 * GIB
    free = shutil.disk_usage(work).free
    if free < need:
        return {"case": name, "skipped": f"{free / GIB:.1f} GiB free under {work}, {need / GIB:.1f} GiB needed"}
    want = 2 * planned["total"] + 3 * GIB  # two ranks, their interpreters and workers
    for _ in range(60):  # other work on the machine may hold memory for a while: wait up to 10 minutes
        if _available() >= want:
            break
        time.sleep(10)
    else:
        return {"case": name, "skipped": f"{_available() / GIB:.1f} GiB of memory available, {want / GIB:.1f} GiB wanted"}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),  # DeepSpeed's CPU op built once, as make does
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions")),
           # glibc keeps freed heap blocks resident (ZeRO-3's gathered parameters, freed and made again per module,
           # piled up as "memory" a GPU's caching allocator would reuse): every allocation over 64 KiB its own
           # mapping, given back when freed, so resident memory follows the live tensors
           "MALLOC_MMAP_THRESHOLD_": "65536"}
    out: dict = {"case": name, "arch": arch, "zero_stage": stage, "zero3_init": init, "load_before": _load()}
    port = 29500 + (os.getpid() % 500)
    for phase, steps in (("train", 2), ("resume", 3)):
        cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", __file__,
               "--as-rank", str(record) + f".{phase}", "--config", str(CONFIG),
               *overrides(arch, embed, stage, init, extra, shards, run, steps)]
        job = watch(cmd, env, cap, work / f"{name}.{phase}.log", timeout=3600)
        ranks = [json.loads(Path(f"{record}.{phase}.timings.{r}").read_text()) for r in range(2)
                 if Path(f"{record}.{phase}.timings.{r}").exists()]
        out[phase] = {**job, "ranks": ranks, "load_after": _load()}
        if job["rc"] != 0:
            out["failed"] = f"{phase}: exit code {job['rc']}" + (" (killed at the memory cap)" if job["capped"] else "")
            out["log_tail"] = (work / f"{name}.{phase}.log").read_text()[-3000:]
            shutil.rmtree(run, ignore_errors=True)
            return {**out, "plan": planned}
    # the engine's model states after the first step, each rank (the larger one reported, as the test does)
    measured = [measured_parts(torch.load(f"{record}.train.{r}", weights_only=False)["run"]) for r in range(2)]
    out["measured_states"] = {k: max(m[k] for m in measured) for k in measured[0]}
    ckpts = sorted((run / "checkpoints").glob("step*"))
    out["checkpoint_bytes"] = _bytes(ckpts[-1])
    export = work / f"{name}.export"
    job = watch([PY, "-m", "pretrain.export", "--checkpoint", str(ckpts[-1]), "--output", str(export)],
                env, cap, work / f"{name}.export.log", timeout=3600)
    out["export"] = {"rc": job["rc"], "seconds": job["seconds"], "peak_pss": job["peak_pss_job"],
                     "bytes": _bytes(export) if export.exists() else 0}
    out["plan"] = planned
    out["plan_parameters"] = plan["parameters"]["total"]
    shutil.rmtree(run, ignore_errors=True)
    shutil.rmtree(export, ignore_errors=True)
    return out


def summarise(r: dict) -> dict:
    """The comparisons issue 28 asks for: plan / measured per part, activations against the peak."""
    if "measured_states" not in r:
        return {}
    plan, meas = r["plan"]["parts"], r["measured_states"]
    ratios = {p: (plan[p] / meas[m] if meas[m] else None) for p, m in STATE_PARTS}
    ranks = r["train"]["ranks"]
    # the second step (optimizer states exist): what its forward and backward added at their peak to
    # what was resident when it began, less what stayed after them (the gradients made in backward)
    second = [k["steps"][1] for k in ranks]
    act_measured = max(p["peak_forward_backward"] - p["start"] - max(0, p["before_update"] - p["start"])
                       for p in second)
    update_measured = max(p["peak_update"] - p["before_update"] for p in second)
    act_plan = plan["activations"] + plan["loss"] + plan["inputs"]
    # DeepSpeed's reduction bucket is torch.empty(reduce_bucket_size): a GPU's allocator holds all of it,
    # the CPU only the pages written, at most the model's gradients; the rest of its buffers (ZeRO-3's
    # gathered parameters) are written whole
    bucket = 4 * (int(1e8) if SMALL_BUCKET in CASES[r["case"]][4] else int(5e8))
    written = min(bucket, 4 * r["plan_parameters"]) if plan["deepspeed"] else 0
    backward_cpu = act_plan + max(0, plan["deepspeed"] - bucket) + written if plan["deepspeed"] else act_plan
    held = sum(meas[m] for m in ("weights", "masters", "optimizer", "grads_held"))
    return {"state_ratio_plan_over_measured": ratios, "states_held": held,
            "peak_above_baseline": max(k["maxrss"] - k["rss_before_model"] for k in ranks),
            "activations_measured": act_measured, "activations_planned": act_plan,
            "activation_ratio": act_plan / act_measured if act_measured > 0 else None,
            "backward_planned_cpu": backward_cpu, "backward_ratio_cpu": backward_cpu / act_measured,
            "update_transient_measured": update_measured, "update_transient_planned": plan["gradient_copies"],
            "plan_total_less_loader": r["plan"]["total"] - plan["loader"]}


def make_shards(work: Path) -> str:
    out = work / "shards"
    if not (out / "index.json").exists():
        subprocess.run([PY, "-m", "data_tools.synthetic", "webimages", "--samples", "64", "--shard-size", "32",
                        "--output", str(out), "--no-measure"], cwd=ROOT, check=True, capture_output=True)
    stems = sorted(p.stem for p in out.glob("*.tar"))
    return str(out / f"{{{stems[0]}..{stems[-1]}}}.tar")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--as-rank":
        return rank_main(argv[1], argv[2:])
    if argv and argv[0] == "--table":  # RESULTS.md's table from saved results: --table A.json [B.json ...]
        print(table([c for f in argv[1:] for c in json.loads(Path(f).read_text())["cases"]]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--cap-gib", type=float, default=20.0, help="kill a job whose processes pass this, GiB")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed)")
    ap.add_argument("--out", default=None, help="JSON results")
    args = ap.parse_args(argv)
    names = [c for c in args.cases.split(",") if c]
    bad = [c for c in names if c not in CASES]
    if bad:
        ap.error(f"--cases: unknown {bad}; known: {', '.join(CASES)}")
    work = Path(args.work or tempfile.mkdtemp(prefix="realsize-"))
    work.mkdir(parents=True, exist_ok=True)
    shards = make_shards(work)
    results = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "torch": __import__("torch").__version__,
               "date": time.strftime("%Y-%m-%d %H:%M"), "cases": []}
    for name in names:
        print(f"[realsize] {name} (load {_load()})", flush=True)
        r = run_case(name, work, shards, int(args.cap_gib * GIB))
        r["summary"] = summarise(r)
        results["cases"].append(r)
        print(json.dumps(_brief(r)), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(table(results["cases"]))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def table(cases: list[dict]) -> str:
    """RESULTS.md's rows: per case, the plan beside the measurement (MiB per rank, the larger rank)."""
    m = lambda b: f"{b / MIB:,.0f}"  # noqa: E731
    rows = ["| case | weights | fp32 masters | gradients held / fp32 copies | optimizer states | plan / engine "
            "| backward's growth: measured vs plan's activations (+ DeepSpeed buffers) "
            "| the same, DeepSpeed's bucket as far as written (CPU): plan / measured | peak above start-up: "
            "measured vs plan's total | rank + loader worker peak (PSS) | checkpoint: MiB (plan), save s, resume s "
            "| export: s, MiB, peak MiB |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in cases:
        if "measured_states" not in r:
            rows.append(f"| {r['case']} | {r.get('skipped') or r.get('failed')} |" + " |" * 10)
            continue
        s, e, p = summarise(r), r["measured_states"], r["plan"]["parts"]
        ratio = " ".join(f"{v:.3f}" for v in s["state_ratio_plan_over_measured"].values() if v)
        tr, rs = r["train"]["ranks"], r["resume"]["ranks"]
        ds = f" + {m(p['deepspeed'])}" if p["deepspeed"] else ""
        rows.append(
            f"| {r['arch']} ZeRO-{r['zero_stage']}{' zero3_init' if r['zero3_init'] else ''} | {m(e['weights'])} "
            f"| {m(e['masters'])} | {m(e['grads_held'])} / {m(e['grads_update'])} | {m(e['optimizer'])} | {ratio} "
            f"| {m(s['activations_measured'])} vs {m(s['activations_planned'])}{ds} "
            f"| {m(s['backward_planned_cpu'])} / {m(s['activations_measured'])} = {s['backward_ratio_cpu']:.2f} "
            f"| {m(s['peak_above_baseline'])} vs {m(s['plan_total_less_loader'])} "
            f"| {', '.join(m(x) for x in r['train']['peak_pss_rank_and_workers'])} "
            f"| {m(r['checkpoint_bytes'])} ({m(r['plan']['checkpoint_bytes'])}), "
            f"{max(max(k['save_s']) for k in tr):.1f}, {max(k.get('resume_s', 0) for k in rs):.1f} "
            f"| {r['export']['seconds']:.1f}, {m(r['export']['bytes'])}, {m(r['export']['peak_pss'])} |")
    return "\n".join(rows)


def _brief(r: dict) -> dict:
    if "measured_states" not in r:
        return {k: r.get(k) for k in ("case", "skipped", "failed", "log_tail")}
    s, tr, rs = r["summary"], r["train"], r["resume"]
    return {"case": r["case"],
            "states plan/measured": {k: round(v, 3) if v else v for k, v in s["state_ratio_plan_over_measured"].items()},
            "activations MiB plan/measured": (round(s["activations_planned"] / MIB), round(s["activations_measured"] / MIB)),
            "update transient MiB plan/measured": (round(s["update_transient_planned"] / MIB),
                                                   round(s["update_transient_measured"] / MIB)),
            "peak above baseline MiB plan(total-loader)/measured": (round(s["plan_total_less_loader"] / MIB),
                                                                    round(s["peak_above_baseline"] / MIB)),
            "peak rank MiB": [round(k["maxrss"] / MIB) for k in tr["ranks"]],
            "peak rank+worker PSS MiB": [round(x / MIB) for x in tr["peak_pss_rank_and_workers"]],
            "baseline MiB": [round(k["rss_before_model"] / MIB) for k in tr["ranks"]],
            "save s": max(max(k["save_s"]) for k in tr["ranks"]),
            "resume s": max(k.get("resume_s", 0) for k in rs["ranks"]),
            "checkpoint MiB": round(r["checkpoint_bytes"] / MIB), "plan checkpoint MiB": round(r["plan"]["checkpoint_bytes"] / MIB),
            "export s": round(r["export"]["seconds"], 1), "export MiB": round(r["export"]["bytes"] / MIB),
            "export peak MiB": round(r["export"]["peak_pss"] / MIB)}


if __name__ == "__main__":
    if sys.argv[1:2] == ["--as-rank"]:
        from pretrain.cli import exit_process

        exit_process(main())  # as the trainer's own entry point ends
    sys.exit(main())
