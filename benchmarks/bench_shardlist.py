"""100,000 shards (issue 28): what a long shard list costs the loader, against the same run with a
10-shard list, and webdataset's own shard-list handling on the same list.

    .venv/bin/python benchmarks/bench_shardlist.py                        # 10, 1k, 10k, 100k shards
    .venv/bin/python benchmarks/bench_shardlist.py --other /tmp/base      # and another checkout, alternating
    .venv/bin/python benchmarks/bench_shardlist.py --shards 1000 --quick  # the test's tiny mode

The data: ten real text shards (20..29 samples each) written once, and for each list length N a
folder of N shard names that are hard links to them (``shard-{000000..N-1}.tar``), with the
``index.json`` and ``sizes.json`` that ``python -m data_tools build`` writes beside a build's shards
(per-shard name, samples, bytes, sha256, members, modalities). ``resampled`` mode uses ten weighted
sources (``data.train.sources``, weights 1..10), each a folder of N / 10 such shards with its own
index. Every configuration names its shards by a brace pattern, as a user would.

Figures, each list length against the 10-shard list in the same invocation (rounds alternate the
order of the list lengths and of the checkouts; medians):

1. Per rank (a fresh process per measurement, ``--world`` ranks x ``--workers`` loader workers,
   this process as rank ``--rank``; micro-batch 32, text only): ``build`` = ``make_loader`` (URLs,
   counts, the loader; what a rank does before its first ``iter()``), ``first batch`` = from
   ``iter()`` to the first batch (worker start-up and the slot's plan included), ``all workers`` =
   to one batch from every worker; resident memory after that (every worker alive and past its
   plan): RSS summed over the process and its worker children, and PSS summed (each shared page
   counted once, split between the processes sharing it: the physical memory the rank holds).
   Reported as the extra over the 10-shard list of the same mode.
2. The assignment of one epoch for ``--assign-world`` ranks x ``--assign-workers`` workers in one
   process: ``slot_plan`` for every slot, its time, and the balance (max / min samples per slot).
   A checkout that needs longer than ``--assign-budget`` seconds is stopped there and its time
   extrapolated from the slots done (marked ``~``).
3. webdataset (same list, same process kind): ``braceexpand`` of the pattern, ``SimpleShardList``
   and ``ResampledShards`` built and iterated to the first URL, and the OpenCLIP-style
   ``SimpleShardList -> split_by_node -> split_by_worker`` iterated to the first URL and through a
   slot's URLs as rank ``--rank`` of the assignment's world (``RANK``/``WORLD_SIZE``/``WORKER``/
   ``NUM_WORKERS`` as webdataset reads them); beside ours: ``pretrain.data.expand_urls`` of the
   pattern and one slot's ``slot_plan`` at the same position.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BATCH = 32
BASE_SIZES = [20 + i for i in range(10)]  # samples in the ten real shards
SOURCES = 10
MODES = ("epoch", "resampled")


# ------------------------------------------------------------------------------------------ data


def _write_tar(path: Path, keys: list[str]) -> None:
    import io
    import tarfile

    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key in keys:
            for ext, data in (("txt", f"a caption of sample {key}".encode()), ("cls", str(len(key) % 3).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))


def _base(root: Path) -> list[dict]:
    """The ten real shards: name, path, samples, bytes, sha256."""
    folder = root / "base"
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, n in enumerate(BASE_SIZES):
        path = folder / f"base-{i}.tar"
        if not path.is_file():
            _write_tar(path, [f"b{i}_{j:04d}" for j in range(n)])
        data = path.read_bytes()
        out.append({"path": path, "samples": n, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    return out


def _shard_folder(folder: Path, count: int, base: list[dict], offset: int = 0) -> str:
    """``count`` hard links shard-000000.tar... to the base shards, with index.json and sizes.json as
    ``data_tools build`` writes them; returns the brace pattern."""
    from pretrain.shard_index import dumps, index_document, sizes_document

    digits = max(6, len(str(count - 1)))
    pattern = str(folder / f"shard-{{{0:0{digits}d}..{count - 1:0{digits}d}}}.tar")
    if (folder / "index.json").is_file():
        return pattern
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for i in range(count):
        b = base[(i + offset) % len(base)]
        name = f"shard-{i:0{digits}d}.tar"
        if not (folder / name).exists():
            os.link(b["path"], folder / name)
        shards.append({"name": name, "split": "all", "samples": b["samples"], "bytes": b["bytes"], "sha256": b["sha256"],
                       "members": {"cls": b["samples"], "txt": b["samples"]},
                       "modalities": {"labels": b["samples"], "text": b["samples"]}})
    (folder / "sizes.json").write_text(dumps(sizes_document(shards)))
    doc = index_document(shards, {"all": Path(pattern).name}, sum(s["samples"] for s in shards), {}, 0, [],
                         {"shard_size": max(BASE_SIZES)})
    (folder / "index.json").write_text(dumps(doc))  # last, as the builder does: the completion mark
    return pattern


def dataset(root: Path, n: int) -> dict[str, dict]:
    """The ``data.train`` section per mode for an ``n``-shard list under ``root`` (made if missing)."""
    base = _base(root)
    epoch = {"urls": _shard_folder(root / f"n{n}" / "epoch", n, base), "mode": "epoch"}
    per = max(1, n // SOURCES)
    sources = [{"urls": _shard_folder(root / f"n{n}" / f"src{s}", per, base, offset=s), "weight": float(s + 1)}
               for s in range(SOURCES)]
    return {"epoch": epoch, "resampled": {"sources": sources, "mode": "resampled"}}


def data_config(train: dict, workers: int):
    from pretrain.config import config_from_dict

    tree = {"train": {**train, "workers": workers, "shuffle_buffer": 64},
            "modalities": {"text": {"decoder": "text"}}, "labels": None, "context_length": 24}
    return config_from_dict({"data": tree, "eval": {"enabled": False}}).data


# ------------------------------------------------------------------------------ memory, children


FIELDS = {"Rss:": "rss", "Anonymous:": "anon", "Pss_Anon:": "pss_anon"}


def _smaps(pid: int) -> dict[str, int]:
    """RSS, anonymous RSS and anonymous PSS of a process in bytes, from /proc/PID/smaps_rollup."""
    out = dict.fromkeys(FIELDS.values(), 0)
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            name = line.split(maxsplit=1)[0] if line.strip() else ""
            if name in FIELDS:
                out[FIELDS[name]] = int(line.split()[1]) * 1024
    return out


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids = (task / "children").read_text().split()
        except OSError:
            continue
        for k in map(int, kids):
            out += [k] + _children(k)
    return out


def _memory() -> dict:
    """Summed over this process and its children: RSS (shared pages counted in every process that
    maps them), anonymous RSS, and anonymous PSS (each anonymous page counted once, split between
    the processes sharing it after a fork: the heap the rank really holds; file pages, such as the
    libraries, are left out since other programs on the machine share them)."""
    pids = [os.getpid()] + _children(os.getpid())
    total = dict.fromkeys(FIELDS.values(), 0)
    for pid in pids:
        try:
            one = _smaps(pid)
        except OSError:
            continue
        for k, v in one.items():
            total[k] += v
    return {"processes": len(pids), **total}


# --------------------------------------------------------------------------- children: one figure


def child_startup(a: argparse.Namespace) -> dict:
    """One rank: build the loader, then iterate to one batch from every worker."""
    from pretrain.data import build_modalities, make_loader

    d = data_config(json.loads(a.train), a.workers)
    modalities = build_modalities(d, train=True)
    gc.collect()
    mem0 = _memory()
    t0 = time.perf_counter()
    loader = make_loader(d.train, modalities, d, BATCH, a.rank, a.world, 0, True)
    t1 = time.perf_counter()
    mem_built = _memory()
    it = iter(loader)
    first = next(it)
    t2 = time.perf_counter()
    for _ in range(max(1, a.workers) - 1):
        next(it)
    t3 = time.perf_counter()
    mem_live = _memory()
    assert len(first) == BATCH
    shards = len(loader.dataset.spec.shards)
    it.close()
    loader.close()
    return {"shards": shards, "build_s": t1 - t0, "first_batch_s": t2 - t1, "all_workers_s": t3 - t1,
            "processes": mem_live["processes"],
            **{f"{k}_{when}": m[k] for when, m in (("start", mem0), ("built", mem_built), ("live", mem_live))
               for k in FIELDS.values()}}


def _samples(shards, plan) -> int:
    total = 0
    for shard, k, j in plan:
        n = shards[shard].samples
        total += len(range(j, n, k))
    return total


def child_assign(a: argparse.Namespace) -> dict:
    """Every slot's plan of one epoch for world x workers in this process; stops after the budget."""
    import dataclasses

    from pretrain.data import build_modalities, make_loader, slot_plan

    d = data_config(json.loads(a.train), 0)
    spec = make_loader(d.train, build_modalities(d, train=True), d, BATCH, 0, a.world, 0, True).dataset.spec
    slots = a.world * a.workers
    per_slot: list[int] = []
    gc.collect()
    elapsed = 0.0  # in slot_plan only (the samples per slot are counted outside the timing)
    done = 0
    for rank in range(a.world):
        s = dataclasses.replace(spec, rank=rank)
        for worker in range(a.workers):
            t0 = time.perf_counter()
            plan = slot_plan(s, 0, worker, a.workers)
            elapsed += time.perf_counter() - t0
            per_slot.append(_samples(spec.shards, plan))
            done += 1
        if elapsed > a.budget:
            break
    return {"slots": slots, "done": done, "seconds": elapsed * slots / done, "extrapolated": done < slots,
            "balance": max(per_slot) / min(per_slot) if min(per_slot) else float("inf"), "min": min(per_slot),
            "max": max(per_slot), "total": sum(per_slot)}


