"""OpenCLIP's towers, checkpoints and model configs, through open_clip itself (offline).

Towers (``model.towers.<m>.type``), each with options ``model`` (an open_clip architecture name:
ViT-B-32, ViT-B-16, ViT-L-14, convnext_base, ...) and ``model_config`` (the model-config JSON of an
architecture open_clip does not ship, registered with ``open_clip.add_model_config``):

- ``open_clip_image``: the model's ``visual`` module (its projection included): ``(B, embed_dim)``;
- ``open_clip_text``: the model's text transformer and ``encode_text`` (causal, pooled at the end of
  text as OpenCLIP does, projected): ``(B, embed_dim)``. Its input length is the model's context
  length; the text decoder's tokenizer is OpenCLIP's BPE (``tokenizer: open_clip``).

Both are built by ``open_clip.create_model(name, pretrained=None)``; their forward passes are the
library's own. With ``head: none`` they give OpenCLIP's embeddings. Weights: ``model.init_from:
{format: open_clip, model: NAME, path: FILE}`` (an OpenCLIP checkpoint: .safetensors, or .pt/.bin
read with ``weights_only=True``); ``python -m pretrain.export --format open_clip`` writes one back in
open_clip's own folder layout: ``open_clip_config.json`` (``model_cfg``, and the run's image
preprocessing as ``preprocess_cfg``) beside ``open_clip_model.safetensors``, which
``open_clip.create_model_and_transforms("local-dir:DIR")`` and ``open_clip.get_tokenizer("local-dir:DIR")``
load as they are.
A model of our ``timm`` and ``text_transformer`` towers (the quickstart's) is written as open_clip's
``CustomTextCLIP`` (``pretrain.models.timm_bert``: its TimmModel and HFTextEncoder, the run's
tokenizer beside them).
Key layout: OpenCLIP's ``visual.*`` is our ``towers.<image>.backbone.visual.*``; its text keys
(``token_embedding``, ``transformer``, ... or ``text.*``) are ``towers.<text>.backbone.model.*``;
``logit_scale`` / ``logit_bias`` are scalars there and of shape (1,) here.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from pretrain.models import timm_bert
from pretrain.models.interop import FORMATS, CheckpointFormat, check_projects_itself, decoders_of, load_checked, pair, \
    refusal, split_pair, tower_configs, towers_of
from pretrain.models.towers import TOWERS, Backbone, load_weights_file, local_path
from pretrain.options import ConfigError, require
from pretrain.tokenizer import is_open_clip

IMAGE, TEXT = "open_clip_image", "open_clip_text"
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]


def library(key: str):
    """The open_clip package (an optional dependency: ``pip install multimodal-pretrain[openclip]``)."""
    try:
        import open_clip
    except ImportError:
        raise ConfigError(f"{key}: OpenCLIP's models need the open-clip-torch package: pip install -e '.[openclip]'") \
            from None
    return open_clip


def model_config(name: str, config_file: Optional[str], key: str) -> dict:
    """open_clip's config of architecture ``name`` (``config_file`` registered first)."""
    open_clip = library(key)

    if config_file:
        path = Path(config_file)
        require(path.is_file(), f"{key}.model_config", f"no such file: {config_file}")
        open_clip.add_model_config(path)
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ConfigError(f"{key}.model: open_clip has no model {name!r} (e.g. ViT-B-32, ViT-B-16, ViT-L-14; "
                          f"model_config: a JSON file for another architecture)")
    return copy.deepcopy(cfg)


def create(name: str, config_file: Optional[str], key: str) -> nn.Module:
    """A randomly initialised open_clip model (nothing downloaded)."""
    open_clip = library(key)
    model_config(name, config_file, key)
    # built on the meta device (``pretrain.plan`` counts parameters without memory), open_clip's final
    # ``model.to(device)`` must name meta too: a move from meta to the CPU has no data to copy
    where = {"device": "meta"} if torch.get_default_device().type == "meta" else {}
    return open_clip.create_model(name, pretrained=None, pretrained_image=False, pretrained_text=False, **where)


@dataclass
class _Options:
    model: str = "ViT-B-32"
    model_config: Optional[str] = None  # the model-config JSON of an architecture open_clip does not ship


