"""A loss that owns parameters, written outside ``pretrain/`` (tests/plugins/siglip_pairs.py: SigLIP
with a bias per modality pair) and loaded through ``data.imports``: it trains on 2 ranks under ZeRO-3
(the biases learned, each its own), resumes from its checkpoint exactly, exports natively with its
biases, and the field's formats refuse it, naming them."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.helpers import PYTHON, losses, make_vector_shards, ok, run_cmd, torchrun, vector_overrides

pytestmark = pytest.mark.slow

NAMES = ("a", "b", "c")


def _args(shards, out, steps):
    return vector_overrides(shards, out, steps=steps, micro_batch=4, names=NAMES) + [
        "data.imports=[tests.plugins.siglip_pairs]", "loss.name=siglip_pairs", "loss.init_bias=-2.0",
        "train.zero_stage=3", "train.lr=0.05", "data.train.workers=0"]


def _column(out, key):
    return {r["step"]: r[key] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if key in r}


def test_a_plugin_loss_with_parameters_trains_resumes_and_exports(tmp_path):
    shards = make_vector_shards(tmp_path / "data", n=24, dim=8, names=NAMES)
    out = tmp_path / "run"
    ok(torchrun(_args(shards, out, steps=4) + ["train.checkpoint_every=2", "train.keep_checkpoints=3"]))
    pairs = ["a-b", "a-c", "b-c"]
    biases = {p: _column(out, f"siglip_pairs/bias/{p}") for p in pairs}
    for p in pairs:  # each pair's bias is learned, from the option's start
        assert sorted(biases[p]) == [1, 2, 3, 4]
        assert biases[p][1] == pytest.approx(-2.0) and biases[p][4] != pytest.approx(-2.0)
    assert len({round(biases[p][4], 6) for p in pairs}) == 3, biases  # three biases, not one shared
    assert set(_column(out, "siglip/a-b")) == {1, 2, 3, 4}

    # the checkpoint holds them (gathered from ZeRO-3's partitions) and the scalar bias does not exist
    from pretrain.export import consolidated_state_dict

    state = consolidated_state_dict(out / "checkpoints" / "step000004")
    assert {k for k in state if k.startswith("objective.")} == {f"objective.pair_bias.{p}" for p in pairs}
    assert "logit_bias" not in state
    # metrics log the bias in use at each step, before that step's update
    assert float(state["objective.pair_bias.a-b"].detach()) != pytest.approx(biases["a-b"][4])

    # resumed from step 2 on the same layout: steps 3 and 4 as the uninterrupted run
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step000004")
    (resumed / "checkpoints" / "latest").write_text("step000002\n")
    ok(torchrun(_args(shards, resumed, steps=4)))
    want, got = losses(out), losses(resumed)
    for step in (3, 4):
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), (step, got, want)

    # native export: the biases travel with the towers and the Embedder serves the model
    native = tmp_path / "native"
    ok(run_cmd([PYTHON, "-m", "pretrain.export", "--checkpoint", str(out), "--output", str(native)]))
    from safetensors.torch import load_file

    exported = load_file(str(native / "model.safetensors"))
    torch.testing.assert_close(exported["objective.pair_bias.b-c"], state["objective.pair_bias.b-c"])
    from pretrain.export import Embedder

    emb = Embedder.load(native)
    torch.testing.assert_close(emb.model.objective.pair_bias["a-c"].detach(), state["objective.pair_bias.a-c"])

    # a format holding one scalar bias refuses the model and says why: its towers, before the weights
    # are read, and every format; its parameters, for a model whose towers it could hold
    refused = run_cmd([PYTHON, "-m", "pretrain.export", "--checkpoint", str(out), "--output",
                       str(tmp_path / "oc"), "--format", "open_clip"])
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "needs an open_clip_image and an open_clip_text tower" in refused.stderr, refused.stderr[-2000:]
    assert "Formats: native (any model" in refused.stderr, refused.stderr[-2000:]
    assert not (tmp_path / "oc").exists()
    from pretrain.options import ConfigError

    with pytest.raises(ConfigError, match=r"objective\.pair_bias.* one scalar bias"):
        emb.model.inference_state_dict("open_clip")
