"""Linear probe on frozen features: multinomial logistic regression, trained full-batch with L-BFGS.

The features are standardised with the training set's mean and standard deviation; the objective
is the mean cross-entropy plus ``l2 / 2 * ||W||^2`` (the bias is not penalised), minimised by
``torch.optim.LBFGS`` with a strong-Wolfe line search, on the features' device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LinearProbe:
    weight: torch.Tensor  # (d, C)
    bias: torch.Tensor  # (C,)
    mean: torch.Tensor  # (d,)
    std: torch.Tensor  # (d,)

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.to(self.weight) - self.mean) / self.std
        return x @ self.weight + self.bias

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).argmax(dim=1)


def fit_linear_probe(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float = 1e-3, max_iter: int = 100
) -> LinearProbe:
    """Multinomial logistic regression on (N, d) features and (N,) labels in [0, num_classes)."""
    if x.shape[0] == 0:
        raise ValueError("linear probe: no training samples")
    x = x.float()
    y = y.to(x.device).long()
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False).clamp_min(1e-6)
    xs = (x - mean) / std
    weight = torch.zeros(x.shape[1], num_classes, device=x.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=max_iter, history_size=10, tolerance_grad=1e-6,
                            tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xs @ weight + bias, y) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LinearProbe(weight.detach(), bias.detach(), mean, std)


def linear_probe_accuracy(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    num_classes: int,
    l2: float = 1e-3,
    max_iter: int = 100,
) -> dict[str, float]:
    """Trains on (x_train, y_train) and returns ``top1`` on the validation features, ``train_top1``
    and ``chance`` (the share of the most frequent validation class: the best constant guess)."""
    probe = fit_linear_probe(x_train, y_train, num_classes, l2, max_iter)
    y_val, y_train = y_val.to(probe.weight.device), y_train.to(probe.weight.device)
    top1 = (probe.predict(x_val) == y_val).float().mean().item() if len(y_val) else float("nan")
    train_top1 = (probe.predict(x_train) == y_train).float().mean().item()
    chance = torch.bincount(y_val, minlength=num_classes).max().item() / len(y_val) if len(y_val) else float("nan")
    return {"top1": top1, "train_top1": train_top1, "chance": chance}
