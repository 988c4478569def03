"""Our towers built from sizes in the field's formats: a ``timm`` image tower and a
``text_transformer`` text tower (transformers' BertModel), each with a bias-free ``linear`` head,
the model of the quickstart recipe and ``make demo``.

The libraries hold this model with their own modules, built from their own configs:

- open_clip (``--format open_clip``, ``pretrain.models.openclip``): a ``CustomTextCLIP`` of its
  ``TimmModel`` (``timm_model_name``: the timm model by name with its own pooling, then a
  bias-free linear ``proj``) and its ``HFTextEncoder`` (``hf_model_name``: the BERT's config,
  ``hf_pooler_type``: ``cls_pooler`` runs BERT's pooler, ``cls_last_hidden_state_pooler`` takes the
  first token, ``mean_pooler`` the mean over the text; a bias-free linear ``proj``; its attention
  mask is ``ids != pad_token_id``);
- transformers (``--format hf``, ``pretrain.models.hf_clip``): a ``VisionTextDualEncoderModel`` of
  a ``TimmWrapperModel`` (the timm model by name, ``num_classes=0``: our backbone) and a
  ``BertModel``, whose text is pooled with BERT's pooler and both projected without bias.

Both read the run's tokenizer as a transformers tokenizer: the byte tokenizer's own
``tokenizer.json`` (``pretrain.tokenizer.byte_tokenizer_for_transformers``: the same ids for any
text) or the run's tokenizer folder. Key layout: our ``towers.<image>.backbone.model.*`` is the
timm model, ``towers.<image>.head.weight`` the image projection; ``towers.<text>.backbone.encoder.*``
the BertModel, ``towers.<text>.head.weight`` the text projection.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from pretrain.models.interop import refusal
from pretrain.models.towers import timm_kwargs
from pretrain.options import ConfigError
from pretrain.tokenizer import byte_tokenizer_for_transformers, is_open_clip

IMAGE, TEXT = "timm", "text_transformer"
WHAT = f"a {IMAGE} and a {TEXT} tower"


def find_pair(towers: dict[str, Any]) -> Optional[tuple[str, str]]:
    """(image, text): the modalities of the first ``timm`` and the first ``text_transformer`` tower
    among ``towers`` (modality -> ``TowerConfig``), or None when there is no such pair."""
    image = next((m for m, t in towers.items() if t is not None and t.type == IMAGE), None)
    text = next((m for m, t in towers.items() if t is not None and t.type == TEXT), None)
    return (image, text) if image is not None and text is not None else None


def check(fmt: str, towers: dict[str, Any], decoders: dict[str, Any], image: str, text: str, poolings: dict[str, str],
          holder: str) -> None:
    """What every format asks of this pair, from the recipe alone (a ``refusal`` otherwise): bias-free
    linear heads, no missingness embedding, a text pooling among ``poolings`` (ours -> how the
    library names it, for the message), a tokenizer transformers can read (``byte`` or a folder),
    no third tower."""
    others = [m for m, t in towers.items() if t is not None and m not in (image, text)]
    if others:
        raise refusal(fmt, f"model.towers.{others[0]}: a {holder} holds an image and a text tower only")
    for m in (image, text):
        tower = towers[m]
        if tower.head != "linear":
            raise refusal(fmt, f"model.towers.{m}.head is {tower.head}: a {holder} projects each tower with one "
                               f"bias-free linear map (train with head: linear)")
        if tower.missing != "mask":
            raise refusal(fmt, f"model.towers.{m}.missing is {tower.missing}: a {holder} has no place for the "
                               f"missingness embedding")
    pooling = towers[text].typed_options(f"model.towers.{text}").pooling
    if pooling not in poolings:
        ways = ", ".join(f"{ours} ({theirs})" for ours, theirs in poolings.items())
        raise refusal(fmt, f"model.towers.{text}.options.pooling is {pooling}: a {holder} pools a BERT by {ways}")
    try:
        check_tokenizer(decoders[text], f"data.modalities.{text}.options")
    except ConfigError as err:
        raise refusal(fmt, str(err)) from None


def check_tokenizer(text_decoder, key: str) -> None:
    spec = text_decoder.options.tokenizer
    if spec != "byte" and (is_open_clip(spec) or not Path(spec).is_dir()):
        raise ConfigError(f"{key}.tokenizer is {spec!r}: the export carries the run's tokenizer as a transformers "
                          f"tokenizer, which exists for byte (its own tokenizer.json) and for a tokenizer folder")


def created_kwargs(towers: dict[str, Any], decoders: dict[str, Any], image: str) -> dict[str, Any]:
    """The ``timm.create_model`` arguments the image tower was built with beyond its name."""
    options = towers[image].typed_options(f"model.towers.{image}")
    return timm_kwargs(options, getattr(decoders[image], "output_shape", None))


def transformers_tokenizer(text_decoder, context_length: int):
    """The run's tokenizer as transformers reads it, cut at the run's context length
    (``truncation=True`` cuts where ours does) and padding as the text decoder does."""
    spec = text_decoder.options.tokenizer
    if spec == "byte":
        return byte_tokenizer_for_transformers(context_length)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec, local_files_only=True)
    if tokenizer.pad_token_id is None:  # as the text decoder pads (pretrain.tokenizer.HFTokenizer)
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.model_max_length = context_length
    return tokenizer


def parts(fmt: str, model, image: str, text: str) -> dict[str, dict[str, torch.Tensor]]:
    """The pair's weights by part (fp32, contiguous): ``timm`` (the timm model's state dict),
    ``image_proj``, ``bert`` (the BertModel's), ``text_proj``; and ``scales`` (``logit_scale``, the
    one in use, and ``logit_bias`` where the model has one, as scalars)."""
    state = {k: v.detach().float().contiguous() for k, v in model.inference_state_dict(fmt).items()}
    out: dict[str, dict[str, torch.Tensor]] = {"timm": {}, "image_proj": {}, "bert": {}, "text_proj": {}, "scales": {}}
    prefixes = {f"towers.{image}.backbone.model.": "timm", f"towers.{image}.head.": "image_proj",
                f"towers.{text}.backbone.encoder.": "bert", f"towers.{text}.head.": "text_proj"}
    for k, v in state.items():
        part = next(((p, name) for p, name in prefixes.items() if k.startswith(p)), None)
        if part is not None:
            out[part[1]][k[len(part[0]):]] = v
        elif k == "logit_scale":
            out["scales"][k] = v.clamp(max=model.max_log_scale).reshape(())  # the scale in use
        elif k == "logit_bias":
            out["scales"][k] = v.reshape(())
        else:
            raise refusal(fmt, f"{k} has no place beside the {IMAGE} and {TEXT} towers (keep the native format)")
    return out
