"""Collectives with gradient (the batch layout and the plain collectives are in pretrain.distributed).

``all_gather_with_grad(x)`` returns the concatenation of every rank's ``x`` (ranks may hold
different batch sizes) and routes gradients back: the backward pass sums, over all ranks, the
gradient each rank's loss sends to this rank's slice. With each rank's loss scaled so that the
mean over ranks is the global loss (what DeepSpeed and DDP average), every parameter gets the
gradient of one process holding the whole global batch.

``ring_shift(x)`` sends ``x`` to the next rank and returns the previous rank's, differentiably
(the gradient travels the other way): the building block of ring exchanges.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from pretrain.distributed import (
    BatchLayout,
    all_gather_nograd,
    batch_layout,
    collective,
    is_distributed,
    reduce_scatter_flat,
)


class _GatherWithGrad(torch.autograd.Function):
    """Forward: all-gather into one flat buffer (rows padded to the longest rank). Backward:
    reduce-scatter, so each rank receives only the summed gradient of its own rows (half the
    traffic of an all-reduce of the whole gathered gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layout: BatchLayout) -> torch.Tensor:
        ctx.layout = layout
        return all_gather_nograd(x, layout)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        layout = ctx.layout
        longest = max(layout.sizes)
        if longest == 0:
            return grad.new_zeros((0, *grad.shape[1:])), None
        if len(set(layout.sizes)) == 1:
            flat = grad.contiguous()
        else:
            flat = grad.new_zeros((layout.world * longest, *grad.shape[1:]))
            start = 0
            for r, n in enumerate(layout.sizes):
                flat[r * longest : r * longest + n] = grad[start : start + n]
                start += n
        mine = grad.new_empty((longest, *grad.shape[1:]))
        with collective("all_gather_with_grad backward (reduce_scatter)"):
            reduce_scatter_flat(mine, flat, op=dist.ReduceOp.SUM)
        return mine[: layout.local], None


def all_gather_with_grad(x: torch.Tensor, layout: BatchLayout | list[int] | None = None) -> torch.Tensor:
    """Concatenated ``x`` of all ranks along dim 0, differentiable; identity in one process."""
    if not is_distributed():
        return x
    if layout is None:
        layout = batch_layout(x.shape[0], x.device)
    elif not isinstance(layout, BatchLayout):
        layout = BatchLayout(dist.get_rank(), tuple(layout))
    return _GatherWithGrad.apply(x, layout)


def _exchange(x: torch.Tensor, send_to: int, recv_from: int) -> torch.Tensor:
    out = torch.empty_like(x)
    ops = [dist.P2POp(dist.isend, x.contiguous(), send_to), dist.P2POp(dist.irecv, out, recv_from)]
    with collective("ring_shift (send/recv)"):
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    return out


class _RingShift(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, world = dist.get_rank(), dist.get_world_size()
        return _exchange(x, (rank + 1) % world, (rank - 1) % world)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rank, world = dist.get_rank(), dist.get_world_size()
        return _exchange(grad, (rank - 1) % world, (rank + 1) % world)


def ring_shift(x: torch.Tensor, grad: bool = True) -> torch.Tensor:
    """This rank's ``x`` goes to rank+1; returns rank-1's (same shape on every rank)."""
    if not is_distributed():
        return x
    if grad:
        return _RingShift.apply(x)
    with torch.no_grad():
        rank, world = dist.get_rank(), dist.get_world_size()
        return _exchange(x, (rank + 1) % world, (rank - 1) % world)
