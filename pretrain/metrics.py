"""Run outputs: ``metrics.jsonl`` (one JSON object per logged step or evaluation) and TensorBoard.

Only rank 0 writes; other ranks hold a writer that does nothing.
"""
from __future__ import annotations

import json
import math
from pathlib import Path


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
