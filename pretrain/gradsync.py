"""Data-parallel gradient averaging that overlaps backward: ``OverlappedGradSync``.

Under ZeRO-0 DeepSpeed averages the gradients after backward has finished: it copies them all into
one flat buffer, all-reduces it and copies the result back. Here, as in PyTorch's DDP, each
gradient lives in a bucket of a flat buffer from the start (``param.grad`` is a view of it, so
autograd accumulates straight into the bucket and nothing is copied), and a bucket is all-reduced,
asynchronously, as soon as backward has produced all of its gradients, while backward goes on with
the layers below. ``finish()``, after backward, sends the buckets whose gradients never came
(parameters that took no part in this step keep zero gradients), waits for all of them and
divides by the number of ranks: the result is DeepSpeed's average, bucket for bucket the same sums.

Rules that keep every rank in step:

- buckets are sent in one fixed order (bucket 0 first) whatever order backward finishes them in,
  so every rank issues the same collectives in the same order even if their graphs differ;
- the buckets travel in a process group of their own, so they never interleave with the loss's
  collectives, which backward runs too (the gather's gradient);
- with several micro-batches per step only the last one's backward sends (``arm(last)``); the
  others accumulate into the buckets.

Used for ZeRO-0 in fp32 (``train.overlap_grad_reduce``); DeepSpeed keeps its own reduction
elsewhere (ZeRO 1-3 partition the gradients; bf16/fp16 keep them in the optimizer's buffers).
Between steps the buckets are zeroed in place of DeepSpeed's ``grad = None`` (``zero_grad``).
"""
from __future__ import annotations

from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from pretrain.distributed import collective

BUCKET_MB = 25.0  # DDP's default bucket size


class _Bucket:
    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        dtype, device = params[0].dtype, params[0].device
        self.buffer = torch.zeros(sum(p.numel() for p in params), dtype=dtype, device=device)
        self.views, offset = [], 0
        for p in params:
            self.views.append(self.buffer[offset:offset + p.numel()].view(p.shape))
            offset += p.numel()
        self.pending = len(params)
        self.work = None


class OverlappedGradSync:
    def __init__(self, model: torch.nn.Module, bucket_mb: Optional[float] = None, timeout: Optional[float] = None):
        self.world = dist.get_world_size()
        # a group of its own: its collectives never interleave with the loss's, which backward runs too
        self.group = dist.new_group(**({"timeout": timedelta(seconds=timeout)} if timeout else {}))
        params = [p for p in model.parameters() if p.requires_grad and p.numel() > 0]
        # reverse order of registration: roughly the order backward produces the gradients
        self.buckets: list[_Bucket] = []
        current, size, cap = [], 0, int((bucket_mb or BUCKET_MB) * 2**20)
        for p in reversed(params):
            if current and (size + p.numel() * p.element_size() > cap or p.dtype != current[0].dtype):
                self.buckets.append(_Bucket(current))
                current, size = [], 0
            current.append(p)
            size += p.numel() * p.element_size()
        if current:
            self.buckets.append(_Bucket(current))
        self.where: dict[torch.nn.Parameter, tuple[_Bucket, torch.Tensor]] = {}  # identity-keyed
        for bucket in self.buckets:
            for p, view in zip(bucket.params, bucket.views):
                if p.grad is not None:
                    view.copy_(p.grad)
                p.grad = view
                self.where[p] = (bucket, view)
        self.armed = False
        self.next = 0  # the next bucket to send: buckets go in order
        for p in params:
            p.register_post_accumulate_grad_hook(self._ready)

    # -- backward

    def arm(self, send: bool = True) -> None:
        """Before a backward: whether it sends its buckets (the step's last micro-batch) or only
        accumulates into them."""
        self.armed = send
        for bucket in self.buckets:
            bucket.pending, bucket.work = len(bucket.params), None
        self.next = 0

    def _ready(self, p: torch.nn.Parameter) -> None:
        if not self.armed:
            return
        bucket, view = self.where[p]
        if p.grad.data_ptr() != view.data_ptr():  # the gradient was replaced by a new tensor: into the bucket
            view.copy_(p.grad)
            p.grad = view
        bucket.pending -= 1
        self._send_ready()

    def _send_ready(self, all_left: bool = False) -> None:
        while self.next < len(self.buckets) and (all_left or self.buckets[self.next].pending == 0):
            bucket = self.buckets[self.next]
            bucket.work = dist.all_reduce(bucket.buffer, group=self.group, async_op=True)
            self.next += 1

    def finish(self) -> None:
        """After the sending backward: every bucket sent, received and divided by the number of ranks."""
        if not self.armed:
            return
        self._send_ready(all_left=True)
        with collective(f"gradsync.finish ({len(self.buckets)} bucket all_reduce)"):
            for bucket in self.buckets:
                bucket.work.wait()
                bucket.buffer.mul_(1.0 / self.world)
        self.armed = False

    # -- between steps

    def zero_grad(self) -> None:
        """DeepSpeed's ``engine.zero_grad`` (it sets ``grad = None``): the buckets zeroed instead,
        the gradients staying their views."""
        for bucket in self.buckets:
            bucket.buffer.zero_()
            for p, view in zip(bucket.params, bucket.views):
                if p.grad is None or p.grad.data_ptr() != view.data_ptr():
                    p.grad = view
