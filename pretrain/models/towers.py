"""Backbones by name: ``model.towers.<modality>.type`` picks one, ``.options`` configures it.

A backbone maps a batch of one modality's decoded inputs to pooled features ``(B, width)``; the
``EncoderTower`` around it (see ``pretrain.models``) adds the missingness embedding, the
projection head to the shared size, freezing and activation checkpointing.

Registered types:

- ``timm``: any timm model by name (images); ``pretrained``: a local weights file or folder.
- ``text_transformer``: a BERT-style encoder built from sizes, random init, over the text
  decoder's tokenizer (the byte tokenizer by default).
- ``hf_text``: any transformers text encoder, from a local pretrained folder (``path``) or from a
  config (``config``: ``{model_type: ..., ...}``, random init); pooling ``cls``, ``mean``, ``last``
  or ``pooler``. (CLIP and SigLIP towers as the library computes them: ``pretrain.models.hf_clip``.)
- ``audio_cnn``: a convolutional tower over log-mel spectrograms ``(n_mels, frames)``.
- ``hf_audio``: any transformers audio encoder (wav2vec2, HuBERT, Whisper's encoder, AST, ...) from
  a local folder or a config; waveforms go in as ``input_values``, spectrograms as ``input_features``.
- ``mlp``: vectors and tables (any fixed shape, flattened).

``register_tower(name)`` adds a type; a module listed in ``data.imports`` can register one.
Nothing is downloaded: pretrained weights come only from local paths.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

import torch
from torch import nn

from pretrain.distributed import building_partitioned, gathered
from pretrain.options import ConfigError, NoOptions, Registry


@dataclass
class TowerContext:
    modality: str
    key: str  # "model.towers.<modality>", for error messages
    input_shape: Optional[tuple[int, ...]]  # one sample's decoded shape (None: variable)
    input_dtype: torch.dtype
    decoder: Any  # the modality's data decoder (its tokenizer, for text)


class Backbone(nn.Module):
    """Base class: set ``self.width`` (pooled feature size) in ``__init__``."""

    Options: ClassVar[type] = NoOptions
    width: int

    def __init__(self, options: Any, ctx: TowerContext):
        super().__init__()
        self.options, self.ctx = options, ctx

    def set_grad_checkpointing(self, enabled: bool) -> None:
        raise ConfigError(f"{self.ctx.key}.grad_checkpointing: tower type {type(self).__name__} does not support it")

    def set_patch_dropout(self, prob: float) -> None:
        """Drop this share of the patch tokens in training (FLIP); none in evaluation."""
        raise ConfigError(f"{self.ctx.key}.patch_dropout: tower type {type(self).__name__} has no patch tokens "
                          "(ViT towers only: timm, open_clip_image, hf_clip_image)")


TOWERS = Registry("tower type", base=Backbone, hint="a module that registers more can be listed in data.imports")


def register_tower(name: str, cls: Optional[type[Backbone]] = None, *, replace: bool = False):
    """Registers a ``Backbone`` subclass under ``name``; usable as a decorator."""
    return TOWERS.register(name, cls, replace=replace)


def tower_names() -> list[str]:
    return TOWERS.names()


# ---------------------------------------------------------------------------------------- helpers


def local_path(path: str, key: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"{key}: no such file or folder: {path} (weights load only from local paths)")
    return p


_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "model.pth", "model.pt")


def load_weights_file(path: Path, key: str) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors / .pth / .pt / .bin file or a folder holding one (never
    unpickles anything but tensors: ``torch.load(weights_only=True)``)."""
    if path.is_dir():
        found = [path / n for n in _WEIGHT_FILES if (path / n).is_file()]
        if not found:
            raise ConfigError(f"{key}: {path} holds none of {', '.join(_WEIGHT_FILES)}")
        path = found[0]
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - a pickle with code, a corrupt file
            raise ConfigError(f"{key}: cannot load {path} as tensors only ({type(err).__name__}: {err})") from None
        for wrapper in ("state_dict", "model", "module"):
            if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{key}: {path} is not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def text_attention_mask(ids: torch.Tensor, pad_id: int, eos_id: Optional[int] = None) -> torch.Tensor:
    """(B, L) 1 on each text, 0 on the right padding after it. A tokenizer that pads with its end
    token (CLIP's: pad id == eos id, ``eos_id`` the id it ends every text with) keeps the first end
    token, the real end of the text, as the tokenizer's own attention mask does."""
    mask = ids != pad_id
    if eos_id is not None and eos_id == pad_id:
        is_end = ids == eos_id
        mask = mask | (is_end & (is_end.cumsum(1) == 1))
    return mask.long()