@TOWERS.register(IMAGE)
class OpenClipImage(Backbone):
    """OpenCLIP's image tower (projection included)."""

    Options = _Options

    def __init__(self, options, ctx):
        super().__init__(options, ctx)
        key = f"{ctx.key}.options"
        cfg = model_config(options.model, options.model_config, key)
        size = cfg["vision_cfg"].get("image_size", 224)
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        if ctx.input_shape is not None and tuple(ctx.input_shape[1:]) != size:
            raise ConfigError(f"data.modalities.{ctx.modality}.options.size: open_clip {options.model!r} takes "
                              f"{size[0]}x{size[1]} images, the decoder gives {tuple(ctx.input_shape[1:])}")
        self.visual = create(options.model, options.model_config, key).visual
        self.width = cfg["embed_dim"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)

    def set_grad_checkpointing(self, enabled: bool) -> None:
        self.visual.set_grad_checkpointing(enabled)

    def set_patch_dropout(self, prob: float) -> None:
        from open_clip.transformer import PatchDropout

        if not hasattr(self.visual, "patch_dropout"):
            super().set_patch_dropout(prob)
        self.visual.patch_dropout = PatchDropout(prob)


@TOWERS.register(TEXT)
class OpenClipText(Backbone):
    """OpenCLIP's text tower: the model without its image tower, run by its own ``encode_text``."""

    Options = _Options

    def __init__(self, options, ctx):
        super().__init__(options, ctx)
        key = f"{ctx.key}.options"
        cfg = model_config(options.model, options.model_config, key)
        model = create(options.model, options.model_config, key)
        del model.visual, model.logit_scale  # the image tower and the temperature live elsewhere
        if getattr(model, "logit_bias", None) is not None:
            del model.logit_bias
        self.model = model
        self.width = cfg["embed_dim"]
        tok = getattr(ctx.decoder, "tokenizer", None)
        if tok is None:
            raise ConfigError(f"{ctx.key}.type: {TEXT} needs a text modality (data.modalities.{ctx.modality} has "
                              f"no tokenizer)")
        if ctx.input_shape is not None and ctx.input_shape[0] != model.context_length:
            raise ConfigError(f"data.context_length: open_clip {options.model!r} reads {model.context_length} "
                              f"tokens, the text decoder gives {ctx.input_shape[0]}")
        if tok.vocab_size > model.vocab_size:
            raise ConfigError(f"data.modalities.{ctx.modality}.options.tokenizer: gives ids up to "
                              f"{tok.vocab_size - 1}, open_clip {options.model!r} has {model.vocab_size} tokens "
                              f"(use the model's own tokenizer: open_clip for OpenAI's BPE, or a local folder "
                              f"holding its Hugging Face tokenizer)")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(ids)

    def set_grad_checkpointing(self, enabled: bool) -> None:
        if hasattr(self.model, "text"):  # CustomTextCLIP: a text module of its own
            self.model.text.set_grad_checkpointing(enabled)
        else:  # CLIP: the text transformer's parts sit on the model (its own switch also touches visual)
            self.model.transformer.grad_checkpointing = enabled


# ------------------------------------------------------------------------------ the checkpoint format

RESIZE_MODES = {"center": "shortest", "squash": "squash", "border": "longest"}  # timm's crop_mode -> open_clip's


def preprocess_cfg(image) -> dict:
    """open_clip's ``preprocess_cfg`` (fields of its ``PreprocessCfg``) whose evaluation transform
    gives what the image decoder gives (``image``: its ``ImageSettings``; equal tensors, since both
    run the same torchvision and PIL operations); a setting open_clip cannot express is a
    ``ConfigError`` naming its key."""
    if image.crop_pct != 1:
        raise ConfigError(f"{image.key}.crop_pct is {image.crop_pct:g}: open_clip's preprocessing has no crop "
                          f"percentage (it resizes to the model's size: crop_pct 1)")
    if image.interpolation not in ("bilinear", "bicubic"):
        raise ConfigError(f"{image.key}.interpolation is {image.interpolation}: open_clip's preprocessing has "
                          f"bilinear and bicubic only")
    cfg = {"size": image.size, "mode": "RGB", "mean": list(image.mean), "std": list(image.std),
           "interpolation": image.interpolation, "resize_mode": RESIZE_MODES[image.crop_mode]}
    if image.crop_mode == "border":  # timm pads with the mean colour, open_clip with one grey level
        fill = {round(255 * m) for m in image.mean}
        if len(fill) != 1:
            raise ConfigError(f"{image.key}.crop_mode is border, which pads with the mean colour "
                              f"{[round(255 * m) for m in image.mean]}; open_clip pads with one grey level "
                              f"(an equal mean per channel, or crop_mode center or squash)")
        cfg["fill_color"] = fill.pop()
    return cfg


