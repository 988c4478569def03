"""The optimizer and its schedule (``train.optimizer``, ``train.lr``, ... in a recipe).

AdamW from torch (fused), LAMB from ``timm.optim`` (You et al., 2019: Adam's update rescaled per
parameter tensor by the trust ratio ||w|| / ||update||, applied to every tensor as in the paper),
SGD with momentum (torch's fused, optionally Nesterov); any of them inside ``Lookahead`` (Zhang et
al., 2019: every k steps the slow weights move alpha of the way to the fast ones, which restart
there; ``train.lookahead``);
weight decay on matrices and kernels only (``train.weight_decay_on: all``: on every parameter);
linear warmup, then cosine decay to 0 or constant.

Parameter groups: without per-part settings, two groups (decayed, not decayed). With them
(``model.towers.<m>.optim``, ``model.towers.<m>.head_optim``, ``loss.optim``: ``GroupOptim``), one
group per part, depth and decay: a tower's backbone and its other parameters (``<m>``), its head
(``<m>.head``; default: the tower's settings), the parameters the loss owns (``loss``: the
temperature, the bias, ``objective.*``); each unset value is ``train.*``'s. ``layer_decay`` d scales
the learning rate of a backbone parameter at depth i of L + 1 (embeddings 0, block k k + 1, what
follows the last block L + 1; ``layer_depths``) by d ** (L + 1 - i), as BEiT and EVA-CLIP do; the
head keeps the tower's rate. The schedule multiplies every group's own rate by the same factor.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch

from pretrain.options import ConfigError, require


@dataclass(kw_only=True)
class GroupOptim:
    """The optimizer settings of one part of the model; unset: ``train.*``'s."""

    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    layer_decay: float = 1.0  # a tower's backbone only: the rate shrinks by this per block below the top

    def check(self, key: str) -> None:
        require(self.lr is None or self.lr > 0, f"{key}.lr", f"must be > 0, got {self.lr}")
        require(self.weight_decay is None or self.weight_decay >= 0, f"{key}.weight_decay",
                f"must be >= 0, got {self.weight_decay}")
        require(0 < self.layer_decay <= 1, f"{key}.layer_decay", f"must be in (0, 1], got {self.layer_decay}")


@dataclass(kw_only=True)
class LookaheadConfig:
    """``train.lookahead``: every ``k`` steps the slow weights move ``alpha`` of the way to the fast."""

    k: int = 5
    alpha: float = 0.5

    def check(self, key: str) -> None:
        require(self.k >= 1, f"{key}.k", f"must be >= 1, got {self.k}")
        require(0 < self.alpha <= 1, f"{key}.alpha", f"must be in (0, 1], got {self.alpha}")


@dataclass(kw_only=True)  # built from the config by name
class OptimConfig:
    """The optimizer fields of ``train.*``."""

    optimizer: Literal["adamw", "lamb", "sgd"] = "adamw"  # lamb: layer-wise trust ratio (needs zero_stage 0)
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    lookahead: Optional[LookaheadConfig] = None  # {k, alpha}: wrap the optimizer in Lookahead
    eps: float = 1e-6
    weight_decay: float = 0.1
    weight_decay_on: Literal["matrices", "all"] = "matrices"  # all: norms, biases and the temperature too
    warmup_steps: int = 10
    schedule: Literal["cosine", "constant"] = "cosine"  # after linear warmup

    def check_optim(self, key: str = "train") -> None:
        require(self.lr > 0, f"{key}.lr", f"must be > 0, got {self.lr}")
        require(self.warmup_steps >= 0, f"{key}.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{key}.betas",
                f"two values in [0, 1), got {self.betas}")
        require(self.eps > 0, f"{key}.eps", f"must be > 0, got {self.eps}")
        require(0 <= self.momentum < 1, f"{key}.momentum", f"must be in [0, 1), got {self.momentum}")
        require(not self.nesterov or (self.optimizer == "sgd" and self.momentum > 0), f"{key}.nesterov",
                "goes with optimizer: sgd and a momentum > 0")


def _decayed(name: str, p: torch.nn.Parameter) -> bool:
    """Matrices and kernels: not norms, biases, the temperature, the logit bias or the
    missing/present embeddings."""
    ndim = len(getattr(p, "ds_shape", p.shape))  # a parameter built partitioned (ZeRO-3) keeps its shape there
    return ndim >= 2 and "logit_" not in name and "missing_embedding" not in name


