"""The quickstart's model (a timm image tower, a text_transformer over the byte tokenizer, linear
heads) in the field's libraries: ``--format open_clip`` (open_clip's CustomTextCLIP through
``local-dir:``) and ``--format hf`` (transformers' VisionTextDualEncoderModel, AutoProcessor, the
zero-shot pipeline). The byte tokenizer's own tokenizer.json gives its ids for any text; the suite's
trained 2-rank quickstart exports in both formats, and each library's own loader, tokenizer and
preprocessing give our embeddings and zero-shot predictions from raw image files, from another
working directory, also with the run's image decoder set otherwise; the other poolings open_clip
can hold export too; what a format cannot hold is refused before the weights are read, named.
(`make demo`'s own model: tests/test_demo.py.)"""
from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
import torch.nn.functional as F
import yaml

from pretrain.config import load_config
from pretrain.data import build_modalities
from pretrain.models import FORMATS, build_model
from pretrain.options import ConfigError
from pretrain.tokenizer import ByteTokenizer, byte_tokenizer_for_transformers
from tests.helpers import ASSET_SHARDS, QUICKSTART, TINY_MODEL, heldout_images, libraries_agree, tiny_overrides

open_clip = pytest.importorskip("open_clip", reason="open-clip-torch is a test dependency (pip install -e .[test])")

# texts open_clip's tokenizer leaves as they are (it first fixes mojibake and collapses whitespace)
CLEAN = ["a handwritten seven", "class number 3", "héllo wörld, ñ, 日本語, 🙂", " ".join(["long"] * 40)]
OPENAI = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}


def _texts() -> list[str]:
    texts = ["a handwritten seven", "", "x", "  spaces  inside\tand\nnewlines ", "héllo wörld, ñ, 日本語, 🙂🙂",
             "[BOS] [PAD] [EOS] <s> </s> <|endoftext|>", "\x00\x01 control", "é" * 30, "long " * 40]
    rng = random.Random(0)
    ranges = [(32, 127), (0, 32), (0x80, 0x800), (0x800, 0xD800), (0xE000, 0x10000), (0x10000, 0x110000)]
    for _ in range(200):
        texts.append("".join(chr(rng.randrange(*rng.choice(ranges))) for _ in range(rng.randrange(0, 40))))
    return texts


def test_the_byte_tokenizers_tokenizer_json_gives_its_ids_for_any_text(tmp_path):
    """Saved and read back by AutoTokenizer: ASCII, non-ASCII, control characters, special-token
    names and texts longer than the context (cut mid-character, as ours) give ByteTokenizer's ids
    and mask; batches padded to the longest text too."""
    from transformers import AutoTokenizer

    byte_tokenizer_for_transformers(24).save_pretrained(str(tmp_path))
    theirs, ours, texts = AutoTokenizer.from_pretrained(str(tmp_path)), ByteTokenizer(24), _texts()
    for text in texts:
        got = theirs(text, truncation=True, padding="max_length")
        want = ours.encode(text)
        assert got["input_ids"] == want.tolist(), text
        assert got["attention_mask"] == (want != 0).long().tolist(), text
    batch = theirs(texts[:6], padding=True, truncation=True, return_tensors="pt")
    assert set(batch) == {"input_ids", "attention_mask"}
    want = ours(texts[:6])[:, : batch["input_ids"].shape[1]]
    assert torch.equal(batch["input_ids"], want) and torch.equal(batch["attention_mask"], (want != 0).long())
    assert theirs.decode(theirs("héllo 🙂")["input_ids"], skip_special_tokens=True) == "héllo 🙂"


