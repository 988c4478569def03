"""Gradient accumulation whose negatives span every micro-batch, with exact gradients.

``accumulate_step`` runs the feature-caching scheme (as in GradCache):

1. encode every micro-batch without a graph and cache the features;
2. compute the loss once on the whole accumulated batch (cached features, temperature and bias
   as leaves) and take its gradients with respect to them;
3. encode each micro-batch again with a graph, RNG state restored so dropout draws the same
   masks, and backpropagate <features, cached gradient> (plus, with the first micro-batch,
   <temperature, its gradient> and the same for the bias): the parameters receive exactly the
   gradient of the full-batch loss, the temperature's once and unscaled, in one backward call
   per micro-batch (so a DeepSpeed engine counts one micro-step each).

The result equals one step on the whole batch (value and every gradient); peak activation memory
is one micro-batch. Costs one extra forward per micro-batch. Layers with running statistics
(BatchNorm) see each micro-batch twice.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from pretrain.distributed import set_rng_state, torch_rng_state


def accumulate_step(
    encode: Callable[[object], object],
    micro_batches: Sequence[object],
    loss_fn: Callable[..., dict[str, torch.Tensor]],
    scales: Callable[[], tuple[torch.Tensor, torch.Tensor | None]] | None = None,
    masks: Sequence[dict[str, torch.Tensor]] | None = None,
    backward: Callable[[torch.Tensor], None] | None = None,
    step: int | None = None,
    check: Callable[[dict[str, torch.Tensor]], bool] | None = None,
    before_replay: Callable[[], None] | None = None,
) -> dict[str, torch.Tensor]:
    """One optimisation step's gradients over ``micro_batches``; returns the loss output (detached).

    ``encode(mb)`` gives ``{modality: (B_mb, d) features}``, with ``scales() -> (logit_scale,
    logit_bias or None)``; or it gives ``(features, logit_scale, logit_bias)`` itself, as the
    model's forward does (needed under ZeRO-3, where parameters exist only inside a forward).
    ``backward(t)`` backpropagates t (default ``t.backward()``); it is called exactly once per
    micro-batch, the temperature's and bias's gradients riding on the first one.
    ``check(loss_output)`` runs before any backward; when it returns False nothing is
    backpropagated (a skipped step). ``before_replay()`` runs between the cached forwards and their
    replays (the trainer puts BatchNorm's running statistics back there, so that each micro-batch
    updates them once, not twice).
    """
    if not micro_batches:
        raise ValueError("accumulate_step: no micro-batches")
    backward = backward or (lambda t: t.backward())

    def run(mb):
        out = encode(mb)
        if isinstance(out, tuple):
            return out
        if scales is None:
            raise ValueError("accumulate_step: encode gave only features; pass scales()")
        return (out, *scales())

    states, cached = [], []
    with torch.no_grad():
        for i, mb in enumerate(micro_batches):
            states.append(torch_rng_state())
            feats_mb, scale0, bias0 = run(mb)
            cached.append({m: f.detach() for m, f in feats_mb.items()})
            if i == 0:
                scale_value = scale0.detach()
                bias_value = None if bias0 is None else bias0.detach()
    after = torch_rng_state()
    if before_replay is not None:
        before_replay()
    names = sorted(cached[0])
    sizes = [cached_mb[names[0]].shape[0] for cached_mb in cached]
    feats = {m: torch.cat([c[m] for c in cached]).requires_grad_(True) for m in names}
    all_masks = None
    if masks is not None:
        all_masks = {m: torch.cat([mk[m] for mk in masks]) for m in masks[0]}
    scale = scale_value.clone().requires_grad_(True)
    bias = None if bias_value is None else bias_value.clone().requires_grad_(True)
    with torch.enable_grad():
        out = loss_fn(feats, scale, bias, masks=all_masks, step=step)
    if check is not None and not check(out):
        set_rng_state(after)
        return {k: v.detach() for k, v in out.items()}
    leaves = [feats[m] for m in names] + [scale] + ([bias] if bias is not None else [])
    grads = torch.autograd.grad(out["loss"], leaves, allow_unused=True)
    feat_grads = {m: g if g is not None else torch.zeros_like(feats[m]) for m, g in zip(names, grads)}
    scale_grad = grads[len(names)]
    bias_grad = grads[len(names) + 1] if bias is not None else None
    start = 0
    for i, (mb, state, n) in enumerate(zip(micro_batches, states, sizes)):
        set_rng_state(state)
        fresh, fresh_scale, fresh_bias = run(mb)
        surrogate = sum((fresh[m].to(feat_grads[m].dtype) * feat_grads[m][start : start + n]).sum() for m in names)
        if i == 0:  # the temperature and bias get their gradient once, unscaled
            if scale_grad is not None:
                surrogate = surrogate + (fresh_scale.to(scale_grad.dtype) * scale_grad).sum()
            if bias_grad is not None and fresh_bias is not None:
                surrogate = surrogate + (fresh_bias.to(bias_grad.dtype) * bias_grad).sum()
        backward(surrogate)
        start += n
    set_rng_state(after)
    return {k: v.detach() for k, v in out.items()}