def param_groups(model: torch.nn.Module, cfg: "OptimConfig | float", settings: Optional[dict] = None) -> list[dict]:
    """The optimizer's parameter groups (the module docstring); ``cfg`` a weight decay alone means
    ``train.*``'s defaults otherwise; ``settings``: the per-part ``GroupOptim`` (default: the
    model's ``optim_settings``, which ``build_model`` sets). Each group of the per-part form has
    ``name`` (its part) and ``depth`` beside ``lr`` and ``weight_decay``."""
    if not isinstance(cfg, OptimConfig):
        cfg = OptimConfig(weight_decay=float(cfg))
    if settings is None:
        settings = getattr(model, "optim_settings", None) or {}
    settings = {k: v for k, v in settings.items() if v is not None}
    if not settings and cfg.weight_decay_on == "matrices":  # the two groups of every earlier version
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                (decay if _decayed(name, p) else no_decay).append(p)
        return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    scales = _layer_scales(model, settings)
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part, own = _part(name, settings)
        lr = own.lr if own is not None and own.lr is not None else cfg.lr
        wd = own.weight_decay if own is not None and own.weight_decay is not None else cfg.weight_decay
        depth, scale = scales.get(name, (None, 1.0))
        decayed = cfg.weight_decay_on == "all" or _decayed(name, p)
        key = (part, depth, decayed)
        if key not in groups:
            groups[key] = {"params": [], "lr": lr * scale, "weight_decay": wd if decayed else 0.0, "name": part,
                           "depth": depth}
        groups[key]["params"].append(p)
    return list(groups.values())


def _part(name: str, settings: dict) -> tuple[str, Optional[GroupOptim]]:
    """(group name, its settings) of a parameter: ``<m>.head``, ``<m>`` or ``loss``."""
    if name.startswith("towers."):
        tower = name.split(".")[1]
        if name.startswith(f"towers.{tower}.head."):
            return f"{tower}.head", settings.get(f"towers.{tower}.head") or settings.get(f"towers.{tower}")
        return tower, settings.get(f"towers.{tower}")
    return "loss", settings.get("loss")


def _layer_scales(model: torch.nn.Module, settings: dict) -> dict[str, tuple[int, float]]:
    """Parameter name -> (depth, learning-rate scale) for the backbones with ``layer_decay`` < 1."""
    out = {}
    for key, own in settings.items():
        if not key.startswith("towers.") or key.endswith(".head") or own.layer_decay == 1.0:
            continue
        tower = key.split(".")[1]
        backbone = model.towers[tower].backbone
        depths, top = layer_depths(backbone)
        if top < 2:
            raise ConfigError(f"model.towers.{tower}.optim.layer_decay: the {tower} tower's backbone has no "
                              "numbered blocks to decay over (layer_depths found none)")
        for sub, depth in depths.items():
            out[f"towers.{tower}.backbone.{sub}"] = (depth, own.layer_decay ** (top - depth))
    return out


_BLOCK = re.compile(r"(?:^|\.)(?:blocks|resblocks|layers|layer|h)\.(\d+)\.")
_STEM = re.compile(r"(?:^|\.|_)(?:embed|embeddings|embedding|cls_token|reg_token|mask_token|pos_embed|patch_embed|"
                   r"class_embedding|positional_embedding|token_embedding|conv1|ln_pre|pre_layrnorm|stem)(?:$|\.|_)")


def layer_depths(backbone: torch.nn.Module) -> tuple[dict[str, int], int]:
    """(parameter name -> depth, top depth) of a backbone: timm models by their own
    ``group_matcher`` (stem 0, then blocks or stages in order, the final norm last); other
    transformers (open_clip, Hugging Face, this project's) by name: embeddings and the stem 0,
    block k (``blocks.k``, ``resblocks.k``, ``layer.k``, ``layers.k``) k + 1, what follows the last
    block (final norm, pooler, projection) L + 1."""
    names = [n for n, _ in backbone.named_parameters()]
    inner = getattr(backbone, "model", None)
    if inner is not None and hasattr(inner, "group_matcher"):
        from timm.models import group_parameters

        layer_map = group_parameters(inner, inner.group_matcher(coarse=False), reverse=True)
        top = max(layer_map.values(), default=0)
        return {n: layer_map.get(n[len("model."):], top) if n.startswith("model.") else top for n in names}, top
    blocks = {n: int(m.group(1)) for n in names if (m := _BLOCK.search(n))}
    top = max(blocks.values(), default=-1) + 2
    depths = {}
    for n in names:
        if n in blocks:
            depths[n] = blocks[n] + 1
        elif _STEM.search(n):
            depths[n] = 0
        else:
            depths[n] = top
    return depths, top


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The learning rate of each named part (its top depth's), from the optimizer's groups."""
    out: dict[str, float] = {}
    for g in optimizer.param_groups:
        if "name" in g:
            out[g["name"]] = max(out.get(g["name"], 0.0), float(g["lr"]))
    return out


def optimized_names(model: torch.nn.Module, cfg: "OptimConfig | float" = 0.0, settings: Optional[dict] = None) -> list[str]:
    """The names of the parameters the optimizer holds, in its order (groups, then position)."""
    return [n for group in optimizer_groups(model, cfg, settings) for n in group]


def optimizer_groups(model: torch.nn.Module, cfg: "OptimConfig | float" = 0.0,
                     settings: Optional[dict] = None) -> list[list[str]]:
    """The parameter names of each (non-empty) optimizer group, in order."""
    return _names_of(model, [g for g in param_groups(model, cfg, settings) if g["params"]])


def _names_of(model: torch.nn.Module, groups: list[dict]) -> list[list[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in groups]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer over ``param_groups``; its ``group_names`` lists each (non-empty) group's
    parameter names, which checkpoints record (``pretrain.checkpoint``)."""
    groups = [g for g in param_groups(model, cfg) if g["params"]]  # (DeepSpeed drops empty groups too)
    if cfg.optimizer == "lamb":
        from timm.optim import Lamb

        # DeepSpeed clips the gradients (train.grad_clip): no second clip inside the optimizer
        optimizer = Lamb(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, max_grad_norm=None, always_adapt=True)
    elif cfg.optimizer == "sgd":
        optimizer = FusedSGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, fused=True)
    else:
        # fused: one kernel for every tensor (CUDA, and CPU), and an update it skips on the device when
        # the step's gradients are not finite (``found_inf``; see ``pretrain.step``)
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=True)
        optimizer.register_load_state_dict_post_hook(_stay_fused)
    if cfg.lookahead is not None:
        optimizer = Lookahead(optimizer, k=cfg.lookahead.k, alpha=cfg.lookahead.alpha)
    optimizer.group_names = _names_of(model, groups)
    return optimizer


