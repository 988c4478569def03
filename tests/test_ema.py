"""``train.ema`` (issue 30): under ZeRO-3 on 2 ranks each rank averages its own partition; the
average equals one computed in a single process from the run's own weights at every step (the
checkpoints'), also across a resume on the same layout and one onto 1 rank; it is evaluated beside
the weights (``eval/ema/...``) and exported with ``--weights ema``."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.helpers import ASSET_SHARDS, PYTHON, ok, run_cmd, single_cmd, tiny_overrides, torchrun

pytestmark = pytest.mark.slow
DECAY = 0.6


def _weights(run, step: int) -> dict[str, torch.Tensor]:
    from pretrain.export import consolidated_state_dict

    return consolidated_state_dict(run / "checkpoints" / f"step{step:06d}")


def _exported_ema(run, step: int, out, cli: bool = False) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from pretrain.export import export

    folder = run / "checkpoints" / f"step{step:06d}"
    if cli:
        ok(run_cmd([PYTHON, "-m", "pretrain.export", "--checkpoint", str(folder), "--output", str(out), "--weights", "ema"]))
    else:
        export(folder, out, weights="ema")
    return load_file(str(out / "model.safetensors"))


def _close(a: dict, b: dict, names) -> None:
    for n in names:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=1e-6, msg=n)


def test_ema_sharded_under_zero3_equals_one_process_and_survives_resume(tmp_path):
    from pretrain.ema import full_from_checkpoint

    run = tmp_path / "run"
    common = tiny_overrides(ASSET_SHARDS, run, steps=4) + [
        "train.zero_stage=3", "train.checkpoint_every=1", "train.keep_checkpoints=10", "eval.enabled=false",
        f"train.ema={{decay: {DECAY}, start: 2}}"]
    ok(torchrun(common + ["train.stop_at_step=2"]))
    ok(torchrun(common))  # resumed at step 2 on the same layout
    names = list(full_from_checkpoint(run / "checkpoints" / "step000001"))
    assert any(".backbone." in n for n in names) and "logit_scale" in names
    # by hand, in one process, from the weights the run had after each step (before start: a copy)
    ema = {n: w.clone() for n, w in _weights(run, 1).items() if n in names}
    for step in (2, 3, 4):
        w = _weights(run, step)
        ema = {n: ema[n] + (1 - DECAY) * (w[n] - ema[n]) for n in names}
    _close(_exported_ema(run, 4, tmp_path / "ema4", cli=True), ema, names)
    live = _weights(run, 4)
    assert any(not torch.allclose(live[n], ema[n]) for n in names)  # the average is not the weights

    # the step-2 checkpoint continued on 1 rank (the shares joined and cut again), with evaluation
    one = tmp_path / "one"
    shutil.copytree(run, one)
    for later in (3, 4):
        shutil.rmtree(one / "checkpoints" / f"step{later:06d}")
    (one / "checkpoints" / "latest").write_text("step000002\n")
    over = tiny_overrides(ASSET_SHARDS, one, steps=3) + [
        "train.zero_stage=3", "train.checkpoint_every=1", "train.keep_checkpoints=10",
        f"train.ema={{decay: {DECAY}, start: 2}}", "eval.every=0"]
    ok(run_cmd(single_cmd(over)))
    before = full_from_checkpoint(run / "checkpoints" / "step000002")
    w3 = _weights(one, 3)
    want = {n: before[n] + (1 - DECAY) * (w3[n] - before[n]) for n in names}
    _close(_exported_ema(one, 3, tmp_path / "ema3"), want, names)
    rows = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/ema/samples" in r]
    assert evals and any(k.startswith("eval/ema/") and k.replace("ema/", "") in evals[-1] for k in evals[-1])


def test_a_step_skipped_on_the_device_leaves_the_average_alone():
    from pretrain.ema import EmaConfig, WeightEma

    layer = torch.nn.Linear(3, 2)
    ema = WeightEma(layer, EmaConfig(decay=0.5), rank=0, world=1, zero3=False)
    before = {n: a.clone() for n, a in ema.avg.items()}
    with torch.no_grad():
        layer.weight.add_(1.0)
    ema.update(1, torch.tensor(1.0))  # skipped: no change
    assert all(torch.equal(ema.avg[n], before[n]) for n in before)
    ema.update(2, torch.tensor(0.0))  # taken: half way to the weights
    torch.testing.assert_close(ema.avg["weight"], before["weight"] + 0.5)
