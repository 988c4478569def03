"""The loop at scale, on real torchrun gloo groups: gradient accumulation reproduces the large-batch
run under another ZeRO stage; a rank that dies ends the whole job promptly; LAMB trains."""
from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from tests.helpers import QUICKSTART, ROOT, deadline, losses, make_vector_shards, ok, run_cmds, single, \
    torchrun, torchrun_cmd, vector_overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vectors(tmp_path_factory):
    return make_vector_shards(tmp_path_factory.mktemp("vectors"), n=48, dim=8, shard_size=6)


def test_accumulation_reproduces_the_large_batch_run_under_zero3(vectors, tmp_path):
    """2 ranks: micro-batch 8 in one step (ZeRO-2) vs 2 micro-batches of 4 (ZeRO-3, and ZeRO-0). The negatives span
    the accumulated batch, so every step's loss, gradient norm and temperature are the same: a
    gradient scaled by the number of micro-batches (or the temperature's, as OpenCLIP's accumulation
    does) would show in the norm and the temperature even where AdamW's update hides it. (Dropout
    masks replayed by the accumulation: test_loss_reference.py.)"""
    big, acc, acc0 = tmp_path / "big", tmp_path / "acc", tmp_path / "acc0"
    common = ["train.checkpoint=false", "train.steps=4", "train.lr=0.05", "train.grad_clip=0"]
    accumulated = ["train.grad_accumulation_steps=2", "train.global_batch_size=16"]
    ok(torchrun(vector_overrides(vectors, big, 4, 8) + common + ["train.zero_stage=2"]))
    # and under ZeRO-0, whose gradients are averaged while the last micro-batch's backward runs
    outs = [ok(p) for p in run_cmds([torchrun_cmd(vector_overrides(vectors, acc, 4, 4) + common + accumulated
                                                  + ["train.zero_stage=3"]),
                                     torchrun_cmd(vector_overrides(vectors, acc0, 4, 4) + common + accumulated
                                                  + ["train.zero_stage=0"])])]
    assert all("accumulation=2 global_batch=16" in out for out in outs)
    rows = {name: {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r}
            for name, run in (("big", big), ("acc", acc), ("acc0", acc0))}
    assert sorted(rows["big"]) == sorted(rows["acc"]) == sorted(rows["acc0"]) == [1, 2, 3, 4]
    for step, want in rows["big"].items():
        for name in ("acc", "acc0"):
            got = rows[name][step]
            for key in ("loss", "grad_norm", "temperature"):
                assert got[key] == pytest.approx(want[key], rel=1e-5), (name, step, key, want[key], got[key])
    assert len({round(r["loss"], 4) for r in rows["big"].values()}) == 4  # the model moved between steps
    assert rows["big"][4]["temperature"] != pytest.approx(rows["big"][1]["temperature"], rel=1e-4)  # so did T
    assert {r.get("global_batch") for r in rows["acc"].values()} == {16.0}


def test_a_rank_that_dies_ends_the_job_promptly(vectors, tmp_path):
    """Rank 1 exits at step 3: the launcher exits non-zero within seconds of the death line (start-up
    not counted)."""
    cmd = torchrun_cmd(vector_overrides(vectors, tmp_path / "run", 400, 4) + ["train.checkpoint=false"],
                       module="tests.faults")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PRETRAIN_FAULT": "die:1:3", "PYTHONUNBUFFERED": "1"})
    lines, died = [], None
    with deadline(300):
        for line in proc.stdout:
            lines.append(line)
            if died is None and "rank 1: injected death at step 3" in line:
                died = time.monotonic()
        proc.wait()
    seconds = time.monotonic() - died if died else None
    print(f"dead rank: the launcher exited {seconds} s after the death line")
    assert died is not None, "".join(lines[-30:])
    assert proc.returncode != 0, "".join(lines[-30:])
    assert seconds < 15, f"the job took {seconds:.1f} s to end after a rank died"
    assert max(losses(tmp_path / "run")) < 400  # it ended early, not after its steps


def test_lamb_trains_on_one_process_and_mfu_is_logged(vectors, tmp_path):
    out = tmp_path / "lamb"
    ok(single(vector_overrides(vectors, out, 12, 8) + [
        "train.optimizer=lamb", "train.zero_stage=0", "train.lr=0.01", "train.checkpoint=false",
        "train.peak_tflops=0.001"]))
    curve = losses(out)
    first, last = sum(curve[s] for s in (1, 2, 3)) / 3, sum(curve[s] for s in (10, 11, 12)) / 3
    assert last < 0.8 * first, curve
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    # counted FLOPs over a 1 GFLOP/s "device": positive, and tflops / peak is the MFU
    assert all(r["mfu"] > 0 and r["mfu"] == pytest.approx(r["tflops_per_device"] / 0.001) for r in rows)


def test_step_flops_equal_a_hand_count_for_mlp_towers(vectors, tmp_path):
    """The counter behind ``mfu`` on our own MLP towers (8 -> 16 hidden -> linear head to 8), forward
    and backward of a step: every matrix product counted by hand (2 x rows x in x out each; the first
    layer's input needs no gradient, so it has one backward product, the others two)."""
    import torch

    from pretrain.config import load_config
    from pretrain.data import build_modalities
    from pretrain.flops import StepFlops
    from pretrain.models import build_model

    cfg = load_config(QUICKSTART, vector_overrides(vectors, tmp_path / "run", 1, 4))
    model = build_model(cfg.model, build_modalities(cfg.data, train=True))
    rows = 6
    inputs = {m: torch.randn(rows, 8) for m in ("a", "b")}
    with StepFlops() as counter:
        features, scale, _ = model(inputs)
        sum(f.sum() for f in features.values()).backward()
    per_layer = 2 * rows * 8 * 16  # both layers are 8 x 16 (hidden) and 16 x 8 (head)
    per_tower = per_layer * 2 + per_layer * 1 + per_layer * 2  # forward, first layer's backward, head's backward
    assert counter.flops == 2 * per_tower, (counter.flops, 2 * per_tower)
