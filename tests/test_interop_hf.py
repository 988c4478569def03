"""Hugging Face CLIP and SigLIP in and out (``model.init_from: {format: hf}``, ``hf_clip_*`` towers,
``pretrain.export --format hf``), proven equal to transformers itself: tiny random CLIPModel and
SiglipModel folders with a CLIP BPE tokenizer built offline; features, logit scale and bias, and
zero-shot predictions match the library's in fp32; bad inputs stop with messages naming the key; a
trained checkpoint exported as a CLIPModel folder reproduces our embeddings."""
from __future__ import annotations

import copy
import json
import random
import shutil

import pytest
import torch
import torch.nn.functional as F
import yaml

from pretrain.config import ConfigError, config_from_dict
from pretrain.data import build_modalities
from pretrain.losses import build_loss
from pretrain.models import FORMATS, build_model
from pretrain.models.towers import text_attention_mask
from tests.helpers import ASSET_SHARDS, ASSETS, heldout_images, image_decoder, ok, png_bytes, readme_block, \
    torchrun, write

ATOL = 1e-5
TEXTS = ["a cat", "the cat sat on the mat", "x", "a photo of a cat on a mat with the hat of the cat " * 3]
CLASSES = ["cat", "mat", "hat", "bat"]
TINY = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)


def clip_tokenizer():
    """A CLIP BPE tokenizer over the 256 byte symbols and a few merges (518 ids), built offline."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + 256 for i, c in enumerate(chars)})
    merges = [("t", "h"), ("th", "e</w>"), ("c", "a"), ("ca", "t</w>"), ("a", "t</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    return CLIPTokenizer(vocab=vocab, merges=merges)


def text_ids(tok, positions: int) -> dict:
    # the tokenizer's own ids at their places in the config (the CLIP text model pools at eos_token_id)
    return dict(vocab_size=len(tok), max_position_embeddings=positions, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **TINY)


def save_clip(folder, tok, seed=0):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text_ids(tok, 77), projection_dim=12, logit_scale_init_value=3.1,
                                 vision_config=dict(image_size=16, patch_size=8, **TINY)))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size=16).save_pretrained(folder)
    return folder


def save_siglip(folder, tok, seed=1):
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    torch.manual_seed(seed)
    model = SiglipModel(SiglipConfig(text_config=text_ids(tok, 12), vision_config=dict(image_size=16, patch_size=8,
                                                                                       **TINY)))
    with torch.no_grad():
        model.logit_scale.fill_(4.8)  # exp: 121.5, above our default clamp (100), as Google's SigLIP
        model.logit_bias.fill_(-3.5)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)  # SigLIP pads with its end token too, like this one
    SiglipImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("hf")
    tok = clip_tokenizer()
    return {"clip": save_clip(base / "clip", tok), "siglip": save_siglip(base / "siglip", tok), "base": base}


def tree(path=None, model: dict | None = None, data: dict | None = None, **top) -> dict:
    init = {"init_from": {"format": "hf", "path": str(path)}} if path else {}
    return {"data": {"train": {"urls": "unused.tar"}, **(data or {})}, "model": {**init, **(model or {})},
            "eval": {"enabled": False}, **top}


def ours(t: dict, with_bias: bool = False):  # with_bias: SigLIP's objective (it asks for the scalar bias)
    cfg = config_from_dict(t)
    mods = build_modalities(cfg.data, train=False)
    objective = build_loss({"name": "siglip"}) if with_bias else None
    return cfg, mods, build_model(cfg.model, mods, objective=objective).eval()


def features(out) -> torch.Tensor:
    return F.normalize(getattr(out, "pooler_output", out), dim=-1)  # transformers 5: an output; 4: a tensor


def images(mods, n=8) -> torch.Tensor:
    dec, rng = mods["image"].decoder, random.Random(0)
    return torch.stack([dec.decode(png_bytes(i, size=(20, 17)), "png", rng) for i in range(n)])


def test_clip_folder_gives_the_librarys_features_scale_and_zero_shot(folders):
    from transformers import AutoTokenizer, CLIPModel

    folder = folders["clip"]
    cfg, mods, model = ours(tree(folder))
    # the recipe followed the folder
    assert {m: (t.type, t.head) for m, t in cfg.model.towers.items()} == {
        "image": ("hf_clip_image", "none"), "text": ("hf_clip_text", "none")}
    assert cfg.model.embed_dim == 12 and cfg.data.context_length == 77
    assert cfg.data.modalities["text"].options["tokenizer"] == str(folder)
    image_opts = cfg.data.modalities["image"].options
    assert image_opts["size"] == 16 and image_opts["interpolation"] == "bicubic"
    assert image_opts["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    ref = CLIPModel.from_pretrained(folder).eval()
    lib_tok = AutoTokenizer.from_pretrained(folder)
    x = images(mods)
    ids = mods["text"].decoder.tokenizer(TEXTS)
    lib = lib_tok(TEXTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        img, txt = model.encode("image", x), model.encode("text", ids)
        ref_img = features(ref.get_image_features(pixel_values=x))
        ref_txt = features(ref.get_text_features(**lib))
        # CLIP pads with its end token: masking every pad id would hide the real end of text
        naive = features(ref.get_text_features(input_ids=ids, attention_mask=(ids != lib_tok.pad_token_id).long()))
        prompts = lib_tok([f"a photo of a {c}" for c in CLASSES], padding=True, return_tensors="pt")
        ref_logits = ref(pixel_values=x, **prompts).logits_per_image
        cls = model.encode("text", mods["text"].decoder.tokenizer([f"a photo of a {c}" for c in CLASSES]))
    assert len(set(lib["attention_mask"].sum(1).tolist())) == len(TEXTS)  # padding happened, and truncation
    assert torch.equal(ids[:, :lib["input_ids"].shape[1]], lib["input_ids"])
    mask = text_attention_mask(ids, mods["text"].decoder.tokenizer.pad_id, mods["text"].decoder.tokenizer.eos_id)
    assert torch.equal(mask[:, :lib["attention_mask"].shape[1]], lib["attention_mask"]) and not mask[:, lib[
        "attention_mask"].shape[1]:].any()
    torch.testing.assert_close(img, ref_img, atol=ATOL, rtol=0)
    torch.testing.assert_close(txt, ref_txt, atol=ATOL, rtol=0)
    assert (naive - ref_txt).abs().max() > 1e-2
    scale, bias = model.scales()
    assert bias is None and float(scale.detach()) == pytest.approx(float(ref.logit_scale.detach().exp()), abs=ATOL)
    logits = scale * img @ cls.T
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-5)
    labels = torch.arange(len(x)) % len(CLASSES)  # a labelled set: the same predictions, so the same accuracy
    assert torch.equal(logits.argmax(1), ref_logits.argmax(1))
    assert float((logits.argmax(1) == labels).float().mean()) == float((ref_logits.argmax(1) == labels).float().mean())
    assert (logits.topk(2).values.diff(dim=1).abs() > 100 * ATOL).all()  # no near-ties decide them


def test_siglip_folder_gives_the_librarys_features_scale_and_bias(folders):
    from transformers import AutoTokenizer, SiglipModel

    folder = folders["siglip"]
    cfg, mods, model = ours(tree(folder), with_bias=True)
    assert cfg.loss.name == "siglip" and cfg.model.embed_dim == 16 and cfg.data.context_length == 12
    assert cfg.model.max_logit_scale == 122  # raised to keep the checkpoint's scale
    assert cfg.data.modalities["image"].options["crop_mode"] == "squash"
    ref = SiglipModel.from_pretrained(folder).eval()
    x = images(mods, 6)
    ids = mods["text"].decoder.tokenizer(TEXTS)
    lib = AutoTokenizer.from_pretrained(folder)(TEXTS, padding="max_length", truncation=True, max_length=12,
                                                return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model.encode("image", x), features(ref.get_image_features(pixel_values=x)),
                                   atol=ATOL, rtol=0)
        torch.testing.assert_close(model.encode("text", ids), features(ref.get_text_features(**lib)), atol=ATOL, rtol=0)
    scale, bias = model.scales()
    assert float(scale.detach()) == pytest.approx(float(ref.logit_scale.detach().exp()), abs=ATOL)
    assert float(bias.detach()) == pytest.approx(-3.5) and float(ref.logit_bias.detach()) == pytest.approx(-3.5)

    with pytest.raises(ConfigError, match=r"model\.max_logit_scale: 100 clamps the logit scale of .* \(121\.5\)"):
        ours(tree(folder, model={"max_logit_scale": 100}), with_bias=True)

    # towers named by hand, weights from the tower's own path; ids alone, as SigLIP was trained
    towers = {"image": {"type": "hf_clip_image", "options": {"path": str(folder)}, "head": "none"},
              "text": {"type": "hf_clip_text", "options": {"path": str(folder), "attention_mask": False},
                       "head": "none"}}
    data = {"context_length": 12, "modalities": {"image": {"decoder": "image", "options": {"size": 16}},
                                                 "text": {"decoder": "text", "options": {"tokenizer": str(folder)}}}}
    _, _, by_hand = ours(tree(model={"towers": towers, "embed_dim": 16}, data=data))
    with torch.no_grad():
        torch.testing.assert_close(by_hand.encode("text", ids), features(ref.get_text_features(input_ids=ids)),
                                   atol=ATOL, rtol=0)


def test_init_from_towers_and_temperature_are_respected(folders):
    from transformers import CLIPModel

    folder = folders["clip"]
    init = {"format": "hf", "path": str(folder), "towers": ["image"], "temperature": False}
    cfg, mods, model = ours(tree(model={"init_from": init, "init_temperature": 0.5}))
    ref = CLIPModel.from_pretrained(folder).eval()
    x, ids = images(mods, 3), mods["text"].decoder.tokenizer(TEXTS[:3])
    with torch.no_grad():
        torch.testing.assert_close(model.encode("image", x), features(ref.get_image_features(pixel_values=x)),
                                   atol=ATOL, rtol=0)
        lib_txt = features(ref.get_text_features(input_ids=ids, attention_mask=text_attention_mask(
            ids, mods["text"].decoder.tokenizer.pad_id, mods["text"].decoder.tokenizer.eos_id)))
        assert (model.encode("text", ids) - lib_txt).abs().max() > 1e-2  # the text tower kept its random init
    assert float(model.scales()[0].detach()) == pytest.approx(2.0)  # 1 / init_temperature, not the checkpoint's


def test_bad_folders_weights_and_keys_stop_with_clear_messages(folders, tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import BertConfig, BertModel

    clip = folders["clip"]
    not_model = tmp_path / "only_tokenizer"
    clip_tokenizer().save_pretrained(not_model)
    with pytest.raises(ConfigError, match=r"model\.init_from\.path: .*only_tokenizer is not a Hugging Face model"):
        config_from_dict(tree(not_model))
    with pytest.raises(ConfigError, match=r"model\.init_from\.path: no such file or folder"):
        config_from_dict(tree(tmp_path / "absent"))
    towers = {"image": {"type": "hf_clip_image", "options": {"path": str(not_model)}, "head": "none"}}
    with pytest.raises(ConfigError, match=r"model\.towers\.image\.options\.path: .* is not a Hugging Face model"):
        ours(tree(model={"towers": towers, "embed_dim": 12}, data={"modalities": {"image": {"decoder": "image"}}}))
    BertModel(BertConfig(vocab_size=50, **TINY)).save_pretrained(tmp_path / "bert")
    with pytest.raises(ConfigError, match=r"model\.init_from\.path: .* holds a BertModel, not one of CLIPModel"):
        config_from_dict(tree(tmp_path / "bert"))

    # weights that do not fit the folder's own config: named with both shapes
    bad = tmp_path / "bad"
    shutil.copytree(clip, bad)
    state = load_file(str(bad / "model.safetensors"))
    state["visual_projection.weight"] = torch.zeros(7, 16)
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"init_from\.path: .*visual_projection\.weight \(7, 16\) vs \(12, 16\)"):
        ours(tree(bad))
    # a folder that does not fit towers configured otherwise
    other = {"model_type": "clip", "projection_dim": 12, "vision_config": dict(TINY, image_size=16, patch_size=4),
             "text_config": dict(TINY, vocab_size=10)}
    towers = {"image": {"type": "hf_clip_image", "options": {"config": other}, "head": "none"}}
    with pytest.raises(ConfigError, match=r"model\.init_from: .* does not fit this model: .*position_embedding"):
        ours(tree(clip, model={"towers": towers, "embed_dim": 12},
                  data={"modalities": {"image": {"decoder": "image", "options": {"size": 16}}}}))
    with pytest.raises(ConfigError, match=r"model\.init_from\.towers\[0\]: no such modality"):
        config_from_dict(tree(model={"init_from": {"format": "hf", "path": str(clip), "towers": ["nope"]}}))

    # export refuses what a CLIPModel cannot hold, saying why
    cfg, mods, model = ours(tree(clip))
    cfg.model.towers["image"].head = "linear"
    with pytest.raises(ConfigError, match=r"--format hf: model\.towers\.image\.head is linear: a CLIPModel projects"):
        FORMATS.get("hf", "--format")().export(build_model(cfg.model, mods), cfg, tmp_path / "out")


def test_image_processor_gives_our_decoders_tensors(tmp_path):
    """Through transformers' own loader (AutoImageProcessor, its default backend): for each decoder
    setting it can express, its processing of PNG files (square and not) equals our decoder's up to
    one level of 255 (PIL's rounding and torchvision's); the recipe reads the folder back to a
    decoder giving the same tensors (init_from of an export); the others are refused, named."""
    from types import SimpleNamespace

    from PIL import Image
    from transformers import AutoImageProcessor

    from pretrain.models.hf_clip import image_options, image_processor

    paths, _ = heldout_images(tmp_path / "png")
    paths = paths[:2] + paths[-2:]
    norms = [{"mean": [0.5] * 3, "std": [0.5] * 3}, {"mean": [0.3, 0.4, 0.5], "std": [0.2, 0.25, 0.3]}]
    cases = [dict(interpolation=i, crop_mode=c, crop_pct=pct) for i in ("bilinear", "bicubic", "lanczos")
             for c in ("center", "squash") for pct in (1.0, 0.875)]
    cases = [dict(case, **norms[i % 2]) for i, case in enumerate(cases)]
    for i, options in enumerate(cases):
        ours = image_decoder(size=16, **options)
        folder = tmp_path / f"case{i}"
        name = "CLIPImageProcessor" if options["crop_mode"] == "center" else "SiglipImageProcessor"
        image_processor(ours.settings, name).save_pretrained(folder)
        theirs = AutoImageProcessor.from_pretrained(folder)
        followed = image_decoder(**image_options(folder, SimpleNamespace(image_size=16), "SiglipVisionModel"))
        for path in paths:
            want = ours.decode(path.read_bytes(), "png", None)
            got = theirs(images=Image.open(path), return_tensors="pt")["pixel_values"][0]
            levels = (got - want).abs() * 255 * torch.tensor(options["std"]).reshape(3, 1, 1)
            if _mixed(Image.open(path).size, options) and options["interpolation"] != "bilinear":
                assert float(levels.mean()) <= 1, (options, path.name)  # see image_processor's docstring
            else:
                assert float(levels.max()) <= 1.001, (options, path.name)
            torch.testing.assert_close(followed.decode(path.read_bytes(), "png", None), want, atol=0, rtol=0)
    for options, message in [({"crop_mode": "border"}, r"crop_mode is border: transformers' image processors do "
                                                        r"not pad"),
                             ({"interpolation": "nearest"}, r"interpolation is nearest: transformers' image "
                                                           r"processors resize with torchvision")]:
        with pytest.raises(ConfigError, match=r"^data\.modalities\.image\.options\." + message):
            image_processor(image_decoder(size=16, **options).settings)


def _mixed(size: tuple[int, int], options: dict) -> bool:
    """Whether a squash enlarges the image along one side and shrinks it along the other."""
    scaled = int(16 / options["crop_pct"])
    return options["crop_mode"] == "squash" and min(size) < scaled < max(size)


def test_a_siglip_built_from_config_exports_with_its_processor(folders, tmp_path):
    """Towers built from ``config:`` (no folder to copy a processor from), the image decoder unlike
    SigLIP's defaults: the export holds the run's tokenizer and a SiglipImageProcessor of the run's
    decoder, so AutoModel with AutoProcessor, and the zero-shot pipeline, give our embeddings and
    predictions from raw image files."""
    from PIL import Image
    from transformers import AutoModel, AutoProcessor, pipeline

    from pretrain.export import Embedder

    siglip = {"model_type": "siglip", "vision_config": dict(image_size=16, patch_size=8, **TINY),
              "text_config": dict(max_position_embeddings=64, **TINY)}
    towers = {m: {"type": f"hf_clip_{m}", "options": {"config": siglip}, "head": "none"} for m in ("image", "text")}
    data = {"context_length": 64, "modalities": {  # 64: the pipeline pads SigLIP's prompts to 64 tokens
        "image": {"decoder": "image", "options": {"size": 16, "crop_mode": "squash", "interpolation": "bicubic",
                                                  "mean": [0.4, 0.5, 0.6], "std": [0.3, 0.3, 0.3]}},
        "text": {"decoder": "text", "options": {"tokenizer": str(folders["siglip"])}}}}
    cfg, mods, model = ours(tree(model={"towers": towers, "embed_dim": 16}, data=data, loss={"name": "siglip"}),
                            with_bias=True)
    out = tmp_path / "export"
    FORMATS.get("hf", "--format")().export(model, cfg, out)
    paths, labels = heldout_images(tmp_path / "png")
    lib, processor = AutoModel.from_pretrained(out).eval(), AutoProcessor.from_pretrained(out)
    assert type(lib).__name__ == "SiglipModel" and type(processor.image_processor).__name__ == "SiglipImageProcessor"
    prompts = [f"a photo of a {c}" for c in CLASSES]
    inputs = processor(text=prompts, images=[Image.open(p) for p in paths], padding="max_length", return_tensors="pt")
    with torch.no_grad():
        images, texts = features(lib.get_image_features(pixel_values=inputs["pixel_values"])), features(
            lib.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]))
    emb = Embedder(model, cfg, mods)
    _agrees(images, texts, emb.embed_images(paths), emb.embed_texts(prompts), labels)
    classify = pipeline("zero-shot-image-classification", model=str(out))
    _same_top_label(classify, paths, labels, emb)

    # what the folder could not carry is refused from the recipe alone, naming the key and every format
    for where, value, message in [("text", {"tokenizer": "byte"}, r"text\.options\.tokenizer is 'byte': the export "
                                                                   r"carries the run's tokenizer"),
                                  ("image", {"crop_mode": "border"}, r"image\.options\.crop_mode is border")]:
        changed = copy.deepcopy(data)
        changed["modalities"][where]["options"].update(value)
        cfg = config_from_dict(tree(model={"towers": towers, "embed_dim": 16}, data=changed, loss={"name": "siglip"}))
        decoders = {m.name: m.decoder for m in build_modalities(cfg.data, train=False)}
        with pytest.raises(ConfigError, match=r"^--format hf: data\.modalities\." + message + r".*\. Formats: "
                                              r"native \(any model.*hf \(an hf_clip_image"):
            FORMATS.get("hf", "--format")().check(cfg, decoders)


def _agrees(images, texts, our_images, our_texts, labels) -> None:
    """The library's embeddings are ours (cos >= 0.9999) and so are its zero-shot predictions."""
    assert float(F.cosine_similarity(images, our_images).min()) >= 0.9999
    assert float(F.cosine_similarity(texts, our_texts).min()) >= 0.9999
    held = torch.tensor([label >= 0 for label in labels])
    assert torch.equal((images @ texts.T).argmax(1)[held], (our_images @ our_texts.T).argmax(1)[held])


