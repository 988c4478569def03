"""OpenCLIP in and out: a model created by open_clip itself (a tiny model config registered locally,
random init, saved to disk) loads through ``model.init_from`` and gives open_clip's own embeddings,
temperature and zero-shot predictions; partial loads (LiT); bad weights are named; a run fine-tuned
from it on 2 ranks exports back to a checkpoint open_clip loads; the recipes in configs/ train in
their tiny variants."""
from __future__ import annotations

import json
import math
import pickle
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from pretrain.config import config_from_dict, load_config
from pretrain.data import build_modalities
from pretrain.models import build_model
from pretrain.options import ConfigError
from tests.helpers import ASSETS, ASSET_SHARDS, PYTHON, ROOT, heldout_images, image_decoder, ok, readme_block, \
    run_cmd, run_cmds, torchrun, write

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


def test_export_to_open_clip_is_refused_for_other_towers_and_tokenizers(ck, tmp_path):
    """Refused from the recipe alone, naming the reason and every format (native too)."""
    from pretrain.export import export
    from pretrain.models import FORMATS

    with pytest.raises(ConfigError, match=r"--format open_clip: needs an open_clip_image and an open_clip_text tower"
                                          r".*\. Formats: native \(any model.*hf \(.*open_clip \(an open_clip_image"):
        export(ASSETS / "run_v1" / "checkpoints" / "step000002", tmp_path / "x", fmt="open_clip")
    with pytest.raises(ConfigError, match=r"--format nope: no such format\. Formats: native"):
        export(ASSETS / "run_v1" / "checkpoints" / "step000002", tmp_path / "x", fmt="nope")
    cfg, modalities, _ = _ours(ck)
    cfg.data.modalities["text"].options["tokenizer"] = "byte"  # ids open_clip's loader would not give
    decoders = {m.name: m.decoder for m in build_modalities(cfg.data, train=False)}
    with pytest.raises(ConfigError, match=r"^--format open_clip: data\.modalities\.text\.options\.tokenizer is "
                                          r"'byte': open_clip loads this model with its own tokenizer"):
        FORMATS.get("open_clip", "--format")().check(cfg, decoders)


OPENAI = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}


def test_preprocess_cfg_makes_open_clips_transform_give_our_decoders_tensors(tmp_path):
    """Through open_clip's own ``local-dir:`` loader: for each decoder setting open_clip can express,
    its transform of PNG files (square and not) equals our decoder's; the others are refused, named."""
    from PIL import Image

    from pretrain.models.openclip import preprocess_cfg

    paths, _ = heldout_images(tmp_path / "png")
    paths = paths[:2] + paths[-2:]
    norms = [{"mean": [0.5] * 3, "std": [0.5] * 3}, {"mean": [0.3, 0.4, 0.5], "std": [0.2, 0.25, 0.3]}, OPENAI]
    cases = [dict(interpolation=i, crop_mode=c, **n) for i in ("bilinear", "bicubic") for c in ("center", "squash")
             for n in norms] + [dict(interpolation="bicubic", crop_mode="border", **norms[0])]
    for i, options in enumerate(cases):
        ours = image_decoder(size=16, **options)
        folder = tmp_path / f"case{i}"
        write(folder / "open_clip_config.json", json.dumps({"model_cfg": TINY, "preprocess_cfg": preprocess_cfg(
            ours.settings)}))
        _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
        for path in paths:
            want = ours.decode(path.read_bytes(), "png", None)
            torch.testing.assert_close(preprocess(Image.open(path)), want, atol=1e-6, rtol=0,
                                       msg=f"{options} {path.name}")
    refused = [({"crop_pct": 0.875}, r"crop_pct is 0\.875: open_clip's preprocessing has no crop percentage"),
               ({"interpolation": "lanczos"}, r"interpolation is lanczos: open_clip's preprocessing has bilinear and "
                                             r"bicubic only"),
               ({"crop_mode": "border", **OPENAI}, r"crop_mode is border, which pads with the mean colour \[123, 117, "
                                                  r"104\]")]
    for options, message in refused:
        with pytest.raises(ConfigError, match=r"^data\.modalities\.image\.options\." + message):
            preprocess_cfg(image_decoder(size=16, **options).settings)


def _tiny_recipe(ck, out: Path) -> list[str]:
    return [f"output_dir={out}",
            f"data.train.urls={ASSET_SHARDS}/train/shard-{{000000..000007}}.tar",
            f"data.val.urls={ASSET_SHARDS}/val/shard-{{000000..000001}}.tar",
            "data.train.shuffle_buffer=4", "data.train.workers=0",
            "train.steps=2", "train.micro_batch_size=6", "train.warmup_steps=1", "train.precision=fp32",
            "train.zero_stage=2", "train.log_every=1"]


