"""Run outputs: ``metrics.jsonl`` (one JSON object per logged step or evaluation), TensorBoard and,
when ``train.wandb.project`` is set, Weights & Biases (only rank 0 writes; other ranks hold a
writer that does nothing), and the throughput meter.
"""
from __future__ import annotations

import contextlib
import json
import math
import secrets
import string
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from pretrain.flops import StepFlops, peak_flops
from pretrain.options import ConfigError, require

WANDB_RUN_ID = "wandb_run_id"  # in the run folder: the wandb run a resumed run continues


@dataclass
class WandbConfig:
    """``train.wandb.*``: Weights & Biases beside metrics.jsonl and TensorBoard (the ``wandb`` extra).
    Off unless ``project`` is set. The run's files go under ``output_dir/wandb/``; its id is kept in
    ``output_dir/wandb_run_id``, so a resumed run continues the same wandb run."""

    project: Optional[str] = None  # unset or empty: wandb off
    entity: Optional[str] = None  # user or team (default: wandb's default entity)
    name: Optional[str] = None  # the run's display name (default: the run folder's name)
    tags: list[str] = field(default_factory=list)
    mode: Optional[Literal["online", "offline"]] = None  # unset: WANDB_MODE, else online

    @property
    def enabled(self) -> bool:
        return bool(self.project)

    def check(self, key: str = "train.wandb") -> None:
        if self.project:
            bad = sorted(set("/\\#?%:") & set(self.project))
            require(not bad, f"{key}.project", f"cannot contain {' '.join(bad)}, got {self.project!r}")
            require(len(self.project) <= 128, f"{key}.project", "at most 128 characters")
        for i, tag in enumerate(self.tags):
            require(1 <= len(tag) <= 64, f"{key}.tags[{i}]", f"must be 1 to 64 characters, got {tag!r}")


class MetricsWriter:
    """``log(step, values)`` writes the same scalars, at the same step, to metrics.jsonl, TensorBoard
    and (``wandb`` enabled) Weights & Biases, whose config is ``run_config`` (the resolved recipe)."""

    def __init__(self, output_dir: str | Path, enabled: bool, wandb: Optional[WandbConfig] = None,
                 run_config: Optional[dict] = None):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.tb_dir = Path(output_dir) / "tensorboard"
        self._tb = None
        self._wandb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            if wandb is not None and wandb.enabled:
                self._wandb = _start_wandb(wandb, Path(output_dir), run_config or {})
            self._tb = SummaryWriter(str(self.tb_dir))
            self._file = open(self.path, "a", buffering=1)

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if math.isfinite(float(v)) else str(float(v))) for k, v in values.items()}
        self._file.write(json.dumps({"step": step, **clean}) + "\n")
        for k, v in values.items():
            self._tb.add_scalar(k, float(v), step)
        if self._wandb is not None:  # NaN and +-inf as floats: wandb records them as such
            self._wandb.log({k: float(v) for k, v in values.items()}, step=step)

    def close(self) -> None:
        if self.enabled:
            self._tb.flush()
            self._tb.close()
            self._file.close()
            if self._wandb is not None:
                self._wandb.finish()
                self._wandb = None


def _start_wandb(cfg: WandbConfig, output_dir: Path, run_config: dict):
    """``wandb.init`` for this run folder: a new run, or the one ``output_dir/wandb_run_id`` names."""
    try:
        import wandb
    except ImportError:
        raise ConfigError("train.wandb.project: Weights & Biases logging needs the wandb package: "
                          "pip install -e '.[wandb]' (or leave train.wandb.project unset)") from None
    id_file = output_dir / WANDB_RUN_ID
    run_id = id_file.read_text().strip() if id_file.is_file() else ""
    if not run_id:
        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # wandb's form
        id_file.write_text(run_id + "\n")
    kwargs = {"entity": cfg.entity} if cfg.entity else {}
    if cfg.mode:
        kwargs["mode"] = cfg.mode
    return wandb.init(project=cfg.project, name=cfg.name or output_dir.resolve().name, tags=list(cfg.tags),
                      config=run_config, dir=str(output_dir), id=run_id, resume="allow", **kwargs)


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