def _same_top_label(classify, paths, labels, emb, template: str = "a photo of a {}") -> None:
    """The zero-shot pipeline, for one template, predicts our class on every held-out image."""
    held = [p for p, label in zip(paths, labels) if label >= 0]
    ranked = classify([str(p) for p in held], candidate_labels=CLASSES, hypothesis_template=template)
    ours = (emb.embed_images(held) @ emb.embed_texts([template.format(c) for c in CLASSES]).T).argmax(1)
    assert [r[0]["label"] for r in ranked] == [CLASSES[i] for i in ours.tolist()]


def test_hf_text_takes_the_text_model_of_a_clip_folder(folders):
    towers = {"text": {"type": "hf_text", "options": {"path": str(folders["clip"]), "pooling": "pooler"}}}
    data = {"context_length": 16, "modalities": {"text": {"decoder": "text", "options": {
        "tokenizer": str(folders["clip"])}}}}
    _, mods, model = ours(tree(model={"towers": towers, "embed_dim": 8}, data=data))
    assert model.encode("text", mods["text"].decoder.tokenizer(TEXTS)).shape == (len(TEXTS), 8)


@pytest.mark.slow
def test_a_checkpoint_trained_on_two_ranks_exports_as_a_clip_model_folder(folders, tmp_path, capsys, monkeypatch):
    """A CLIP folder fine-tuned on 2 ranks, its image decoder set unlike the folder's processor (mean
    and std 0.5, bilinear), exported: the README's transformers lines, as printed (AutoModel,
    AutoProcessor, the zero-shot pipeline), give our embeddings (cos >= 0.9999) and zero-shot
    predictions from raw image files; the same for a run of the folder's own preprocessing (the
    run's config.yaml set so, same weights); the recipe reads the export back; other towers are
    refused, by the command line too."""
    from transformers import AutoModel, AutoProcessor, AutoTokenizer, CLIPModel

    from pretrain.export import Embedder, consolidated_state_dict, export, main, model_from_state

    run = tmp_path / "run"
    ok(torchrun([f"output_dir={run}", f"data.train.urls={ASSET_SHARDS}/train/shard-{{000000..000007}}.tar",
               "data.val.urls=", "data.train.shuffle_buffer=4", "data.train.workers=0", "model.towers={}",
               f"model.init_from={{format: hf, path: {folders['clip']}}}", "train.steps=2",
               "train.micro_batch_size=6", "train.warmup_steps=1", "train.log_every=1", "eval.enabled=false",
               "eval.classnames=[]", "data.modalities.image.options.mean=[0.5, 0.5, 0.5]",
               "data.modalities.image.options.std=[0.5, 0.5, 0.5]",
               "data.modalities.image.options.interpolation=bilinear"],
              timeout=300))
    ckpt = run / "checkpoints" / "step000002"
    out = export(ckpt, tmp_path / "hf", fmt="hf")
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= {
        p.name for p in out.iterdir()}
    cfg = config_from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    mods = build_modalities(cfg.data, train=False)
    trained = model_from_state(cfg, consolidated_state_dict(ckpt), mods).eval()
    emb = Embedder(trained, cfg, mods)
    lib, before = CLIPModel.from_pretrained(out).eval(), CLIPModel.from_pretrained(folders["clip"]).eval()
    lib_tok = AutoTokenizer.from_pretrained(out)(TEXTS, padding=True, truncation=True, return_tensors="pt")
    assert cfg.data.context_length == 40  # the recipe's own, kept (the model reads up to 77): the tokenizer's cut
    x, ids = images(mods, 4), mods["text"].decoder.tokenizer(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(trained.encode("text", ids), features(lib.get_text_features(**lib_tok)),
                                   atol=ATOL, rtol=0)
        assert (features(before.get_image_features(pixel_values=x)) - trained.encode("image", x)).abs().max() > 1e-4
    assert float(trained.scales()[0].detach()) == pytest.approx(float(lib.logit_scale.detach().exp()), abs=ATOL)

    # the README's lines, as printed, with DIR the export, beside digit.png
    paths, labels = heldout_images(tmp_path / "png")
    write(tmp_path / "digit.png", paths[0].read_bytes())
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    for first in ("from transformers import AutoModel", "from transformers import pipeline"):
        exec(compile(readme_block(first).text.replace("DIR", str(out)), "README.md", "exec"), scope)
    assert float(F.cosine_similarity(scope["out"].image_embeds.detach(), emb.embed_images([paths[0]]))) >= 0.9999
    _agrees_through_processor(scope["model"], scope["processor"], paths, labels, emb)
    _same_top_label(scope["classify"], paths, labels, emb)

    # a run of the folder's own preprocessing (the checkpoint beside a config.yaml saying so)
    plain = tmp_path / "plain"
    shutil.copytree(run, plain)
    tree_ = yaml.safe_load((plain / "config.yaml").read_text())
    source = json.loads((folders["clip"] / "preprocessor_config.json").read_text())
    tree_["data"]["modalities"]["image"]["options"].update(
        mean=source["image_mean"], std=source["image_std"], interpolation="bicubic")
    (plain / "config.yaml").write_text(yaml.safe_dump(tree_))
    export(plain / "checkpoints" / "step000002", tmp_path / "hf_plain", fmt="hf")
    cfg = config_from_dict(tree_)
    _agrees_through_processor(AutoModel.from_pretrained(tmp_path / "hf_plain").eval(),
                              AutoProcessor.from_pretrained(tmp_path / "hf_plain"), paths, labels,
                              Embedder(trained, cfg, build_modalities(cfg.data, train=False)))

    # the recipe reads the export back: its decoder settings are the run's
    back = config_from_dict(tree(out)).data.modalities["image"].options
    run_image = yaml.safe_load((run / "config.yaml").read_text())["data"]["modalities"]["image"]["options"]
    keys = ("size", "mean", "std", "interpolation", "crop_mode")
    assert {k: back[k] for k in keys} == {k: run_image[k] for k in keys}

    # a model of other towers is refused, with the reason and every format, by the command line too
    capsys.readouterr()
    assert main(["--checkpoint", str(ASSETS / "run_v1" / "checkpoints" / "step000002"), "--output",
                 str(tmp_path / "refused"), "--format", "hf"]) == 2
    err = capsys.readouterr().err
    assert "config error: --format hf: needs an hf_clip_image and an hf_clip_text tower" in err
    assert "this model has image: mlp, text: text_transformer" in err
    assert "Formats: native (any model" in err and "open_clip (an open_clip_image" in err


def _agrees_through_processor(model, processor, paths, labels, emb, template: str = "a photo of a {}") -> None:
    """AutoModel with AutoProcessor, from the raw files, gives our embeddings and predictions."""
    from PIL import Image

    prompts = [template.format(c) for c in CLASSES]
    inputs = processor(text=prompts, images=[Image.open(p) for p in paths], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    _agrees(F.normalize(out.image_embeds, dim=-1), F.normalize(out.text_embeds, dim=-1), emb.embed_images(paths),
            emb.embed_texts(prompts), labels)
