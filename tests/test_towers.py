"""Towers from the config: every registered type builds and encodes its modality; local pretrained
weights load (and bad ones are refused by name); freezing, the missingness indicator, activation
checkpointing and LAMB behave as documented. Single process, tiny sizes."""
from __future__ import annotations

import json
import re

import pytest
import torch

from pretrain.config import ConfigError, load_config
from pretrain.data import build_modalities
from pretrain.models import build_model
from pretrain.optim import OptimConfig, build_optimizer, param_groups
from tests.helpers import QUICKSTART


def _cfg(modalities: dict, towers: dict, extra: list[str] = ()):
    return load_config(QUICKSTART, [
        "data.train.urls=unused-{000000..000001}.tar", "data.val.urls=", "data.labels=null", "eval.enabled=false",
        "eval.classnames=[]", "data.image_size=16", "data.context_length=12", "model.embed_dim=8",
        f"data.modalities={json.dumps(modalities)}", f"model.towers={json.dumps(towers)}", *extra,
    ])


NPY = {"decoder": "npy", "options": {"shape": [6]}}
MEL = {"decoder": "audio", "options": {"features": "log_mel", "n_mels": 16, "seconds": 0.2, "sample_rate": 8000}}
WAVE = {"decoder": "audio", "options": {"seconds": 0.1, "sample_rate": 8000}}
TINY_BERT = {"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
             "intermediate_size": 32, "max_position_embeddings": 16}
TINY_W2V = {"model_type": "wav2vec2", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 32, "conv_dim": [8, 8], "conv_kernel": [10, 3], "conv_stride": [5, 2],
            "num_conv_pos_embeddings": 4, "num_conv_pos_embedding_groups": 2, "do_stable_layer_norm": True}


def _model(cfg):
    """The model of a checked config, built as a run builds it (decoders first)."""
    return build_model(cfg.model, build_modalities(cfg.data, train=True))


def _inputs(model, cfg, n=3):
    mods = build_modalities(cfg.data, train=True)
    out = {}
    for m in mods:
        dec = m.decoder
        if dec.dtype == torch.long:
            out[m.name] = torch.randint(3, dec.tokenizer.vocab_size, (n, *dec.output_shape))
        else:
            out[m.name] = torch.randn(n, *dec.output_shape)
    return out


@pytest.mark.parametrize(
    "modality, tower",
    [
        ({"decoder": "image"}, {"type": "timm", "options": {"name": "test_resnet"}}),
        ({"decoder": "image"}, {"type": "timm", "options": {"name": "test_vit"}}),  # fixed input size: built at 16px
        ({"decoder": "text"}, {"type": "text_transformer", "options": {"width": 16, "layers": 1, "heads": 2,
                                                                     "pooling": "last"}}),
        ({"decoder": "text"}, {"type": "hf_text", "options": {"config": TINY_BERT, "pooling": "mean"}}),
        (MEL, {"type": "audio_cnn", "options": {"channels": [4, 8]}}),
        (WAVE, {"type": "hf_audio", "options": {"config": TINY_W2V}}),
        (NPY, {"type": "mlp", "options": {"hidden": [12, 10]}, "head": "mlp"}),
    ],
    ids=["timm-cnn", "timm-vit", "text_transformer", "hf_text", "audio_cnn", "hf_audio", "mlp"],
)
def test_every_tower_type_encodes_its_modality(modality, tower):
    cfg = _cfg({"x": modality, "v": NPY}, {"x": tower, "v": {"type": "mlp", "options": {"hidden": [4]}}})
    model = _model(cfg)
    inputs = _inputs(model, cfg)
    feats, scale, bias = model(inputs)
    assert feats["x"].shape == (3, 8) and bias is None
    torch.testing.assert_close(feats["x"].norm(dim=-1), torch.ones(3))
    assert not torch.allclose(feats["x"][0], feats["x"][1])  # the inputs matter
    feats["x"].sum().backward()  # and every trainable part of the tower gets a gradient path
    grads = [p.grad for p in model.towers["x"].parameters() if p.requires_grad]
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads) >= len(grads) // 2


def test_pooling_choices_pick_the_documented_positions():
    from pretrain.models.towers import _pool

    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)
    attn = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert _pool(hidden, attn, "cls").flatten().tolist() == [0.0, 4.0]
    assert _pool(hidden, attn, "last").flatten().tolist() == [2.0, 5.0]
    assert _pool(hidden, attn, "mean").flatten().tolist() == [1.0, 4.5]