def _pool(hidden: torch.Tensor, attn: Optional[torch.Tensor], how: str) -> torch.Tensor:
    if how == "cls":
        return hidden[:, 0]
    if attn is None:
        attn = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    if how == "mean":
        w = attn.unsqueeze(-1).to(hidden.dtype)
        return (hidden * w).sum(1) / w.sum(1).clamp_min(1.0)
    if how == "last":  # the last non-padding position (right padding)
        last = (attn.sum(1) - 1).clamp_min(0)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(how)


def _tokenizer_of(ctx: TowerContext):
    tok = getattr(ctx.decoder, "tokenizer", None)
    if tok is None:
        raise ConfigError(f"{ctx.key}.type: a text tower needs a text modality (data.modalities.{ctx.modality} "
                          f"has no tokenizer; use decoder: text)")
    return tok


# ------------------------------------------------------------------------------------------- image


@register_tower("timm")
class TimmBackbone(Backbone):
    """A timm model with its classifier removed; ``pretrained`` loads local weights (the
    classifier's are dropped; any other missing or unexpected key is an error)."""

    @dataclass
    class Options:
        name: str = "resnet10t"
        pretrained: Optional[str] = None  # local .safetensors/.pth/.bin file, or a folder with one
        kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments

    def __init__(self, options, ctx):
        super().__init__(options, ctx)
        import timm

        key = f"{ctx.key}.options"
        if not timm.is_model(options.name):
            raise ConfigError(f"{key}.name: timm has no model {options.name!r}")
        kwargs = timm_kwargs(options, ctx.input_shape)
        try:
            self.model = timm.create_model(options.name, pretrained=False, num_classes=0, **kwargs)
        except TypeError as err:
            raise ConfigError(f"{key}.kwargs: timm.create_model({options.name!r}) refused them: {err}") from None
        self.width = self.model.num_features
        if options.pretrained:
            state = load_weights_file(local_path(options.pretrained, f"{key}.pretrained"), f"{key}.pretrained")
            own = self.model.state_dict()
            state = {k: v for k, v in state.items() if k in own or not _is_classifier(k)}
            shapes = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
            if shapes:
                raise ConfigError(
                    f"{key}.pretrained: {options.pretrained} does not fit timm model {options.name!r}: "
                    f"{len(shapes)} tensors of other shapes, e.g. {shapes[0]} {tuple(state[shapes[0]].shape)} "
                    f"vs {tuple(own[shapes[0]].shape)}"
                )
            result = self.model.load_state_dict(state, strict=False)
            if result.missing_keys or result.unexpected_keys:
                raise ConfigError(
                    f"{key}.pretrained: {options.pretrained} does not fit timm model {options.name!r}: "
                    f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def set_grad_checkpointing(self, enabled: bool) -> None:
        self.model.set_grad_checkpointing(enabled)

    def set_patch_dropout(self, prob: float) -> None:
        from timm.layers import PatchDropout

        if not hasattr(self.model, "patch_drop"):
            super().set_patch_dropout(prob)
        self.model.patch_drop = PatchDropout(prob, num_prefix_tokens=getattr(self.model, "num_prefix_tokens", 1))


class TokenDropout(nn.Module):
    """Keeps ``max(1, int(N * (1 - prob)))`` of the N tokens after the first ``prefix`` (class or
    register tokens, always kept), a random subset per sample, in training; the identity in eval."""

    def __init__(self, prob: float, prefix: int):
        super().__init__()
        self.prob, self.prefix = prob, prefix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.prob == 0:
            return x
        head, tokens = x[:, :self.prefix], x[:, self.prefix:]
        keep = max(1, int(tokens.shape[1] * (1 - self.prob)))
        order = torch.rand(tokens.shape[0], tokens.shape[1], device=x.device).argsort(dim=1)[:, :keep]
        tokens = torch.gather(tokens, 1, order.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        return torch.cat([head, tokens], dim=1)


def timm_kwargs(options, input_shape: Optional[tuple[int, ...]]) -> dict[str, Any]:
    """The ``timm.create_model`` arguments a ``timm`` tower adds to its name (besides ``pretrained``
    and ``num_classes``): its ``kwargs``, and the input size of models built for one (ViTs)."""
    import timm

    kwargs = dict(options.kwargs)
    cfg = timm.get_pretrained_cfg(options.name)
    if cfg is not None and getattr(cfg, "fixed_input_size", False) and input_shape and len(input_shape) == 3:
        kwargs.setdefault("img_size", tuple(input_shape[1:]))  # ViTs are built for one input size
    return kwargs


def _is_classifier(name: str) -> bool:
    return name.split(".")[0] in ("fc", "head", "classifier", "last_linear") or name.startswith("head.fc")


# -------------------------------------------------------------------------------------------- text


@register_tower("text_transformer")
class TextTransformer(Backbone):
    """A BERT-style encoder (transformers' BertModel) built from sizes, random init. Pooling: the
    first token's output (``cls``), the mean over the text (``mean``), its last token (``last``), or
    BERT's pooler (``pooler``: dense + tanh over the first token, the layer built only then), which
    is how transformers' ``VisionTextDualEncoderModel`` and open_clip's ``cls_pooler`` pool a BERT."""

    @dataclass
    class Options:
        width: int = 128
        layers: int = 2
        heads: int = 4
        mlp_ratio: float = 4.0
        pooling: Literal["cls", "mean", "last", "pooler"] = "cls"
        dropout: float = 0.0

    def __init__(self, options, ctx):
        super().__init__(options, ctx)
        from transformers import BertConfig, BertModel

        key = f"{ctx.key}.options"
        for name in ("width", "layers", "heads"):
            if getattr(options, name) <= 0:
                raise ConfigError(f"{key}.{name}: must be > 0, got {getattr(options, name)}")
        if options.width % options.heads:
            raise ConfigError(f"{key}.heads: must divide width ({options.width}), got {options.heads}")
        tok = _tokenizer_of(ctx)
        self.pad_id, self.eos_id = tok.pad_id, getattr(tok, "eos_id", None)
        hf_cfg = BertConfig(
            vocab_size=tok.vocab_size,
            hidden_size=options.width,
            num_hidden_layers=options.layers,
            num_attention_heads=options.heads,
            intermediate_size=int(options.mlp_ratio * options.width),
            max_position_embeddings=max(ctx.input_shape[0] if ctx.input_shape else 512, 8),
            pad_token_id=tok.pad_id,
            hidden_dropout_prob=options.dropout,
            attention_probs_dropout_prob=options.dropout,
            attn_implementation="sdpa",  # fused scaled-dot-product attention
        )
        pooler = options.pooling == "pooler"  # its weights only then: the state dicts of other poolings stay as they were
        if building_partitioned():  # train.zero3_init: transformers initialises once the parameters are whole
            from transformers.initialization import no_init_weights

            with no_init_weights():
                self.encoder = BertModel(hf_cfg, add_pooling_layer=pooler)
            with gathered(self.encoder):
                self.encoder.init_weights()
        else:
            self.encoder = BertModel(hf_cfg, add_pooling_layer=pooler)
        self.width = options.width

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        attn = text_attention_mask(ids, self.pad_id, self.eos_id)
        # a 4-D mask as transformers takes it as it is: from a 2-D one it would first ask the device
        # whether every token is kept (a host read each step)
        mask = attn[:, None, None, :].bool().expand(-1, 1, ids.shape[1], -1)
        out = self.encoder(input_ids=ids, attention_mask=mask)
        if self.options.pooling == "pooler":
            return out.pooler_output
        return _pool(out.last_hidden_state, attn, self.options.pooling)

    def set_grad_checkpointing(self, enabled: bool) -> None:
        _hf_grad_checkpointing(self.encoder, enabled, self.ctx.key)


def _hf_model(options, key: str, kind: str, vocab_size: Optional[int] = None):
    """A transformers model from a local folder (pretrained) or a config mapping (random init)."""
    from transformers import AutoConfig, AutoModel

    if bool(options.path) == bool(options.config):
        raise ConfigError(f"{key}: give exactly one of path (a local pretrained folder) or config (random init)")
    if options.path:
        folder = local_path(options.path, f"{key}.path")
        try:
            model = AutoModel.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as err:
            raise ConfigError(f"{key}.path: cannot load a {kind} model from {folder}: {err}") from None
    else:
        conf = dict(options.config)
        model_type = conf.pop("model_type", None)
        if not model_type:
            raise ConfigError(f"{key}.config.model_type: required (e.g. bert, roberta, wav2vec2)")
        if vocab_size is not None and "vocab_size" not in conf:
            conf["vocab_size"] = vocab_size
        try:
            hf_cfg = AutoConfig.for_model(model_type, **conf)
            model = AutoModel.from_config(hf_cfg)
        except (ValueError, TypeError, KeyError) as err:
            raise ConfigError(f"{key}.config: transformers cannot build it: {err}") from None
    if getattr(model.config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        model = model.get_encoder()  # T5, Whisper, ...: the encoder alone
    return model


def _hf_width(model) -> int:
    cfg = model.config
    for name in ("hidden_size", "d_model", "dim", "n_embd"):
        if isinstance(getattr(cfg, name, None), int):
            return getattr(cfg, name)
    raise ConfigError(f"cannot tell the hidden size of {type(model).__name__}")


def _hf_grad_checkpointing(model, enabled: bool, key: str) -> None:
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"{key}.grad_checkpointing: {type(model).__name__} does not support it")
    # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_*
    if hasattr(model, "activation_checkpointing_enable"):
        if enabled:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


@register_tower("hf_text")
class HFText(Backbone):
    """Any transformers text encoder; the data side must use its tokenizer
    (``data.modalities.<m>.options.tokenizer`` = the same folder) when it is pretrained. Of a dual
    encoder's folder (CLIPModel, SiglipModel) it takes the text model, without the projection
    (``hf_clip_text`` gives the library's projected text features)."""

    @dataclass
    class Options:
        path: Optional[str] = None  # local folder from save_pretrained (weights + config)
        config: dict[str, Any] = field(default_factory=dict)  # or: {model_type: bert, hidden_size: ...}
        pooling: Literal["cls", "mean", "last", "pooler"] = "cls"

    def __init__(self, options, ctx):
        super().__init__(options, ctx)
        key = f"{ctx.key}.options"
        tok = _tokenizer_of(ctx)
        self.model = _hf_model(options, key, "text", vocab_size=tok.vocab_size)
        if hasattr(self.model, "text_model") and hasattr(self.model, "vision_model"):
            self.model = self.model.text_model  # CLIPModel, SiglipModel, ...: the text encoder alone
        vocab = self.model.get_input_embeddings().num_embeddings
        if tok.vocab_size > vocab:
            raise ConfigError(
                f"data.modalities.{ctx.modality}.options.tokenizer: gives ids up to {tok.vocab_size - 1} but the "
                f"model of {key} has {vocab} embeddings (use the model's own tokenizer folder)"
            )
        self.pad_id, self.eos_id = tok.pad_id, getattr(tok, "eos_id", None)
        self.width = _hf_width(self.model)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        attn = text_attention_mask(ids, self.pad_id, self.eos_id)
        out = self.model(input_ids=ids, attention_mask=attn)
        if self.options.pooling == "pooler":
            if getattr(out, "pooler_output", None) is None:
                raise RuntimeError(f"{self.ctx.key}.options.pooling: {type(self.model).__name__} has no pooler output")
            return out.pooler_output
        return _pool(out.last_hidden_state, attn, self.options.pooling)

    def set_grad_checkpointing(self, enabled: bool) -> None:
        _hf_grad_checkpointing(self.model, enabled, self.ctx.key)


# ------------------------------------------------------------------------------------------- audio


@register_tower("audio_cnn")
class AudioCNN(Backbone):
    """Log-mel spectrogram (n_mels, frames) -> conv blocks (3x3 conv, BatchNorm, ReLU, 2x2 max
    pool) -> mean over frequency and time."""

    @dataclass
    class Options:
        channels: list[int] = field(default_factory=lambda: [32, 64, 128])

    def __init__(self, options, ctx):
        super().__init__(options, ctx)
        key = f"{ctx.key}.options"
        if not options.channels or any(c <= 0 for c in options.channels):
            raise ConfigError(f"{key}.channels: a non-empty list of positive sizes, got {options.channels}")
        if ctx.input_shape is not None and len(ctx.input_shape) != 2:
            raise ConfigError(
                f"{ctx.key}.type: audio_cnn takes spectrograms (n_mels, frames); data.modalities.{ctx.modality} "
                f"gives shape {ctx.input_shape} (set its options.features: log_mel)"
            )
        layers, c_in = [], 1
        for c in options.channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2, ceil_mode=True)]
            c_in = c
        self.blocks = nn.Sequential(*layers)
        self.width = c_in
        self._checkpoint = False

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        x = spec.unsqueeze(1)
        if self._checkpoint and self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint_sequential

            x = checkpoint_sequential(self.blocks, len(self.options.channels), x, use_reentrant=False)
        else:
            x = self.blocks(x)
        return x.mean(dim=(2, 3))

    def set_grad_checkpointing(self, enabled: bool) -> None:
        self._checkpoint = enabled