def child_webdataset(a: argparse.Namespace) -> dict:
    """webdataset's shard-list handling and ours on the same pattern."""
    import dataclasses

    import braceexpand
    import webdataset as wds

    from pretrain.data import build_modalities, expand_urls, make_loader, slot_plan

    pattern = json.loads(a.train)["urls"]
    out: dict[str, float] = {}

    def timed(name, fn):
        t = time.perf_counter()
        value = fn()
        out[name] = time.perf_counter() - t
        return value

    gc.collect()
    gc.disable()  # no collection inside a timing
    urls = timed("braceexpand", lambda: list(braceexpand.braceexpand(pattern)))
    timed("ours_expand_urls", lambda: expand_urls(pattern))
    timed("wds_SimpleShardList_first", lambda: next(iter(wds.SimpleShardList(pattern, seed=0))))
    timed("wds_ResampledShards_first", lambda: next(iter(wds.ResampledShards(pattern, deterministic=True))))
    slot_rank, slot_worker = a.rank % a.world, a.rank % a.workers
    os.environ.update(RANK=str(slot_rank), WORLD_SIZE=str(a.world), WORKER=str(slot_worker),
                      NUM_WORKERS=str(a.workers))

    def split(seed):
        return wds.DataPipeline(wds.SimpleShardList(pattern, seed=seed), wds.split_by_node, wds.split_by_worker)

    timed("wds_split_first", lambda: next(iter(split(0))))
    wds_slot = timed("wds_split_slot", lambda: [u["url"] for u in split(0)])
    d = data_config({"urls": pattern, "mode": "epoch"}, 0)
    spec = make_loader(d.train, build_modalities(d, train=True), d, BATCH, slot_rank, a.world, 0, True).dataset.spec
    ours = timed("ours_slot_plan", lambda: slot_plan(spec, 0, slot_worker, a.workers))
    spec_r = dataclasses.replace(spec, mode="resampled")
    timed("ours_slot_plan_resampled", lambda: slot_plan(spec_r, 0, slot_worker, a.workers))
    gc.enable()
    out["urls"] = len(urls)
    out["wds_slot_urls"] = len(wds_slot)
    out["ours_slot_shards"] = len(ours)
    return out


