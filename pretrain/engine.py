"""Process group and DeepSpeed engine.

Every launcher (``python``, ``torchrun``, ``accelerate launch``) ends here: the process group is
initialised from the environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; a lone process gets
a one-rank group on loopback), and rank and world size are read back from torch.distributed, never
from a launcher's own state. The engine is built directly with ``deepspeed.initialize``.
"""
from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pretrain.config import TrainConfig


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> DistInfo:
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def lr_lambda(step: int, warmup: int, total: int, schedule: str = "cosine") -> float:
    """Linear warmup to 1, then cosine decay to 0 at ``total`` (or constant)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and kernels only: not on norms, biases, the temperature, the logit
    bias or the missing/present embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "logit_" not in name and "missing_embedding" not in name else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed config from the training config, with ``train.deepspeed`` merged over it
    (e.g. ``zero_optimization: {overlap_comm: true, reduce_bucket_size: 5e8}``)."""
    return _merge(_generated(cfg, world_size), cfg.deepspeed)


def _generated(cfg: TrainConfig, world_size: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accumulation_steps,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accumulation_steps * world_size,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_engine(model: torch.nn.Module, cfg: TrainConfig, world_size: int):
    """DeepSpeed engine with AdamW (or LAMB) and warmup + cosine; returns (engine, optimizer, scheduler)."""
    import deepspeed

    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "lamb":
        from pretrain.optim import Lamb

        optimizer = Lamb(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    else:
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, cfg.warmup_steps, cfg.steps, cfg.schedule)
    )
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, world_size)
    )
    if cfg.precision != "fp32":
        # DeepSpeed casts parameters only; floating buffers (BatchNorm statistics) must follow, or
        # normalisation layers meet bf16/fp16 inputs and weights beside fp32 statistics.
        dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
        for buf in engine.module.buffers():
            if buf.is_floating_point():
                buf.data = buf.data.to(dtype)
    return engine, optimizer, scheduler
