"""The optimizer and its schedule (``train.optimizer``, ``train.lr``, ... in a recipe).

AdamW from torch (fused), LAMB from ``timm.optim`` (You et al., 2019: Adam's update rescaled per
parameter tensor by the trust ratio ||w|| / ||update||, applied to every tensor as in the paper);
weight decay on matrices and kernels only; linear warmup, then cosine decay to 0 or constant.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from pretrain.options import require


@dataclass(kw_only=True)  # built from the config by name
class OptimConfig:
    """The optimizer fields of ``train.*``."""

    optimizer: Literal["adamw", "lamb"] = "adamw"  # lamb: layer-wise trust ratio (needs zero_stage 0)
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    weight_decay: float = 0.1
    warmup_steps: int = 10
    schedule: Literal["cosine", "constant"] = "cosine"  # after linear warmup

    def check_optim(self, key: str = "train") -> None:
        require(self.lr > 0, f"{key}.lr", f"must be > 0, got {self.lr}")
        require(self.warmup_steps >= 0, f"{key}.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{key}.betas",
                f"two values in [0, 1), got {self.betas}")
        require(self.eps > 0, f"{key}.eps", f"must be > 0, got {self.eps}")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and kernels only: not on norms, biases, the temperature, the logit
    bias or the missing/present embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))  # a parameter built partitioned (ZeRO-3) keeps its shape there
        (decay if ndim >= 2 and "logit_" not in name and "missing_embedding" not in name else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def optimized_names(model: torch.nn.Module) -> list[str]:
    """The names of the parameters the optimizer holds, in its order (groups, then position)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in param_groups(model, 0.0) for p in g["params"]]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "lamb":
        from timm.optim import Lamb

        # DeepSpeed clips the gradients (train.grad_clip): no second clip inside the optimizer
        return Lamb(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, max_grad_norm=None, always_adapt=True)
    # fused: one kernel for every tensor (CUDA, and CPU), and an update it skips on the device when
    # the step's gradients are not finite (``found_inf``; see ``pretrain.step``)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=True)
    optimizer.register_load_state_dict_post_hook(_stay_fused)
    return optimizer


def _stay_fused(optimizer: torch.optim.Optimizer) -> None:
    # a checkpoint's param groups carry their own ``fused`` (None in checkpoints written before the
    # optimizer was fused); the implementation is this run's choice, not the checkpoint's
    for group in optimizer.param_groups:
        group["fused"] = True
        for p in group["params"]:  # the fused kernel keeps each step count beside its parameter
            state = optimizer.state.get(p, {})
            if torch.is_tensor(state.get("step")) and state["step"].device != p.device:
                state["step"] = state["step"].to(p.device, torch.float32)


def lr_lambda(step: int, warmup: int, total: int, schedule: str = "cosine") -> float:
    """Linear warmup to 1, then cosine decay to 0 at ``total`` (or constant)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_schedule(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, cfg.warmup_steps, total_steps, cfg.schedule)
    )