@register_tower("hf_audio")
class HFAudio(Backbone):
    """Any transformers audio encoder, mean-pooled over time."""

    @dataclass
    class Options:
        path: Optional[str] = None
        config: dict[str, Any] = field(default_factory=dict)  # e.g. {model_type: wav2vec2, hidden_size: 64, ...}
        input_name: Optional[str] = None  # default: input_values for waveforms, input_features for spectrograms

    def __init__(self, options, ctx):
        super().__init__(options, ctx)
        self.model = _hf_model(options, f"{ctx.key}.options", "audio")
        rank = len(ctx.input_shape) if ctx.input_shape else 1
        self.input_name = options.input_name or ("input_values" if rank == 1 else "input_features")
        self.width = _hf_width(self.model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.model(**{self.input_name: x}).last_hidden_state
        return hidden.mean(1)

    def set_grad_checkpointing(self, enabled: bool) -> None:
        _hf_grad_checkpointing(self.model, enabled, self.ctx.key)


# ------------------------------------------------------------------------------------ vectors, tables


@register_tower("mlp")
class MLP(Backbone):
    """Flattened fixed-shape input -> (Linear, norm, activation, dropout) per hidden size."""

    @dataclass
    class Options:
        hidden: list[int] = field(default_factory=lambda: [256, 256])
        activation: Literal["gelu", "relu", "silu"] = "gelu"
        norm: Literal["layernorm", "none"] = "layernorm"
        dropout: float = 0.0

    def __init__(self, options, ctx):
        super().__init__(options, ctx)
        key = f"{ctx.key}.options"
        if ctx.input_shape is None:
            raise ConfigError(f"{ctx.key}.type: mlp needs a fixed input shape (data.modalities.{ctx.modality} has none)")
        if any(h <= 0 for h in options.hidden):
            raise ConfigError(f"{key}.hidden: sizes must be > 0, got {options.hidden}")
        act = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}[options.activation]
        layers: list[nn.Module] = [nn.Flatten()]
        d = math.prod(ctx.input_shape)
        for h in options.hidden:
            layers.append(nn.Linear(d, h))
            if options.norm == "layernorm":
                layers.append(nn.LayerNorm(h))
            layers.append(act())
            if options.dropout > 0:
                layers.append(nn.Dropout(options.dropout))
            d = h
        self.net = nn.Sequential(*layers)
        self.width = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.to(self.net[1].weight.dtype if len(self.net) > 1 else torch.float32))
