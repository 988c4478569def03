"""One contrastive training step under a DeepSpeed engine: ``ContrastiveStep``.

The contract: ``step(batches, step_index) -> StepOutput`` takes the step's micro-batches (one per
``train.grad_accumulation_steps``, each a ``pretrain.data.Batch`` of this rank) and

1. moves each batch to the device (``non_blocking``: the loader pins it), finishes each modality
   its decoder leaves to the device (``device_transforms``: uint8 pixels scaled and normalised
   there), casts floating inputs to the engine's precision (token ids stay integers) and encodes it: L2-normalised features per
   modality, the logit scale and bias, and what the objective's own parameters give its loss
   (``params``: the model's forward gets a ``BatchContext`` saying where the micro-batch sits in the
   step's global batch, e.g. for CLIP-Lite's prior samples);
2. agrees with the other ranks, in one collective, whether every rank's features and scale are
   finite and whether any rank received a stop signal. Where some rank's features are not finite,
   every rank replaces its features by zeros, so all ranks still run the same loss collectives;
3. computes the loss with the masks of the modalities that may be absent (``masked``; towers with
   a missingness indicator encode absence themselves) and every rank's batch size known up front;
   with several micro-batches through the exact feature-caching helper
   ``pretrain.losses.accumulate_step`` (negatives span every micro-batch, the temperature's gradient
   is counted once);
4. agrees (one more collective) whether the loss is finite everywhere, and lets DeepSpeed update
   (one micro-step per micro-batch; under ZeRO-0 the gradients are averaged while the last
   micro-batch's backward runs, ``pretrain.gradsync``, and at log steps their norm is measured,
   which DeepSpeed does not do there). A non-finite step is skipped on every rank *on the device*:
   the fused AdamW gets the agreed flag as ``found_inf`` and leaves parameters and optimizer state
   as they were, while the schedule advances (it stays on the step count); BatchNorm's running
   statistics, which the step's forward moved, are put back too (a device-side select). An
   optimizer without that ability (LAMB) is skipped by reading the flag on the host instead. With
   accumulation the statistics are put back between the cached forwards and their replays, so each
   micro-batch updates them once;
5. gives every rank rank 0's buffers (BatchNorm's running statistics, which each rank's own batches
   moved), as DDP does: the ranks hold one model, so an evaluation on any of them, a checkpoint (rank
   0's) and an export agree.

Nothing is read back from the device in a step: the agreed flags travel to the host through the
trainer's ``FlagChannel`` (below: the whole protocol). The order of an update (backward, DeepSpeed's
step: optimizer then schedule; a skip) is ``pretrain.engine.Engine``'s. DeepSpeed's own reads (its
gradient-norm check under ZeRO 1-2 with clipping) are its own.
"""
from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from typing import Optional

import torch
import torch.distributed as dist

from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.utils._pytree import tree_map

from pretrain.data.decoders import to_device
from pretrain.distributed import collective
from pretrain.losses import BatchContext, accumulate_step
from pretrain.optim import group_lrs


@dataclass
class StepFlags:
    step: int  # the step (1-based) these flags belong to
    finite: bool  # its update happened (False: skipped on every rank)
    stop: bool  # some rank had received a stop signal by then