CHILDREN = {"startup": child_startup, "assign": child_assign, "webdataset": child_webdataset}


def run_child(checkout: Path, kind: str, train: dict, args: argparse.Namespace, **extra) -> dict:
    """One figure in a fresh process (``--quick``: in this one, which the memory figures then share)."""
    if args.quick:
        env = dict(os.environ)
        try:
            return CHILDREN[kind](argparse.Namespace(
                train=json.dumps(train), world=extra.get("world", args.world), rank=args.rank,
                workers=extra.get("workers", args.workers), budget=args.assign_budget))
        finally:
            os.environ.clear()
            os.environ.update(env)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--train", json.dumps(train),
           "--checkout", str(checkout), "--world", str(extra.get("world", args.world)),
           "--workers", str(extra.get("workers", args.workers)), "--rank", str(args.rank),
           "--budget", str(args.assign_budget)]
    proc = subprocess.run(cmd, cwd=checkout, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} in {checkout} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------- driver


def _med(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default="10,1000,10000,100000", help="list lengths, comma-separated (10 is added)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=8, help="loader workers per rank (start-up part)")
    parser.add_argument("--world", type=int, default=1, help="ranks in the start-up part")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--assign-world", type=int, default=1024)
    parser.add_argument("--assign-workers", type=int, default=8)
    parser.add_argument("--assign-budget", type=float, default=60.0, help="seconds before an assignment is extrapolated")
    parser.add_argument("--other", action="append", default=[], metavar="DIR",
                        help="another checkout (e.g. `git archive` of an earlier commit) measured alongside")
    parser.add_argument("--root", help="keep the generated shard folders here (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true",
                        help="the test's mode: 1 round, 2 workers, a 64 x 2 assignment, every figure in this process")
    parser.add_argument("--skip", default="", help="parts to leave out: startup,assign,webdataset")
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--train", help=argparse.SUPPRESS)
    parser.add_argument("--checkout", help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=float, default=60.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        sys.path.insert(0, args.checkout)
        print(json.dumps(CHILDREN[args.child](args)))
        return 0
    if args.quick:
        args.rounds, args.workers, args.assign_world, args.assign_workers = 1, 2, 64, 2
        if args.other:
            parser.error("--quick measures this checkout only (in this process)")
    sizes = sorted({10, *(int(s) for s in args.shards.split(","))})
    checkouts = [ROOT] + [Path(d).resolve() for d in args.other]
    skip = set(filter(None, args.skip.split(",")))
    with tempfile.TemporaryDirectory(prefix="bench_shardlist_") as tmp:
        root = Path(args.root) if args.root else Path(tmp)
        sys.path.insert(0, str(ROOT))
        t = time.perf_counter()
        data = {n: dataset(root, n) for n in sizes}
        print(f"data: {sizes} shards under {root} ({time.perf_counter() - t:.1f} s)", flush=True)
        result = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                  "python": platform.python_version(), "args": {k: v for k, v in vars(args).items() if v is not None},
                  "load_before": os.getloadavg(), "startup": {}, "assign": {}, "webdataset": {}}
        import torch

        result["torch"] = torch.__version__
        if "startup" not in skip:
            runs: dict = {}
            for r in range(args.rounds):
                order = [(c, n) for c in checkouts for n in sizes]
                for c, n in (order if r % 2 == 0 else order[::-1]):
                    for mode in MODES:
                        row = run_child(c, "startup", data[n][mode], args)
                        runs.setdefault(f"{c}|{mode}|{n}", []).append(row)
                        print(f"round {r} {c.name} {mode:9s} {n:>6}: build {row['build_s']:.2f} s, first batch "
                              f"{row['first_batch_s']:.2f} s, all workers {row['all_workers_s']:.2f} s, RSS "
                              f"{row['rss_live'] / 2**20:.0f} MiB, anon PSS {row['pss_anon_live'] / 2**20:.0f} MiB "
                              f"({row['processes']} processes); load {os.getloadavg()[0]:.2f}", flush=True)
            result["startup"] = runs
        if "assign" not in skip:
            for c in checkouts:
                for n in sizes:
                    for mode in MODES:
                        row = run_child(c, "assign", data[n][mode], args, world=args.assign_world,
                                        workers=args.assign_workers)
                        result["assign"][f"{c}|{mode}|{n}"] = row
                        print(f"assign {c.name} {mode:9s} {n:>6}: {'~' if row['extrapolated'] else ''}"
                              f"{row['seconds']:.2f} s for {row['slots']} slots ({row['done']} done), balance "
                              f"{row['balance']:.3f} ({row['min']}..{row['max']} samples per slot)", flush=True)
        if "webdataset" not in skip:
            for n in sizes:
                row = run_child(ROOT, "webdataset", data[n]["epoch"], args, world=args.assign_world,
                                workers=args.assign_workers)
                result["webdataset"][str(n)] = row
                print(f"webdataset {n:>6}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                         for k, v in row.items()), flush=True)
        result["load_after"] = os.getloadavg()
    print_tables(result, sizes, checkouts)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str) + "\n")
    return 0


