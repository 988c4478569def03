"""Encoder towers (one per modality), projection heads and the multi-tower contrastive model."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config import ModelConfig, TextTowerConfig
from pretrain.tokenizer import ByteTokenizer


class ImageTower(nn.Module):
    """A timm backbone (random init, classifier removed) and a linear projection."""

    def __init__(self, name: str, embed_dim: int, kwargs: dict | None = None):
        super().__init__()
        import timm

        self.backbone = timm.create_model(name, pretrained=False, num_classes=0, **(kwargs or {}))
        self.proj = nn.Linear(self.backbone.num_features, embed_dim, bias=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.backbone(images))


class TextTower(nn.Module):
    """A BERT-style transformer from transformers, built from a config (random init)."""

    def __init__(self, cfg: TextTowerConfig, embed_dim: int, vocab_size: int, context_length: int):
        super().__init__()
        from transformers import BertConfig, BertModel

        hf_cfg = BertConfig(
            vocab_size=vocab_size,
            hidden_size=cfg.width,
            num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads,
            intermediate_size=4 * cfg.width,
            max_position_embeddings=context_length,
            pad_token_id=ByteTokenizer.pad_id,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        self.encoder = BertModel(hf_cfg, add_pooling_layer=False)
        self.pooling = cfg.pooling
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        attn = (ids != ByteTokenizer.pad_id).long()
        hidden = self.encoder(input_ids=ids, attention_mask=attn).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            w = attn.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * w).sum(1) / w.sum(1).clamp_min(1.0)
        return self.proj(pooled)


class ContrastiveModel(nn.Module):
    """One tower per modality; forward gives L2-normalised features and the logit scale."""

    def __init__(self, cfg: ModelConfig, context_length: int, with_bias: bool = False):
        super().__init__()
        self.towers = nn.ModuleDict(
            {
                "image": ImageTower(cfg.image.name, cfg.embed_dim, cfg.image.kwargs),
                "text": TextTower(cfg.text, cfg.embed_dim, ByteTokenizer.vocab_size, context_length),
            }
        )
        # Shape (1,), not a 0-dim tensor: DeepSpeed cannot partition 0-dim parameters.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / cfg.init_temperature)))
        self.max_log_scale = math.log(cfg.max_logit_scale)
        self.logit_bias = nn.Parameter(torch.full((1,), cfg.init_logit_bias)) if with_bias else None

    def encode(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.towers[modality](x), dim=-1)

    def scales(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logit_scale, logit_bias): the multiplier (exponentiated, clamped) and the bias or None."""
        return self.logit_scale.clamp(max=self.max_log_scale).exp(), self.logit_bias

    def forward(self, inputs: dict[str, torch.Tensor]):
        """Features per modality, then the logit scale and bias (see ``scales``)."""
        features = {m: self.encode(m, x) for m, x in inputs.items()}
        return features, *self.scales()


def build_model(cfg: ModelConfig, context_length: int, with_bias: bool = False) -> ContrastiveModel:
    return ContrastiveModel(cfg, context_length, with_bias)
