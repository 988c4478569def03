"""Run outputs: ``metrics.jsonl`` (one JSON object per logged step or evaluation) and TensorBoard
(only rank 0 writes; other ranks hold a writer that does nothing), and the throughput meter.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Optional

from pretrain.flops import StepFlops, peak_flops


class MetricsWriter:
    def __init__(self, output_dir: str | Path, enabled: bool):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.tb_dir = Path(output_dir) / "tensorboard"
        self._tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.tb_dir))
            self._file = open(self.path, "a", buffering=1)

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if math.isfinite(float(v)) else str(float(v))) for k, v in values.items()}
        self._file.write(json.dumps({"step": step, **clean}) + "\n")
        for k, v in values.items():
            self._tb.add_scalar(k, float(v), step)

    def close(self) -> None:
        if self.enabled:
            self._tb.flush()
            self._tb.close()
            self._file.close()


class StepMeter:
    """Throughput since the last ``reset()``: wall time, the share spent waiting for data, samples
    per second and, where the device's peak is known, the first step's FLOPs as TFLOP/s and MFU.

        with meter.waiting(): batches = ...        # data wait
        with meter.stepping(samples=n): step(...)  # a step of n samples (all ranks)
    """

    def __init__(self, peak_tflops: float, precision: str, device):
        self.peak = peak_flops(peak_tflops, precision, device)
        self.flops: Optional[int] = None  # of the first step, on this rank
        self.reset()

    def reset(self) -> None:
        self.start, self.wait, self.samples, self.steps = time.perf_counter(), 0.0, 0, 0

    @contextlib.contextmanager
    def waiting(self):
        t0 = time.perf_counter()
        yield
        self.wait += time.perf_counter() - t0

    @contextlib.contextmanager
    def stepping(self, samples: int):
        if self.peak is not None and self.flops is None:
            with StepFlops() as counter:
                yield
            self.flops = counter.flops
        else:
            yield
        self.samples += samples
        self.steps += 1

    def figures(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {"data_wait_fraction": self.wait / elapsed, "samples_per_s": self.samples / elapsed}
        if self.flops:
            step_time = elapsed / max(1, self.steps)
            out["tflops_per_device"] = self.flops / step_time / 1e12
            out["mfu"] = self.flops / step_time / self.peak
        return out
