"""Shaped for the GPU, checked on CPU: no read of a device value on the host in a steady-state step
(the flags travel with a non-blocking copy and are read a step later); DeepSpeed's own reads are
counted beside ours."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import ASSET_SHARDS, QUICKSTART, ok, run_cmd, run_cmds, single_cmd, tiny_overrides, torchrun_cmd

pytestmark = pytest.mark.slow


def test_no_host_reads_in_steady_state_steps(tmp_path):
    """One process under ZeRO-2 (the quickstart's), and 2 ranks under ZeRO-0, whose gradients are
    averaged while backward runs (pretrain.gradsync); both with clipping."""
    common = ["train.log_every=4", "eval.enabled=false", "train.checkpoint=false", "data.train.workers=0"]
    pattern = tmp_path / "reads-{world}-{rank}.json"  # tests.host_reads fills in its world size and rank
    other = tmp_path / "sgd-{world}-{rank}.json"  # SGD in Lookahead (issue 30), ZeRO-0, its own counts file
    procs = run_cmds([
        single_cmd(tiny_overrides(ASSET_SHARDS, tmp_path / "run", steps=8) + common, module="tests.host_reads"),
        torchrun_cmd(tiny_overrides(ASSET_SHARDS, tmp_path / "run0", steps=8) + common + ["train.zero_stage=0"],
                     module="tests.host_reads")], env={"HOST_READS_OUT": str(pattern)})
    procs.append(run_cmd(single_cmd(tiny_overrides(ASSET_SHARDS, tmp_path / "sgd", steps=8) + common + [
        "train.zero_stage=0", "train.optimizer=sgd", "train.lookahead={k: 2, alpha: 0.5}"], module="tests.host_reads"),
        env={"HOST_READS_OUT": str(other)}))
    for proc in procs:
        ok(proc)
    for name, ranks, deepspeed_reads, files in (("ZeRO-2, 1 process", 1, True, pattern), ("ZeRO-0, 2 ranks", 2, False, pattern),
                                                ("SGD + Lookahead, ZeRO-0, 1 process", 1, False, other)):
        for rank in range(ranks):
            raw = json.loads(Path(str(files).format(world=ranks, rank=rank)).read_text())
            counts = {int(k): v for k, v in raw.items()}
            steady = [s for s in range(2, 8) if not counts.get(s, {}).get("logged")]
            assert steady == [2, 3, 5, 6, 7], counts
            ours = {s: counts.get(s, {}).get("pretrain", 0) for s in steady}
            theirs = {s: counts.get(s, {}).get("deepspeed", 0) for s in steady}
            print(f"host reads per steady-state step ({name}, rank {rank}, clipping): pretrain {ours}, deepspeed {theirs}")
            assert set(ours.values()) == {0}, counts
            if deepspeed_reads:
                # the counter does see reads in these steps: DeepSpeed's own (its gradient-norm check
                # under ZeRO-2 with clipping), which this project does not control
                assert all(n > 0 for n in theirs.values()), counts
            else:  # ZeRO-0: none from DeepSpeed either
                assert set(theirs.values()) == {0}, counts


def test_zero3_init_builds_each_rank_only_its_partition_then_trains_and_exports(tmp_path):
    """train.zero3_init: right after the model is built, each of 2 ranks holds only its part of every
    parameter (the full tensors exist nowhere; recorded by tests.faults' record_partitions probe), weight
    decay falls on the same tensors as in a model built as usual; the run trains and exports."""
    import math

    import torch

    from pretrain.config import load_config
    from pretrain.data import build_modalities
    from pretrain.export import Embedder, export
    from pretrain.models import build_model
    from pretrain.optim import param_groups
    from tests.helpers import TINY_MODEL, torchrun

    run, parts = tmp_path / "run", tmp_path / "parts"
    ok(torchrun(tiny_overrides(ASSET_SHARDS, run, steps=2) + ["train.zero_stage=3", "train.zero3_init=true",
                                                              "eval.enabled=false", "data.train.workers=0"],
                env={"PRETRAIN_FAULT": f"record_partitions:{parts}"}, module="tests.faults"))
    ranks = [torch.load(f"{parts}.{r}") for r in range(2)]
    rows = [r["rows"] for r in ranks]
    assert [n for n, *_ in rows[0]] == [n for n, *_ in rows[1]] and len(rows[0]) > 20
    full = sum(row[2] for row in rows[0])
    held = [sum(row[3] for row in rank_rows) for rank_rows in rows]
    assert all(row[1] == 0 for rank_rows in rows for row in rank_rows)  # no rank holds a whole parameter
    assert all(row[3] <= math.ceil(row[2] / 2) for rank_rows in rows for row in rank_rows)
    assert full <= sum(held) <= full + 2 * len(rows[0])  # the parts cover the model (padding at most 1 each)
    cfg = load_config(QUICKSTART, ["data.train.urls=x.tar", *TINY_MODEL])
    whole = build_model(cfg.model, build_modalities(cfg.data, train=True))  # built as usual
    names = {id(p): n for n, p in whole.named_parameters()}
    assert ranks[0]["decayed"] == ranks[1]["decayed"] == sorted(names[id(p)] for p in param_groups(whole, 0.1)[0]["params"])

    out = export(run / "checkpoints" / "step000002", tmp_path / "exported")
    emb = Embedder.load(out)
    assert emb.embed_texts(["class number 1"]).shape == (1, 16)


def test_the_gpu_benchmark_runs_in_its_tiny_mode(tmp_path):
    """benchmarks/bench_gpu.py --tiny on CPU: ours on synthetic batches and on shards, OpenCLIP's
    trainer beside them, the figures written (so the script a GPU session runs never rots)."""
    import sys

    from tests.helpers import ROOT, run_cmd

    ok(run_cmd([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--tiny", "--out", str(tmp_path)],
               timeout=400))
    result = json.loads((tmp_path / "bench_gpu.json").read_text())
    runs = result["runs"]
    assert runs["ours_synthetic"]["samples_per_s"] > 0 and runs["ours_synthetic"]["data_wait_fraction"] < 0.5
    assert runs["ours_shards"]["samples_per_s"] > 0 and "data_wait_fraction" in runs["ours_shards"]
    assert runs["openclip_synthetic"]["samples_per_s"] > 0 and result["ratio_vs_openclip"] > 0
    # the data-only runs (issue 29): the loader alone, batches taken to the device as the step takes them
    import torch

    assert runs["data"]["samples_per_s"] > 0 and runs["data"]["decode"] == "cpu"
    assert runs["data_gpu_decode"]["decode"] == ("gpu" if torch.cuda.is_available() else "cpu")
    assert result["shards"]["samples"] >= 256 and result["shards"]["bytes_per_pixel"] > 0


def test_what_travels_to_the_gpu_machine_with_its_image_covers_every_need():
    """benchmarks/gpu/carry.txt + the GPU image's list (image_packages.txt) hold the project's
    dependencies and, for each carried wheel or source archive, every requirement that its installed
    metadata here names (pip resolves only the with-deps lines there): a need on neither list would
    stop `import deepspeed` or the benchmark on the lent machine, after its minutes had started."""
    import importlib.metadata as md
    import tomllib

    from packaging.requirements import Requirement

    from benchmarks.gpu.packages import carried as read_carried
    from benchmarks.gpu.packages import image as read_image
    from benchmarks.gpu.packages import norm
    from tests.helpers import ROOT

    image, carried = read_image(), {name: how for name, (_, how) in read_carried().items()}
    assert {"deepspeed", "open-clip-torch", "webdataset"} <= set(carried)
    # markers evaluated as on the GPU machine (Python 3.12, Linux), no extras
    env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "extra": ""}
    needs = {}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    needs["the project"] = [Requirement(r) for r in project]
    unread = set()
    for name, how in carried.items():
        if how != "with-deps":
            try:
                needs[name] = [Requirement(r) for r in md.requires(name) or []]
            except md.PackageNotFoundError:
                unread.add(name)
    # DeepSpeed's GPU-only need, not installed on a CPU machine; its wheel names no requirement
    assert unread <= {"nvidia-ml-py"}, f"carried but not installed here, so their needs are unread: {unread}"
    missing = [f"{who} needs {req.name}" for who, reqs in needs.items() for req in reqs
               if (req.marker is None or req.marker.evaluate(env)) and norm(req.name) not in image | set(carried)]
    assert not missing, f"neither on the GPU image nor in benchmarks/gpu/carry.txt: {missing}"
