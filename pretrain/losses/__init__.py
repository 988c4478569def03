"""The loss layer: objectives keyed by name, negatives drawn from the global batch.

``build_loss({"name": "clip", ...})`` returns a callable
``loss_fn(features, logit_scale, logit_bias=None, masks=None) -> {"loss": scalar, ...}``.
"""
from __future__ import annotations

from typing import Callable

from pretrain.losses.clip import ClipLoss
from pretrain.losses.gather import all_gather_with_grad, gather_sizes

LOSSES: dict[str, Callable[..., object]] = {"clip": ClipLoss}


def build_loss(options: dict):
    options = dict(options)
    name = options.pop("name", None)
    if name not in LOSSES:
        raise ValueError(f"loss.name: unknown loss {name!r} (known: {', '.join(sorted(LOSSES))})")
    return LOSSES[name](**options)


__all__ = ["LOSSES", "build_loss", "all_gather_with_grad", "gather_sizes"]
