"""``train.ema``: an exponential moving average of the weights, kept sharded.

Each rank keeps the average of its share of every trainable parameter, cut as ZeRO-3 cuts a
parameter whatever the stage (rank r holds flat elements [r c, (r + 1) c) of a parameter of n
elements, c = ceil(n / W), zero-padded): under ZeRO-3 that share is the rank's own partition
(``ds_tensor``), under ZeRO 0-2 a slice of the whole tensor. After each optimizer step (from step
``start``, every ``every`` steps) ema += (1 - decay) (w - ema) in fp32, on the device, masked where
the step was skipped for non-finite gradients (``found_inf``): no host reads; before ``start`` the
average is the weights. It is the average of the module's weights (in a bf16 run, of their bf16
values).

A checkpoint holds each rank's shares in its ``rank<r>.pt`` (``TrainState``); another number of
ranks joins the old shares and cuts them again. ``swapped()`` puts the average into the model for an
evaluation and back (``eval/ema/...``); ``full_from_checkpoint`` joins the shares of a checkpoint
folder for ``pretrain.export --weights ema``.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from pretrain.distributed import collective
from pretrain.options import require

FORMAT = 1


@dataclass(kw_only=True)
class EmaConfig:
    """``train.ema``: ``{decay, every, start}``."""

    decay: float = 0.9999
    every: int = 1  # steps between updates (the decay applies per update)
    start: int = 0  # the step from which it averages (before: a copy of the weights)

    def check(self, key: str) -> None:
        require(0 < self.decay < 1, f"{key}.decay", f"must be in (0, 1), got {self.decay}")
        require(self.every >= 1, f"{key}.every", f"must be >= 1, got {self.every}")
        require(self.start >= 0, f"{key}.start", f"must be >= 0, got {self.start}")


def _chunk(n: int, world: int) -> int:
    return math.ceil(n / world)


class WeightEma:
    def __init__(self, model: torch.nn.Module, cfg: EmaConfig, rank: int, world: int, zero3: bool):
        self.model, self.cfg, self.rank, self.world, self.zero3 = model, cfg, rank, world, zero3
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in self.params.items()}
        self.avg = {n: self._mine(n).float().clone() for n in self.params}

    # -- this rank's share of a parameter's current weights (a view where it can be)
    def _mine(self, name: str) -> torch.Tensor:
        p = self.params[name]
        if self.zero3:
            return p.ds_tensor.detach().reshape(-1)
        flat, n = p.detach().reshape(-1), p.numel()
        c = _chunk(n, self.world)
        lo, hi = min(self.rank * c, n), min((self.rank + 1) * c, n)
        if hi - lo == c:
            return flat[lo:hi]
        return torch.cat([flat[lo:hi], flat.new_zeros(c - (hi - lo))])

    @torch.no_grad()
    def update(self, step: int, found_inf: Optional[torch.Tensor] = None) -> None:
        """After the optimizer step that made ``step``: average (or copy, before ``start``)."""
        if step < self.cfg.start:
            for n, a in self.avg.items():
                a.copy_(self._mine(n))
            return
        if (step - self.cfg.start) % self.cfg.every:
            return
        rate = 1.0 - self.cfg.decay
        weight = rate if found_inf is None else (1.0 - found_inf.reshape(()).float()) * rate
        names = list(self.avg)
        avg = [self.avg[n] for n in names]
        now = [self._mine(n).float() for n in names]
        torch._foreach_add_(avg, torch._foreach_mul(torch._foreach_sub(now, avg), weight))

    # -- whole tensors
    def _gather(self, name: str) -> torch.Tensor:
        part = self.avg[name]
        if self.world > 1:
            parts = [torch.empty_like(part) for _ in range(self.world)]
            with collective("ema: gather the average (all_gather)"):
                dist.all_gather(parts, part)
            part = torch.cat(parts)
        n = math.prod(self.shapes[name])
        return part[:n].reshape(self.shapes[name])

    @contextlib.contextmanager
    def swapped(self):
        """Collective: the average in the model's parameters for the duration (then the weights back)."""
        saved = {}
        with torch.no_grad():
            for n, p in self.params.items():
                if self.zero3:
                    saved[n] = p.ds_tensor.data.clone()
                    p.ds_tensor.data.copy_(self.avg[n].reshape(p.ds_tensor.shape).to(p.ds_tensor.dtype))
                else:
                    whole = self._gather(n)
                    saved[n] = p.data.clone()
                    p.data.copy_(whole.to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    (p.ds_tensor if self.zero3 else p).data.copy_(saved[n])

    # -- checkpoints
    def state_dict(self) -> dict:
        return {"format": FORMAT, "rank": self.rank, "world": self.world, "shapes": self.shapes,
                "avg": {n: a.detach().cpu().clone() for n, a in self.avg.items()}}

    def load_state_dict(self, state: dict) -> None:
        for n, a in self.avg.items():
            a.copy_(state["avg"][n].to(a.device))

    def load_layout(self, states: list[dict]) -> None:
        """From every old rank's state of another number of ranks: join, then cut for this layout."""
        whole = join(states)
        for n, a in self.avg.items():
            flat = whole[n].reshape(-1).to(a.device)
            c = _chunk(flat.numel(), self.world)
            lo, hi = min(self.rank * c, flat.numel()), min((self.rank + 1) * c, flat.numel())
            a.zero_()
            a[:hi - lo].copy_(flat[lo:hi])


def join(states: list[dict]) -> dict[str, torch.Tensor]:
    """Whole fp32 tensors from every rank's share (``WeightEma.state_dict()`` of each old rank)."""
    states = sorted(states, key=lambda s: s["rank"])
    out = {}
    for n, shape in states[0]["shapes"].items():
        flat = torch.cat([s["avg"][n].reshape(-1) for s in states])
        out[n] = flat[:math.prod(shape)].reshape(shape)
    return out


def full_from_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    """The average of a checkpoint folder as whole tensors by parameter name (its ``rank*.pt``)."""
    states = []
    for path in sorted(Path(folder).glob("rank*.pt")):
        saved = torch.load(path, map_location="cpu", weights_only=False)
        if not saved.get("ema"):
            raise ValueError(f"{folder}: no EMA weights in {path.name} (was the run trained with train.ema?)")
        states.append(saved["ema"])
    if not states:
        raise ValueError(f"{folder}: no rank*.pt files")
    return join(states)
