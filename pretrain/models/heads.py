"""Projection heads by name: ``model.towers.<modality>.head`` picks one, ``.head_options``
configures it. A head maps the backbone's pooled features ``(B, width)`` to ``(B, model.embed_dim)``;
the tower L2-normalises what it gives.

- ``linear`` (default): one bias-free linear map.
- ``mlp``: linear, GELU, bias-free linear (the hidden layer as wide as the backbone).
- ``none``: the backbone's output as it is (towers that project themselves: OpenCLIP, CLIP, SigLIP).
- ``milinear``: the critic block of CLIP-Lite's official code (after Deep InfoMax's "encode and
  dot" critics): a non-linear branch (linear without bias, BatchNorm, ReLU, linear) plus a linear
  shortcut that starts as a noisy identity, then LayerNorm. The official runs use a width of 2048
  for both the hidden layer and the output (``model.embed_dim: 2048``). BatchNorm keeps per-rank
  statistics, as the official DDP runs do (no synchronisation across ranks).

Heads are plain modules with the state-dict keys of earlier versions (``head.weight`` for linear,
``head.0.weight``/``head.2.weight`` for mlp), so checkpoints load unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from pretrain.options import NoOptions, Registry, require

HEADS = Registry("head", base=nn.Module)


@HEADS.register("linear")
class LinearHead(nn.Linear):
    Options = NoOptions

    def __init__(self, options, width: int, embed_dim: int, key: str):
        super().__init__(width, embed_dim, bias=False)


@HEADS.register("mlp")
class MLPHead(nn.Sequential):
    Options = NoOptions

    def __init__(self, options, width: int, embed_dim: int, key: str):
        super().__init__(nn.Linear(width, width), nn.GELU(), nn.Linear(width, embed_dim, bias=False))


@HEADS.register("none")
class NoHead(nn.Identity):
    Options = NoOptions

    def __init__(self, options, width: int, embed_dim: int, key: str):
        super().__init__()
        require(width == embed_dim, key, f"none keeps the backbone's output ({width} wide), which must equal "
                f"model.embed_dim ({embed_dim})")


@HEADS.register("milinear")
class MILinearHead(nn.Module):
    @dataclass
    class Options:
        width: Optional[int] = None  # the non-linear branch's hidden width (default: model.embed_dim, as official)
        batch_norm: bool = True  # BatchNorm1d after the first linear map
        shortcut: bool = True  # the linear shortcut beside the non-linear branch
        shortcut_init: str = "noisy_identity"  # U(-0.01, 0.01) with ones on the diagonal, or "default"
        layer_norm: bool = True  # LayerNorm on the sum

        def check(self, key: str) -> None:
            require(self.width is None or self.width > 0, f"{key}.width", f"must be > 0, got {self.width}")
            require(self.shortcut_init in ("noisy_identity", "default"), f"{key}.shortcut_init",
                    f"expected noisy_identity or default, got {self.shortcut_init!r}")

    def __init__(self, options, width: int, embed_dim: int, key: str):
        super().__init__()
        if embed_dim < width and options.shortcut:
            import warnings

            # the official block asserts n_units >= n_input; narrower, the noisy-identity shortcut
            # passes on only the first embed_dim features
            warnings.warn(f"{key}: a milinear head {embed_dim} wide on {width} input features (model.embed_dim < "
                          f"the backbone's width): its shortcut passes only the first {embed_dim}; the official "
                          f"critic is at least as wide as its input (model.embed_dim >= {width})", stacklevel=2)
        hidden = options.width or embed_dim
        self.nonlinear = nn.Sequential(
            nn.Linear(width, hidden, bias=False),
            nn.BatchNorm1d(hidden) if options.batch_norm else nn.Identity(),
            nn.ReLU(),
            nn.Linear(hidden, embed_dim),
        )
        self.shortcut = nn.Linear(width, embed_dim) if options.shortcut else None
        if self.shortcut is not None and options.shortcut_init == "noisy_identity":
            with torch.no_grad():  # starts close to copying the first min(width, embed_dim) features
                self.shortcut.weight.uniform_(-0.01, 0.01)
                self.shortcut.weight.fill_diagonal_(1.0)
        self.norm = nn.LayerNorm(embed_dim) if options.layer_norm else nn.Identity()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.nonlinear(h)
        if self.shortcut is not None:
            out = out + self.shortcut(h)
        return self.norm(out)


def build_head(name: str, options: dict, width: int, embed_dim: int, key: str) -> nn.Module:
    """The head ``name`` from its options mapping; errors name ``key`` (``model.towers.<m>``)."""
    typed = HEADS.options(name, options, f"{key}.head", f"{key}.head_options")
    return HEADS.get(name, f"{key}.head")(typed, width, embed_dim, f"{key}.head")
