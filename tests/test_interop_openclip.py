"""OpenCLIP in and out: a model created by open_clip itself (a tiny model config registered locally,
random init, saved to disk) loads through ``model.init_from`` and gives open_clip's own embeddings,
temperature and zero-shot predictions; partial loads (LiT); bad weights are named; a run fine-tuned
from it on 2 ranks exports back to a checkpoint open_clip loads; the recipes in configs/ train in
their tiny variants."""
from __future__ import annotations

import json
import math
import pickle
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pretrain.config import config_from_dict, load_config
from pretrain.data import build_modalities
from pretrain.models import build_model
from pretrain.options import ConfigError
from tests.helpers import ASSETS, ASSET_SHARDS, PYTHON, ROOT, ok, readme_block, run_cmd, run_cmds, torchrun

open_clip = pytest.importorskip("open_clip", reason="open-clip-torch is a test dependency (pip install -e .[test])")

TINY = {"embed_dim": 16,
        "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
TEXTS = ["class number 0", "class number 1", "class number 2", "class number 3", "a much longer caption here"]


def _checkpoint(folder: Path, name: str, cfg: dict, seed: int = 0) -> SimpleNamespace:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = folder / f"{name}.json"
    config.write_text(json.dumps(cfg))
    open_clip.add_model_config(config)
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(20.0))  # not the default 1/0.07: a load shows
    weights = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return SimpleNamespace(name=name, model=model, config=config, weights=weights, folder=folder)


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("oc"), "tiny_oc", TINY)


def _ours(ck, **init):
    tree = {"data": {"train": {"urls": "x.tar"}}, "eval": {"enabled": False},
            "model": {"init_from": {"format": "open_clip", "model": ck.name, "model_config": str(ck.config),
                                    "path": str(ck.weights), **init}}}
    cfg = config_from_dict(tree)
    modalities = build_modalities(cfg.data, train=False)
    return cfg, modalities, build_model(cfg.model, modalities).eval()


def test_init_from_gives_open_clips_embeddings_temperature_and_zero_shot(ck):
    cfg, modalities, ours = _ours(ck)
    # the recipe followed the checkpoint's architecture
    assert {m: t.type for m, t in cfg.model.towers.items()} == {"image": "open_clip_image", "text": "open_clip_text"}
    assert cfg.model.embed_dim == 16 and cfg.data.context_length == 12
    assert cfg.data.modalities["image"].options["size"] == 16 and cfg.data.modalities["text"].options["tokenizer"] == "open_clip"
    tok = modalities["text"].decoder.tokenizer
    ids = torch.stack([tok.encode(t) for t in TEXTS])
    assert torch.equal(ids, open_clip.tokenize(TEXTS, context_length=12))  # OpenCLIP's BPE, offline
    images = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        img, txt = ours.encode("image", images), ours.encode("text", ids)
        want_img, want_txt = ck.model.encode_image(images, normalize=True), ck.model.encode_text(ids, normalize=True)
    torch.testing.assert_close(img, want_img, atol=1e-5, rtol=0)
    torch.testing.assert_close(txt, want_txt, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.scales()[0], ck.model.logit_scale.exp().reshape(1))
    assert torch.equal((img @ txt[:4].T).argmax(1), (want_img @ want_txt[:4].T).argmax(1))  # zero-shot predictions


def test_partial_load_one_tower_and_no_temperature(ck):
    """LiT's start: the image tower from the checkpoint, the text tower and temperature fresh."""
    cfg, modalities, ours = _ours(ck, towers=["image"], temperature=False)
    images = torch.randn(4, 3, 16, 16)
    ids = open_clip.tokenize(TEXTS[:2], context_length=12)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode("image", images), ck.model.encode_image(images, normalize=True),
                                   atol=1e-5, rtol=0)
        assert not torch.allclose(ours.encode("text", ids), ck.model.encode_text(ids, normalize=True), atol=1e-3)
    assert float(ours.scales()[0].detach()) == pytest.approx(1 / 0.07)


def test_bad_weights_stop_with_a_message_naming_them(ck, tmp_path):
    with pytest.raises(ConfigError, match=r"^model\.init_from\.model: open_clip has no model 'no_such_arch'"):
        _ours(ck, model="no_such_arch", model_config=None)
    other = _checkpoint(tmp_path / "other", "tiny_oc_wide", {**TINY, "text_cfg": {**TINY["text_cfg"], "width": 48}})
    with pytest.raises(ConfigError, match=r"^model\.init_from: .* does not fit this model: .*of other shapes.*"
                                          r"towers\.text\.backbone\.model\."):
        _ours(ck, path=str(other.weights))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(ConfigError, match=r"^model\.init_from\.path: cannot load .*junk\.pt as tensors only"):
        _ours(ck, path=str(junk))

    class Payload:  # a pickle that would run code when loaded without weights_only
        def __reduce__(self):
            return (print, ("owned",))

    hostile = tmp_path / "hostile.pt"
    hostile.write_bytes(pickle.dumps({"state_dict": Payload()}))
    with pytest.raises(ConfigError, match=r"^model\.init_from\.path: cannot load .*hostile\.pt as tensors only"):
        _ours(ck, path=str(hostile))
    from safetensors.torch import save_file

    half = tmp_path / "half.safetensors"
    save_file({k: v.contiguous() for k, v in ck.model.state_dict().items() if k.startswith("visual.")}, str(half))
    with pytest.raises(ConfigError, match=r"missing \d+ tensors, e\.g\. \['logit_scale'|missing \d+ tensors"):
        _ours(ck, path=str(half))
    with pytest.raises(ConfigError, match=r"^model\.init_from\.towers\[0\]: no such modality"):
        _ours(ck, towers=["audio"])


