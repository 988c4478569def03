"""The model section of a recipe (``model.*``): the shared feature size, the temperature and one
tower per modality, checked against the tower registry (nothing is built here)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from pretrain.models.heads import HEADS
from pretrain.models.towers import TOWERS
from pretrain.optim import GroupOptim
from pretrain.options import require


@dataclass
class TowerConfig:
    """One modality's encoder (``model.towers.<modality>``; the name matches data.modalities)."""

    type: str = ""  # required: a registered backbone (pretrain.models.tower_names(); README's config table)
    options: dict[str, Any] = field(default_factory=dict)  # the backbone's options (see pretrain/models/towers.py)
    head: str = "linear"  # projection to model.embed_dim: linear, mlp, milinear, none (the backbone projects)
    head_options: dict[str, Any] = field(default_factory=dict)  # the head's options (see pretrain/models/heads.py)
    freeze: Literal["none", "backbone", "all"] = "none"  # lock the backbone (LiT) or the whole tower
    missing: Literal["mask", "indicator"] = "mask"  # absent samples: left out of the loss, or a learned embedding
    grad_checkpointing: bool = False  # recompute backbone activations in backward
    channels_last: bool = False  # convolutional image towers: NHWC memory layout (faster convolutions on GPUs)
    patch_dropout: float = 0.0  # ViT towers: the share of patch tokens dropped in training (FLIP); off in eval
    optim: Optional[GroupOptim] = None  # the tower's learning rate, weight decay, layer decay (unset: train.*)
    head_optim: Optional[GroupOptim] = None  # its head's (unset: the tower's)

    def typed_options(self, key: str):
        """The backbone's own ``Options``, type-checked (errors name ``key.options.<field>``)."""
        return TOWERS.options(self.type, self.options, f"{key}.type", f"{key}.options")

    def typed_head_options(self, key: str):
        """The head's own ``Options``, type-checked (errors name ``key.head_options.<field>``)."""
        return HEADS.options(self.head, self.head_options, f"{key}.head", f"{key}.head_options")


def default_tower(decoder: str, decoder_options: Any) -> Optional[TowerConfig]:
    """The tower a modality gets when ``model.towers`` names none for it, by its decoder (and,
    for audio, its ``features`` option; options as a mapping or the decoder's typed options)."""
    get = decoder_options.get if isinstance(decoder_options, dict) else lambda k: getattr(decoder_options, k, None)
    if decoder == "image":
        return TowerConfig(type="timm", options={"name": "resnet10t"})
    if decoder == "text":
        return TowerConfig(type="text_transformer", options={"width": 128, "layers": 2, "heads": 4})
    if decoder == "audio" and get("features") == "log_mel":
        return TowerConfig(type="audio_cnn")
    if decoder in ("npy", "json"):
        return TowerConfig(type="mlp")
    return None


@dataclass
class InitFrom:
    """``model.init_from``: the whole model from a checkpoint of the field: towers, projections,
    temperature (and bias). ``format: open_clip``: ``path`` a local OpenCLIP checkpoint, ``model``
    its architecture name (``model_config``: the model-config JSON of one open_clip does not ship);
    ``format: hf``: ``path`` a local Hugging Face ``save_pretrained`` folder (CLIPModel, SiglipModel)."""

    format: Literal["open_clip", "hf"] = "open_clip"
    path: str = ""
    model: Optional[str] = None
    model_config: Optional[str] = None
    towers: Optional[list[str]] = None  # modalities whose towers load (None: every tower of this format)
    temperature: bool = True  # the logit scale (and bias) from the checkpoint

    def check(self, key: str) -> None:
        require(bool(self.path), f"{key}.path", "is required (a local checkpoint file or folder)")
        if self.format == "open_clip":
            require(bool(self.model), f"{key}.model", "is required with format: open_clip (the architecture, "
                    "e.g. ViT-B-32)")
        else:
            require(self.model is None and self.model_config is None, f"{key}.model",
                    "goes with format: open_clip (a Hugging Face folder holds its own config)")
        require(self.model_config is None or Path(self.model_config).is_file(), f"{key}.model_config",
                f"no such file: {self.model_config}")


@dataclass
class ModelConfig:
    embed_dim: int = 64
    # one per data modality; a modality left out gets its decoder's default (image: timm resnet10t,
    # text: text_transformer, audio log-mel: audio_cnn, npy/json: mlp)
    towers: dict[str, TowerConfig] = field(default_factory=dict)
    init_temperature: float = 0.07  # logit_scale starts at log(1/T)
    init_logit_bias: float = -10.0  # for objectives with a learnable bias (siglip)
    max_logit_scale: float = 100.0  # the temperature clamp: 1/T never exceeds this
    init_from: Optional[InitFrom] = None  # towers, projections and temperature from a checkpoint of the field
    compile: bool = False  # compile each tower's backbone with torch.compile (state-dict keys unchanged)

    def check(self, key: str = "model") -> None:
        require(self.embed_dim > 0, f"{key}.embed_dim", f"must be > 0, got {self.embed_dim}")
        require(self.init_temperature > 0, f"{key}.init_temperature", "must be > 0")

    def check_towers(self, modalities: list[str], key: str = "model") -> None:
        for i, m in enumerate((self.init_from.towers or []) if self.init_from else []):
            require(m in modalities, f"{key}.init_from.towers[{i}]",
                    f"no such modality in data.modalities ({', '.join(modalities)})")
        """Tower types and option types, each tower named after a data modality (towers from a
        module in ``data.imports`` need it imported first: ``DataConfig.check`` does that)."""
        for name, tower in self.towers.items():
            where = f"{key}.towers.{name}"
            require(name in modalities, where, f"no such modality in data.modalities ({', '.join(modalities)})")
            tower.typed_options(where)
            tower.typed_head_options(where)
            require(0 <= tower.patch_dropout < 1, f"{where}.patch_dropout", f"must be in [0, 1), got {tower.patch_dropout}")
            if tower.head_optim is not None:
                require(tower.head_optim.layer_decay == 1.0, f"{where}.head_optim.layer_decay",
                        "a head has no layers (layer decay belongs in optim)")
