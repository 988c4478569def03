"""Linear probe on frozen features: multinomial logistic regression, trained full-batch with L-BFGS.

The features are standardised with the training set's mean and standard deviation; the objective
is the mean cross-entropy plus ``l2 / 2 * ||W||^2`` (the bias is not penalised), its gradient
written out, minimised by a small L-BFGS of our own (torch.optim would import torch._dynamo, seconds
of start-up for a CLI). Plain torch on the features' device: no scikit-learn at run time.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


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


def _softmax_regression(xs: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float):
    """The objective and its gradient (analytic; no autograd) over a flat [W (d x C), b (C)]."""
    n, d = xs.shape
    onehot = torch.zeros(n, num_classes, dtype=xs.dtype, device=xs.device)
    onehot[torch.arange(n, device=xs.device), y] = 1.0

    def fg(theta: torch.Tensor) -> tuple[float, torch.Tensor]:
        w, b = theta[: d * num_classes].view(d, num_classes), theta[d * num_classes:]
        logits = xs @ w + b
        logp = torch.log_softmax(logits, dim=1)
        loss = -(logp * onehot).sum() / n + 0.5 * l2 * w.pow(2).sum()
        err = (logp.exp() - onehot) / n
        grad = torch.cat([(xs.T @ err + l2 * w).reshape(-1), err.sum(dim=0)])
        return float(loss), grad

    return fg


def lbfgs(fg, theta: torch.Tensor, max_iter: int = 100, history: int = 10, tol_grad: float = 1e-6,
          tol_change: float = 1e-9) -> torch.Tensor:
    """Minimises a smooth function given ``fg(theta) -> (value, gradient)``: L-BFGS directions
    (two-loop recursion) with a backtracking (Armijo) line search."""
    f, g = fg(theta)
    pairs: list[tuple[torch.Tensor, torch.Tensor, float]] = []
    for _ in range(max_iter):
        if float(g.abs().max()) <= tol_grad:
            break
        q, alphas = g.clone(), []
        for s, yv, rho in reversed(pairs):
            a = rho * float(s @ q)
            q -= a * yv
            alphas.append(a)
        if pairs:
            s, yv, _ = pairs[-1]
            q *= float(s @ yv) / float(yv @ yv)
        else:
            q /= max(float(g.norm()), 1e-12)
        for (s, yv, rho), a in zip(pairs, reversed(alphas)):
            q += s * (a - rho * float(yv @ q))
        direction = -q
        slope = float(g @ direction)
        if slope >= 0:  # not a descent direction: restart from the gradient
            pairs.clear()
            direction = -g / max(float(g.norm()), 1e-12)
            slope = float(g @ direction)
        t = 1.0
        while True:
            new = theta + t * direction
            f_new, g_new = fg(new)
            if f_new <= f + 1e-4 * t * slope or t < 1e-10:
                break
            t *= 0.5
        s, yv = new - theta, g_new - g
        sy = float(s @ yv)
        if sy > 1e-10:
            pairs.append((s, yv, 1.0 / sy))
            if len(pairs) > history:
                pairs.pop(0)
        done = abs(f - f_new) <= tol_change * max(1.0, abs(f))
        theta, f, g = new, f_new, g_new
        if done:
            break
    return theta


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
    d = x.shape[1]
    theta = lbfgs(_softmax_regression(xs, y, num_classes, l2), torch.zeros(d * num_classes + num_classes,
                                                                           device=x.device), max_iter)
    weight, bias = theta[: d * num_classes].view(d, num_classes), theta[d * num_classes:]
    return LinearProbe(weight, bias, mean, std)


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