def print_tables(result: dict, sizes: list[int], checkouts: list[Path]) -> None:
    print(f"\nload averages before {result['load_before']}, after {result['load_after']}")
    if result["startup"]:
        print("\nPer rank; extra = over the 10-shard list of the same mode and checkout; memory after one batch "
              "from every worker, summed over the rank's processes (MiB)")
        print("\n| checkout | mode | shards | build s | first batch s | all workers s | extra build + first batch s "
              "| RSS | extra RSS | extra anon RSS | extra anon PSS | extra anon RSS, rank process after build |")
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for c in checkouts:
            for mode in MODES:
                base = result["startup"][f"{c}|{mode}|10"]
                for n in sizes:
                    rows = result["startup"][f"{c}|{mode}|{n}"]
                    med = lambda k, rows=rows: _med(rows, k)  # noqa: E731
                    extra = lambda k, rows=rows: (_med(rows, k) - _med(base, k)) / 2**20  # noqa: E731
                    startup = med("build_s") + med("first_batch_s") - _med(base, "build_s") - _med(base, "first_batch_s")
                    print(f"| {c.name} | {mode} | {n:,} | {med('build_s'):.2f} | {med('first_batch_s'):.2f} | "
                          f"{med('all_workers_s'):.2f} | {startup:+.2f} | {med('rss_live') / 2**20:.0f} | "
                          f"{extra('rss_live'):+.1f} | {extra('anon_live'):+.1f} | {extra('pss_anon_live'):+.1f} | "
                          f"{(med('anon_built') - med('anon_start') - _med(base, 'anon_built') + _med(base, 'anon_start')) / 2**20:+.1f} |")
    if result["assign"]:
        print("\n| checkout | mode | shards | slots | seconds | balance: max / min samples per slot (min..max) |")
        print("| --- | --- | ---: | ---: | ---: | --- |")
        for key, row in result["assign"].items():
            c, mode, n = key.split("|")
            part = f", first {row['done']:,} slots" if row["extrapolated"] else ""
            print(f"| {Path(c).name} | {mode} | {int(n):,} | {row['slots']:,} | {'~' if row['extrapolated'] else ''}"
                  f"{row['seconds']:.2f} | {row['balance']:.3f} ({row['min']}..{row['max']}{part}) |")
    if result["webdataset"]:
        keys = ["braceexpand", "ours_expand_urls", "wds_SimpleShardList_first", "wds_ResampledShards_first",
                "wds_split_first", "wds_split_slot", "ours_slot_plan", "ours_slot_plan_resampled"]
        print("\n| shards | " + " | ".join(f"{k} ms" for k in keys) + " |")
        print("| ---: | " + " | ".join("---:" for _ in keys) + " |")
        for n, row in result["webdataset"].items():
            print(f"| {int(n):,} | " + " | ".join(f"{1000 * row[k]:.1f}" for k in keys) + " |")


if __name__ == "__main__":
    sys.exit(main())