def test_timm_weights_load_from_a_local_file_and_a_wrong_file_is_refused(tmp_path):
    import timm
    from safetensors.torch import save_file

    source = timm.create_model("test_resnet", num_classes=5)  # with a classifier, as published weights are
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "w.safetensors"))
    cfg = _cfg({"image": {"decoder": "image"}, "v": NPY},
               {"image": {"type": "timm", "options": {"name": "test_resnet", "pretrained": str(tmp_path / "w.safetensors")}},
                "v": {"type": "mlp"}})
    model = _model(cfg)
    loaded = model.towers["image"].backbone.model.state_dict()
    for k, v in loaded.items():
        torch.testing.assert_close(v, source.state_dict()[k])
    other = timm.create_model("resnet10t", num_classes=0)
    torch.save(other.state_dict(), tmp_path / "other.pth")
    bad = _cfg({"image": {"decoder": "image"}, "v": NPY},
               {"image": {"type": "timm", "options": {"name": "test_resnet", "pretrained": str(tmp_path / "other.pth")}},
                "v": {"type": "mlp"}})
    with pytest.raises(ConfigError, match=r"model\.towers\.image\.options\.pretrained: .* does not fit|size mismatch"):
        _model(bad)
    missing = _cfg({"image": {"decoder": "image"}, "v": NPY},
                   {"image": {"type": "timm", "options": {"name": "test_resnet", "pretrained": "/nowhere/w.pt"}},
                    "v": {"type": "mlp"}})
    with pytest.raises(ConfigError, match=r"model\.towers\.image\.options\.pretrained: no such file"):
        _model(missing)


