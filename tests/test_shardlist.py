"""Long shard lists (issue 28): every slot's plan equals the straightforward implementation it
replaced (kept here as the reference), a 100k-shard plan costs little per slot, the compact shard list
and the per-folder file look-ups give pathlib's answers, and the benchmark runs in its tiny mode."""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import pickle
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.data import slot_plan
from pretrain.data.pipeline import StreamSpec
from pretrain.data.sources import ShardList, ShardRef, SourceInfo, SplitSources, _Folders, _match_remote
from tests.helpers import ROOT, data_config, loader, text_shards, write_index


def reference_plan(spec: StreamSpec, epoch: int, worker: int, num_workers: int) -> list[tuple[int, int, int]]:
    """``slot_plan`` as it was before issue 28: the whole shard list shuffled once per call."""
    n = len(spec.shards)
    slots = spec.world_size * num_workers
    slot = spec.rank * num_workers + worker
    if spec.mode == "resampled":
        rng = random.Random(f"{spec.seed}-draws-{epoch}-{spec.rank}-{worker}")
        weights = [s.weight if s.samples is None else (s.weight / s.mean_shard_samples if s.samples else 0.0)
                   for s in spec.sources]
        cum = list(itertools.accumulate(weights))
        plan = []
        for _ in range(max(1, math.ceil(n / slots))):
            x = rng.random() * cum[-1]
            src = spec.sources[min(len(cum) - 1, next((i for i, c in enumerate(cum) if c > x), len(cum)))]
            plan.append((src.first + rng.randrange(src.count), 1, 0))
        return plan
    order = list(range(n))
    if spec.shuffle:
        random.Random(f"{spec.seed}-shards-{epoch}").shuffle(order)
    if n >= slots:
        return [(order[i], 1, 0) for i in range(slot, n, slots)]
    i = slot % n
    return [(order[i], len(range(i, slots, n)), slot // n)]


def spec_for(n: int, sizes=(3, 1, 2), weights=(1.0, 3.0, 0.5), samples=(40, 0, None), **kw) -> StreamSpec:
    """``n`` shards in len(sizes) sources (shares of n), as ``make_loader`` builds them."""
    k = len(sizes) if n >= 2 * len(sizes) else 1
    counts = [n * s // sum(sizes[:k]) for s in sizes[:k]]
    counts[0] += n - sum(counts)
    sources, first, ids = [], 0, []
    for sid, (c, w, t) in enumerate(zip(counts, weights, samples)):
        sources.append(SourceInfo(f"s{sid}", w, first, c, t, "test"))
        first += c
        ids += [sid] * c
    shards = ShardList([f"/data/src{i}/shard-{j:06d}.tar" for i, j in zip(ids, range(n))], ids,
                       [None] * n)
    return StreamSpec(shards, sources, **kw)


def test_plans_equal_the_reference_for_every_slot():
    for n, (world, workers), mode, shuffle, seed, epoch in itertools.product(
            (1, 3, 8, 50, 1000), ((1, 1), (2, 3), (4, 2), (16, 8)), ("epoch", "resampled"), (True, False),
            (0, 7), (0, 3)):
        if mode == "resampled" and not shuffle:
            continue
        spec = spec_for(n, mode=mode, shuffle=shuffle, seed=seed, world_size=world)
        for rank in range(world):
            s = dataclasses.replace(spec, rank=rank)
            for w in range(workers):
                assert slot_plan(s, epoch, w, workers) == reference_plan(s, epoch, w, workers), \
                    (n, world, workers, mode, shuffle, seed, epoch, rank, w)


def test_a_100k_shard_epoch_for_1024_ranks_by_8_workers():
    """Every slot's plan of one epoch in one process: bounded time per slot (the order is shuffled
    once, not once per slot), each shard exactly once, and the reference's plans."""
    spec = spec_for(100_000, world_size=1024, seed=5)
    t0 = time.perf_counter()
    first = slot_plan(dataclasses.replace(spec, rank=0), 2, 0, 8)
    t1 = time.perf_counter()
    seen = list(first)
    for rank in range(1024):
        s = dataclasses.replace(spec, rank=rank)
        seen += [p for w in range(8) for p in slot_plan(s, 2, w, 8) if (rank, w) != (0, 0)]
    per_slot = (time.perf_counter() - t1) / 8191
    assert t1 - t0 < 5 and per_slot < 0.005, (t1 - t0, per_slot)  # the reference: ~60 ms per slot
    assert sorted(shard for shard, _, _ in seen) == list(range(100_000))
    for rank, w in ((0, 0), (517, 3), (1023, 7)):
        s = dataclasses.replace(spec, rank=rank)
        assert slot_plan(s, 2, w, 8) == reference_plan(s, 2, w, 8)
    resampled = dataclasses.replace(spec, mode="resampled", rank=517)
    t = time.perf_counter()
    plans = [slot_plan(resampled, 2, w, 8) for w in range(8)]
    assert (time.perf_counter() - t) / 8 < 0.005
    assert plans[3] == reference_plan(resampled, 2, 3, 8) and all(len(p) == 13 for p in plans)


def test_the_shard_list_holds_what_it_was_given():
    urls = ["/d/a-0.tar", "/d/a-1.tar", "/d/é/b.tar", "pipe:curl -s https://x/y-{1}.tar", "/d/a-0.tar"]
    samples = [3, None, 0, 2**70, 7]
    shards = ShardList(urls, [0, 0, 1, 1, 2], samples)
    want = [ShardRef(u, s, n) for u, s, n in zip(urls, [0, 0, 1, 1, 2], samples)]
    assert len(shards) == 5 and list(shards) == want and shards[-1] == want[-1] and shards[1:4] == want[1:4]
    assert pickle.loads(pickle.dumps(shards)).urls() == urls
    with pytest.raises(IndexError):
        shards[5]
    assert list(ShardList([], [], [])) == []
    common = ShardList([f"/very/long/common/prefix/shard-{i:06d}.tar" for i in range(1000)], [0] * 1000, [1] * 1000)
    assert common.prefix == "/very/long/common/prefix/shard-000" and common[999].url.endswith("000999.tar")
    # the loader's fingerprint (saved with every checkpoint) is the one it always was
    for n in (0, 1, 4097):
        split = SplitSources(ShardList([f"/d/{i}\".tar" for i in range(n)], [0] * n, [1] * n),
                             [SourceInfo("a", 1.0, 0, n, n, ""), SourceInfo("b", 2.5, n, 0, 0, "")])
        old = hashlib.sha256(json.dumps([[s.url for s in split.shards], [1.0, 2.5]]).encode()).hexdigest()
        assert split.digest() == old


def old_match_remote(url: str, table: dict[str, int]):
    if url in table:
        return table[url]
    best = None
    for name, n in table.items():
        if url.endswith("/" + name) and (best is None or len(name) > len(best[0])):
            best = (name, n)
    return best[1] if best is not None else table.get(url.rsplit("/", 1)[-1])


def test_remote_names_match_as_before():
    rng = random.Random(0)
    parts = ["a", "b", "s3:", "", "x.tar", "bucket"]
    for _ in range(2000):
        url = "/".join(rng.choice(parts) for _ in range(rng.randint(1, 5)))
        table = {"/".join(rng.choice(parts) for _ in range(rng.randint(1, 3))): i for i in range(rng.randint(0, 6))}
        assert _match_remote(url, table) == old_match_remote(url, table), (url, table)


def test_folder_lookups_answer_as_pathlib(tmp_path, monkeypatch):
    d = tmp_path / "d"
    other = tmp_path / "other"
    for folder in (d, other, d / "sub"):
        folder.mkdir(parents=True)
    for i in range(_Folders.LIST_AFTER + 8):
        (d / f"f{i:03d}.tar").write_bytes(b"x")
    (other / "target.tar").write_bytes(b"y")
    (d / "link.tar").symlink_to(other / "target.tar")
    (d / "dirlink").symlink_to(other)
    (d / "broken.tar").symlink_to(tmp_path / "nothing")
    (d / "loop.tar").symlink_to(d / "loop.tar")
    monkeypatch.chdir(tmp_path)
    names = [f"f{i:03d}.tar" for i in range(_Folders.LIST_AFTER + 8)] + [
        "link.tar", "dirlink", "dirlink/target.tar", "broken.tar", "missing.tar", "sub", "sub/", "sub/../f000.tar",
        "./f001.tar", ".", "..", "f002.tar/"]
    paths = [str(d / n) for n in names] + [f"d/{n}" for n in names] + ["d", "d/", "other/target.tar", "x"]
    folders = _Folders()
    for round_ in range(3):  # before and after each folder is listed
        for p in (paths if round_ != 1 else paths[::-1]):
            assert folders.is_file(p) == Path(p).is_file(), p
            assert folders.realpath(p) == str(Path(p).resolve()), p
    loop = str(d / "loop.tar")
    with pytest.raises(RuntimeError):
        Path(loop).resolve()
    with pytest.raises(RuntimeError):
        folders.realpath(loop)


def test_counts_beside_a_symlinked_shard_and_index_over_sizes(tmp_path):
    """A symlinked shard takes its count from its target's folder (pathlib's resolve, as before);
    where sizes.json and index.json both list a shard, index.json's count is the one used."""
    real = text_shards(tmp_path / "real", [4, 5])
    write_index(tmp_path / "real", {"s-000000.tar": 4, "s-000001.tar": 5})
    (tmp_path / "real" / "sizes.json").write_text(json.dumps({"s-000000.tar": 99, "s-000001.tar": 99}))
    links = tmp_path / "links"
    links.mkdir()
    for i, u in enumerate(real):
        (links / f"l-{i}.tar").symlink_to(u)
    (links / "index.json").write_text(json.dumps({"shards": [{"name": "l-0.tar", "samples": 1000}]}))
    ld = loader(data_config({"urls": [str(links / "l-0.tar"), str(links / "l-1.tar")]}))
    assert ld.epoch_samples == 9 and "index.json" in ld.describe()


def test_the_benchmark_runs_in_its_tiny_mode(tmp_path):
    out = tmp_path / "figures.json"
    proc = subprocess.run([sys.executable, "benchmarks/bench_shardlist.py", "--shards", "1000", "--quick",
                           "--root", str(tmp_path / "data"), "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert set(figures["startup"]) == {f"{ROOT}|{m}|{n}" for m in ("epoch", "resampled") for n in (10, 1000)}
    assert figures["assign"][f"{ROOT}|epoch|1000"]["total"] == sum(20 + i % 10 for i in range(1000))
    assert figures["webdataset"]["1000"]["urls"] == 1000
    assert "| wt" in proc.stdout or "| " in proc.stdout
