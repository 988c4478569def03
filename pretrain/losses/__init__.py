"""The loss layer: objectives keyed by name, negatives drawn from the global batch.

    loss_fn = build_loss({"name": "clip" | "clip_lite" | "symile" | "siglip", **options})
    out = loss_fn(features, logit_scale, logit_bias=None, masks=None, step=None, sizes=None, params=None)

``features``: modality -> (B_local, d), L2-normalised; ``logit_scale`` (and ``logit_bias``) of
shape (1,); ``masks``: modality -> bool (B_local,), False where a sample lacks the modality;
``step`` seeds Symile's O(N) negative sampling; ``sizes`` every rank's batch size when known;
``params`` what the objective's own parameters gave in the model's forward (``LossParameters``).
``out["loss"]`` is this rank's share: its mean over ranks is the single-process loss of the global
batch, and so are the rank-mean gradients. The default process group is used when
torch.distributed is initialised; one process works unchanged.

Each objective is a ``Loss`` (``pretrain.losses.base``: the contract) registered in ``LOSSES`` with
its own ``Options`` (the config keys ``loss.<option>``, type-checked and checked by the objective);
``LossConfig`` is the ``loss`` section of a recipe.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from pretrain.losses.accumulate import accumulate_step
from pretrain.losses.base import LOSSES, BatchContext, Loss, LossContext, LossInputError, LossParameters
from pretrain.losses.clip import ClipLoss
from pretrain.losses.clip_lite import ClipLiteLoss
from pretrain.losses.gather import all_gather_with_grad, ring_shift
from pretrain.losses.siglip import SigLipLoss
from pretrain.losses.symile import SymileLoss
from pretrain.options import ConfigError, from_dict, require, to_dict


def loss_options(name: str) -> list[str]:
    return [f.name for f in dataclasses.fields(LOSSES.get(name, "loss.name").Options)]


@dataclass
class LossConfig:
    """``loss.name`` and that objective's options (``loss.<option>``, flat beside the name)."""

    name: str = "clip"
    options: Any = None  # the objective's Options (its defaults when None)
    optim: Any = None  # ``loss.optim``: the optimizer settings of the parameters it owns (pretrain.optim.GroupOptim)

    def __post_init__(self):
        if self.options is None:
            self.options = LOSSES.get(self.name, "loss.name").Options()

    @classmethod
    def from_config(cls, values: dict, key: str = "loss") -> "LossConfig":
        # an option left unset (or null, as configs written by earlier versions list every one) takes the default
        values = {k: v for k, v in values.items() if v is not None}
        name = values.pop("name", "clip")
        optim = values.pop("optim", None)
        require(isinstance(name, str), f"{key}.name", f"expected a string, got {name!r}")
        options_cls = LOSSES.get(name, f"{key}.name").Options
        known = [f.name for f in dataclasses.fields(options_cls)]
        for k in values:
            require(k in known, f"{key}.{k}", f"not an option of {name} (its options: {', '.join(known) or 'none'})")
        from pretrain.optim import GroupOptim

        group = None if optim is None else from_dict(GroupOptim, optim, f"{key}.optim")
        if group is not None:
            require(group.layer_decay == 1.0, f"{key}.optim.layer_decay", "the loss's parameters have no layers")
        return cls(name, from_dict(options_cls, values, key), group)

    def to_config(self) -> dict:
        out = {"name": self.name, **to_dict(self.options)}
        if self.optim is not None:
            out["optim"] = to_dict(self.optim)
        return out

    def build(self):
        loss = LOSSES.get(self.name, "loss.name")(**{f.name: getattr(self.options, f.name)
                                                     for f in dataclasses.fields(self.options)})
        loss.optim = self.optim  # read by pretrain.models.build_model for the optimizer's groups
        return loss

    def check_against(self, modalities: list[str], train, key: str = "loss") -> None:
        """The objective's checks against the data's modalities and ``train.*`` (``Loss.check_against``)."""
        self.build().check_against(modalities, train, key)


def build_loss(options: dict):
    """An objective from ``{"name": ..., **options}`` (``LossInputError`` naming a bad option)."""
    try:
        return LossConfig.from_config(dict(options)).build()
    except ConfigError as err:
        raise LossInputError(str(err)) from None


__all__ = [
    "LOSSES", "BatchContext", "ClipLiteLoss", "ClipLoss", "Loss", "LossConfig", "LossContext", "LossInputError",
    "LossParameters", "SigLipLoss", "SymileLoss",
    "accumulate_step", "all_gather_with_grad", "build_loss", "loss_options", "ring_shift",
]