class FlagChannel:
    """How each step's outcome reaches the host, without a device read in the step. Owned by the
    trainer, written by the step; one step's flags in flight at a time.

    1. The step agrees over the ranks, on the device, on [its loss was not finite, some rank has a
       stop signal] and ``send``s them: a non-blocking copy into host memory (an event marks its end).
    2. The trainer ``receive``s them: normally just before the next step starts (the copy finished
       long ago: nothing waits), or right after the step where it must know at once (it logs,
       evaluates, saves or ends there): then it waits for that copy alone. ``receive`` gives
       ``StepFlags`` (the step, whether its update happened, whether to stop), or None when nothing
       is in flight. A skipped step is counted and a stop obeyed one step late at most.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._host = torch.zeros(2, pin_memory=device.type == "cuda")
        self._event = None
        self._pending: Optional[int] = None  # the step whose flags are on their way

    def send(self, step: int, flags: torch.Tensor) -> None:
        """``flags`` (on the device): [not finite, stop] of ``step`` (1-based)."""
        assert self._pending is None, f"the flags of step {self._pending} were never received"
        self._host.copy_(flags, non_blocking=True)
        if self.device.type == "cuda":
            self._event = torch.cuda.Event()
            self._event.record()
        self._pending = step

    def receive(self) -> Optional[StepFlags]:
        if self._pending is None:
            return None
        if self._event is not None:
            self._event.synchronize()  # the copy only, not the device's queue
        nonfinite, stop = self._host.numpy().tolist()  # host memory the copy filled: no device read
        flags, self._pending = StepFlags(self._pending, nonfinite == 0, stop > 0), None
        return flags


@dataclass
class StepOutput:
    losses: dict[str, torch.Tensor]  # the loss and its terms (detached, on the device)
    logit_scale: torch.Tensor  # detached, float
    logit_bias: Optional[torch.Tensor]
    lr: float  # the learning rate of this step's update (the schedule has moved on when it returns)
    # where asked (a log step) and DeepSpeed keeps none (ZeRO-0): the norm of the averaged gradient
    # before clipping, on the device
    grad_norm: Optional[torch.Tensor] = None
    _: KW_ONLY
    part_lrs: Optional[dict] = None  # with per-part optimizer groups: each part's rate for this update


class ContrastiveStep:
    """``engine``: a ``pretrain.engine.Engine``; ``flags``: the trainer's ``FlagChannel``; ``masked``:
    the modalities a sample may lack; ``seed``: ``train.seed``; ``device_transforms``: modality ->
    its decoder's ``device_transform`` (``Modalities.device_transforms()``)."""

    def __init__(self, engine, loss_fn, flags: FlagChannel, *, dtype: torch.dtype, stop_signal,
                 masked: frozenset[str] = frozenset(), seed: int = 0, device_transforms: Optional[dict] = None):
        self.device_transforms = dict(device_transforms or {})
        self._norm_wanted, self._norm = False, None  # this step measures the gradient norm (ZeRO-0 log steps)
        self.engine, self.loss_fn, self.flags = engine, loss_fn, flags
        self.model = engine.module
        # the objective's parameters' outputs with one row per sample (accumulation concatenates them)
        self.per_sample = getattr(getattr(self.model, "objective", None), "per_sample", frozenset())
        self.seed = seed
        self.device, self.dtype, self.stop_signal, self.masked = flags.device, dtype, stop_signal, masked
        loss_fn.check_finite = False  # the step guards finiteness itself, without reading the device
        self.world = dist.get_world_size()
        self._flags: Optional[torch.Tensor] = None  # this step's [nonfinite, stop], agreed over the ranks
        self._scales: tuple = (None, None)
        # BatchNorm's running statistics: a forward updates them, so a skipped step puts them back
        # (on the device), and the accumulation's replay does not update them a second time
        self.norm_buffers = [b for mod in self.model.modules() if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm)
                             for b in mod.buffers()]
        # every buffer, grouped by dtype: one broadcast each per step (step 5)
        self.buffer_groups = _by_dtype(list(self.model.buffers())) if self.world > 1 else []

    def __call__(self, batches: list, step: int, grad_norm: bool = False) -> StepOutput:
        """``grad_norm``: measure the gradient's norm where DeepSpeed does not (ZeRO-0), for the log."""
        lr, part_lrs = self.engine.lr(), group_lrs(self.engine.optimizer)
        self._norm_wanted, self._norm = grad_norm and self.engine.ds.zero_optimization_stage() == 0, None
        loss_masks = [self.model.loss_masks({m: b.masks[m].to(self.device, non_blocking=True)
                                             for m in self.masked if m in b.masks}) for b in batches]
        saved = [b.clone() for b in self.norm_buffers]
        if len(batches) == 1:
            features, scale, bias, params = self.forward(batches[0], step)
            losses = self.guarded_loss(features, scale, bias, masks=loss_masks[0], step=step, params=params)
            if self.engine.skips_on_device or self._host_finite():
                self._backward(losses["loss"])
                self.engine.step()
            losses = {k: v.detach() for k, v in losses.items()}
        else:
            check = None if self.engine.skips_on_device else (lambda _: self._host_finite())
            losses = accumulate_step(lambda ib: self.forward(ib[1], step, ib[0], len(batches)), list(enumerate(batches)),
                                     self.guarded_loss, masks=loss_masks, backward=self.backward_micro, step=step,
                                     check=check, before_replay=lambda: self._put_back(saved),
                                     per_sample=self.per_sample)
        self._put_back(saved, only_if_skipped=True)
        self._share_buffers()
        if not self.engine.skips_on_device and not self._host_finite():
            self.engine.skip()  # no backward, no update; the schedule stays on the step count
        self.flags.send(step + 1, self._flags)
        scale, bias = self._scales
        return StepOutput(losses, scale, bias, lr, self._norm, part_lrs=part_lrs)

    def forward(self, batch, step: int, micro: int = 0, micros: int = 1):
        """(features as float32, logit scale, logit bias or None, the objective's ``params``) of micro-
        batch ``micro`` of ``micros`` of the step."""
        masks = {m: k.to(self.device, non_blocking=True) for m, k in batch.masks.items()}
        # floating inputs follow the parameters; token ids stay integers
        # (the presence mask only where a sample may lack the modality: its placeholder rows become 0)
        inputs = {m: to_device(x, self.device, self.dtype, self.device_transforms.get(m),
                               masks.get(m) if m in self.masked else None)
                  for m, x in batch.modalities.items()}
        rows = len(batch)  # training batches are full: every rank holds as many
        # rank-major over the step's global batch, as one micro-batch of micros x rows per rank would be
        where = BatchContext(step, self.seed, (dist.get_rank() * micros + micro) * rows, rows, self.world * micros * rows)
        features, scale, bias, params = self.engine.ds(inputs, masks, batch=where)
        features = {m: f.float() for m, f in features.items()}
        params = tree_map(lambda x: x.float() if torch.is_tensor(x) and x.is_floating_point() else x, params)
        scale, bias = scale.float(), None if bias is None else bias.float()
        self._scales = (scale.detach(), None if bias is None else bias.detach())
        return features, scale, bias, params

    def guarded_loss(self, features, scale, bias, *, masks=None, step=None, params=None) -> dict[str, torch.Tensor]:
        """The loss of features that are finite on every rank (zeros stand in where some rank's are
        not, so every rank runs the same collectives); NaN where anything was not finite. Leaves the
        agreed [nonfinite, stop] flags in ``self._flags``."""
        finite = torch.stack([torch.isfinite(x).all() for x in (*features.values(), scale)]).all()
        stopping = torch.full((), float(self.stop_signal.received is not None), device=self.device)
        flags = torch.stack([(~finite).float(), stopping])
        with collective("step flags: finite features, stop signal (all_reduce)"):
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # both flags in one collective
        ok = flags[0] == 0
        features = {m: torch.where(ok, f, torch.zeros_like(f)) for m, f in features.items()}
        scale = torch.where(ok, scale, torch.ones_like(scale))
        bias = None if bias is None else torch.where(ok, bias, torch.zeros_like(bias))
        rows = next(iter(features.values())).shape[0]  # training batches are full: every rank has as many
        out = self.loss_fn(features, scale, bias, masks=masks or None, step=step, sizes=(rows,) * self.world,
                           params=params or None)
        bad = torch.stack([flags[0], (~torch.isfinite(out["loss"].detach())).float()]).max().reshape(1)
        with collective("step flags: finite loss (all_reduce)"):
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # is the loss finite on every rank?
        self._flags = torch.stack([bad[0], flags[1]])
        if self.engine.skips_on_device:
            self.engine.optimizer.found_inf = bad[0]  # the fused update is skipped on the device where 1
        out["loss"] = torch.where(bad[0] == 0, out["loss"], torch.full_like(out["loss"], float("nan")))
        return out

    def _put_back(self, saved: list, only_if_skipped: bool = False) -> None:
        """BatchNorm's running statistics as they were before the step: always, or (on the device, no
        host read) only where the step was skipped."""
        for buf, old in zip(self.norm_buffers, saved):
            buf.copy_(torch.where(self._flags[0] > 0, old, buf) if only_if_skipped else old)

    def _share_buffers(self) -> None:
        """Rank 0's buffers on every rank (DDP's ``broadcast_buffers``), one broadcast per dtype, on the device."""
        for group in self.buffer_groups:
            flat = _flatten_dense_tensors(group)
            with collective("step: rank 0's buffers (broadcast)"):
                dist.broadcast(flat, src=0)
            for buf, value in zip(group, _unflatten_dense_tensors(flat, group)):
                buf.copy_(value)

    def backward_micro(self, surrogate: torch.Tensor) -> None:
        self._backward(surrogate, scale_wrt_gas=False)  # the surrogates sum to the full-batch gradient
        self.engine.step()  # DeepSpeed updates at the last micro-batch of the step

    def _backward(self, loss: torch.Tensor, **kwargs) -> None:
        """The engine's backward; at the step's last micro-batch of a log step under ZeRO-0, the norm
        of the averaged gradient too."""
        last = self.engine.last_micro_batch()
        self.engine.backward(loss, **kwargs)
        if self._norm_wanted and last:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            self._norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else None

    def _host_finite(self) -> bool:
        """For optimizers that cannot skip on the device: the agreed flag, read now."""
        return not bool(self._flags[0] > 0)


def _by_dtype(tensors: list) -> list[list[torch.Tensor]]:
    groups: dict = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    return list(groups.values())
