"""``train.async_checkpoint``: checkpoints written by a background thread (pretrain.checkpoint_writer).

The synchronous route is the suite's ``uninterrupted_run`` (2 ranks, ZeRO-2, 6 steps, checkpoints
every 2): the background saves must write the very same bytes, survive a kill -9 during their write
(no COMPLETE, the previous checkpoint in force), resume through today's reader, and stop the run
with the reason when their write fails.
"""
from __future__ import annotations

import io
import json
from collections import OrderedDict

import pytest
import torch

from pretrain.checkpoint import COMPLETE
from pretrain.checkpoint_writer import snapshot
from tests.helpers import ASSET_SHARDS, losses, ok, single, small_disk, tiny_overrides, torchrun

pytestmark = pytest.mark.slow


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_a_snapshot_saves_byte_for_byte_as_the_state_did_and_later_changes_do_not_reach_it():
    """Views of one flat buffer (ZeRO's parameters) stay views of one copy, a tensor met twice is
    saved once, containers keep their types and order, parameters and requires_grad stay."""
    flat = torch.arange(10, dtype=torch.float32)
    shared = torch.ones(3)
    state = OrderedDict(a=flat[:4].view(2, 2), b=flat[4:], again=shared, nested={"x": [shared, (1, "y")],
                        "p": torch.nn.Parameter(torch.zeros(2)), "g": torch.ones(2, requires_grad=True)},
                        t=flat[::3], step=7, shape=torch.Size([2, 2]))
    before = _saved(state)
    snap = snapshot(state)
    flat.add_(100)  # the training steps after the save
    shared.mul_(-1)
    state["nested"]["x"].append("later")
    assert _saved(snap.value) == before
    assert snap.value["a"].untyped_storage().data_ptr() == snap.value["b"].untyped_storage().data_ptr()
    assert type(snap.value) is OrderedDict and type(snap.value["nested"]["p"]) is torch.nn.Parameter


def test_async_saves_write_the_sync_bytes_survive_a_kill_and_resume_exactly(uninterrupted_run, tmp_path):
    """Rank 1 is killed (SIGKILL) in the middle of its background write of step 4 (rank 0's files
    written): no COMPLETE there, ``latest`` stays step 2 (itself written in the background), and the
    same command resumes from it through today's reader (checksums checked) and reproduces the
    synchronous run: the same losses, and checkpoints of steps 4 and 6 byte for byte the same files."""
    out = tmp_path / "run"
    args = tiny_overrides(ASSET_SHARDS, out, steps=6) + ["train.checkpoint_every=2", "eval.enabled=false",
                                                         "train.async_checkpoint=true"]
    killed = torchrun(args, env={"PRETRAIN_FAULT": "kill_in_async_write:1:4"}, module="tests.faults")
    assert killed.returncode != 0, killed.stdout[-2000:]
    assert "rank 1: injected kill -9 during the background write of step 4" in killed.stdout, killed.stdout[-3000:]
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step000002"
    assert (ckpts / "step000004").is_dir() and not (ckpts / "step000004" / COMPLETE).exists()
    assert any((ckpts / "step000004").glob("*.pt"))  # the kill came during the write, not before it

    resumed = ok(torchrun(args))
    assert f"resumed_from={ckpts / 'step000002'} at step 2" in resumed
    assert "(written in the background in" in resumed
    want, got = losses(uninterrupted_run), losses(out)
    assert sorted(got) == [1, 2, 3, 4, 5, 6] and all(got[s] == want[s] for s in got), (got, want)
    assert (ckpts / "latest").read_text().strip() == "step000006"
    for step in (4, 6):
        sync, background = (json.loads((r / f"step{step:06d}" / COMPLETE).read_text())
                            for r in (uninterrupted_run / "checkpoints", ckpts))
        assert background["step"] == step and background["files"] == sync["files"], step
        on_disk = sorted(p.name for p in (ckpts / f"step{step:06d}").iterdir())
        assert on_disk == sorted([*sync["files"], COMPLETE]), on_disk  # nothing left beside them


def test_a_failed_background_write_stops_the_run_with_the_reason(tmp_path):
    """The disk fills (another writer) before the save of step 6, whose write then fails in the
    background while training goes on: the run stops at the next step (exit 1) with the synchronous
    save's message (rank, folder, "the file system is full", the checkpoint kept); the torn folder
    is removed and the kept checkpoint stays ``latest``."""
    with small_disk(tmp_path / "disk", 32 * 2**20) as disk:  # one checkpoint of this run: ~6 MB
        out = disk / "run"
        args = tiny_overrides(ASSET_SHARDS, out, steps=12) + ["train.checkpoint_every=3", "eval.enabled=false",
                                                              "train.async_checkpoint=true"]
        proc = single(args, env={"PRETRAIN_FAULT": "fill_disk:6"}, module="tests.faults")
        assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert "rank 0 could not write the checkpoint of step 6" in proc.stderr, proc.stderr[-3000:]
        assert "the file system is full" in proc.stderr, proc.stderr[-3000:]
        ckpts = out / "checkpoints"
        assert f"The previous complete checkpoint {ckpts / 'step000003'} stays in force" in proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert [p.name for p in ckpts.iterdir() if p.is_dir()] == ["step000003"]
        assert (ckpts / "latest").read_text().strip() == "step000003"
        # it stopped within a step or two of the failure: not at the next save (step 9), nor at the end
        assert 6 <= max(losses(out)) < 9, sorted(losses(out))
