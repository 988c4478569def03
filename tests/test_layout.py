"""Resume on another layout (issue 27): a checkpoint of the suite's uninterrupted run (2 ranks,
ZeRO-2, 1 loader worker, 6 steps of 12 samples over 48-sample epochs) continues on 1 rank at ZeRO-3
with 2 workers; that run, mid-epoch, on 2 ranks at ZeRO-1; that one, mid-epoch, on 1 rank at ZeRO-0;
and the original on 4 ranks at ZeRO-3. Each time the state the new engine loaded (saved again right
after the resume by tests.faults' probe) equals the checkpoint's, parameter by parameter: weights,
Adam moments and step count, buffers, the schedule; and the sample keys logged over the epoch that
crossed the layouts hold every sample exactly once."""
from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from tests.helpers import ASSET_SHARDS, ok, torchrun

pytestmark = pytest.mark.slow


def _full(folder: Path, names: list[str]):
    from pretrain.layout import read_full_state

    return read_full_state(folder, folder.parent.parent / "scratch", names)


def _assert_same_state(saved: Path, resumed: Path, names: list[str]) -> None:
    a, b = _full(saved, names), _full(resumed, names)
    assert a.params.keys() == b.params.keys() and a.buffers.keys() == b.buffers.keys()
    for k in a.params:
        assert torch.equal(a.params[k].reshape(-1), b.params[k].reshape(-1)), k
        for m in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(a.moments[k][m].reshape(-1), b.moments[k][m].reshape(-1)), (k, m)
    for k in a.buffers:
        assert torch.equal(a.buffers[k], b.buffers[k]), k
    assert a.optimizer_steps == b.optimizer_steps > 0
    assert a.scheduler["last_epoch"] == b.scheduler["last_epoch"] and a.scheduler["_last_lr"] == b.scheduler["_last_lr"]


def _keys(run: Path, steps: range) -> list[str]:
    out = []
    for path in sorted((run / "keys").glob("rank*.jsonl")):
        rows = {}
        for line in path.read_text().splitlines():  # a resumed run appends: the later line of a step wins
            row = json.loads(line)
            rows[row["step"]] = row["keys"]
        out += [k for s in steps for k in rows.get(s, [])]
    return out


def _every_sample_once(keys: list[str]) -> None:
    from pretrain.data.tarstream import iter_shard

    every = {raw.key for shard in sorted((ASSET_SHARDS / "train").glob("*.tar"))
             for raw in iter_shard(str(shard), None, lambda i: True, lambda *a: None, 2**20)}
    counts = Counter(keys)
    assert set(counts) == every and set(counts.values()) == {1}, (len(keys), len(every), counts.most_common(3))


def _copy_at(run: Path, to: Path, step: int) -> Path:
    """A copy of ``run`` that has just saved ``step``: later checkpoints and key lines gone."""
    shutil.copytree(run, to)
    for folder in (to / "checkpoints").glob("step*"):
        if int(folder.name[4:]) > step:
            shutil.rmtree(folder)
    (to / "checkpoints" / "latest").write_text(f"step{step:06d}\n")
    for path in (to / "keys").glob("*.jsonl"):
        lines = [l for l in path.read_text().splitlines() if json.loads(l)["step"] <= step]
        path.write_text("".join(l + "\n" for l in lines))
    return to


def _resume(run: Path, probe: Path, nproc: int, *overrides: str) -> str:
    from tests.helpers import tiny_overrides

    args = tiny_overrides(ASSET_SHARDS, run, steps=6) + ["train.checkpoint_every=2", "train.log_keys=true",
                                                         "eval.enabled=false", *overrides]
    return ok(torchrun(args, nproc=nproc, module="tests.faults", env={"PRETRAIN_FAULT": f"save_after_resume:{probe}"}))


def test_two_ranks_to_one_to_two_to_one_and_to_four(uninterrupted_run, tmp_path):
    from pretrain.config import load_config
    from pretrain.data import build_modalities
    from pretrain.models import build_model
    from pretrain.optim import optimized_names

    cfg = load_config(uninterrupted_run / "config.yaml")
    names = optimized_names(build_model(cfg.model, build_modalities(cfg.data, train=True), objective=cfg.loss.build()))
    steps = uninterrupted_run / "checkpoints"

    # 2 ranks ZeRO-2, 1 worker, at step 4 (epoch 0 read whole) -> 1 rank ZeRO-3, 2 workers, to step 6
    one = _copy_at(uninterrupted_run, tmp_path / "one", 4)
    out = _resume(one, tmp_path / "probe1", 1, "train.zero_stage=3", "data.train.workers=2")
    assert "on another layout (ZeRO-2 x 2 ranks -> ZeRO-3 x 1 ranks); global batch 12 -> 6" in out, out[-3000:]
    _assert_same_state(steps / "step000004", tmp_path / "probe1" / "resumed", names)

    # -> 2 ranks ZeRO-1, 1 worker, from its step 6 (12 samples of epoch 1 read), to step 9
    two = _copy_at(one, tmp_path / "two", 6)
    _resume(two, tmp_path / "probe2", 2, "train.zero_stage=1", "train.steps=9")
    _assert_same_state(one / "checkpoints" / "step000006", tmp_path / "probe2" / "resumed", names)

    # -> 1 rank ZeRO-0, from its step 8 (36 of epoch 1 read: stopped mid-epoch), to step 10
    back = _copy_at(two, tmp_path / "back", 8)
    _resume(back, tmp_path / "probe3", 1, "train.zero_stage=0", "train.steps=10")
    _assert_same_state(two / "checkpoints" / "step000008", tmp_path / "probe3" / "resumed", names)
    _every_sample_once(_keys(back, range(5, 11)))  # epoch 1 over three layouts: 12 + 24 + 12

    # the original at step 4 -> 4 ranks ZeRO-3: epoch 1 on the new layout, once each
    four = _copy_at(uninterrupted_run, tmp_path / "four", 4)
    _resume(four, tmp_path / "probe4", 4, "train.zero_stage=3")
    _assert_same_state(steps / "step000004", tmp_path / "probe4" / "resumed", names)
    _every_sample_once(_keys(four, range(5, 7)))
    rows = [json.loads(line) for line in (four / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows if "loss" in r) == 6
    assert json.loads((four / "ranks" / "rank3.json").read_text())["world_size"] == 4

    # the last checkpoint of a run continued elsewhere exports and evaluates as any other
    from pretrain.export import Embedder, export

    emb = Embedder.load(export(back / "checkpoints" / "step000010", tmp_path / "exported"))
    assert emb.embed_texts(["class number 1"]).shape == (1, 16)


def test_zero0_bf16_mid_epoch_to_four_ranks_at_zero1(tmp_path):
    """The chain above has no ZeRO-0 source and no bf16: benchmarks/relayout_matrix.py's cell for a
    2-rank ZeRO-0 bf16 checkpoint (DeepSpeed's per-parameter fp32 masters) saved mid-epoch, resumed on
    4 ranks at ZeRO-1: the state loaded equals the checkpoint's; epoch 0 read exactly once, the two
    new ranks (no old stream dealt to them) starting epoch 1. The script runs every such pair."""
    import importlib.util

    from tests.helpers import ROOT

    spec = importlib.util.spec_from_file_location("relayout_matrix", ROOT / "benchmarks" / "relayout_matrix.py")
    matrix = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(matrix)
    source, error = matrix.make_source(tmp_path, 0, 2, "bf16")
    assert not error, error
    cell = matrix.resume_cell(source, tmp_path, 1, 4, "bf16", matrix._names(source), matrix._every_key())
    assert cell["result"] == "exact", cell
