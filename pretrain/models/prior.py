"""CLIP-Lite's prior-matching discriminators (after Deep InfoMax), part of the model.

With ``loss.prior_weight > 0`` the model gets one discriminator per modality in ``loss.prior_on``
(default: every modality), over that tower's pre-head backbone features: 1000 and 200 ReLU units,
one output logit (the official code's sigmoid is applied in the loss, as ``logsigmoid``, which
gives the same value without overflow). Being submodules, they are checkpointed, exported in the
native format and sharded by ZeRO like the towers; ``--format open_clip|hf`` leaves them out.

In a training forward (``noise`` given) each discriminator scores the prior samples u ~ U[0, 1)
("real") and the backbone features f ("fake"); the loss turns the logits into
PRIOR = -(mean log D(u) + mean log(1 - D(f))). ``prior_mode``:

- ``cooperative`` (the official code): one objective for everything, so the encoder descends
  PRIOR too, together with the discriminator;
- ``adversarial`` (Deep InfoMax): the gradient reaching f through the discriminator is reversed,
  so the discriminator descends PRIOR while the encoder ascends it (pushes its features towards
  the prior), in the same backward and optimizer step.

The prior samples are drawn for the whole global batch from a seed shared by the ranks and each
rank keeps its own rows, so a distributed run sees the samples one process would.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

PRIOR_MODES = ("cooperative", "adversarial")


@dataclass(frozen=True)
class PriorSpec:
    """What the model builds for the prior term: the modalities (None: all) and the mode."""

    on: Optional[tuple[str, ...]]
    mode: str = "cooperative"

    @staticmethod
    def of(loss_options) -> Optional["PriorSpec"]:
        """The spec of a loss's options (None when the objective has no prior term or it is off)."""
        if not (getattr(loss_options, "prior_weight", 0.0) or 0.0) > 0:
            return None
        on = getattr(loss_options, "prior_on", None)
        return PriorSpec(tuple(on) if on else None, getattr(loss_options, "prior_mode", "cooperative"))


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


def prior_noise(widths: dict[str, int], seed: int, offset: int, local: int, total: int,
                device: torch.device) -> dict[str, torch.Tensor]:
    """Rows ``offset:offset+local`` of the global batch's prior samples u ~ U[0, 1), per modality
    (the same on every rank for a seed: drawn for all ``total`` rows, then sliced)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return {m: torch.rand(total, w, generator=gen, device=device)[offset:offset + local]
            for m, w in sorted(widths.items())}