def check_tokenizer(text_decoder, text_cfg: dict, key: str) -> None:
    """The text decoder's tokenizer is the one ``open_clip.get_tokenizer("local-dir:DIR")`` gives for
    this model config (OpenAI's BPE, no extra options), or a ``ConfigError`` naming its key."""
    spec = getattr(text_decoder.options, "tokenizer", None)
    if spec is None or not is_open_clip(spec) or text_cfg.get("hf_tokenizer_name") or text_cfg.get("tokenizer_kwargs"):
        raise ConfigError(f"{key}.tokenizer is {spec!r}: open_clip loads this model with its own tokenizer "
                          f"(OpenAI's BPE, tokenizer: open_clip), which would give other ids")


def to_ours(state: dict[str, torch.Tensor], image: Optional[str], text: Optional[str], scales: bool) -> dict:
    """An OpenCLIP state dict in our keys (the parts of the towers named, and the scales)."""
    out = {}
    for k, v in state.items():
        if k in ("logit_scale", "logit_bias"):
            if scales:
                out[k] = v.reshape(1)
        elif k.startswith("visual."):
            if image is not None:
                out[f"towers.{image}.backbone.{k}"] = v
        elif text is not None:
            out[f"towers.{text}.backbone.model.{k}"] = v
    return out


def to_open_clip(state: dict[str, torch.Tensor], image: str, text: str) -> dict:
    """Our state dict in OpenCLIP's keys (scalar scales)."""
    out = {}
    for k, v in state.items():
        if k in ("logit_scale", "logit_bias"):
            out[k] = v.reshape(())
        elif k.startswith(f"towers.{image}.backbone."):
            out[k[len(f"towers.{image}.backbone."):]] = v
        elif k.startswith(f"towers.{text}.backbone.model."):
            out[k[len(f"towers.{text}.backbone.model."):]] = v
        else:
            raise ConfigError(f"--format open_clip: {k} has no place in an OpenCLIP checkpoint (towers with a "
                              f"head or a missingness embedding cannot be written so; keep the native format)")
    return out


# our text_transformer's pooling -> open_clip's HFTextEncoder pooler doing the same
POOLERS = {"pooler": "cls_pooler", "cls": "cls_last_hidden_state_pooler", "mean": "mean_pooler"}
TIMM_BERT = "CustomTextCLIP of open_clip (TimmModel + HFTextEncoder)"


def timm_bert_pair(towers: dict) -> Optional[tuple[str, str]]:
    """The (image, text) modalities of a timm + text_transformer model (``pretrain.models.timm_bert``)
    this format writes as open_clip's CustomTextCLIP; None for a model of open_clip's own towers."""
    if any(t is not None and t.type in (IMAGE, TEXT) for t in towers.values()):
        return None
    return timm_bert.find_pair(towers)


