"""Gradient accumulation whose negatives span every micro-batch, with exact gradients.

``accumulate_step`` runs the feature-caching scheme (as in GradCache):

1. encode every micro-batch without a graph and cache the features;
2. compute the loss once on the whole accumulated batch (cached features as leaves, the
   temperature and bias straight from their parameters) and backpropagate it: the features get
   their gradients, the temperature and bias get theirs exactly once, unscaled;
3. encode each micro-batch again with a graph, RNG state restored so dropout draws the same
   masks, and backpropagate <features, cached gradient>: the towers' parameters receive exactly
   the gradient of the full-batch loss.

The result equals one step on the whole batch (value and every gradient); peak activation memory
is one micro-batch. Costs one extra forward per micro-batch. Layers with running statistics
(BatchNorm) see each micro-batch twice.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch


def _rng_state():
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def _set_rng_state(state) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def accumulate_step(
    encode: Callable[[object], dict[str, torch.Tensor]],
    micro_batches: Sequence[object],
    loss_fn: Callable[..., dict[str, torch.Tensor]],
    scales: Callable[[], tuple[torch.Tensor, torch.Tensor | None]],
    masks: Sequence[dict[str, torch.Tensor]] | None = None,
    backward: Callable[[torch.Tensor], None] | None = None,
    step: int | None = None,
) -> dict[str, torch.Tensor]:
    """One optimisation step's gradients over ``micro_batches``; returns the loss output (detached).

    encode(mb) -> {modality: (B_mb, d) features}; scales() -> (logit_scale, logit_bias or None);
    backward(t) backpropagates t (default ``t.backward()``; pass ``engine.backward`` for DeepSpeed).
    """
    if not micro_batches:
        raise ValueError("accumulate_step: no micro-batches")
    backward = backward or (lambda t: t.backward())
    states, cached = [], []
    with torch.no_grad():
        for mb in micro_batches:
            states.append(_rng_state())
            cached.append({m: f.detach() for m, f in encode(mb).items()})
    after = _rng_state()
    names = sorted(cached[0])
    sizes = [cached_mb[names[0]].shape[0] for cached_mb in cached]
    feats = {m: torch.cat([c[m] for c in cached]).requires_grad_(True) for m in names}
    all_masks = None
    if masks is not None:
        all_masks = {m: torch.cat([mk[m] for mk in masks]) for m in masks[0]}
    scale, bias = scales()
    out = loss_fn(feats, scale, bias, masks=all_masks, step=step)
    backward(out["loss"])
    start = 0
    for mb, state, n in zip(micro_batches, states, sizes):
        _set_rng_state(state)
        fresh = encode(mb)
        surrogate = sum((fresh[m] * feats[m].grad[start : start + n]).sum() for m in names)
        backward(surrogate)
        start += n
    _set_rng_state(after)
    return {k: v.detach() for k, v in out.items()}
