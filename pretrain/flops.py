"""Model FLOPs utilisation: FLOPs of one training step, counted once by PyTorch's FLOP counter,
over what the accelerator could do in the step's time.

    mfu = flops_per_step / step_time / peak_flops_per_device

``flops_per_step`` is counted on this rank for the first step (forward, loss and backward as they
ran: with accumulation it includes the extra no-grad forward, with activation checkpointing the
recomputation, so it can read a little above the model's own FLOPs). The peak comes from
``train.peak_tflops`` or, on a known GPU, from its datasheet (dense bf16/fp16, or TF32 for fp32).
"""
from __future__ import annotations

from typing import Optional

import torch

# dense tensor-core peaks (TFLOP/s): (bf16/fp16, tf32), SXM parts
_PEAKS = {"H200": (989.0, 494.5), "H100": (989.0, 494.5), "A100": (312.0, 156.0), "L40S": (362.0, 183.0),
          "A10G": (125.0, 62.5), "L4": (121.0, 60.0), "V100": (125.0, 15.7)}


def peak_flops(configured_tflops: float, precision: str, device: torch.device) -> Optional[float]:
    """Peak FLOP/s of one device, or None when unknown (then no MFU is logged)."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (half, tf32) in _PEAKS.items():
        if key in name:
            return (tf32 if precision == "fp32" else half) * 1e12
    return None


class StepFlops:
    """Counts the FLOPs of the code run inside ``with counter:`` (once)."""

    def __init__(self):
        from torch.utils.flop_counter import FlopCounterMode

        self._mode = FlopCounterMode(display=False)
        self.flops: Optional[int] = None

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        self.flops = int(self._mode.get_total_flops())
        return False
