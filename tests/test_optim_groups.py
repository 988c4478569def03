"""Optimizer groups per part of the model (issue 30): a tower's backbone, its head, the loss's own
parameters, each with its learning rate, weight decay and (backbones) layer decay; the depth every
parameter gets in a timm ViT, an open_clip ViT and a BERT; the rates over warmup + cosine against a
hand computation; the groups under ZeRO-3 on 2 ranks, logged as lr/<part>, and a checkpoint resumed
with other groups (its state loaded by name)."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch

from tests.helpers import ASSET_SHARDS, QUICKSTART, TINY_MODEL, ok, tiny_overrides, torchrun


def _model(*overrides: str):
    from pretrain.config import load_config
    from pretrain.data import build_modalities
    from pretrain.models import build_model

    cfg = load_config(QUICKSTART, TINY_MODEL + list(overrides))
    return cfg, build_model(cfg.model, build_modalities(cfg.data, train=True), objective=cfg.loss.build())


def _hand_lr(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def _bert_depth(name: str, layers: int) -> int:
    """BERT by hand: embeddings 0, encoder layer k k + 1, the pooler after the last layer."""
    if ".embeddings." in name:
        return 0
    m = re.search(r"\.layer\.(\d+)\.", name)
    return int(m.group(1)) + 1 if m else layers + 1


def test_rates_and_decay_of_each_group_over_warmup_and_cosine():
    from pretrain.optim import build_optimizer, build_schedule

    cfg, model = _model("model.towers.text.options.layers=3",
                        "model.towers.text.optim={lr: 0.01, weight_decay: 0.05, layer_decay: 0.5}",
                        "model.towers.image.head_optim={lr: 0.003}", "loss.optim={lr: 0.1}",
                        "train.lr=0.002", "train.weight_decay=0.2", "train.warmup_steps=3", "train.steps=10")
    optimizer = build_optimizer(model, cfg.train)
    schedule = build_schedule(optimizer, cfg.train, cfg.train.steps)
    names = {id(p): n for n, p in model.named_parameters()}
    by_name = {}
    for g in optimizer.param_groups:
        for p in g["params"]:
            by_name[names[id(p)]] = g

    def base(name: str, p) -> tuple[float, float]:  # (rate, decay) by the documented rules
        matrix = p.ndim >= 2 and "logit_" not in name
        if name.startswith("towers.text.backbone."):
            return 0.01 * 0.5 ** (4 - _bert_depth(name, 3)), 0.05 if matrix else 0.0
        if name.startswith("towers.text."):
            return 0.01, 0.05 if matrix else 0.0  # the head takes the tower's settings
        if name.startswith("towers.image.head."):
            return 0.003, 0.2 if matrix else 0.0
        if name.startswith("towers.image."):
            return 0.002, 0.2 if matrix else 0.0
        return 0.1, 0.2 if matrix else 0.0  # the loss's: logit_scale

    assert set(by_name) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert {_bert_depth(n, 3) for n in by_name if n.startswith("towers.text.backbone.")} == {0, 1, 2, 3, 4}
    for step in range(cfg.train.steps):
        for name, p in model.named_parameters():
            rate, decay = base(name, p)
            assert by_name[name]["lr"] == pytest.approx(rate * _hand_lr(step, 3, 10), rel=1e-12), (step, name)
            assert by_name[name]["weight_decay"] == decay, name
        optimizer.step()
        schedule.step()

    # train.weight_decay_on: all puts the decay on norms, biases and the temperature too
    cfg, model = _model("train.weight_decay_on=all", "train.weight_decay=0.3")
    groups = build_optimizer(model, cfg.train).param_groups
    assert {g["weight_decay"] for g in groups} == {0.3}
    assert sum(len(g["params"]) for g in groups) == len([p for p in model.parameters() if p.requires_grad])


def test_depth_of_every_parameter_timm_vit_open_clip_vit_and_bert(tmp_path):
    import open_clip
    import timm

    from pretrain.optim import layer_depths

    def wrap(**modules):
        holder = torch.nn.Module()
        for k, v in modules.items():
            setattr(holder, k, v)
        return holder

    # timm ViT (its own group_matcher): stem 0, blocks.k k + 1, the final norm with the last block
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=3, img_size=32)
    depths, top = layer_depths(wrap(model=vit))
    assert top == 3
    for name, _ in vit.named_parameters():
        m = re.match(r"blocks\.(\d+)\.", name)
        want = int(m.group(1)) + 1 if m else 0 if name.split(".")[0] in ("cls_token", "pos_embed", "patch_embed") else 3
        assert depths[f"model.{name}"] == want, name

    # open_clip ViT and text transformer (by name): embeddings/stem 0, resblocks.k k + 1, then ln_post/proj
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 12, "vocab_size": 64, "width": 32, "heads": 2, "layers": 2}}
    (tmp_path / "ld_tiny.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "ld_tiny.json")
    clip = open_clip.create_model("ld_tiny", pretrained=None)
    stem = {"class_embedding", "positional_embedding", "conv1", "ln_pre", "token_embedding"}
    for holder, prefix in ((wrap(visual=clip.visual), "visual."), (wrap(model=clip), "model.")):
        depths, top = layer_depths(holder)
        assert top == 3
        for name, _ in holder.named_parameters():
            if name.startswith("model.visual."):
                continue  # (the whole CLIP here; our text tower deletes its visual)
            m = re.search(r"resblocks\.(\d+)\.", name)
            want = int(m.group(1)) + 1 if m else 0 if name[len(prefix):].split(".")[0] in stem else 3
            assert depths[name] == want, name

    # BERT (this project's tiny text tower, a Hugging Face BertModel): embeddings 0, layer.k k + 1, pooler last
    _, model = _model("model.towers.text.options.layers=2")
    depths, top = layer_depths(model.towers["text"].backbone)
    assert top == 3 and all(depths[n] == _bert_depth(n, 2) for n in depths), depths

    # a backbone without numbered blocks has no depth to decay over: refused, naming the key
    from pretrain.options import ConfigError

    with pytest.raises(ConfigError, match=r"model\.towers\.image\.optim\.layer_decay"):
        from pretrain.optim import param_groups

        _, model = _model("model.towers.image.type=mlp", "model.towers.image.options={}",
                          "model.towers.image.optim={layer_decay: 0.8}")
        param_groups(model, 0.1)


@pytest.mark.slow
def test_groups_under_zero3_logged_and_resumed_with_other_groups(tmp_path):
    from pretrain.layout import read_full_state
    from pretrain.optim import optimized_names

    run = tmp_path / "run"
    groups = ["model.towers.text.optim={lr: 0.01, layer_decay: 0.5}", "loss.optim={lr: 0.05}"]
    base = tiny_overrides(ASSET_SHARDS, run, steps=3) + ["train.zero_stage=3", "train.checkpoint_every=2",
                                                        "eval.enabled=false", "train.warmup_steps=2"]
    ok(torchrun(base + groups))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r for r in rows if "loss" in r}
    lr = 0.002  # the quickstart's train.lr
    for step, row in logged.items():
        factor = _hand_lr(step - 1, 2, 3)
        assert row["lr/text"] == pytest.approx(0.01 * factor) and row["lr/loss"] == pytest.approx(0.05 * factor)
        assert row["lr/image"] == pytest.approx(lr * factor) and row["lr/text.head"] == pytest.approx(0.01 * factor)

    # resumed at step 2 without the groups: the state is loaded by name into the two default groups
    (run / "checkpoints" / "latest").write_text("step000002\n")
    for later in (run / "checkpoints").glob("step000003"):
        import shutil

        shutil.rmtree(later)
    probe = tmp_path / "probe"
    out = ok(torchrun(base + ["train.steps=4"], module="tests.faults",
                      env={"PRETRAIN_FAULT": f"save_after_resume:{probe}"}))
    assert re.search(r"optimizer groups \d+ -> 2", out), out[-3000:]
    _, model = _model()
    saved_order = [n for g in json.loads(json.dumps(_saved_groups(run / "checkpoints" / "step000002"))) for n in g]
    a = read_full_state(run / "checkpoints" / "step000002", tmp_path / "scratch", saved_order)
    b = read_full_state(probe / "resumed", tmp_path / "scratch", optimized_names(model))
    for k in a.params:
        assert torch.equal(a.params[k].reshape(-1), b.params[k].reshape(-1)), k
        for m in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(a.moments[k][m].reshape(-1), b.moments[k][m].reshape(-1)), (k, m)
    assert a.optimizer_steps == b.optimizer_steps == 2
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows if "loss" in r) == 4


def _saved_groups(folder):
    from pretrain.layout import saved_layout

    groups = saved_layout(folder).optimizer_groups
    assert groups and len(groups) > 2
    return groups
