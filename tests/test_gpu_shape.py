"""Shaped for the GPU, checked on CPU: no read of a device value on the host in a steady-state step
(the flags travel with a non-blocking copy and are read a step later); DeepSpeed's own reads are
counted beside ours."""
from __future__ import annotations

import json

import pytest

from tests.helpers import ASSET_SHARDS, ok, single, tiny_overrides

pytestmark = pytest.mark.slow


def test_no_host_reads_in_steady_state_steps(tmp_path):
    counts_file = tmp_path / "reads.json"
    args = tiny_overrides(ASSET_SHARDS, tmp_path / "run", steps=8) + [
        "train.log_every=4", "eval.enabled=false", "train.checkpoint=false", "data.train.workers=0"]
    ok(single(args, env={"HOST_READS_OUT": str(counts_file)}, module="tests.host_reads"))
    counts = {int(k): v for k, v in json.loads(counts_file.read_text()).items()}
    steady = [s for s in range(2, 8) if not counts.get(s, {}).get("logged")]
    assert steady == [2, 3, 5, 6, 7], counts
    ours = {s: counts.get(s, {}).get("pretrain", 0) for s in steady}
    theirs = {s: counts.get(s, {}).get("deepspeed", 0) for s in steady}
    print(f"host reads per steady-state step (ZeRO-2, clipping): pretrain {ours}, deepspeed {theirs}")
    assert set(ours.values()) == {0}, counts
    # the counter does see reads in these steps: DeepSpeed's own (its gradient-norm check under ZeRO-2
    # with clipping), which this project does not control
    assert all(n > 0 for n in theirs.values()), counts


def _partition_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch

    from pretrain.config import load_config
    from pretrain.data import build_modalities
    from pretrain.distributed import close_distributed, init_distributed
    from pretrain.engine import construction
    from pretrain.models import build_model
    from tests.helpers import QUICKSTART, TINY_MODEL

    init_distributed(rank, world, port, cpu=True)
    try:
        cfg = load_config(QUICKSTART, ["data.train.urls=x.tar", "train.zero_stage=3", "train.zero3_init=true",
                                       *TINY_MODEL])
        modalities = build_modalities(cfg.data, train=True)
        with construction(cfg.train, world):
            model = build_model(cfg.model, modalities)
        rows = [(n, p.numel(), p.ds_numel, p.ds_tensor.numel()) for n, p in model.named_parameters()]
        from pretrain.optim import param_groups

        names = {id(p): n for n, p in model.named_parameters()}
        decayed = sorted(names[id(p)] for p in param_groups(model, 0.1)[0]["params"])
        whole = build_model(cfg.model, modalities)  # built as usual: weight decay on the same tensors
        whole_names = {id(p): n for n, p in whole.named_parameters()}
        assert decayed == sorted(whole_names[id(p)] for p in param_groups(whole, 0.1)[0]["params"])
        torch.save(rows, f"{out}.{rank}")
    finally:
        close_distributed()


def test_zero3_init_builds_each_rank_only_its_partition(tmp_path):
    """train.zero3_init: right after the model is built, each of 2 ranks holds only its part of every
    parameter (the full tensors exist nowhere)."""
    import math

    import torch
    import torch.multiprocessing as mp

    from pretrain.distributed import free_port

    mp.spawn(_partition_worker, args=(2, free_port(), str(tmp_path / "parts")), nprocs=2)
    ranks = [torch.load(f"{tmp_path / 'parts'}.{r}") for r in range(2)]
    assert [n for n, *_ in ranks[0]] == [n for n, *_ in ranks[1]] and len(ranks[0]) > 20
    full = sum(row[2] for row in ranks[0])
    held = [sum(row[3] for row in rows) for rows in ranks]
    assert all(row[1] == 0 for rows in ranks for row in rows)  # no rank holds a whole parameter
    assert all(row[3] <= math.ceil(row[2] / 2) for rows in ranks for row in rows)
    assert full <= sum(held) <= full + 2 * len(ranks[0])  # the parts cover the model (padding at most 1 each)


def test_zero3_init_trains_and_exports(tmp_path):
    from pretrain.export import export
    from tests.helpers import torchrun

    run = tmp_path / "run"
    ok(torchrun(tiny_overrides(ASSET_SHARDS, run, steps=2) + ["train.zero_stage=3", "train.zero3_init=true",
                                                              "eval.enabled=false", "data.train.workers=0"]))
    out = export(run / "checkpoints" / "step000002", tmp_path / "exported")
    from pretrain.export import Embedder

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
