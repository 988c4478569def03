"""One contrastive training step under a DeepSpeed engine: ``ContrastiveStep``.

The contract: ``step(batches, step_index) -> StepOutput`` takes the step's micro-batches (one per
``train.grad_accumulation_steps``, each a ``pretrain.data.Batch`` of this rank) and

1. moves each batch to the device, casts floating inputs to the engine's precision (token ids stay
   integers) and encodes it: L2-normalised features per modality, the logit scale and bias;
2. checks, in one collective, whether every rank's features and scale are finite and whether any
   rank received a stop signal. If some rank's features are not finite, every rank takes a NaN
   loss and none enters the loss's collectives;
3. computes the loss with the model's loss masks (towers with a missingness indicator encode
   absent samples themselves, so those rows take part); with several micro-batches, through the
   exact feature-caching helper ``pretrain.losses.accumulate_step`` (negatives span every
   micro-batch, the temperature's gradient is counted once);
4. agrees over the ranks (one collective) whether the loss is finite. If it is, it backpropagates
   and lets DeepSpeed update (one micro-step per micro-batch); if not, nothing is updated on any
   rank and only the schedule advances, so the learning rate stays on the step count.

``StepOutput.stop`` is True on every rank when any rank has received a stop signal (the loop
saves and returns at this step boundary).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from pretrain.losses import accumulate_step


@dataclass
class StepOutput:
    finite: bool  # the update happened (False: skipped on every rank)
    losses: dict[str, torch.Tensor]  # the loss and its terms (detached)
    logit_scale: torch.Tensor  # detached, float
    logit_bias: Optional[torch.Tensor]
    stop: bool  # some rank received a stop signal
    lr: float  # the learning rate of this step's update (the schedule has moved on when it returns)


class ContrastiveStep:
    def __init__(self, engine, scheduler, loss_fn, device: torch.device, dtype: torch.dtype, stop_signal):
        self.engine, self.scheduler, self.loss_fn = engine, scheduler, loss_fn
        self.model = engine.module
        self.device, self.dtype, self.stop_signal = device, dtype, stop_signal
        self._stop = False
        self._finite = True
        self._scales: tuple = (None, None)

    def __call__(self, batches: list, step: int) -> StepOutput:
        self._stop = False
        lr = self.scheduler.get_last_lr()[0]
        loss_masks = [self.model.loss_masks({m: k.to(self.device) for m, k in b.masks.items()}) for b in batches]
        if len(batches) == 1:
            features, scale, bias = self.forward(batches[0])
            losses = self.guarded_loss(features, scale, bias, masks=loss_masks[0], step=step)
            if self.agree_finite(losses):
                self.engine.backward(losses["loss"])
                self.engine.step()
            losses = {k: v.detach() for k, v in losses.items()}
        else:
            losses = accumulate_step(self.forward, batches, self.guarded_loss, masks=loss_masks,
                                     backward=self.backward_micro, step=step, check=self.agree_finite)
        if not self._finite:
            self.scheduler.step()  # no backward, no update; the schedule stays on the step count
        scale, bias = self._scales
        return StepOutput(self._finite, losses, scale, bias, self._stop, lr)

    def forward(self, batch):
        """(features as float32, logit scale, logit bias or None) of one micro-batch."""
        inputs = {m: x.to(self.device, non_blocking=True) for m, x in batch.modalities.items()}
        if self.dtype != torch.float32:  # floating inputs follow the parameters; token ids stay integers
            inputs = {m: x.to(self.dtype) if x.is_floating_point() else x for m, x in inputs.items()}
        masks = {m: k.to(self.device, non_blocking=True) for m, k in batch.masks.items()}
        features, scale, bias = self.engine(inputs, masks)
        features = {m: f.float() for m, f in features.items()}
        scale, bias = scale.float(), None if bias is None else bias.float()
        self._scales = (scale.detach(), None if bias is None else bias.detach())
        return features, scale, bias

    def guarded_loss(self, features, scale, bias, masks=None, step=None) -> dict[str, torch.Tensor]:
        """The loss, unless some rank's features are not finite (then NaN on every rank, and no
        rank enters the loss's collectives); also learns whether any rank got a stop signal."""
        finite = torch.stack([torch.isfinite(x).all() for x in (*features.values(), scale)]).all()
        stopping = float(self.stop_signal.received is not None)
        flags = torch.stack([(~finite).float(), torch.tensor(stopping, device=self.device)])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # both flags in one collective
        self._stop = self._stop or bool(flags[1] > 0)
        if flags[0] > 0:
            return {"loss": torch.full((), float("nan"), device=self.device)}
        return self.loss_fn(features, scale, bias, masks=masks, step=step)

    def agree_finite(self, losses: dict[str, torch.Tensor]) -> bool:
        """Is the loss finite on every rank? (one small collective)"""
        flag = (~torch.isfinite(losses["loss"].detach()).all()).float().reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self._finite = not bool(flag[0] > 0)
        return self._finite

    def backward_micro(self, surrogate: torch.Tensor) -> None:
        self.engine.backward(surrogate, scale_wrt_gas=False)  # the surrogates sum to the full-batch gradient
        self.engine.step()  # DeepSpeed updates at the last micro-batch of the step
