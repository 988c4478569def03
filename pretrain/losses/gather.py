"""Collectives with gradient, and the batch bookkeeping every objective shares.

``all_gather_with_grad(x)`` returns the concatenation of every rank's ``x`` (ranks may hold
different batch sizes) and routes gradients back: the backward pass sums, over all ranks, the
gradient each rank's loss sends to this rank's slice. With each rank's loss scaled so that the
mean over ranks is the global loss (what DeepSpeed and DDP average), every parameter gets the
gradient of one process holding the whole global batch.

``ring_shift(x)`` sends ``x`` to the next rank and returns the previous rank's, differentiably
(the gradient travels the other way): the building block of ring exchanges.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@dataclass(frozen=True)
class BatchLayout:
    """Where this rank's rows sit in the global batch."""

    rank: int
    sizes: tuple[int, ...]  # local batch size of every rank

    @property
    def world(self) -> int:
        return len(self.sizes)

    @property
    def offset(self) -> int:
        return sum(self.sizes[: self.rank])

    @property
    def local(self) -> int:
        return self.sizes[self.rank]

    @property
    def total(self) -> int:
        return sum(self.sizes)


def batch_layout(n: int, device: torch.device) -> BatchLayout:
    """Every rank's local batch size (one small all_gather)."""
    if not is_distributed():
        return BatchLayout(0, (n,))
    local = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, local)
    return BatchLayout(dist.get_rank(), tuple(int(s.item()) for s in sizes))


# torch >= 2.14 names the flat-buffer collectives *_single; older releases *_into_tensor / *_tensor.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _GatherWithGrad(torch.autograd.Function):
    """Forward: all-gather into one flat buffer (rows padded to the longest rank). Backward:
    reduce-scatter, so each rank receives only the summed gradient of its own rows (half the
    traffic of an all-reduce of the whole gathered gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layout: BatchLayout) -> torch.Tensor:
        ctx.layout = layout
        longest = max(layout.sizes)
        if longest == 0:
            return x.new_zeros((0, *x.shape[1:]))
        padded = x.new_zeros((longest, *x.shape[1:]))
        padded[: x.shape[0]] = x
        flat = x.new_empty((layout.world * longest, *x.shape[1:]))
        _all_gather_flat(flat, padded)
        if len(set(layout.sizes)) == 1:
            return flat
        return torch.cat([flat[r * longest : r * longest + n] for r, n in enumerate(layout.sizes)])

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
        _reduce_scatter_flat(mine, flat, op=dist.ReduceOp.SUM)
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


@torch.no_grad()
def all_gather_nograd(x: torch.Tensor, layout: BatchLayout) -> torch.Tensor:
    """Concatenated ``x`` of all ranks (masks, labels): no gradient."""
    if not is_distributed():
        return x
    if x.dtype == torch.bool:
        return all_gather_nograd(x.to(torch.uint8), layout).bool()
    return _GatherWithGrad.apply(x, layout)


def _exchange(x: torch.Tensor, send_to: int, recv_from: int) -> torch.Tensor:
    out = torch.empty_like(x)
    ops = [dist.P2POp(dist.isend, x.contiguous(), send_to), dist.P2POp(dist.irecv, out, recv_from)]
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
