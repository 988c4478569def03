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

What the objective's own parameters give the loss (``params``, ``pretrain.losses.LossParameters``)
is cached and replayed the same way: entries named in ``per_sample`` (one row per sample) are
concatenated over the micro-batches like the features, any other entry is taken from the first
micro-batch and gets its gradient once, like the temperature.

The result equals one step on the whole batch (value and every gradient); peak activation memory
is one micro-batch. Costs one extra forward per micro-batch. Layers with running statistics
(BatchNorm) see each micro-batch twice.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

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
    per_sample: frozenset = frozenset(),
) -> dict[str, torch.Tensor]:
    """One optimisation step's gradients over ``micro_batches``; returns the loss output (detached).

    ``encode(mb)`` gives ``{modality: (B_mb, d) features}``, with ``scales() -> (logit_scale,
    logit_bias or None)``; or it gives ``(features, logit_scale, logit_bias[, params])`` itself, as
    the model's forward does (needed under ZeRO-3, where parameters exist only inside a forward);
    ``params`` reach ``loss_fn`` as ``params=`` (``per_sample``: its entries with a row per sample).
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
            return out if len(out) == 4 else (*out, {})
        if scales is None:
            raise ValueError("accumulate_step: encode gave only features; pass scales()")
        return (out, *scales(), {})

    states, cached, cached_params = [], [], []
    with torch.no_grad():
        for i, mb in enumerate(micro_batches):
            states.append(torch_rng_state())
            feats_mb, scale0, bias0, params0 = run(mb)
            cached.append({m: f.detach() for m, f in feats_mb.items()})
            cached_params.append(params0)
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
    params, rowwise = _joined(cached_params, per_sample)  # leaves requiring grad
    with torch.enable_grad():
        out = loss_fn(feats, scale, bias, masks=all_masks, step=step, **({"params": params} if params else {}))
    if check is not None and not check(out):
        set_rng_state(after)
        return {k: v.detach() for k, v in out.items()}
    param_leaves = tree_leaves(params)
    leaves = [feats[m] for m in names] + [scale] + ([bias] if bias is not None else []) + param_leaves
    grads = torch.autograd.grad(out["loss"], leaves, allow_unused=True)
    feat_grads = {m: g if g is not None else torch.zeros_like(feats[m]) for m, g in zip(names, grads)}
    scale_grad = grads[len(names)]
    bias_grad = grads[len(names) + 1] if bias is not None else None
    param_grads = grads[len(leaves) - len(param_leaves):]
    start = 0
    for i, (mb, state, n) in enumerate(zip(micro_batches, states, sizes)):
        set_rng_state(state)
        fresh, fresh_scale, fresh_bias, fresh_params = run(mb)
        surrogate = sum((fresh[m].to(feat_grads[m].dtype) * feat_grads[m][start : start + n]).sum() for m in names)
        if i == 0:  # the temperature and bias get their gradient once, unscaled
            if scale_grad is not None:
                surrogate = surrogate + (fresh_scale.to(scale_grad.dtype) * scale_grad).sum()
            if bias_grad is not None and fresh_bias is not None:
                surrogate = surrogate + (fresh_bias.to(bias_grad.dtype) * bias_grad).sum()
        for leaf, grad, per_row in zip(tree_leaves(fresh_params), param_grads, rowwise):
            if grad is None or not (per_row or i == 0):  # a shared entry gets its gradient once
                continue
            part = grad[start : start + leaf.shape[0]] if per_row else grad
            surrogate = surrogate + (leaf.to(part.dtype) * part).sum()
        backward(surrogate)
        start += n
    set_rng_state(after)
    return {k: v.detach() for k, v in out.items()}


def _joined(per_micro: list[dict], per_sample: frozenset) -> tuple[dict, list[bool]]:
    """The micro-batches' ``params`` as one batch's (leaves detached, requiring grad): entries in
    ``per_sample`` concatenated along rows, others the first micro-batch's; and, per leaf (in
    ``tree_leaves`` order), whether it is per sample."""
    first = per_micro[0]
    if not first:
        return {}, []
    leaves, spec = tree_flatten(first)
    rowwise = [k in per_sample for k in first for _ in tree_leaves(first[k])]
    columns = [tree_flatten(p)[0] for p in per_micro]
    joined = [torch.cat([c[j] for c in columns]) if rowwise[j] else leaves[j] for j in range(len(leaves))]
    joined = [x.detach().requires_grad_(x.is_floating_point()) for x in joined]
    return tree_unflatten(joined, spec), rowwise