RUN_IMAGE = {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear", "crop_mode": "squash"}  # not open_clip's
CLASSNAMES, TEMPLATE = ["a", "b", "c", "d"], "class number {}"


def _agrees_with_ours(emb, model, preprocess, tokenizer, paths: list[Path], labels: list[int]) -> None:
    """open_clip's model, transform (of the raw files) and tokenizer give our Embedder's embeddings
    (cos >= 0.9999) and its zero-shot prediction on every held-out image."""
    from PIL import Image

    prompts = [TEMPLATE.format(c) for c in CLASSNAMES]
    with torch.no_grad():
        images = model.encode_image(torch.stack([preprocess(Image.open(p)) for p in paths]), normalize=True)
        classes = model.encode_text(tokenizer(prompts), normalize=True)
    ours, our_classes = emb.embed_images(paths), emb.embed_texts(prompts)
    assert float(torch.nn.functional.cosine_similarity(images, ours).min()) >= 0.9999
    assert float(torch.nn.functional.cosine_similarity(classes, our_classes).min()) >= 0.9999
    held = torch.tensor([label >= 0 for label in labels])
    assert torch.equal((images @ classes.T).argmax(1)[held], (ours @ our_classes.T).argmax(1)[held])


@pytest.mark.slow
def test_fine_tune_on_two_ranks_then_open_clip_loads_the_export(ck, tmp_path, monkeypatch):
    """configs/finetune_openclip.yaml at tiny size, its image decoder set unlike open_clip's defaults
    (mean/std 0.5, bilinear, squash): the OpenCLIP checkpoint -> init_from -> 2 steps on 2 ranks ->
    export --format open_clip -> the README's local-dir lines, as printed: open_clip's loader,
    transform and tokenizer give our embeddings and zero-shot predictions from raw image files. The
    same for a run of open_clip's preprocessing (the run's config.yaml set so, same weights); one
    open_clip cannot express is refused before the weights are read; the native export still
    serves the Embedder."""
    from pretrain import export as export_module
    from pretrain.export import Embedder, consolidated_state_dict, export, model_from_state

    run = tmp_path / "run"
    args = _tiny_recipe(ck, run) + [f"model.init_from.path={ck.weights}", f"model.init_from.model={ck.name}",
                                    f"model.init_from.model_config={ck.config}", f"eval.classnames={CLASSNAMES}",
                                    f"eval.templates=['{TEMPLATE}']", "train.checkpoint_every=0"]
    args += [f"data.modalities.image.options.{k}={v}" for k, v in RUN_IMAGE.items()]
    out = ok(torchrun(args, config=ROOT / "configs" / "finetune_openclip.yaml"))
    assert "zero-shot image top-1" in out
    ckpt = run / "checkpoints" / "step000002"
    exported = tmp_path / "oc_export"
    ok(run_cmd([PYTHON, "-m", "pretrain.export", "--checkpoint", str(ckpt), "--output", str(exported),
                "--format", "open_clip"]))
    cfg = load_config(run / "config.yaml")
    modalities = build_modalities(cfg.data, train=False)
    ours = model_from_state(cfg, consolidated_state_dict(ckpt), modalities).eval()
    paths, labels = heldout_images(tmp_path / "png")
    write(tmp_path / "digit.png", paths[0].read_bytes())
    # the README's lines, as printed, with DIR the export, beside digit.png
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(readme_block("import open_clip").text.replace("DIR", str(exported)), "README.md", "exec"), scope)
    theirs = scope["model"]
    emb = Embedder(ours, cfg, modalities)
    torch.testing.assert_close(scope["image"], emb.embed_images([paths[0]]), atol=1e-5, rtol=0)
    _agrees_with_ours(emb, theirs, scope["preprocess"], scope["tokenizer"], paths, labels)
    images = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        trained = ours.encode("image", images)
        assert not torch.allclose(trained, ck.model.encode_image(images, normalize=True), atol=1e-4)  # it trained
        torch.testing.assert_close(theirs.logit_scale.exp().reshape(1), ours.scales()[0])

    # a run of open_clip's own preprocessing (the checkpoint beside a config.yaml saying so)
    plain = tmp_path / "plain"
    shutil.copytree(run, plain)
    tree = yaml.safe_load((plain / "config.yaml").read_text())
    tree["data"]["modalities"]["image"]["options"] = {"size": 16, **OPENAI, "interpolation": "bicubic"}
    (plain / "config.yaml").write_text(yaml.safe_dump(tree))
    export(plain / "checkpoints" / "step000002", tmp_path / "oc_plain", fmt="open_clip")
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'oc_plain'}")
    cfg = load_config(plain / "config.yaml")
    modalities = build_modalities(cfg.data, train=False)
    _agrees_with_ours(Embedder(ours, cfg, modalities), model.eval(), preprocess,
                      open_clip.get_tokenizer(f"local-dir:{tmp_path / 'oc_plain'}"), paths, labels)

    # preprocessing open_clip cannot express: refused, naming the key, before the weights are read
    tree["data"]["modalities"]["image"]["options"]["crop_pct"] = 0.875
    (plain / "config.yaml").write_text(yaml.safe_dump(tree))

    def never(folder):
        raise AssertionError("the weights were read before the refusal")

    monkeypatch.setattr(export_module, "consolidated_state_dict", never)
    with pytest.raises(ConfigError, match=r"^--format open_clip: data\.modalities\.image\.options\.crop_pct is "
                                          r"0\.875: .*Formats: native \(any model"):
        export(plain / "checkpoints" / "step000002", tmp_path / "refused", fmt="open_clip")
    monkeypatch.undo()

    # the native export keeps working for these towers
    native = tmp_path / "native"
    export(ckpt, native)
    ids = open_clip.tokenize(TEXTS, context_length=12)
    torch.testing.assert_close(Embedder.load(native).embed_texts(TEXTS), ours.encode("text", ids), atol=1e-5, rtol=0)


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
