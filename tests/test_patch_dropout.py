"""``model.towers.<m>.patch_dropout`` (issue 30, FLIP): in training a ViT tower sees the class
token and max(1, int(N (1 - p))) of its N patch tokens, a random subset per sample; in evaluation
all of them, and the same features as without the key. timm, open_clip and transformers' CLIP."""
from __future__ import annotations

import json

import pytest
import torch

OC = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
      "text_cfg": {"context_length": 12, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}
HF = {"model_type": "clip", "vision_config": {"image_size": 32, "patch_size": 8, "hidden_size": 32,
                                              "intermediate_size": 64, "num_hidden_layers": 1,
                                              "num_attention_heads": 2}, "projection_dim": 16}


def _tower(kind: str, p: float, tmp_path):
    from pretrain.models import EncoderTower, TowerConfig, TowerContext

    if kind == "timm":
        cfg = TowerConfig(type="timm", options={"name": "vit_tiny_patch16_224", "kwargs": {"depth": 1, "patch_size": 8}})
        first = lambda b: b.model.blocks[0]  # noqa: E731
    elif kind == "open_clip":
        (tmp_path / "pd_tiny.json").write_text(json.dumps(OC))
        cfg = TowerConfig(type="open_clip_image", options={"model": "pd_tiny", "model_config": str(tmp_path / "pd_tiny.json")})
        first = lambda b: b.visual.transformer.resblocks[0]  # noqa: E731
    else:
        cfg = TowerConfig(type="hf_clip_image", options={"config": HF})
        first = lambda b: b.vision_model.encoder.layers[0]  # noqa: E731
    cfg.patch_dropout = p
    torch.manual_seed(0)
    tower = EncoderTower(cfg, 16, TowerContext("image", "model.towers.image", (3, 32, 32), torch.float32, None))
    return tower, first(tower.backbone)


def _tokens_seen(tower, block, x) -> int:
    seen = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else next(iter(kwargs.values()))
        seen.append(hidden.shape[1] if hidden.shape[0] == x.shape[0] else hidden.shape[0])  # (open_clip may run L, B, D)

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    tower.backbone(x)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("kind", ["timm", "open_clip", "hf"])
def test_patch_dropout_keeps_the_share_in_training_and_all_in_eval(kind, tmp_path):
    x = torch.randn(3, 3, 32, 32)
    plain, _ = _tower(kind, 0.0, tmp_path)
    tower, block = _tower(kind, 0.5, tmp_path)
    tower.load_state_dict(plain.state_dict())  # same weights: patch dropout adds no parameter
    patches = (32 // 8) ** 2
    tower.train()
    assert _tokens_seen(tower, block, x) == 1 + max(1, int(patches * 0.5))
    a, b = tower.backbone(x), tower.backbone(x)
    assert not torch.equal(a, b)  # another subset each call
    tower.eval()
    plain.eval()
    assert _tokens_seen(tower, block, x) == 1 + patches
    assert torch.equal(tower.backbone(x), plain.backbone(x))


def test_patch_dropout_refused_where_there_are_no_patches(tmp_path):
    from pretrain.config import load_config
    from pretrain.data import build_modalities
    from pretrain.models import build_model
    from pretrain.options import ConfigError
    from tests.helpers import QUICKSTART, TINY_MODEL

    cfg = load_config(QUICKSTART, TINY_MODEL + ["model.towers.image.patch_dropout=0.5"])  # a ResNet
    with pytest.raises(ConfigError, match=r"model\.towers\.image\.patch_dropout"):
        build_model(cfg.model, build_modalities(cfg.data, train=True))
    with pytest.raises(ConfigError, match=r"model\.towers\.image\.patch_dropout"):
        load_config(QUICKSTART, TINY_MODEL + ["model.towers.image.patch_dropout=1.0"])