@pytest.mark.slow
def test_the_trained_quickstart_loads_in_open_clip_and_transformers(uninterrupted_run, tmp_path):
    """The suite's tiny quickstart (2 ranks, 6 steps) exported with each format: open_clip's and
    transformers' own loaders, tokenizers and preprocessing from the raw image files, run from
    another folder, give our embeddings and zero-shot predictions; then the same run with its image
    decoder set to OpenAI's mean, std and bicubic (its config.yaml so, same weights)."""
    from pretrain.export import export

    paths, labels = heldout_images(tmp_path / "png")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = tmp_path / "run"
    shutil.copytree(uninterrupted_run, run, ignore=shutil.ignore_patterns("step000002", "step000004"))
    ckpt = run / "checkpoints" / "step000006"
    templates = ["class number {}", "a photo of {}"]
    for variant in ("run", "decoder set otherwise"):
        if variant != "run":
            tree = yaml.safe_load((run / "config.yaml").read_text())
            tree["data"]["modalities"]["image"]["options"] = {**OPENAI, "interpolation": "bicubic"}
            (run / "config.yaml").write_text(yaml.safe_dump(tree))
        out = tmp_path / variant.replace(" ", "_")
        oc, hf = export(ckpt, out / "open_clip", fmt="open_clip"), export(ckpt, out / "hf", fmt="hf")
        assert {p.name for p in oc.iterdir()} == {"open_clip_config.json", "open_clip_model.safetensors",
                                                   "text_model", "tokenizer.json", "tokenizer_config.json"}
        assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= {
            p.name for p in hf.iterdir()}
        text_cfg = json.loads((oc / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]
        assert text_cfg["hf_model_name"] == str((oc / "text_model").resolve())  # from any working directory
        assert text_cfg["hf_pooler_type"] == "cls_pooler"  # BERT's pooler, as ours
        found = libraries_agree(ckpt, oc, hf, paths, labels, ["a", "b", "c", "d"], templates, elsewhere)
        assert set(found) == {"open_clip", "transformers"}, variant


def _tiny(tmp_path, *overrides: str):
    cfg = load_config(QUICKSTART, tiny_overrides(ASSET_SHARDS, tmp_path / "run", steps=1) + list(overrides))
    return cfg, build_modalities(cfg.data, train=False)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_the_other_poolings_open_clip_holds_export_too(tmp_path, pooling):
    """A quickstart model pooled by its first token (the recipe before BERT's pooler) or by the mean
    exports to open_clip (cls_last_hidden_state_pooler, mean_pooler) and gives our embeddings (random
    weights, BatchNorm statistics of their own); transformers' dual encoder pools with BERT's pooler
    only, so --format hf refuses it."""
    from PIL import Image

    from pretrain.export import Embedder

    cfg, mods = _tiny(tmp_path, f"model.towers.text.options.pooling={pooling}")
    torch.manual_seed(0)
    model = build_model(cfg.model, mods).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
    out = tmp_path / "oc"
    FORMATS.get("open_clip", "--format")().export(model, cfg, out)
    theirs, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    theirs.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    paths, _ = heldout_images(tmp_path / "png")
    emb = Embedder(model, cfg, mods)
    with torch.no_grad():
        images = theirs.encode_image(torch.stack([preprocess(Image.open(p)) for p in paths]), normalize=True)
        words = theirs.encode_text(tokenizer(CLEAN), normalize=True)
    assert float(F.cosine_similarity(images, emb.embed_images(paths)).min()) >= 0.9999
    assert float(F.cosine_similarity(words, emb.embed_texts(CLEAN)).min()) >= 0.9999
    with pytest.raises(ConfigError, match=rf"^--format hf: model\.towers\.text\.options\.pooling is {pooling}: a "
                                          r"VisionTextDualEncoderModel .* pools a BERT by pooler \(BERT's pooler\)\. "
                                          r"Formats: native \(any model"):
        FORMATS.get("hf", "--format")().check(cfg, {m.name: m.decoder for m in mods})


def test_what_a_format_cannot_hold_is_refused_from_the_recipe(tmp_path):
    """From the recipe alone (before any weights are read), naming the key and every format."""
    refused = [
        (("model.towers.text.head=mlp",), "open_clip", r"model\.towers\.text\.head is mlp: a CustomTextCLIP .* "
                                                       r"bias-free linear map"),
        (("model.towers.image.missing=indicator",), "hf", r"model\.towers\.image\.missing is indicator"),
        (("model.towers.text.options.pooling=last",), "open_clip",
         r"model\.towers\.text\.options\.pooling is last: a CustomTextCLIP .* pools a BERT by pooler \(cls_pooler\), "
         r"cls \(cls_last_hidden_state_pooler\), mean \(mean_pooler\)"),
        (("data.modalities.text.options.tokenizer=open_clip",), "hf",
         r"data\.modalities\.text\.options\.tokenizer is 'open_clip': the export carries the run's tokenizer as a "
         r"transformers tokenizer"),
        (("model.towers.image.options.kwargs={drop_rate: 0.1}",), "open_clip",
         r"model\.towers\.image\.options: the timm model is built with \{'drop_rate': 0\.1\}, and open_clip's "
         r"TimmModel builds one by its name alone"),
        (("data.modalities.image.options.crop_mode=border",), "hf", r"data\.modalities\.image\.options\.crop_mode is "
                                                                    r"border"),
        (("data.modalities.title={decoder: text}",), "open_clip", r"model\.towers\.title: a CustomTextCLIP .* holds an "
                                                                 r"image and a text tower only"),
    ]
    for overrides, fmt, message in refused:
        cfg, mods = _tiny(tmp_path, *overrides)
        with pytest.raises(ConfigError, match=rf"^--format {fmt}: {message}.*\. Formats: native \(any model.*hf \("
                                              r".*VisionTextDualEncoderModel.*open_clip \(.*text_transformer"):
            FORMATS.get(fmt, "--format")().check(cfg, {m.name: m.decoder for m in mods})
    cfg, mods = _tiny(tmp_path)  # the quickstart itself: both hold it
    for fmt in ("open_clip", "hf"):
        FORMATS.get(fmt, "--format")().check(cfg, {m.name: m.decoder for m in mods})