def _local_bert(folder):
    """A tiny BERT and its WordPiece tokenizer saved as from a hub, but made here (no network)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "handwritten", "seven", "digit", "the", "##s"]
    folder.mkdir(parents=True, exist_ok=True)
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})
    tok.save_pretrained(str(folder))
    torch.manual_seed(3)
    model = BertModel(BertConfig(vocab_size=len(words), **{k: v for k, v in TINY_BERT.items() if k != "model_type"}))
    model.save_pretrained(str(folder))
    return model


def test_hf_text_tower_and_tokenizer_load_from_a_local_folder(tmp_path):
    folder = tmp_path / "bert"
    source = _local_bert(folder)
    text = {"decoder": "text", "options": {"tokenizer": str(folder)}}
    cfg = _cfg({"text": text, "v": NPY},
               {"text": {"type": "hf_text", "options": {"path": str(folder), "pooling": "cls"}}, "v": {"type": "mlp"}})
    model = _model(cfg)
    for k, v in source.state_dict().items():
        torch.testing.assert_close(model.towers["text"].backbone.model.state_dict()[k], v)
    from pretrain.data import build_modalities

    mod = build_modalities(cfg.data, train=False)["text"]
    ids = mod.decoder.decode(b"a handwritten seven", "txt", None)
    assert ids.tolist()[:5] == [2, 5, 6, 7, 3] and ids.shape == (12,)  # [CLS] a handwritten seven [SEP], padded
    source.eval()
    want = source(input_ids=ids[None], attention_mask=(ids != 0).long()[None]).last_hidden_state[:, 0]
    got = model.towers["text"].backbone(ids[None])
    torch.testing.assert_close(got, want)
    # the byte tokenizer's ids do not fit this vocabulary: refused, naming the data key
    byte = _cfg({"text": {"decoder": "text"}, "v": NPY},
                {"text": {"type": "hf_text", "options": {"path": str(folder)}}, "v": {"type": "mlp"}})
    with pytest.raises(ConfigError, match=r"data\.modalities\.text\.options\.tokenizer"):
        _model(byte)


def test_freeze_locks_the_backbone_and_keeps_its_statistics():
    cfg = _cfg({"image": {"decoder": "image"}, "v": NPY},
               {"image": {"type": "timm", "options": {"name": "test_resnet"}, "freeze": "backbone"},
                "v": {"type": "mlp", "freeze": "all"}})
    model = _model(cfg).train()
    image = model.towers["image"]
    assert not any(p.requires_grad for p in image.backbone.parameters())
    assert all(p.requires_grad for p in image.head.parameters())
    assert not any(p.requires_grad for p in model.towers["v"].parameters())
    assert not image.backbone.training and image.head.training  # BatchNorm statistics stay put
    bn = next(m for m in image.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    feats, *_ = model(_inputs(model, cfg))
    feats["image"].sum().backward()
    torch.testing.assert_close(bn.running_mean, before)
    assert image.head.weight.grad is not None
    trainable = {id(p) for g in param_groups(model, 0.1) for p in g["params"]}
    assert not any(id(p) in trainable for p in image.backbone.parameters())


def test_missing_indicator_encodes_absent_samples_and_keeps_them_in_the_loss():
    cfg = _cfg({"a": NPY, "b": {**NPY, "required": False}},
               {"a": {"type": "mlp"}, "b": {"type": "mlp", "missing": "indicator"}})
    model = _model(cfg)
    x = torch.zeros(2, 6)
    present = torch.tensor([True, False])
    with torch.no_grad():
        model.towers["b"].missing_embedding.normal_()
    f = model.encode("b", x, present)
    assert not torch.allclose(f[0], f[1])  # same placeholder input, told apart by the indicator
    masks = {"a": torch.ones(2, dtype=torch.bool), "b": present}
    assert set(model.loss_masks(masks)) == {"a"}  # b's rows all take part; a keeps its mask
    plain = _cfg({"a": NPY, "b": {**NPY, "required": False}}, {"a": {"type": "mlp"}, "b": {"type": "mlp"}})
    assert set(_model(plain).loss_masks(masks)) == {"a", "b"}


@pytest.mark.parametrize("tower, modality", [
    ({"type": "text_transformer", "options": {"width": 16, "layers": 2, "heads": 2}}, {"decoder": "text"}),
    ({"type": "audio_cnn", "options": {"channels": [4, 8]}}, MEL),
    ({"type": "timm", "options": {"name": "test_vit"}}, {"decoder": "image"}),
], ids=["text_transformer", "audio_cnn", "timm-vit"])
def test_grad_checkpointing_gives_the_same_gradients(tower, modality):
    grads, calls = [], []
    for ckpt in (False, True):
        cfg = _cfg({"x": modality, "v": NPY}, {"x": {**tower, "grad_checkpointing": ckpt}, "v": {"type": "mlp"}})
        torch.manual_seed(0)
        model = _model(cfg).train()
        count = [0]
        for mod in model.towers["x"].backbone.modules():
            if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
                mod.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        torch.manual_seed(1)
        inputs = _inputs(model, cfg)
        feats, *_ = model(inputs)
        (feats["x"] * torch.linspace(-1, 1, 8)).sum().backward()
        grads.append([p.grad.clone() for p in model.towers["x"].parameters() if p.grad is not None])
        calls.append(count[0])
    assert calls[1] > calls[0]  # layers ran again in backward: the activations were recomputed
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "modalities, towers, key",
    [
        ({"v": NPY, "w": NPY}, {"v": {"type": "mlp"}, "w": {"type": "cnn9"}}, "model.towers.w.type: unknown tower type"),
        ({"v": NPY, "w": NPY}, {"v": {"type": "mlp"}, "w": {"options": {}}}, "model.towers.w.type: required"),
        ({"v": NPY, "w": NPY}, {"v": {"type": "mlp"}, "w": {"type": "mlp", "options": {"depth": 2}}},
         "model.towers.w.options.depth: unknown key"),
        ({"v": NPY, "w": NPY}, {"v": {"type": "mlp"}, "w": {"type": "mlp"}, "z": {"type": "mlp"}},
         "model.towers.z: no such modality"),
        ({"v": NPY, "w": NPY}, {"v": {"type": "mlp"}, "w": {"type": "mlp", "freeze": "yes"}},
         "model.towers.w.freeze: must be one of"),
    ],
)
def test_bad_tower_config_names_the_field(modalities, towers, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        _cfg(modalities, towers)


def test_a_modality_without_a_tower_gets_its_decoders_default():
    cfg = _cfg({"image": {"decoder": "image"}, "text": {"decoder": "text"}, "v": NPY, "mel": MEL}, {})
    assert cfg.model.towers == {}  # checking a config does not change it; the defaults come at build
    model = _model(cfg)
    assert {m: type(t.backbone).__name__ for m, t in model.towers.items()} == {
        "image": "TimmBackbone", "text": "TextTransformer", "v": "MLP", "mel": "AudioCNN"}


def test_a_modality_with_no_tower_and_no_default_stops_at_build():
    cfg = _cfg({"v": NPY, "w": WAVE}, {"v": {"type": "mlp"}})
    with pytest.raises(ConfigError, match=re.escape("model.towers.w: data.modalities has 'w' (decoder 'audio')")):
        _model(cfg)


@pytest.mark.parametrize("modality, tower, key", [
    (NPY, {"type": "timm", "options": {"name": "no_such_net"}}, r"model\.towers\.x\.options\.name: timm has no model"),
    (NPY, {"type": "audio_cnn"}, r"model\.towers\.x\.type: audio_cnn takes spectrograms"),
    (NPY, {"type": "text_transformer"}, r"model\.towers\.x\.type: a text tower needs a text modality"),
    (NPY, {"type": "hf_text", "options": {"config": {"hidden_size": 8}}}, r"model\.towers\.x"),
])
def test_towers_that_do_not_fit_their_data_are_refused_at_build(modality, tower, key):
    cfg = _cfg({"x": modality, "v": NPY}, {"x": tower, "v": {"type": "mlp"}})
    with pytest.raises(ConfigError, match=key):
        _model(cfg)


def test_lamb_matches_the_paper_update_and_refuses_zero_partitions():
    """train.optimizer=lamb: timm's LAMB with the trust ratio on every tensor (the paper's update),
    decay on the matrix only, no clipping inside the optimizer (DeepSpeed clips)."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 4)
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    opt = build_optimizer(layer, OptimConfig(optimizer="lamb", lr=0.1, betas=[0.9, 0.99], eps=1e-6, weight_decay=0.01))
    gw, gb = torch.randn(4, 3) * 100, torch.randn(4)  # a large gradient: a clip inside would show
    layer.weight.grad, layer.bias.grad = gw.clone(), gb.clone()
    opt.step()

    def paper(p0, g, wd):
        m_hat = (0.1 * g) / (1 - 0.9)
        v_hat = (0.01 * g * g) / (1 - 0.99)
        u = m_hat / (v_hat.sqrt() + 1e-6) + wd * p0
        return p0 - 0.1 * (p0.norm() / u.norm()) * u

    torch.testing.assert_close(layer.weight.detach(), paper(w0, gw, 0.01))
    torch.testing.assert_close(layer.bias.detach(), paper(b0, gb, 0.0))
    adam = torch.nn.Parameter(w0.clone())
    a = torch.optim.AdamW([adam], lr=0.1, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.01)
    adam.grad = gw.clone()
    a.step()
    assert not torch.allclose(adam.detach(), layer.weight.detach())  # the trust ratio changes the step
    with pytest.raises(ConfigError, match=r"train\.optimizer: lamb .* train\.zero_stage=0"):
        _cfg({"v": NPY, "w": NPY}, {"v": {"type": "mlp"}, "w": {"type": "mlp"}}, ["train.optimizer=lamb"])