@FORMATS.register("open_clip")
class OpenClipFormat(CheckpointFormat):
    tower_types = (IMAGE, TEXT)
    holds = (f"an {IMAGE} and an {TEXT} tower of one model, head: none; or {timm_bert.WHAT} (pooling "
             f"{', '.join(POOLERS)}), head: linear")

    def follow(self, tree: dict, init: dict) -> dict:
        tree = copy.deepcopy(tree)
        name = init.get("model")
        if not name:
            raise ConfigError("model.init_from.model: is required with format: open_clip (e.g. ViT-B-32)")
        cfg = model_config(name, init.get("model_config"), "model.init_from")
        data = tree.setdefault("data", {})
        modalities = data.setdefault("modalities", {"image": {"decoder": "image"}, "text": {"decoder": "text"}})
        options = {"model": name, **({"model_config": init["model_config"]} if init.get("model_config") else {})}
        towers = {}
        for m, spec in modalities.items():
            decoder = (spec or {}).get("decoder") or m
            if decoder == "image" and IMAGE not in [t["type"] for t in towers.values()]:
                towers[m] = {"type": IMAGE, "options": dict(options), "head": "none"}
                size = cfg["vision_cfg"].get("image_size", 224)
                pre = cfg.get("preprocess_cfg", {})
                opts = spec.setdefault("options", {})
                opts.setdefault("size", size if isinstance(size, int) else size[0])
                opts.setdefault("mean", list(pre.get("mean", OPENAI_MEAN)))
                opts.setdefault("std", list(pre.get("std", OPENAI_STD)))
                opts.setdefault("interpolation", pre.get("interpolation", "bicubic"))
            elif decoder == "text" and TEXT not in [t["type"] for t in towers.values()]:
                towers[m] = {"type": TEXT, "options": dict(options), "head": "none"}
                text_cfg = cfg["text_cfg"]
                if text_cfg.get("hf_tokenizer_name") and "tokenizer" not in spec.get("options", {}):
                    raise ConfigError(f"data.modalities.{m}.options.tokenizer: open_clip {name!r} uses the Hugging "
                                      f"Face tokenizer {text_cfg['hf_tokenizer_name']!r}: give a local folder "
                                      f"holding it (nothing is downloaded)")
                spec.setdefault("options", {}).setdefault("tokenizer", "open_clip")
                data.setdefault("context_length", text_cfg.get("context_length", 77))
        tree.setdefault("model", {})["towers"] = towers
        tree["model"]["embed_dim"] = cfg["embed_dim"]
        return tree

    def load(self, model, init) -> None:
        state = load_weights_file(local_path(init.path, "model.init_from.path"), "model.init_from.path")
        towers = towers_of(model, self.tower_types, init.towers)
        if not towers:
            raise ConfigError("model.init_from: no tower of this model is an OpenCLIP tower "
                              f"({IMAGE}, {TEXT}) to load into")
        image, text = split_pair(towers, IMAGE, TEXT)
        for m, tower in towers.items():
            if tower.backbone.options.model != init.model:
                raise ConfigError(f"model.init_from.model: {init.model!r}, but model.towers.{m} is open_clip "
                                  f"{tower.backbone.options.model!r}")
        scales = init.temperature
        mapped = to_ours(state, image, text, scales)
        if scales and model.logit_bias is None:
            mapped.pop("logit_bias", None)  # SigLIP's bias, for an objective without one
        prefixes = [f"towers.{m}.backbone." for m in towers] + (["logit_scale"] if scales else [])
        if scales and model.logit_bias is not None:
            prefixes.append("logit_bias")
        load_checked(model, mapped, prefixes, f"{init.path} (open_clip {init.model})", init.path)

    def check(self, cfg, decoders: dict) -> None:
        towers = tower_configs(cfg)
        found = timm_bert_pair(towers)
        if found is not None:
            return self.check_timm_bert(towers, decoders, *found)
        image, text = pair("open_clip", towers, IMAGE, TEXT, f", or {timm_bert.WHAT}")
        check_projects_itself("open_clip", towers, (image, text), "CLIP model of open_clip")
        a, b = (towers[m].typed_options(f"model.towers.{m}") for m in (image, text))
        if (a.model, a.model_config) != (b.model, b.model_config):
            raise refusal("open_clip", f"the towers are of two models ({a.model}, {b.model})")
        config = model_config(a.model, a.model_config, f"model.towers.{image}.options")
        try:
            preprocess_cfg(decoders[image].settings)
            check_tokenizer(decoders[text], config["text_cfg"], f"data.modalities.{text}.options")
        except ConfigError as err:
            raise refusal("open_clip", str(err)) from None

    def check_timm_bert(self, towers: dict, decoders: dict, image: str, text: str) -> None:
        timm_bert.check("open_clip", towers, decoders, image, text, POOLERS, TIMM_BERT)
        kwargs = timm_bert.created_kwargs(towers, decoders, image)
        if kwargs:
            raise refusal("open_clip", f"model.towers.{image}.options: the timm model is built with {kwargs}, and "
                                       f"open_clip's TimmModel builds one by its name alone")
        tok = decoders[text].tokenizer
        if getattr(tok, "eos_id", None) is not None and tok.eos_id == tok.pad_id:
            raise refusal("open_clip", f"data.modalities.{text}.options.tokenizer pads with its end token, which "
                                       f"open_clip's HFTextEncoder masks out everywhere, the end of each text too "
                                       f"(a tokenizer with a pad token of its own)")
        try:
            preprocess_cfg(decoders[image].settings)
        except ConfigError as err:
            raise refusal("open_clip", str(err)) from None

    def export_timm_bert(self, model, cfg, out: Path, image: str, text: str) -> list[Path]:
        """A CustomTextCLIP's folder: ``open_clip_config.json`` whose ``text_cfg`` names the BERT's config
        (``text_model/``) and the tokenizer (the folder itself) by absolute path, as open_clip resolves
        ``hf_model_name`` from the working directory; the run's tokenizer (``tokenizer.json``, ...)."""
        from safetensors.torch import save_file

        decoders = decoders_of(model)
        weights = timm_bert.parts("open_clip", model, image, text)
        state = {**{f"visual.trunk.{k}": v for k, v in weights["timm"].items()},
                 "visual.head.proj.weight": weights["image_proj"]["weight"],
                 **{f"text.transformer.{k}": v for k, v in weights["bert"].items()},
                 "text.proj.weight": weights["text_proj"]["weight"], **weights["scales"]}
        out.mkdir(parents=True, exist_ok=True)
        home = out.resolve()
        bert = model.towers[text].backbone.encoder.config
        bert.save_pretrained(str(home / "text_model"))
        timm_bert.transformers_tokenizer(decoders[text], cfg.data.context_length).save_pretrained(str(home))
        settings = decoders[image].settings
        model_cfg = {
            "embed_dim": model.embed_dim,
            "vision_cfg": {"timm_model_name": model.towers[image].backbone.options.name, "timm_model_pretrained": False,
                           "timm_pool": "", "timm_proj": "linear", "timm_proj_bias": False,  # the model's own pooling
                           "image_size": settings.size},
            "text_cfg": {"hf_model_name": str(home / "text_model"), "hf_model_pretrained": False,
                         "hf_tokenizer_name": str(home), "hf_pooler_type": POOLERS[model.towers[text].backbone.options.pooling],
                         "hf_proj_type": "linear", "context_length": cfg.data.context_length},
        }
        if "logit_bias" in weights["scales"]:
            model_cfg["init_logit_bias"] = float(weights["scales"]["logit_bias"])
        layout = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg(settings)}
        (out / "open_clip_config.json").write_text(json.dumps(layout, indent=1) + "\n")
        save_file(state, str(out / "open_clip_model.safetensors"))
        library("--format open_clip").create_model(f"local-dir:{home}")  # open_clip's strict load, at once
        return sorted(out.iterdir())

    def export(self, model, cfg, out: Path) -> list[Path]:
        """open_clip's folder layout: ``open_clip_config.json`` (``model_cfg``, ``preprocess_cfg``)
        and ``open_clip_model.safetensors``, what ``create_model_and_transforms("local-dir:DIR")`` reads."""
        from safetensors.torch import save_file

        decoders = decoders_of(model)
        self.check(cfg, decoders)
        found = timm_bert_pair(tower_configs(cfg))
        if found is not None:
            return self.export_timm_bert(model, cfg, out, *found)
        image, text = pair("open_clip", tower_configs(cfg), IMAGE, TEXT)
        options = model.towers[image].backbone.options
        config = model_config(options.model, options.model_config, f"model.towers.{image}.options")
        state = to_open_clip({k: v.detach().float().contiguous() for k, v in model.inference_state_dict("open_clip").items()},
                             image, text)
        if model.logit_bias is not None:
            config["init_logit_bias"] = float(model.logit_bias.detach())
        else:  # open_clip makes a bias exactly when the config has one
            config.pop("init_logit_bias", None)
        layout = {"model_cfg": config, "preprocess_cfg": preprocess_cfg(decoders[image].settings)}
        out.mkdir(parents=True, exist_ok=True)
        (out / "open_clip_config.json").write_text(json.dumps(layout, indent=1) + "\n")
        save_file(state, str(out / "open_clip_model.safetensors"))
        return [out / "open_clip_config.json", out / "open_clip_model.safetensors"]
