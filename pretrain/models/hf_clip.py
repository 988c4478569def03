"""Hugging Face CLIP and SigLIP: towers, checkpoints and configs, through transformers itself (offline).

Towers (``model.towers.<m>.type``), each with options ``path`` (a local ``save_pretrained`` folder of
a CLIPModel, CLIPVisionModelWithProjection, CLIPTextModelWithProjection, SiglipModel,
SiglipVisionModel or SiglipTextModel) or ``config`` (a mapping for random init: ``{model_type: clip,
text_config: {...}, vision_config: {...}, projection_dim: 512}``, ``siglip``, ``clip_vision_model``,
...); ``pretrained: false`` takes only the architecture of ``path`` (random init; ``model.init_from``
then loads the weights):

- ``hf_clip_image``: the model's ``vision_model`` (and CLIP's ``visual_projection``): what
  ``get_image_features`` computes, ``(B, projection size)``;
- ``hf_clip_text``: the model's ``text_model`` (and CLIP's ``text_projection``): what
  ``get_text_features`` computes, with the attention mask of the text decoder's tokenizer (CLIP's
  pads with its end token: the first one stays in the mask, as the tokenizer's own mask has it);
  ``attention_mask: false`` gives ids alone (how Google's SigLIP checkpoints were trained).

Their forward passes are the library's own; with ``head: none`` they give its features. Weights:
``model.init_from: {format: hf, path: FOLDER}`` (the recipe follows the folder: towers, embed_dim,
tokenizer, context length, image size and normalisation from ``preprocessor_config.json``, SigLIP's
loss); ``python -m pretrain.export --format hf`` writes a folder that ``CLIPModel.from_pretrained``
(``SiglipModel``, ``AutoModel``) loads, with the run's tokenizer and an image processor made from the
run's image decoder (``image_processor``), so ``AutoProcessor`` and ``pipeline(...)`` read them; a model of
our ``timm`` and ``text_transformer`` towers (the quickstart's) as a ``VisionTextDualEncoderModel``
(``pretrain.models.timm_bert``) with its processor. Key layout: the HF
model's ``vision_model.*`` / ``visual_projection.*`` are ``towers.<image>.backbone.`` + the same
keys, ``text_model.*`` / ``text_projection.*`` ``towers.<text>.backbone.`` + them; ``logit_scale``
(a log, like ours) and SigLIP's ``logit_bias`` are of shape (1,) here (CLIP's scale is a scalar).
The towers keep reading ``path`` when built again (export, ``Embedder.load``): keep the folder.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from pretrain.models import timm_bert
from pretrain.models.config import ModelConfig
from pretrain.models.interop import FORMATS, CheckpointFormat, check_projects_itself, decoders_of, load_checked, pair, \
    refusal, tower_configs, towers_of
from pretrain.models.towers import TOWERS, Backbone, _hf_grad_checkpointing, _tokenizer_of, local_path, \
    text_attention_mask
from pretrain.options import ConfigError

IMAGE, TEXT = "hf_clip_image", "hf_clip_text"
# the transformers classes these towers read: class -> the parts it holds
CLASSES = {
    "CLIPModel": ("image", "text"), "CLIPVisionModelWithProjection": ("image",),
    "CLIPTextModelWithProjection": ("text",), "SiglipModel": ("image", "text"), "SiglipVisionModel": ("image",),
    "SiglipTextModel": ("text",),
}
BY_TYPE = {  # a config's model_type -> the class (for configs that name no architecture)
    "clip": "CLIPModel", "clip_vision_model": "CLIPVisionModelWithProjection",
    "clip_text_model": "CLIPTextModelWithProjection", "siglip": "SiglipModel",
    "siglip_vision_model": "SiglipVisionModel", "siglip_text_model": "SiglipTextModel",
}
DUAL = ("CLIPModel", "SiglipModel")
PROCESSORS = {"CLIPModel": "CLIPImageProcessor", "SiglipModel": "SiglipImageProcessor"}  # each one's image processor
PIL_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3}  # PIL's codes in preprocessor_config.json
_RESAMPLE = {code: name for name, code in PIL_RESAMPLE.items()}


def hf_config(path: Optional[str], config: dict, key: str, vocab: Optional[dict] = None):
    """(transformers config, class name) of a folder or a config mapping; ``key`` names the options
    (errors name ``key.path`` / ``key.config``). ``vocab``: text-config entries to fill in when unset."""
    from transformers import AutoConfig

    if bool(path) == bool(config):
        raise ConfigError(f"{key}: give exactly one of path (a local save_pretrained folder) or config (random init)")
    if path:
        folder = local_path(path, f"{key}.path")
        try:
            cfg = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, KeyError) as err:
            raise ConfigError(f"{key}.path: {folder} is not a Hugging Face model folder (config.json of a CLIP or "
                              f"SigLIP model): {err}") from None
        arch = (getattr(cfg, "architectures", None) or [None])[0]
        name = arch if arch in CLASSES else (BY_TYPE.get(cfg.model_type) if arch is None else None)
        if name is None:
            raise ConfigError(f"{key}.path: {folder} holds a {arch or cfg.model_type}, not one of {', '.join(CLASSES)} "
                              f"(other transformers encoders: tower types hf_text, hf_audio)")
        return cfg, name
    conf = copy.deepcopy(dict(config))
    model_type = conf.pop("model_type", None)
    if model_type not in BY_TYPE:
        raise ConfigError(f"{key}.config.model_type: one of {', '.join(BY_TYPE)}, got {model_type!r}")
    if vocab:
        text = conf.setdefault("text_config", {}) if model_type in ("clip", "siglip") else conf
        for k, v in vocab.items():
            text.setdefault(k, v)
    try:
        return AutoConfig.for_model(model_type, **conf), BY_TYPE[model_type]
    except (ValueError, TypeError, KeyError) as err:
        raise ConfigError(f"{key}.config: transformers cannot build it: {err}") from None


def from_pretrained(name: str, folder: Path, key: str) -> nn.Module:
    """``name``.from_pretrained(folder) in fp32; a tensor missing, unexpected or of another shape
    than the folder's own config says stops with a ``ConfigError``."""
    import transformers

    try:
        model, info = getattr(transformers, name).from_pretrained(
            str(folder), local_files_only=True, output_loading_info=True, ignore_mismatched_sizes=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise ConfigError(f"{key}: cannot load a {name} from {folder}: {err}") from None
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(k for k in info.get("unexpected_keys") or [] if not k.endswith("position_ids"))
    shapes = [f"{k} {tuple(a)} vs {tuple(b)}" for k, a, b in sorted(info.get("mismatched_keys") or [])]
    if missing or unexpected or shapes:
        parts = [f"missing {len(missing)} tensors, e.g. {missing[:4]}"] if missing else []
        parts += [f"unexpected {len(unexpected)}, e.g. {unexpected[:4]}"] if unexpected else []
        parts += [f"{len(shapes)} of other shapes than its config.json says, e.g. {shapes[:3]}"] if shapes else []
        raise ConfigError(f"{key}: the weights in {folder} do not fit its {name}: " + "; ".join(parts))
    return model.float()


def build(options, key: str, part: str, vocab: Optional[dict] = None) -> nn.Module:
    """The whole transformers model of a tower's options (its ``part`` is taken from it)."""
    cfg, name = hf_config(options.path, options.config, key, vocab)
    if part not in CLASSES[name]:
        where = f"{key}.path" if options.path else f"{key}.config.model_type"
        raise ConfigError(f"{where}: a {name} has no {part} model (tower type "
                          f"{IMAGE if part == 'image' else TEXT})")
    if options.path and options.pretrained:
        return from_pretrained(name, local_path(options.path, f"{key}.path"), f"{key}.path")
    import transformers

    return getattr(transformers, name)(cfg).float()


def parts(model: nn.Module, part: str) -> dict[str, nn.Module]:
    """attribute -> module of a transformers model's image or text part (what a tower holds)."""
    if part == "image":  # SiglipVisionModel is its own vision model
        found = {"vision_model": getattr(model, "vision_model", model), "visual_projection":
                 getattr(model, "visual_projection", None)}
    else:
        found = {"text_model": getattr(model, "text_model", model), "text_projection":
                 getattr(model, "text_projection", None)}
    return {k: v for k, v in found.items() if v is not None}


def vocab_of(tok) -> dict:
    """The text-config entries a tokenizer fixes (filled into a ``config:`` where unset)."""
    eos = getattr(tok, "eos_id", None)
    return {"vocab_size": tok.vocab_size, **({"eos_token_id": eos} if eos is not None else {})}


@dataclass
class _Options:
    path: Optional[str] = None  # a local save_pretrained folder (CLIPModel, SiglipModel, ...)
    config: dict[str, Any] = field(default_factory=dict)  # or: {model_type: clip, ...}, random init
    pretrained: bool = True  # with path: its weights (false: only its architecture, random init)


@TOWERS.register(IMAGE)
class HFClipImage(Backbone):
    """CLIP's or SigLIP's image tower in transformers (projection included)."""

    Options = _Options

    def __init__(self, options, ctx):
        super().__init__(options, ctx)
        for name, module in parts(build(options, f"{ctx.key}.options", "image"), "image").items():
            setattr(self, name, module)
        vc = self.vision_model.config
        if getattr(vc, "vision_use_head", True) is False:
            raise ConfigError(f"{ctx.key}.options: this SigLIP vision model has no pooling head (vision_use_head: "
                              f"false), so no image features")
        size = vc.image_size if isinstance(vc.image_size, (list, tuple)) else (vc.image_size, vc.image_size)
        if ctx.input_shape is not None and tuple(ctx.input_shape[1:]) != tuple(size):
            raise ConfigError(f"data.modalities.{ctx.modality}.options.size: the model takes {size[0]}x{size[1]} "
                              f"images, the decoder gives {tuple(ctx.input_shape[1:])}")
        proj = getattr(self, "visual_projection", None)
        self.width = proj.out_features if proj is not None else vc.hidden_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.vision_model(pixel_values=x).pooler_output
        proj = getattr(self, "visual_projection", None)
        return proj(pooled) if proj is not None else pooled

    def set_grad_checkpointing(self, enabled: bool) -> None:
        _hf_grad_checkpointing(self.vision_model, enabled, self.ctx.key)

    def set_patch_dropout(self, prob: float) -> None:
        """transformers has no patch dropout: the embeddings' output goes through ``TokenDropout``
        (CLIP keeps its class token; SigLIP has none)."""
        from pretrain.models.towers import TokenDropout

        embeddings = self.vision_model.embeddings
        self.token_dropout = TokenDropout(prob, 1 if hasattr(embeddings, "class_embedding") else 0)
        embeddings.register_forward_hook(lambda module, args, out: self.token_dropout(out))


@TOWERS.register(TEXT)
class HFClipText(Backbone):
    """CLIP's or SigLIP's text tower in transformers (projection included), over the text decoder's
    tokenizer (the model's own)."""

    @dataclass
    class Options(_Options):
        attention_mask: bool = True  # the tokenizer's mask (false: ids alone, as SigLIP was trained)

    def __init__(self, options, ctx):
        super().__init__(options, ctx)
        key = f"{ctx.key}.options"
        tok = _tokenizer_of(ctx)
        self.pad_id, self.eos_id = tok.pad_id, getattr(tok, "eos_id", None)
        for name, module in parts(build(options, key, "text", vocab_of(tok)), "text").items():
            setattr(self, name, module)
        tc = self.text_model.config
        if ctx.input_shape is not None and ctx.input_shape[0] > tc.max_position_embeddings:
            raise ConfigError(f"data.context_length: the text model reads at most {tc.max_position_embeddings} "
                              f"tokens, the text decoder gives {ctx.input_shape[0]}")
        if tok.vocab_size > tc.vocab_size:
            raise ConfigError(f"data.modalities.{ctx.modality}.options.tokenizer: gives ids up to "
                              f"{tok.vocab_size - 1}, the text model has {tc.vocab_size} (use the model's own "
                              f"tokenizer folder)")
        eos = getattr(tc, "eos_token_id", None)
        if tc.model_type.startswith("clip") and self.eos_id is not None and eos not in (2, self.eos_id):
            raise ConfigError(f"data.modalities.{ctx.modality}.options.tokenizer: ends texts with id {self.eos_id}, "
                              f"the CLIP text model pools at its eos_token_id {eos} (use the model's own tokenizer)")
        proj = getattr(self, "text_projection", None)
        self.width = proj.out_features if proj is not None else self.text_model.head.out_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = text_attention_mask(ids, self.pad_id, self.eos_id) if self.options.attention_mask else None
        pooled = self.text_model(input_ids=ids, attention_mask=mask).pooler_output
        proj = getattr(self, "text_projection", None)
        return proj(pooled) if proj is not None else pooled

    def set_grad_checkpointing(self, enabled: bool) -> None:
        _hf_grad_checkpointing(self.text_model, enabled, self.ctx.key)


# ------------------------------------------------------------------------------ the checkpoint format


def embed_dim(cfg, name: str) -> int:
    """The size of the features a model of class ``name`` gives."""
    if name.startswith("CLIP"):
        return cfg.projection_dim
    if name == "SiglipModel":
        return cfg.vision_config.hidden_size
    return cfg.hidden_size if name == "SiglipVisionModel" else cfg.projection_size


def image_options(folder: Path, cfg, name: str) -> dict:
    """The image decoder's options of a model: its input size; normalisation, interpolation and crop
    from the folder's ``preprocessor_config.json`` when it has one."""
    vc = cfg.vision_config if name in DUAL else cfg
    size = vc.image_size
    out: dict[str, Any] = {"size": size if isinstance(size, int) else size[0]}
    pre = folder / "preprocessor_config.json"
    if not pre.is_file():
        return out
    p = json.loads(pre.read_text())
    for ours, theirs in (("mean", "image_mean"), ("std", "image_std")):
        if isinstance(p.get(theirs), list) and len(p[theirs]) == 3:
            out[ours] = [float(v) for v in p[theirs]]
    resample = p.get("resample")
    if resample in _RESAMPLE or resample in _RESAMPLE.values():
        out["interpolation"] = _RESAMPLE.get(resample, resample)
    resize = p.get("size") if isinstance(p.get("size"), dict) else {}
    crop = p.get("crop_size")
    crop = crop.get("height") if isinstance(crop, dict) else crop
    scaled = None
    if "height" in resize and "width" in resize:  # SigLIP: resized to the square (then cropped, if asked)
        out["crop_mode"], scaled = "squash", resize["height"]
    elif p.get("do_center_crop"):  # CLIP: the short side resized, the centre cropped
        out["crop_mode"], scaled = "center", resize.get("shortest_edge")
    if p.get("do_center_crop") and isinstance(scaled, int) and isinstance(crop, int) and crop < scaled:
        out["crop_pct"] = crop / scaled
    return out


def image_processor(image, name: str = "CLIPImageProcessor"):
    """The transformers image processor ``name`` (``CLIPImageProcessor``, ``SiglipImageProcessor``)
    that does what the image decoder does (``image``: its ``ImageSettings``): timm's resize to
    ``floor(size / crop_pct)`` (the short side, or both with ``squash``), its centre crop, mean and
    std; a setting it cannot express is a ``ConfigError`` naming its key. Its tensors (torchvision's
    resize of the decoded pixels, where ours is PIL's) differ from ours by at most one level of 255,
    measured, except: a cubic kernel (bicubic, lanczos) that enlarges an image along one side and
    shrinks it along the other (squash) differs by up to ~20 levels on random pixels (under one on
    average); a centre crop's margin of 3 mod 4 pixels moves the crop by one pixel (transformers
    floors the offset, torchvision rounds it)."""
    import transformers

    if image.crop_mode == "border":
        raise ConfigError(f"{image.key}.crop_mode is border: transformers' image processors do not pad an image "
                          f"to keep its aspect ratio (crop_mode center or squash)")
    if image.interpolation == "nearest":
        raise ConfigError(f"{image.key}.interpolation is nearest: transformers' image processors resize with "
                          f"torchvision, whose nearest picks other pixels than PIL's (bilinear, bicubic or lanczos)")
    scaled = math.floor(image.size / image.crop_pct)  # timm's, before its crop
    size = {"shortest_edge": scaled} if image.crop_mode == "center" else {"height": scaled, "width": scaled}
    return getattr(transformers, name)(
        do_resize=True, size=size, resample=PIL_RESAMPLE[image.interpolation],
        do_center_crop=image.crop_mode == "center" or scaled != image.size,
        crop_size={"height": image.size, "width": image.size}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=list(image.mean), image_std=list(image.std), do_convert_rgb=True)


def has_tokenizer(folder: Path) -> bool:
    return any((folder / n).is_file() for n in ("tokenizer_config.json", "tokenizer.json"))


def peek_logit_scale(folder: Path) -> Optional[float]:
    """The checkpoint's log logit scale, read alone from its safetensors (None if not there)."""
    from safetensors import safe_open

    file, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if index.is_file():
        file = folder / json.loads(index.read_text()).get("weight_map", {}).get("logit_scale", "-")
    if not file.is_file():
        return None
    with safe_open(str(file), "pt") as f:
        return float(f.get_tensor("logit_scale").reshape(-1)[0]) if "logit_scale" in f.keys() else None


TIMM_BERT = "VisionTextDualEncoderModel (TimmWrapperModel + BertModel)"


def timm_bert_pair(towers: dict) -> Optional[tuple[str, str]]:
    """The (image, text) modalities of a timm + text_transformer model (``pretrain.models.timm_bert``)
    this format writes as a VisionTextDualEncoderModel; None for a model of CLIP or SigLIP towers."""
    if any(t is not None and t.type in (IMAGE, TEXT) for t in towers.values()):
        return None
    return timm_bert.find_pair(towers)


@FORMATS.register("hf")
class HFFormat(CheckpointFormat):
    tower_types = (IMAGE, TEXT)
    holds = (f"an {IMAGE} and an {TEXT} tower of one CLIPModel or SiglipModel, head: none; or {timm_bert.WHAT} "
             f"(pooling: pooler), head: linear, as a VisionTextDualEncoderModel")

    def follow(self, tree: dict, init: dict) -> dict:
        tree = copy.deepcopy(tree)
        if not init.get("path"):
            raise ConfigError("model.init_from.path: is required (a local save_pretrained folder)")
        path = init["path"]
        folder = local_path(path, "model.init_from.path")
        cfg, name = hf_config(path, {}, "model.init_from")
        data = tree.setdefault("data", {})
        modalities = data.setdefault("modalities", {"image": {"decoder": "image"}, "text": {"decoder": "text"}})
        options = {"path": path, "pretrained": False}  # the architecture; init_from loads the weights
        towers: dict[str, dict] = {}
        for m in list(modalities):
            spec = modalities[m] = dict(modalities[m] or {})
            decoder, types = spec.get("decoder") or m, [t["type"] for t in towers.values()]
            if decoder == "image" and "image" in CLASSES[name] and IMAGE not in types:
                towers[m] = {"type": IMAGE, "options": dict(options), "head": "none"}
                opts = spec.setdefault("options", {})
                for k, v in image_options(folder, cfg, name).items():
                    opts.setdefault(k, v)
            elif decoder == "text" and "text" in CLASSES[name] and TEXT not in types:
                towers[m] = {"type": TEXT, "options": dict(options), "head": "none"}
                opts = spec.setdefault("options", {})
                if "tokenizer" not in opts:
                    if not has_tokenizer(folder):
                        raise ConfigError(f"data.modalities.{m}.options.tokenizer: {path} holds no tokenizer: give a "
                                          f"local folder holding the model's own")
                    opts["tokenizer"] = path
                tc = cfg.text_config if name in DUAL else cfg
                data.setdefault("context_length", tc.max_position_embeddings)
        if not towers:
            raise ConfigError(f"model.init_from.path: a {name} has no tower for data.modalities "
                              f"({', '.join(modalities)}: it takes decoder {' and '.join(CLASSES[name])})")
        model = tree.setdefault("model", {})
        model["towers"] = towers
        model["embed_dim"] = embed_dim(cfg, name)
        scale = peek_logit_scale(folder) if init.get("temperature", True) else None
        if scale is not None and math.exp(scale) > ModelConfig.max_logit_scale:  # SigLIP's ~117: keep it
            model.setdefault("max_logit_scale", float(math.ceil(math.exp(scale))))
        if name == "SiglipModel":
            tree.setdefault("loss", {}).setdefault("name", "siglip")
        return tree

    def load(self, model, init) -> None:
        folder = local_path(init.path, "model.init_from.path")
        towers = towers_of(model, self.tower_types, init.towers)
        if not towers:
            raise ConfigError(f"model.init_from: no tower of this model is a Hugging Face CLIP tower ({IMAGE}, "
                              f"{TEXT}) to load into")
        _, name = hf_config(init.path, {}, "model.init_from")
        hf = from_pretrained(name, folder, "model.init_from.path")
        mapped = {}
        for m, tower in towers.items():
            part = "image" if tower.backbone.registered_name == IMAGE else "text"
            if part not in CLASSES[name]:
                raise ConfigError(f"model.init_from.path: {init.path} holds a {name}, which has no {part} model for "
                                  f"model.towers.{m}")
            for attr, module in parts(hf, part).items():
                mapped.update({f"towers.{m}.backbone.{attr}.{k}": v for k, v in module.state_dict().items()})
        prefixes = [f"towers.{m}.backbone." for m in towers]
        if init.temperature:
            for k in ("logit_scale", "logit_bias"):
                if getattr(hf, k, None) is not None and getattr(model, k) is not None:
                    mapped[k] = getattr(hf, k).detach().reshape(1)
                    prefixes.append(k)
        load_checked(model, mapped, prefixes, f"{init.path} (hf {name})", init.path)

    def check(self, cfg, decoders: dict) -> None:
        towers = tower_configs(cfg)
        found = timm_bert_pair(towers)
        if found is not None:
            image, text = found
            timm_bert.check("hf", towers, decoders, image, text, {"pooler": "BERT's pooler"}, TIMM_BERT)
            try:
                image_processor(decoders[image].settings)
            except ConfigError as err:
                raise refusal("hf", str(err)) from None
            return
        image, text = pair("hf", towers, IMAGE, TEXT, f" of one CLIPModel or SiglipModel, or {timm_bert.WHAT} (a "
                                                      f"VisionTextDualEncoderModel)")
        a, b = (towers[m].typed_options(f"model.towers.{m}") for m in (image, text))
        if (a.path, a.config) != (b.path, b.config):
            raise refusal("hf", f"the towers are of two models ({a.path or a.config}, {b.path or b.config}); one "
                                f"CLIPModel or SiglipModel holds both")
        _, name = hf_config(a.path, a.config, f"model.towers.{image}.options")
        if name not in DUAL:
            raise refusal("hf", f"the towers are of a {name}, not one CLIPModel or SiglipModel holding both")
        check_projects_itself("hf", towers, (image, text), name)
        spec = getattr(decoders[text].options, "tokenizer", None)
        try:
            if spec is None or not Path(spec).is_dir():
                raise ConfigError(f"data.modalities.{text}.options.tokenizer is {spec!r}: the export carries the run's "
                                  f"tokenizer, and transformers reads only its own files (a tokenizer folder)")
            image_processor(decoders[image].settings, PROCESSORS[name])
        except ConfigError as err:
            raise refusal("hf", str(err)) from None

    def export(self, model, cfg, out: Path) -> list[Path]:
        """A ``save_pretrained`` folder of a CLIPModel or SiglipModel with the run's tokenizer (its
        ``model_max_length`` the run's context length) and the image processor of the run's image
        decoder: what ``AutoProcessor`` and ``pipeline(...)`` read. (SigLIP pools its text at the
        last position, so texts padded to another length give other features: ``AutoProcessor``
        with ``padding="max_length"`` pads to the run's; the zero-shot pipeline always to 64.)"""
        import transformers

        decoders = decoders_of(model)
        self.check(cfg, decoders)
        found = timm_bert_pair(tower_configs(cfg))
        if found is not None:
            return self.export_timm_bert(model, cfg, out, *found)
        image, text = pair("hf", tower_configs(cfg), IMAGE, TEXT)
        a = model.towers[image].backbone.options
        hf_cfg, name = hf_config(a.path, a.config, f"model.towers.{image}.options", vocab_of(decoders[text].tokenizer))
        ours = (f"towers.{image}.backbone.", f"towers.{text}.backbone.", "logit_scale", "logit_bias")
        extra = [k for k in model.inference_state_dict("hf") if not k.startswith(ours)]
        if extra:
            raise refusal("hf", f"{extra[0]} has no place in a {name}")
        if name == "CLIPModel" and model.logit_bias is not None:
            raise refusal("hf", "a CLIPModel has no logit_bias, and this model learned one (loss siglip)")
        hf = getattr(transformers, name)(hf_cfg).float()
        for m, part in ((image, "image"), (text, "text")):
            for attr, module in parts(hf, part).items():
                module.load_state_dict(getattr(model.towers[m].backbone, attr).state_dict(), strict=True)
        with torch.no_grad():
            scale = model.logit_scale.detach().clamp(max=model.max_log_scale)  # the scale in use
            hf.logit_scale.copy_(scale.reshape(hf.logit_scale.shape))
            if name == "SiglipModel":  # a model trained without a bias: 0 keeps its logits
                bias = model.logit_bias.detach() if model.logit_bias is not None else torch.zeros(1)
                hf.logit_bias.copy_(bias.reshape(hf.logit_bias.shape))
        out.mkdir(parents=True, exist_ok=True)
        hf.save_pretrained(str(out))
        timm_bert.transformers_tokenizer(decoders[text], cfg.data.context_length).save_pretrained(str(out))
        image_processor(decoders[image].settings, PROCESSORS[name]).save_pretrained(str(out))
        return sorted(out.iterdir())

    def export_timm_bert(self, model, cfg, out: Path, image: str, text: str) -> list[Path]:
        """A ``save_pretrained`` folder of a VisionTextDualEncoderModel (a TimmWrapperModel of the timm
        model, the BertModel, bias-free projections) with its processor: the run's tokenizer and a
        CLIPImageProcessor made from the run's image decoder."""
        import transformers

        decoders = decoders_of(model)
        if model.logit_bias is not None:
            raise refusal("hf", "a VisionTextDualEncoderModel has no logit_bias, and this model learned one (loss "
                                "siglip)")
        weights = timm_bert.parts("hf", model, image, text)
        backbone = model.towers[image].backbone
        kwargs = timm_bert.created_kwargs(tower_configs(cfg), decoders, image)
        vision = transformers.TimmWrapperConfig(architecture=backbone.options.name, hidden_size=backbone.width,
                                                model_args=kwargs or None, num_labels=0)  # features, no classes
        config = transformers.VisionTextDualEncoderConfig.from_vision_text_configs(
            vision, model.towers[text].backbone.encoder.config, projection_dim=model.embed_dim,
            logit_scale_init_value=float(weights["scales"]["logit_scale"]))
        hf = transformers.VisionTextDualEncoderModel(config).float()
        state = {**{f"vision_model.timm_model.{k}": v for k, v in weights["timm"].items()},
                 "visual_projection.weight": weights["image_proj"]["weight"],
                 **{f"text_model.{k}": v for k, v in weights["bert"].items()},
                 "text_projection.weight": weights["text_proj"]["weight"], "logit_scale": weights["scales"]["logit_scale"]}
        hf.load_state_dict(state, strict=True)
        out.mkdir(parents=True, exist_ok=True)
        hf.save_pretrained(str(out))
        transformers.VisionTextDualEncoderProcessor(
            image_processor=image_processor(decoders[image].settings, "CLIPImageProcessor"),
            tokenizer=timm_bert.transformers_tokenizer(decoders[text], cfg.data.context_length)).save_pretrained(str(out))
        return sorted(out.iterdir())