def test_compiled_towers_give_the_eager_loss_and_gradients():
    """model.compile: each tower's backbone compiled in place (torch.compile, inductor on CPU here):
    the same loss and gradients as eager, the same parameter names (checkpoints and exports fit)."""
    from pretrain.losses import build_loss

    results = {}
    for compiled in (False, True):
        cfg = _cfg({"a": NPY, "b": NPY}, {m: {"type": "mlp", "options": {"hidden": [16]}} for m in ("a", "b")},
                   [f"model.compile={str(compiled).lower()}"])
        torch.manual_seed(0)
        model = _model(cfg)
        g = torch.Generator().manual_seed(1)
        feats, scale, _ = model({m: torch.randn(5, 6, generator=g) for m in ("a", "b")})
        loss = build_loss({"name": "clip"})(feats, scale)["loss"]
        loss.backward()
        results[compiled] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()},
                             model.towers["a"].backbone._compiled_call_impl is not None)
    (eager, eager_grads, eager_flag), (comp, comp_grads, comp_flag) = results[False], results[True]
    assert comp_flag and not eager_flag and list(comp_grads) == list(eager_grads)
    torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-6)
    for name in eager_grads:
        torch.testing.assert_close(comp_grads[name], eager_grads[name], rtol=1e-4, atol=1e-6)


def test_text_towers_use_scaled_dot_product_attention():
    cfg = _cfg({"text": {"decoder": "text"}, "v": NPY},
               {"text": {"type": "text_transformer", "options": {"width": 16, "layers": 1, "heads": 2}},
                "v": {"type": "mlp"}})
    assert _model(cfg).towers["text"].backbone.encoder.config._attn_implementation == "sdpa"


def test_channels_last_keeps_the_features():
    x = torch.randn(3, 3, 16, 16)
    out = {}
    for cl in (False, True):
        cfg = _cfg({"image": {"decoder": "image"}, "v": NPY},
                   {"image": {"type": "timm", "options": {"name": "test_resnet"}, "channels_last": cl},
                    "v": {"type": "mlp"}})
        torch.manual_seed(0)
        model = _model(cfg).eval()
        with torch.no_grad():
            out[cl] = model.encode("image", x)
        conv = next(m for m in model.towers["image"].backbone.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) == cl
    torch.testing.assert_close(out[True], out[False], rtol=1e-4, atol=1e-5)
