"""Encoder towers (one per modality), projection heads and the multi-tower contrastive model.

``model.towers.<modality>`` in the config names a backbone type (``pretrain.models.towers``) and
its options; every tower gets the same wrapping (``EncoderTower``):

    backbone (B, width) [+ missing/present embedding] -> head -> (B, embed_dim)

- ``head``: ``linear``, ``mlp``, ``milinear`` (CLIP-Lite's official critic block) or ``none``,
  with ``head_options`` (``pretrain.models.heads``).

- ``freeze``: ``backbone`` locks the backbone (LiT: a pretrained image tower, trained head and
  text tower), ``all`` locks the head too; locked parts stay in eval mode (no BatchNorm updates).
- ``missing: indicator`` (Symile's recipe for optional modalities): the decoder's placeholder goes
  through the backbone and a learned embedding for "missing" or "present" is added to its output,
  so every sample takes part in the loss; ``missing: mask`` (default) leaves absent rows out of
  the loss instead.
- ``grad_checkpointing``: recompute the backbone's activations in backward (less memory).

``ContrastiveModel.forward`` returns L2-normalised features per modality, the logit scale
(exp of a learned log-scale of shape (1,), clamped at ``max_logit_scale``) and the bias or None.
The objective's own parameters (``pretrain.losses.LossParameters``: CLIP-Lite's discriminators, a
bias per modality pair, ...) are part of the model as ``objective``; in a training forward (a
``BatchContext`` given) they run on the features and their outputs come back as a fourth item, the
loss's ``params``. The scalar ``logit_bias`` exists when the objective asks for it (SigLIP).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map

from pretrain.models import openclip  # noqa: F401 - registers the OpenCLIP towers and checkpoint format
from pretrain.models import hf_clip  # noqa: F401 - registers the Hugging Face CLIP/SigLIP towers and checkpoint format
from pretrain.models.config import ModelConfig, TowerConfig, default_tower
from pretrain.models.heads import HEADS, build_head
from pretrain.models.interop import FORMATS, load_init
from pretrain.models.towers import TOWERS, Backbone, TowerContext, load_weights_file, register_tower, tower_names
from pretrain.options import ConfigError


class EncoderTower(nn.Module):
    def __init__(self, cfg: TowerConfig, embed_dim: int, ctx: TowerContext):
        super().__init__()
        options = cfg.typed_options(ctx.key)
        self.backbone: Backbone = TOWERS.get(cfg.type, f"{ctx.key}.type")(options, ctx)
        width = self.backbone.width
        self.missing_embedding = nn.Parameter(torch.zeros(2, width)) if cfg.missing == "indicator" else None
        self.head = build_head(cfg.head, cfg.head_options, width, embed_dim, ctx.key)
        if cfg.grad_checkpointing:
            self.backbone.set_grad_checkpointing(True)
        if cfg.patch_dropout:
            self.backbone.set_patch_dropout(cfg.patch_dropout)
        self.channels_last = cfg.channels_last
        if cfg.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        self.freeze = cfg.freeze
        locked = [self.backbone] + ([self.head] if cfg.freeze == "all" else [])
        if cfg.freeze != "none":
            for module in locked:
                module.requires_grad_(False)
        self._locked = locked if cfg.freeze != "none" else []

    @property
    def uses_indicator(self) -> bool:
        return self.missing_embedding is not None

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self._locked:  # frozen parts keep their statistics
            module.eval()
        return self

    def backbone_features(self, x: torch.Tensor, present: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, width): what the head takes (the backbone's pooled output, plus the missingness
        embedding where the tower has one)."""
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        h = self.backbone(x)
        if self.missing_embedding is not None:
            if present is None:
                present = torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
            h = h + self.missing_embedding.to(h.dtype)[present.long()]
        return h

    def forward(self, x: torch.Tensor, present: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.head(self.backbone_features(x, present))


# state-dict keys written before the objective owned its parameters -> today's
LEGACY_KEYS = (("prior_discriminators.", "objective.prior."),)


class ContrastiveModel(nn.Module):
    """One tower per modality; forward gives L2-normalised features and the logit scale/bias (and,
    in training, what the objective's own parameters give the loss)."""

    def __init__(self, cfg: ModelConfig, towers: dict[str, TowerConfig], contexts: dict[str, TowerContext],
                 objective=None):
        super().__init__()
        self.embed_dim = cfg.embed_dim
        self.towers = nn.ModuleDict({m: EncoderTower(towers[m], cfg.embed_dim, ctx) for m, ctx in contexts.items()})
        # the objective's parameters (None when it needs none: the state dict stays as it was); registered
        # where CLIP-Lite's discriminators were, so optimizer states keep their order
        self.objective = None
        if objective is not None:
            from pretrain.losses import LossContext

            ctx = LossContext(sorted(self.towers), cfg.embed_dim, {m: t.backbone.width for m, t in self.towers.items()})
            self.objective = objective.parameters(ctx)
        if self.objective is not None:  # before DeepSpeed's own hooks, which free the parameters (ZeRO-3)
            self.objective.register_forward_hook(_hold_outputs)
        # Shape (1,), not a 0-dim tensor: DeepSpeed cannot partition 0-dim parameters.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / cfg.init_temperature)))
        self.max_log_scale = math.log(cfg.max_logit_scale)
        wants_bias = getattr(self.objective, "scalar_bias", False)
        self.logit_bias = nn.Parameter(torch.full((1,), cfg.init_logit_bias)) if wants_bias else None
        self.register_load_state_dict_pre_hook(_rename_legacy_keys)

    @property
    def modalities(self) -> list[str]:
        return list(self.towers)

    def encode(self, modality: str, x: torch.Tensor, present: Optional[torch.Tensor] = None) -> torch.Tensor:
        return F.normalize(self.towers[modality](x, present), dim=-1)

    def scales(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logit_scale, logit_bias): the multiplier (exponentiated, clamped) and the bias or None."""
        return self.logit_scale.clamp(max=self.max_log_scale).exp(), _held(self.logit_bias)

    def loss_masks(self, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The masks the loss should see: towers with a missingness indicator encode absent
        samples themselves, so their rows all take part."""
        return {m: k for m, k in masks.items() if m in self.towers and not self.towers[m].uses_indicator}

    def backbone_features(self, inputs: dict[str, torch.Tensor],
                          masks: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
        """Per modality, the pre-head features (B, width), not normalised (the linear probe's
        ``features: backbone``)."""
        masks = masks or {}
        return {m: self.towers[m].backbone_features(x, masks.get(m)) for m, x in inputs.items()}

    def forward(self, inputs: dict[str, torch.Tensor], masks: Optional[dict[str, torch.Tensor]] = None,
                batch=None):
        """(features per modality, logit scale, logit bias or None); in training (``batch``, a
        ``pretrain.losses.BatchContext``) a fourth item: what the objective's parameters give the
        loss (its ``params``; {} when it has none)."""
        masks = masks or {}
        features, backbone = {}, {}
        for m, x in inputs.items():
            backbone[m] = self.towers[m].backbone_features(x, masks.get(m))
            features[m] = F.normalize(self.towers[m].head(backbone[m]), dim=-1)
        if batch is None:
            return (features, *self.scales())
        params = self.objective(features, backbone, batch) if self.objective is not None else {}
        return (features, *self.scales(), params)

    def inference_state_dict(self, fmt: str = "the field's formats") -> dict[str, torch.Tensor]:
        """What a format of the field (one temperature and one scalar bias beside the towers) can hold:
        the state dict without the objective's training-only parameters; an objective whose
        parameters are needed for inference and have no place there is refused, naming them."""
        state = self.state_dict()
        own = [k for k in state if k.startswith("objective.")]
        if own and not getattr(self.objective, "training_only", False):
            raise ConfigError(f"--format {fmt}: {own[0]} (a parameter of the objective) has no place in that "
                              "format, which holds one temperature and one scalar bias; keep the native format")
        return {k: v for k, v in state.items() if not k.startswith("objective.")}


def tower_contexts(modalities) -> dict[str, TowerContext]:
    """What each tower learns of its modality's data: the decoded shape, dtype and decoder."""
    return {
        m.name: TowerContext(m.name, f"model.towers.{m.name}", getattr(m.decoder, "output_shape", None),
                             getattr(m.decoder, "dtype", torch.float32), m.decoder)
        for m in modalities
    }


def _held(x):
    """A parameter handed out of the forward as a tensor of its own (the same values and gradient):
    ZeRO-3 frees a parameter's data when the forward ends, before the loss reads it."""
    return x.clone() if isinstance(x, nn.Parameter) else x


def _hold_outputs(module, args, out):
    return tree_map(_held, out)


def _rename_legacy_keys(module, state_dict, prefix, *args) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        for old, new in LEGACY_KEYS:
            if key.startswith(prefix + old):
                state_dict[prefix + new + key[len(prefix + old):]] = state_dict.pop(key)


def build_model(cfg: ModelConfig, modalities, objective=None) -> ContrastiveModel:
    """The model for the built ``modalities`` (``pretrain.data.build_modalities``): one tower per
    modality, the configured one or its decoder's default, and the parameters ``objective`` (a built
    ``pretrain.losses.Loss``) declares (none without one)."""
    towers = {}
    for m in modalities:
        tower = cfg.towers.get(m.name) or default_tower(m.decoder_name, m.decoder.options)
        if tower is None:
            raise ConfigError(f"model.towers.{m.name}: data.modalities has {m.name!r} (decoder "
                              f"{m.decoder_name!r}): configure a tower for it")
        towers[m.name] = tower
    for m in cfg.towers:
        if m not in towers:
            raise ConfigError(f"model.towers.{m}: no such modality in data.modalities ({', '.join(towers)})")
    model = ContrastiveModel(cfg, towers, tower_contexts(modalities), objective)
    # the optimizer's per-part settings (pretrain.optim.param_groups); unset parts are left out
    model.optim_settings = {k: v for k, v in [*((f"towers.{m}", t.optim) for m, t in towers.items()),
                                              *((f"towers.{m}.head", t.head_optim) for m, t in towers.items()),
                                              ("loss", getattr(objective, "optim", None))] if v is not None}
    if cfg.init_from is not None:
        load_init(model, cfg.init_from)
    if cfg.compile:  # in place: the parameters and their names stay the module's own
        for tower in model.towers.values():
            tower.backbone.compile()
    return model


__all__ = [
    "Backbone", "ContrastiveModel", "EncoderTower", "FORMATS", "HEADS", "ModelConfig", "TOWERS",
    "TowerConfig", "TowerContext", "build_model", "default_tower", "load_weights_file", "register_tower",
    "tower_contexts", "tower_names",
]
