"""The loss layer: objectives keyed by name, negatives drawn from the global batch.

    loss_fn = build_loss({"name": "clip" | "clip_lite" | "symile" | "siglip", **options})
    out = loss_fn(features, logit_scale, logit_bias=None, masks=None, step=None)

``features``: modality -> (B_local, d), L2-normalised; ``logit_scale`` (and ``logit_bias``) of
shape (1,); ``masks``: modality -> bool (B_local,), False where a sample lacks the modality;
``step`` seeds Symile's O(N) negative sampling. ``out["loss"]`` is this rank's share: its mean over
ranks is the single-process loss of the global batch, and so are the rank-mean gradients. The
default process group is used when torch.distributed is initialised; one process works unchanged.
"""
from __future__ import annotations

import inspect

from pretrain.losses.accumulate import accumulate_step
from pretrain.losses.base import LossInputError
from pretrain.losses.clip import ClipLoss
from pretrain.losses.clip_lite import ClipLiteLoss
from pretrain.losses.gather import all_gather_with_grad, batch_layout, ring_shift
from pretrain.losses.siglip import SigLipLoss
from pretrain.losses.symile import SymileLoss

LOSSES: dict[str, type] = {cls.name: cls for cls in (ClipLoss, ClipLiteLoss, SymileLoss, SigLipLoss)}


def loss_options(name: str) -> list[str]:
    params = inspect.signature(LOSSES[name].__init__).parameters
    return [p for p in params if p != "self"]


def build_loss(options: dict):
    options = {k: v for k, v in dict(options).items() if v is not None}
    name = options.pop("name", None)
    if name not in LOSSES:
        raise LossInputError(f"loss.name: unknown loss {name!r} (known: {', '.join(sorted(LOSSES))})")
    known = loss_options(name)
    for key in options:
        if key not in known:
            raise LossInputError(f"loss.{key}: not an option of {name} (its options: {', '.join(known) or 'none'})")
    return LOSSES[name](**options)


__all__ = [
    "LOSSES", "LossInputError", "accumulate_step", "all_gather_with_grad", "batch_layout",
    "build_loss", "loss_options", "ring_shift",
]
