"""A plugin objective, as a contributor would write one outside ``pretrain/``: SigLIP with a learnable
bias for each modality pair instead of one shared scalar. Loaded with ``data.imports:
[tests.plugins.siglip_pairs]`` and ``loss.name: siglip_pairs``.

It declares its parameters (one (1,) bias per pair) in ``parameters()``; the model holds them as
``objective.pair_bias.<a>-<b>``, so checkpoints, ZeRO, weight decay (none: they are not matrices)
and the native export take them as any other weight, and the exports to OpenCLIP's and transformers'
formats, which hold a single bias, refuse the model and name them. The pair's bias reaches the loss
through ``params`` (the objective's forward runs inside the model's, so ZeRO-3 gathers it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pretrain.losses import LOSSES, LossParameters, SigLipLoss
from pretrain.losses.base import modality_pairs


class PairBiases(LossParameters):
    def __init__(self, pairs: list[tuple[str, str]], init: float):
        super().__init__()
        self.pair_bias = nn.ParameterDict({f"{a}-{b}": nn.Parameter(torch.full((1,), init)) for a, b in pairs})

    def forward(self, features, backbone, batch):
        return {"pair_bias": {pair: bias for pair, bias in self.pair_bias.items()}}


@LOSSES.register("siglip_pairs")
class SigLipPairs(SigLipLoss):
    name = "siglip_pairs"

    @dataclass
    class Options(SigLipLoss.Options):
        init_bias: float = -10.0  # every pair's bias at the start (SigLIP's -10)

    def parameters(self, ctx):
        return PairBiases(modality_pairs(ctx.modalities, self.anchor, self.name), self.init_bias)

    def pair_bias(self, a, b, logit_bias, params):
        return params["pair_bias"][f"{a}-{b}"]

    def compute(self, inp, logit_scale, logit_bias=None, step=None, params=None):
        out = super().compute(inp, logit_scale, logit_bias, step=step, params=params)
        out.update({f"{self.name}/bias/{pair}": b.detach().reshape(()) for pair, b in params["pair_bias"].items()})
        return out