class FusedSGD(torch.optim.SGD):
    """torch's fused SGD, with each momentum buffer made (zeros) before the first update: torch
    leaves a new buffer unset when that update is skipped on the device (``found_inf``), and zeros
    give the first update exactly (dampening 0: buffer = 0 * momentum + gradient)."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            if group["momentum"]:
                for p in group["params"]:
                    if p.grad is not None and self.state[p].get("momentum_buffer") is None:
                        self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        return super().step(closure)


class Lookahead(torch.optim.Optimizer):
    """Lookahead around ``base``, sharing its groups and state (so DeepSpeed steps and partitions
    it as it does ``base``, and checkpoints hold it). Each parameter's state gets
    ``lookahead_slow`` (a copy of the weights before its first update) and ``lookahead_step``;
    after every ``k``-th update of a parameter, slow += alpha (fast - slow) and fast = slow. The
    skip-on-device contract holds: with ``found_inf`` set (1 where the step's gradients were not
    finite), ``base`` leaves the weights alone and this synchronisation is masked on the device
    too, so neither fast nor slow weights change and nothing is read on the host (a skipped step
    still counts toward ``k``)."""

    def __init__(self, base: torch.optim.Optimizer, k: int, alpha: float):  # noqa: D107 - no Optimizer.__init__
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}
        self.base, self.k, self.alpha = base, k, alpha
        self.param_groups = base.param_groups
        self.defaults = base.defaults
        self.state = base.state
        self.found_inf = None

    def __getstate__(self):
        return {"base": self.base, "k": self.k, "alpha": self.alpha}

    @torch.no_grad()
    def step(self, closure=None):
        live = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        # the weights before a parameter's first update (added after it: base optimizers such as
        # Adam make their own state only while a parameter's is empty)
        first = {p: p.detach().clone() for p in live if "lookahead_slow" not in self.state.get(p, {})}
        if hasattr(self.base, "found_inf") or self.found_inf is not None:
            self.base.found_inf = self.found_inf
        loss = self.base.step(closure)
        for p, value in first.items():
            self.state[p]["lookahead_slow"], self.state[p]["lookahead_step"] = value, 0
        due = []
        for p in live:
            st = self.state[p]
            st["lookahead_step"] += 1
            if st["lookahead_step"] % self.k == 0:
                due.append(p)
        if due:
            slow = [self.state[p]["lookahead_slow"] for p in due]
            keep = None if self.found_inf is None else (1 - self.found_inf.reshape(()).to(due[0].dtype))
            weight = self.alpha if keep is None else keep * self.alpha
            torch._foreach_add_(slow, torch._foreach_mul(torch._foreach_sub(due, slow), weight))
            if keep is None:
                torch._foreach_copy_(due, slow)
            else:  # fast = fast + keep (slow - fast)
                torch._foreach_add_(due, torch._foreach_mul(torch._foreach_sub(slow, due), keep))
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none)

    def state_dict(self):
        return self.base.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.base.load_state_dict(state_dict)
        self.param_groups, self.state = self.base.param_groups, self.base.state


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
