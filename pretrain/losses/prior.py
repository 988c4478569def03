"""CLIP-Lite's prior-matching discriminators (after Deep InfoMax): the objective's own parameters.

With ``loss.prior_weight > 0`` the objective declares one discriminator per modality in
``loss.prior_on`` (default: every modality), over that tower's pre-head backbone features: 1000 and
200 ReLU units, one output logit (the official code's sigmoid is applied in the loss, as
``logsigmoid``, which gives the same value without overflow). The model holds them as
``model.objective.prior.<modality>``, so they are checkpointed, exported in the native format and
sharded by ZeRO like the towers; they are training-only, left out of ``--format open_clip|hf``.

In a training forward (a ``BatchContext`` given) each discriminator scores the prior samples
u ~ U[0, 1) ("real") and the backbone features f ("fake"); the loss turns the logits into
PRIOR = -(mean log D(u) + mean log(1 - D(f))). ``prior_mode``:

- ``cooperative`` (the official code): one objective for everything, so the encoder descends
  PRIOR too, together with the discriminator;
- ``gradient_reversal`` (called ``adversarial`` before, a name still accepted): the gradient
  reaching f through the discriminator is reversed, so the discriminator descends PRIOR while the
  encoder ascends it (pushes its features towards the prior), in the same backward and optimizer
  step. This is a gradient-reversal game, not Deep InfoMax's own prior matching, which detaches the
  features for the discriminator's update, gives the encoder the non-saturating loss -log D(f),
  squashes the features with a sigmoid and adds a gradient penalty; none of that is built here.

The prior samples are drawn for the whole global batch from (``train.seed``, step), shared by the
ranks, and each micro-batch keeps its own rows, so a distributed or accumulated run sees the samples
one process with the whole batch would.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from pretrain.losses.base import BatchContext, LossParameters

PRIOR_MODES = ("cooperative", "gradient_reversal", "adversarial")  # adversarial: gradient_reversal's earlier name


class PriorDiscriminator(nn.Sequential):
    """width -> 1000 -> 200 -> 1 (ReLU between), one logit per row."""

    def __init__(self, width: int):
        super().__init__(nn.Linear(width, 1000), nn.ReLU(), nn.Linear(1000, 200), nn.ReLU(), nn.Linear(200, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).squeeze(-1)


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


def reverse_gradient(x: torch.Tensor) -> torch.Tensor:
    """The identity whose backward negates the gradient."""
    return _ReverseGradient.apply(x)


def prior_noise(widths: dict[str, int], batch: BatchContext, device: torch.device) -> dict[str, torch.Tensor]:
    """This micro-batch's rows of the global batch's prior samples u ~ U[0, 1), per modality (the same
    on every rank for a step: drawn for all ``batch.total`` rows, modalities in sorted order, then sliced)."""
    gen = batch.generator(device)
    return {m: torch.rand(batch.total, w, generator=gen, device=device)[batch.offset:batch.offset + batch.rows]
            for m, w in sorted(widths.items())}


class PriorParameters(LossParameters):
    """One discriminator per modality (``prior``), its logits per sample in a training forward."""

    per_sample = frozenset({"prior"})
    training_only = True

    def __init__(self, widths: dict[str, int], mode: str = "cooperative"):
        super().__init__()
        self.mode = mode
        self.prior = nn.ModuleDict({m: PriorDiscriminator(w) for m, w in widths.items()})

    def widths(self) -> dict[str, int]:
        return {m: d[0].in_features for m, d in self.prior.items()}

    def forward(self, features, backbone, batch: Optional[BatchContext]):
        """``{"prior": {modality: (logits of u, logits of f)}}``, each (rows,), in training; {} otherwise."""
        if batch is None:
            return {}
        present = {m: w for m, w in self.widths().items() if m in backbone}
        if not present:
            return {}
        noise = prior_noise(present, batch, next(iter(backbone.values())).device)
        out = {}
        for m in sorted(present):
            h = backbone[m]
            fake = reverse_gradient(h) if self.mode in ("gradient_reversal", "adversarial") else h
            out[m] = (self.prior[m](noise[m].to(h.dtype)), self.prior[m](fake))
        return {"prior": out}
