"""The loop at scale, on real torchrun gloo groups: gradient accumulation reproduces the large-batch
run under another ZeRO stage; a rank that dies ends the whole job promptly; LAMB trains."""
from __future__ import annotations

import json
import time

import pytest

from tests.helpers import losses, make_vector_shards, ok, single, torchrun, vector_overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vectors(tmp_path_factory):
    return make_vector_shards(tmp_path_factory.mktemp("vectors"), n=48, dim=8, shard_size=6)


def test_accumulation_reproduces_the_large_batch_run_under_zero3(vectors, tmp_path):
    """2 ranks: micro-batch 8 in one step (ZeRO-2) vs 2 micro-batches of 4 (ZeRO-3). The negatives
    span the accumulated batch, so every step's loss (after the updates before it) is the same."""
    big, acc = tmp_path / "big", tmp_path / "acc"
    common = ["train.checkpoint=false", "train.steps=4"]
    ok(torchrun(vector_overrides(vectors, big, 4, 8) + common + ["train.zero_stage=2"]))
    out = ok(torchrun(vector_overrides(vectors, acc, 4, 4) + common + [
        "train.zero_stage=3", "train.grad_accumulation_steps=2", "train.global_batch_size=16"]))
    assert "accumulation=2 global_batch=16" in out
    want, got = losses(big), losses(acc)
    assert sorted(want) == sorted(got) == [1, 2, 3, 4]
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5), (step, want, got)
    assert len({round(v, 4) for v in want.values()}) == 4  # the model moved between steps
    rows = [json.loads(line) for line in (acc / "metrics.jsonl").read_text().splitlines()]
    assert {r.get("global_batch") for r in rows if "loss" in r} == {16.0}


def test_a_rank_that_dies_ends_the_job_promptly(vectors, tmp_path):
    start = time.monotonic()
    proc = torchrun(vector_overrides(vectors, tmp_path / "run", 400, 4) + ["train.checkpoint=false"],
                    env={"PRETRAIN_FAULT": "die:1:3"}, timeout=300, module="tests.faults")
    elapsed = time.monotonic() - start
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "rank 1: injected death at step 3" in proc.stdout
    assert elapsed < 150, f"the job took {elapsed:.0f} s to end after a rank died"
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