def test_export_to_open_clip_is_refused_for_other_towers(tmp_path):
    from pretrain.export import export

    with pytest.raises(ConfigError, match=r"--format open_clip: needs an open_clip_image and an open_clip_text tower"):
        export(ASSETS / "run_v1" / "checkpoints" / "step000002", tmp_path / "x", fmt="open_clip")


def _tiny_recipe(ck, out: Path) -> list[str]:
    return [f"output_dir={out}",
            f"data.train.urls={ASSET_SHARDS}/train/shard-{{000000..000007}}.tar",
            f"data.val.urls={ASSET_SHARDS}/val/shard-{{000000..000001}}.tar",
            "data.train.shuffle_buffer=4", "data.train.workers=0",
            "train.steps=2", "train.micro_batch_size=6", "train.warmup_steps=1", "train.precision=fp32",
            "train.zero_stage=2", "train.log_every=1"]


@pytest.mark.slow
def test_fine_tune_on_two_ranks_then_open_clip_loads_the_export(ck, tmp_path):
    """configs/finetune_openclip.yaml at tiny size: the OpenCLIP checkpoint -> init_from -> 2 steps on
    2 ranks -> export --format open_clip -> open_clip reproduces our trained embeddings; the native
    export still serves the Embedder."""
    from pretrain.export import Embedder, consolidated_state_dict, model_from_state

    run = tmp_path / "run"
    args = _tiny_recipe(ck, run) + [f"model.init_from.path={ck.weights}", f"model.init_from.model={ck.name}",
                                    f"model.init_from.model_config={ck.config}", "eval.classnames=[a, b, c, d]",
                                    "eval.templates=['class number {}']", "train.checkpoint_every=0"]
    proc = torchrun(args, config=ROOT / "configs" / "finetune_openclip.yaml")
    out = ok(proc)
    assert "zero-shot image top-1" in out
    ckpt = run / "checkpoints" / "step000002"
    exported = tmp_path / "oc_export"
    ok(run_cmd([PYTHON, "-m", "pretrain.export", "--checkpoint", str(ckpt), "--output", str(exported),
                "--format", "open_clip"]))
    # the README's lines, as printed, with DIR the export
    snippet = readme_block("import open_clip").text.replace("DIR", str(exported))
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    theirs = scope["model"].eval()  # loaded strictly
    cfg = load_config(run / "config.yaml")
    modalities = build_modalities(cfg.data, train=False)
    ours = model_from_state(cfg, consolidated_state_dict(ckpt), modalities).eval()
    images = torch.randn(4, 3, 16, 16)
    ids = open_clip.tokenize(TEXTS, context_length=12)
    with torch.no_grad():
        trained = ours.encode("image", images)
        assert not torch.allclose(trained, ck.model.encode_image(images, normalize=True), atol=1e-4)  # it trained
        torch.testing.assert_close(theirs.encode_image(images, normalize=True), trained, atol=1e-5, rtol=0)
        torch.testing.assert_close(theirs.encode_text(ids, normalize=True), ours.encode("text", ids), atol=1e-5, rtol=0)
        torch.testing.assert_close(theirs.logit_scale.exp().reshape(1), ours.scales()[0])
    # the native export keeps working for these towers
    native = tmp_path / "native"
    ok(run_cmd([PYTHON, "-m", "pretrain.export", "--checkpoint", str(ckpt), "--output", str(native)]))
    emb = Embedder.load(native)
    torch.testing.assert_close(emb.embed_texts(TEXTS), ours.encode("text", ids), atol=1e-5, rtol=0)


RECIPES = ["openclip_vit_b32", "openclip_vit_b16", "lit"]


@pytest.fixture(scope="module")
def recipe_runs(ck, tmp_path_factory):
    """Each recipe's tiny variant, 2 steps in one process; the three run at once."""
    base = tmp_path_factory.mktemp("recipes")
    cmds = []
    for recipe in RECIPES:
        tiny = [f"model.towers.{m}.options.{k}={v}" for m in ("image", "text")
                for k, v in (("model", ck.name), ("model_config", ck.config))]
        tiny += ["model.embed_dim=16", "data.modalities.image.options.size=16", "data.context_length=12",
                 "eval.enabled=false", "train.checkpoint=false"]
        if recipe == "lit":
            tiny += [f"model.init_from.path={ck.weights}", f"model.init_from.model={ck.name}",
                     f"model.init_from.model_config={ck.config}"]
        args = _tiny_recipe(ck, base / recipe) + tiny
        cmds.append([sys.executable, "-m", "pretrain.train", "--config", str(ROOT / "configs" / f"{recipe}.yaml"), *args])
    return dict(zip(RECIPES, run_cmds(cmds, timeout=300)))


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_train_in_their_tiny_variant(recipe_runs, recipe):
    out = ok(recipe_runs[recipe])
    assert "step 2/2" in out
