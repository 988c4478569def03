"""LAMB (You et al., 2019, "Large Batch Optimization for Deep Learning"): Adam's update rescaled
per parameter tensor by the trust ratio ||w|| / ||update||, for large-batch training.

DeepSpeed's fused LAMB is a CUDA kernel; this one is plain PyTorch and runs anywhere. The trust
ratio is per parameter tensor, so it needs whole tensors: ZeRO stages 1-3 hand the optimizer flat
partitions instead (the config refuses that combination).
"""
from __future__ import annotations

import torch


class Lamb(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 max_trust_ratio: float = 10.0):
        if lr <= 0 or eps <= 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"Lamb: bad hyper-parameters lr={lr} eps={eps} betas={betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      max_trust_ratio=max_trust_ratio))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float()
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(grad)
                    state["exp_avg_sq"] = torch.zeros_like(grad)
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(b1).add_(grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                m_hat = m / (1 - b1 ** state["step"])
                v_hat = v / (1 - b2 ** state["step"])
                update = m_hat / (v_hat.sqrt() + group["eps"])
                weight = p.float()
                if group["weight_decay"]:
                    update = update + group["weight_decay"] * weight
                w_norm, u_norm = weight.norm(), update.norm()
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                trust = trust.clamp(max=group["max_trust_ratio"])
                state["last_trust_ratio"] = float(trust)
                p.add_((update * (-group["lr"] * trust)).to(p.dtype))
        return loss
