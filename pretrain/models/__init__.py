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
(exp of a learned log-scale of shape (1,), clamped at ``max_logit_scale``) and the bias or None;
with CLIP-Lite's prior term it also holds the prior discriminators (``pretrain.models.prior``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.models import openclip  # noqa: F401 - registers the OpenCLIP towers and checkpoint format
from pretrain.models import hf_clip  # noqa: F401 - registers the Hugging Face CLIP/SigLIP towers and checkpoint format
from pretrain.models.config import ModelConfig, TowerConfig, default_tower
from pretrain.models.heads import HEADS, build_head
from pretrain.models.interop import FORMATS, load_init
from pretrain.models.prior import PriorDiscriminator, PriorSpec, prior_noise, reverse_gradient
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


class ContrastiveModel(nn.Module):
    """One tower per modality; forward gives L2-normalised features and the logit scale/bias
    (and, with prior discriminators and ``noise``, their logits: ``pretrain.models.prior``)."""

    def __init__(self, cfg: ModelConfig, towers: dict[str, TowerConfig], contexts: dict[str, TowerContext],
                 with_bias: bool = False, prior: Optional[PriorSpec] = None):
        super().__init__()
        self.embed_dim = cfg.embed_dim
        self.towers = nn.ModuleDict({m: EncoderTower(towers[m], cfg.embed_dim, ctx) for m, ctx in contexts.items()})
        on = [] if prior is None else list(prior.on or self.towers)
        for i, m in enumerate(on):
            if m not in self.towers:
                raise ConfigError(f"loss.prior_on[{i}]: no such modality in data.modalities ({', '.join(self.towers)})")
        self.prior_mode = None if prior is None else prior.mode
        # modality -> discriminator over its backbone features (None without a prior term: the
        # state dict of models without one stays as it was)
        self.prior_discriminators = (nn.ModuleDict({m: PriorDiscriminator(self.towers[m].backbone.width) for m in on})
                                     if on else None)
        # Shape (1,), not a 0-dim tensor: DeepSpeed cannot partition 0-dim parameters.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / cfg.init_temperature)))
        self.max_log_scale = math.log(cfg.max_logit_scale)
        self.logit_bias = nn.Parameter(torch.full((1,), cfg.init_logit_bias)) if with_bias else None

    @property
    def modalities(self) -> list[str]:
        return list(self.towers)

    def encode(self, modality: str, x: torch.Tensor, present: Optional[torch.Tensor] = None) -> torch.Tensor:
        return F.normalize(self.towers[modality](x, present), dim=-1)

    def scales(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logit_scale, logit_bias): the multiplier (exponentiated, clamped) and the bias or None."""
        return self.logit_scale.clamp(max=self.max_log_scale).exp(), self.logit_bias

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

    def prior_widths(self) -> dict[str, int]:
        """modality -> backbone width, for each modality with a prior discriminator."""
        return {m: self.towers[m].backbone.width for m in (self.prior_discriminators or {})}

    def forward(self, inputs: dict[str, torch.Tensor], masks: Optional[dict[str, torch.Tensor]] = None,
                noise: Optional[dict[str, torch.Tensor]] = None):
        """(features per modality, logit scale, logit bias or None); given ``noise`` (prior samples
        per modality with a discriminator, ``prior_noise``) a fourth item: modality -> (logits of
        the prior samples, logits of the backbone features), each (B,)."""
        masks = masks or {}
        features, prior = {}, {}
        for m, x in inputs.items():
            h = self.towers[m].backbone_features(x, masks.get(m))
            features[m] = F.normalize(self.towers[m].head(h), dim=-1)
            if noise is not None and self.prior_discriminators is not None and m in self.prior_discriminators:
                d = self.prior_discriminators[m]
                fake = reverse_gradient(h) if self.prior_mode == "adversarial" else h
                prior[m] = (d(noise[m].to(h.dtype)), d(fake))
        return (features, *self.scales()) if noise is None else (features, *self.scales(), prior)

    def inference_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict without training-only parts (the prior discriminators): what the
        field's formats export."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("prior_discriminators.")}


def tower_contexts(modalities) -> dict[str, TowerContext]:
    """What each tower learns of its modality's data: the decoded shape, dtype and decoder."""
    return {
        m.name: TowerContext(m.name, f"model.towers.{m.name}", getattr(m.decoder, "output_shape", None),
                             getattr(m.decoder, "dtype", torch.float32), m.decoder)
        for m in modalities
    }


def build_model(cfg: ModelConfig, modalities, with_bias: bool = False,
                prior: Optional[PriorSpec] = None) -> ContrastiveModel:
    """The model for the built ``modalities`` (``pretrain.data.build_modalities``): one tower per
    modality, the configured one or its decoder's default; ``with_bias`` and ``prior`` as the
    objective needs (``loss.uses_bias``, ``PriorSpec.of(loss options)``)."""
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
    model = ContrastiveModel(cfg, towers, tower_contexts(modalities), with_bias, prior)
    if cfg.init_from is not None:
        load_init(model, cfg.init_from)
    if cfg.compile:  # in place: the parameters and their names stay the module's own
        for tower in model.towers.values():
            tower.backbone.compile()
    return model


__all__ = [
    "Backbone", "ContrastiveModel", "EncoderTower", "FORMATS", "HEADS", "ModelConfig", "PriorSpec", "TOWERS",
    "TowerConfig", "TowerContext", "build_model", "default_tower", "load_weights_file", "prior_noise", "register_tower",
    "tower_contexts", "tower_names",
]
