"""The trainer: every part built once from a checked ``Config``, and a loop that reads on one screen.

    trainer = Trainer(cfg)      # process group, decoders, model, loss, engine, loader, resume
    trainer.train()             # next batch, step, maybe log, maybe evaluate, maybe save, stop?

Each part owns its cadence: the logger decides which steps log (``train.log_every``), the
periodic evaluation which steps evaluate (``eval.every``), the checkpointer which steps save
(``train.checkpoint_every``, the last one, a stop). ``ContrastiveStep`` (``pretrain.step``) is one
step; ``TrainState`` is everything a checkpoint holds beside the engine.
"""
from __future__ import annotations

import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import yaml

from pretrain.checkpoint import CheckpointConfig, Checkpointer, previous_global_batch, previous_layout
from pretrain.checkpoint_writer import BackgroundWriter
from pretrain.data import Loader, build_modalities, make_loader
from pretrain.distributed import (
    COLLECTIVES,
    StopSignal,
    barrier,
    collective,
    init_distributed,
    mean_over_ranks,
    rng_state,
    seed_everything,
    set_rng_state,
)
from pretrain.ema import EmaConfig, WeightEma
from pretrain.engine import EngineConfig, build_engine, construction
from pretrain.evaluation import evaluate, format_metrics
from pretrain.metrics import MetricsWriter, StepMeter, WandbConfig
from pretrain.models import build_model
from pretrain.optim import OptimConfig
from pretrain.remote import RemoteSync, RemoteSyncConfig
from pretrain.options import ConfigError, require, to_dict
from pretrain.step import ContrastiveStep, FlagChannel, StepFlags, StepOutput
from pretrain.watchdog import Heartbeat

# DeepSpeed's ZeRO partitioning calls a torch collective that torch now marks deprecated.
warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite losses, a checkpoint that does not fit, ...)."""


@dataclass(kw_only=True)  # built from the config by name
class TrainConfig(CheckpointConfig, EngineConfig, OptimConfig):
    """``train.*``: the loop's fields here, the optimizer's (``OptimConfig``), the engine's
    (``EngineConfig``) and the checkpoints' (``CheckpointConfig``) beside their code, one flat
    section; ``train.wandb.*`` (``WandbConfig``, beside the metrics writer) is its one subsection."""

    steps: int = 100
    micro_batch_size: int = 32
    grad_accumulation_steps: int = 1  # micro-batches per step; negatives span all of them (exact feature caching)
    seed: int = 0
    global_batch_size: int = 0  # if set, must equal micro_batch_size x grad_accumulation_steps x world size
    log_every: int = 10
    log_keys: bool = False  # write the sample keys of every step to output_dir/keys/rank{r}.jsonl
    stop_at_step: int = 0  # end this run early at that step with a checkpoint (schedule unchanged)
    peak_tflops: float = 0.0  # one device's peak for the MFU metric (0: known GPUs' datasheet value; CPU: none)
    max_nonfinite_steps: int = 5  # consecutive non-finite losses (steps skipped) before the run stops
    # seconds a rank may go unheard (stopped, frozen, lost) before the job ends naming it; collectives
    # themselves time out at twice this (pretrain.watchdog). 0: torch's default (30 minutes), no watchdog
    collective_timeout: float = 300.0
    wandb: WandbConfig = field(default_factory=WandbConfig)  # Weights & Biases (off unless wandb.project is set)
    ema: Optional[EmaConfig] = None  # {decay, every, start}: a moving average of the weights (pretrain.ema)
    remote_sync: Optional[RemoteSyncConfig] = None  # {url, every}: the run folder mirrored to object storage (pretrain.remote)

    def check(self, key: str = "train") -> None:
        require(self.steps > 0, f"{key}.steps", f"must be > 0, got {self.steps}")
        require(self.micro_batch_size > 0, f"{key}.micro_batch_size", f"must be > 0, got {self.micro_batch_size}")
        require(self.grad_accumulation_steps >= 1, f"{key}.grad_accumulation_steps",
                f"must be >= 1, got {self.grad_accumulation_steps}")
        require(self.log_every > 0, f"{key}.log_every", f"must be > 0, got {self.log_every}")
        require(self.stop_at_step >= 0, f"{key}.stop_at_step", f"must be >= 0, got {self.stop_at_step}")
        require(self.max_nonfinite_steps >= 1, f"{key}.max_nonfinite_steps",
                f"must be >= 1, got {self.max_nonfinite_steps}")
        require(self.peak_tflops >= 0, f"{key}.peak_tflops", f"must be >= 0, got {self.peak_tflops}")
        require(self.global_batch_size >= 0, f"{key}.global_batch_size", f"must be >= 0, got {self.global_batch_size}")
        require(self.collective_timeout >= 0, f"{key}.collective_timeout",
                f"must be >= 0 seconds (0: no watchdog), got {self.collective_timeout}")
        self.check_optim(key)
        self.check_engine(key)
        self.check_checkpoint(key)
        self.wandb.check(f"{key}.wandb")
        require(self.optimizer != "lamb" or self.zero_stage in (0, "auto"), f"{key}.optimizer",
                "lamb computes a trust ratio per parameter, which ZeRO stages 1-3 cut into flat partitions: "
                f"use {key}.zero_stage=0 with lamb")

    @property
    def end_step(self) -> int:
        return min(self.steps, self.stop_at_step) if self.stop_at_step else self.steps


class TrainState:
    """What a checkpoint saves beside the engine, per rank: the step, the skip counters, the data
    loader's position and the random streams."""

    def __init__(self, loader: Loader, ema: Optional[WeightEma] = None):
        self.loader, self.ema = loader, ema
        self.step = 0
        self.skipped_steps = 0  # steps skipped for a non-finite loss, over the whole run
        self.nonfinite_in_row = 0

    def record(self, finite: bool) -> None:
        """A step's outcome (its update happened or was skipped), known on the host."""
        self.skipped_steps += not finite
        self.nonfinite_in_row = 0 if finite else self.nonfinite_in_row + 1

    def state_dict(self) -> dict:
        return {"step": self.step, "skipped_steps": self.skipped_steps, "nonfinite_in_row": self.nonfinite_in_row,
                "loader": self.loader.state_dict(), "rng": rng_state(),
                "ema": self.ema.state_dict() if self.ema is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))  # checkpoints of earlier versions lack them
        self.nonfinite_in_row = int(state.get("nonfinite_in_row", 0))
        self.loader.load_state_dict(state["loader"])  # the data stream continues where it stopped
        set_rng_state(state["rng"])
        if self.ema is not None and state.get("ema"):  # (a run that had none starts it from the weights)
            self.ema.load_state_dict(state["ema"])

    def layout_changed(self, state: dict) -> bool:
        """Whether this rank's saved state comes from another number of ranks or loader workers."""
        return self.loader.layout_changed(state["loader"])

    def load_layout(self, saved: list[dict], step: int) -> None:
        """Continues from every old rank's saved state on this layout: the step and skip counters
        (the same on every rank), the data position dealt to the new ranks
        (``pretrain.data.pipeline.relayout``), the random streams of the rank of the same number
        where there was one."""
        self.step = step
        self.skipped_steps = int(saved[0].get("skipped_steps", 0))
        self.nonfinite_in_row = int(saved[0].get("nonfinite_in_row", 0))
        self.loader.load_layout([s["loader"] for s in saved])
        rank = self.loader.dataset.spec.rank
        if rank < len(saved):
            set_rng_state(saved[rank]["rng"])
        if self.ema is not None and saved[0].get("ema"):
            self.ema.load_layout([s["ema"] for s in saved])


class StepLogger:
    """Logs every ``train.log_every`` steps and the last: the rank-mean loss and its terms, the
    schedule, throughput and MFU, the bad-data counts; to metrics.jsonl, TensorBoard and stdout."""

    def __init__(self, cfg: TrainConfig, writer: MetricsWriter, meter: StepMeter, *, engine, loader: Loader,
                 global_batch: int, rank: int):
        self.cfg, self.writer, self.meter, self.engine = cfg, writer, meter, engine.ds
        self.loader, self.global_batch, self.rank = loader, global_batch, rank
        self.last: dict[str, float] = {}

    def should_log(self, step: int) -> bool:
        return step % self.cfg.log_every == 0 or step == self.cfg.end_step

    def log(self, state: TrainState, out: StepOutput) -> dict[str, float]:
        """Collective (every rank calls it at the same steps)."""
        window = self.meter.figures()
        values = {k: float(v) for k, v in out.losses.items()}
        values["data_wait_fraction"] = window.pop("data_wait_fraction")
        values = mean_over_ranks(values)
        values.update(window, global_batch=float(self.global_batch), lr=out.lr,
                      temperature=1.0 / float(out.logit_scale), skipped_steps=float(state.skipped_steps))
        values.update({f"lr/{part}": lr for part, lr in (out.part_lrs or {}).items()})
        grad_norm = self.engine.get_global_grad_norm() if hasattr(self.engine, "get_global_grad_norm") else None
        grad_norm = out.grad_norm if grad_norm is None else grad_norm  # ZeRO-0: the step measured it
        if grad_norm is not None:
            values["grad_norm"] = float(grad_norm)
        if out.logit_bias is not None:
            values["logit_bias"] = float(out.logit_bias)
        with collective("bad-data counts (all_gather_object)"):
            values.update(self.loader.metrics(all_ranks=True))  # bad-data counts by reason, summed over ranks
        self.writer.log(state.step, values)
        self.meter.reset()
        if self.rank == 0:
            print(f"[train] step {state.step}/{self.cfg.steps} loss {values['loss']:.4f} lr {values['lr']:.2e} "
                  f"T {values['temperature']:.4f} {values['samples_per_s']:.0f} samples/s "
                  f"data wait {100 * values['data_wait_fraction']:.1f}%", flush=True)
        self.last = values
        return values


class PeriodicEvaluation:
    """Held-out evaluation every ``eval.every`` steps and at the end (when ``data.val.urls`` is set)."""

    def __init__(self, cfg, model, device: torch.device, output_dir: Path, ema: Optional[WeightEma] = None):
        self.cfg, self.model, self.device, self.output_dir, self.ema = cfg, model, device, output_dir, ema
        self.enabled = cfg.eval.enabled and bool(cfg.data.val.urls)
        self.modalities = build_modalities(cfg.data, train=False) if self.enabled else None

    def should_run(self, step: int, end_step: int) -> bool:
        every = self.cfg.eval.every
        return self.enabled and bool(every) and step % every == 0 and step < end_step

    def run(self, step: int) -> dict[str, float]:
        """The metrics of the weights, and with ``train.ema`` those of the average as ``eval/ema/...``."""
        metrics = evaluate(self.model, self.cfg, self.modalities, self.device, step=step, output_dir=self.output_dir)
        if self.ema is not None:
            with self.ema.swapped():
                averaged = evaluate(self.model, self.cfg, self.modalities, self.device, step=step)
            metrics.update({f"eval/ema/{k[len('eval/'):]}": v for k, v in averaged.items() if k.startswith("eval/")})
        return metrics


class KeyLog:
    """``train.log_keys``: every step's sample keys of this rank, in ``output_dir/keys/rank{r}.jsonl``:
    ``{"step", "keys", "epochs"}``, the epoch each sample was read in beside its key."""

    def __init__(self, enabled: bool, output_dir: Path, rank: int, append: bool):
        self.file = None
        if enabled:
            (output_dir / "keys").mkdir(parents=True, exist_ok=True)
            self.file = open(output_dir / "keys" / f"rank{rank}.jsonl", "a" if append else "w")

    def write(self, step: int, batches: list) -> None:
        if self.file is not None:
            epochs = [e for b in batches for e in (b.epochs or [-1] * len(b.keys))]
            self.file.write(json.dumps({"step": step, "keys": [k for b in batches for k in b.keys], "epochs": epochs}) + "\n")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _refuse_own_weights_when_partitioned(cfg) -> None:
    """``train.zero3_init`` builds towers partitioned; towers that read weights files themselves while
    being built (timm ``pretrained``, transformers folders) cannot: their weights come through
    ``model.init_from`` (gathered while they load) or without ``zero3_init``."""
    if not cfg.train.zero3_init:
        return
    for m, tower in cfg.model.towers.items():
        o = tower.options or {}
        loads = bool(o.get("pretrained")) if tower.type == "timm" else bool(o.get("path")) and o.get("pretrained", True)
        if loads:
            raise ConfigError(f"train.zero3_init: model.towers.{m} loads its weights while it is built, which a "
                              f"partitioned build cannot; use model.init_from, or train.zero3_init=false")


def _fit_global_batch(t: TrainConfig, world: int, before: Optional[int]) -> str:
    """``train.global_batch_size``: checked on a fresh start; on a resume (``before``: the global batch
    of the checkpoint resumed) a target, kept on another number of ranks by the accumulation steps
    (the micro-batch, hence the memory, stays). Returns what the start line should say ("" if
    nothing changed)."""
    now = t.micro_batch_size * t.grad_accumulation_steps * world
    if not t.global_batch_size:
        return f"global batch {before} -> {now}" if before is not None and before != now else ""
    if t.global_batch_size == now:
        return ""
    per = t.micro_batch_size * world
    if before is None or t.global_batch_size % per:
        how = (f"on resume it is kept by train.grad_accumulation_steps, which needs a multiple of micro_batch_size "
               f"{t.micro_batch_size} x world size {world} = {per}" if before is not None else
               f"micro_batch_size {t.micro_batch_size} x grad_accumulation_steps {t.grad_accumulation_steps} x world "
               f"size {world} = {now}")
        raise ConfigError(f"train.global_batch_size: {t.global_batch_size} asked, but {how}")
    old = t.grad_accumulation_steps
    t.grad_accumulation_steps = t.global_batch_size // per
    return (f"global batch {t.global_batch_size} kept: train.grad_accumulation_steps {old} -> "
            f"{t.grad_accumulation_steps} on {world} ranks")


def _auto_zero_stage(cfg, info, ckpt_dir: Path) -> str:
    """``train.zero_stage: auto``: sets the stage and returns the line that says which and why. A
    resume on as many ranks keeps the stage of the checkpoint it resumes; otherwise rank 0 asks the
    plan (``pretrain.plan.choose_stage``) for this world size and the smallest memory of any rank (a
    GPU's, or the machine's divided among its local ranks) and every rank takes its answer."""
    from pretrain.plan import choose_stage, local_capacity, stage_refusal

    t, world = cfg.train, info.world_size
    found = previous_layout(t, ckpt_dir)
    if found is not None and found[1].world_size == world and not stage_refusal(t, found[1].zero_stage):
        t.zero_stage = found[1].zero_stage
        return f"ZeRO-{t.zero_stage}: the stage of the checkpoint it resumes ({found[0].name}, {world} ranks)"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    capacity, device = local_capacity(local, info.device)
    smallest = torch.tensor([float(capacity)], dtype=torch.float64, device=info.device)
    dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
    answer: list = [None, None]
    if info.rank == 0:
        try:
            answer = list(choose_stage(cfg, world, local, int(smallest.item()), device))
        except Exception as err:  # noqa: BLE001 - every rank must hear of it, not wait for an answer
            answer = [None, f"{type(err).__name__}: {err}"]
    dist.broadcast_object_list(answer, src=0)
    if answer[0] is None:
        raise TrainingError(f"train.zero_stage auto: the plan could not choose a stage ({answer[1]}); name a stage "
                            "(0-3) instead")
    t.zero_stage = int(answer[0])
    return str(answer[1])


class Trainer:
    def __init__(self, cfg):
        self.cfg, t = cfg, cfg.train
        self.out = Path(cfg.output_dir)
        # a hung rank ends the job; every live rank writes where it stood to output_dir/hang (pretrain.watchdog)
        self.info = info = init_distributed(timeout=2 * t.collective_timeout or None, hang_dir=self.out / "hang")
        self.rank, self.world = info.rank, info.world_size
        self.heartbeat = Heartbeat(self.rank, self.world, t.collective_timeout, hang_dir=self.out / "hang").start()
        self.remote = RemoteSync.begin(t, self.out, self.rank)  # a newer remote checkpoint fetched for the resume
        self.batch_note = _fit_global_batch(t, self.world, previous_global_batch(t, self.out / "checkpoints"))
        self.global_batch = t.micro_batch_size * t.grad_accumulation_steps * self.world
        if t.zero_stage == "auto":  # before config.yaml is written: it records the stage chosen
            why = _auto_zero_stage(cfg, info, self.out / "checkpoints")
            if self.rank == 0:
                print(f"[train] train.zero_stage auto -> {why}", flush=True)
        self._prepare_run_folder()
        self.stop_signal = StopSignal()
        self.stopped_by: Optional[str] = None  # set when a signal ended the run before its last step
        seed_everything(t.seed)
        modalities = build_modalities(cfg.data, train=True)
        loss_fn = cfg.loss.build()
        _refuse_own_weights_when_partitioned(cfg)
        with construction(t, self.world):  # ZeRO-3 with train.zero3_init: partitioned as it is built
            model = build_model(cfg.model, modalities, objective=loss_fn)  # and the parameters the loss owns
        self.engine = build_engine(model, t, self.world)
        self.loader = make_loader(cfg.data.train, modalities, cfg.data, t.micro_batch_size, self.rank, self.world,
                                  t.seed, train=True)
        self.ema = (WeightEma(self.engine.module, t.ema, self.rank, self.world, t.zero_stage == 3)
                    if t.ema is not None else None)
        self.state = TrainState(self.loader, self.ema)
        # train.async_checkpoint: a failed background save stops every rank at the next step, as a signal does
        writer = (BackgroundWriter(self.engine.ds, self.rank, self.world, on_failure=self.stop_signal.ask)
                  if t.checkpoint and t.async_checkpoint else None)
        self.checkpointer = Checkpointer(t, self.out / "checkpoints", self.engine, self.rank, writer=writer)
        try:
            self.resumed_from = self.checkpointer.resume(self.state)
        except RuntimeError as err:
            raise TrainingError(str(err)) from None
        self.remote.start()  # rank 0 uploads in the background from here on
        self.batches = iter(self.loader)
        masked = frozenset(m for m, mc in cfg.data.modalities.items() if not mc.required)  # may be absent
        self.flags = FlagChannel(info.device)  # each step's outcome on its way to the host (pretrain.step)
        self.step = ContrastiveStep(self.engine, loss_fn, self.flags, dtype=t.dtype, stop_signal=self.stop_signal,
                                    masked=masked, seed=t.seed, device_transforms=modalities.device_transforms())
        self.writer = MetricsWriter(self.out, enabled=self.rank == 0, wandb=t.wandb, run_config=to_dict(cfg))
        self.meter = StepMeter(t.peak_tflops, t.precision, info.device)
        self.logger = StepLogger(t, self.writer, self.meter, engine=self.engine, loader=self.loader,
                                 global_batch=self.global_batch, rank=self.rank)
        self.evaluation = PeriodicEvaluation(cfg, self.engine.module, info.device, self.out, ema=self.ema)
        self.keys = KeyLog(t.log_keys, self.out, self.rank, append=self.resumed_from is not None)

    def train(self) -> dict[str, float]:
        """The loop: next batch, step, maybe log, maybe evaluate, maybe save, stop? A collective past the
        process group's timeout raises ``HangError`` once every live rank has written where it stood."""
        state, end = self.state, self.cfg.train.end_step
        self._announce()
        self.progress = self._progress_bar(end)
        with self.heartbeat.timeouts():  # (pretrain.watchdog)
            while state.step < end:
                COLLECTIVES.step = state.step + 1  # the step the collectives of this round belong to
                with self.meter.waiting():
                    batches = [next(self.batches) for _ in range(self.cfg.train.grad_accumulation_steps)]
                earlier = self.flags.receive()  # the step before's outcome: its copy is long done, nothing waits
                with self.meter.stepping(samples=sum(len(b) for b in batches) * self.world):
                    out = self.step(batches, state.step, grad_norm=self.logger.should_log(state.step + 1))
                state.step += 1
                if self.ema is not None:  # (masked on the device where the update was skipped there)
                    found_inf = self.engine.optimizer.found_inf if self.engine.skips_on_device else None
                    self.ema.update(state.step, found_inf)
                self._after_step(batches)
                stop = self._settle(earlier)
                if self._needs_flags(state.step, end):  # log, evaluation, checkpoint, end: this step's, now
                    stop = self._settle(self.flags.receive()) or stop
                if self.logger.should_log(state.step):
                    self.logger.log(state, out)
                if stop:
                    return self._finish(stopped_by=self.stop_signal.received or "a signal on another rank")
                if self.evaluation.should_run(state.step, end):
                    self.writer.log(state.step, self.evaluation.run(state.step))
                    self.meter.reset()  # evaluation time is not step time
                self.checkpointer.save(state)
            return self._finish()

    # -- the parts of the loop

    def _after_step(self, batches: list) -> None:
        """The key log and the progress bar."""
        self.keys.write(self.state.step, batches)
        if self.progress is not None:
            self.progress.update(1)

    def _settle(self, flags: Optional[StepFlags]) -> bool:
        """A step's flags, once on the host: the skip policy (skipped steps counted, K in a row stop
        the run); returns whether some rank had a stop signal."""
        if flags is None:
            return False
        state, limit = self.state, self.cfg.train.max_nonfinite_steps
        state.record(flags.finite)
        if not flags.finite:
            if self.rank == 0:
                print(f"[train] step {flags.step}: non-finite loss, step skipped ({state.nonfinite_in_row} in a row)",
                      flush=True)
            if state.nonfinite_in_row >= limit:
                raise TrainingError(
                    f"{state.nonfinite_in_row} consecutive steps with a non-finite loss (train.max_nonfinite_steps="
                    f"{limit}): lower train.lr, raise model.init_temperature, use fp32, or check the data")
        return flags.stop

    def _needs_flags(self, step: int, end: int) -> bool:
        """Steps where the host must know this step's flags now: it logs, evaluates, saves or ends."""
        return (self.logger.should_log(step) or self.evaluation.should_run(step, end)
                or self.checkpointer.due(step) or step >= end)

    def _finish(self, stopped_by: Optional[str] = None) -> dict[str, float]:
        """The last checkpoint, the final evaluation (a finished run), the closing lines."""
        if self.progress is not None:
            self.progress.close()
        self._settle(self.flags.receive())  # the last step's flags (a stop may have come with an earlier step's)
        self.checkpointer.save(self.state, last=True)
        self.keys.close()
        results = {"loss": self.logger.last.get("loss", float("nan"))}
        self.stopped_by = stopped_by if self.state.step < self.cfg.train.end_step else None  # (exit code 75)
        if stopped_by is not None:
            self.checkpointer.wait()  # a background save: complete (or its failure raised) before the line below
            if self.rank == 0 and self.cfg.train.checkpoint:
                print(f"[train] stopped by {stopped_by} at step {self.state.step}; resume with the same command",
                      flush=True)
        elif self.evaluation.enabled and self.state.step >= self.cfg.train.steps:
            results.update(self._final_evaluation())  # (a background save goes on meanwhile)
        self.checkpointer.wait()  # the end of the run waits for the last save
        if self.rank == 0 and stopped_by is None:
            print(f"[train] tensorboard logs: {self.writer.tb_dir}  (tensorboard --logdir {self.writer.tb_dir})",
                  flush=True)
            print(f"[train] metrics: {self.writer.path}", flush=True)
        self.writer.close()
        self.remote.close(stopped=stopped_by is not None)  # the last upload (every rank waits with rank 0)
        barrier("end of the run")
        self.heartbeat.stop()
        if self.stopped_by is not None and not self.cfg.train.checkpoint:  # exit code 1, not 75
            raise TrainingError(f"stopped by {stopped_by} at step {self.state.step}; train.checkpoint is false, so "
                                "nothing was saved: the same command starts over")
        return results

    def _final_evaluation(self) -> dict[str, float]:
        step = self.state.step
        metrics = self.evaluation.run(step)
        self.writer.log(step, metrics)
        if self.rank == 0:
            (self.out / "eval.json").write_text(json.dumps({"step": step, **metrics}, indent=1) + "\n")
            print(format_metrics(metrics), flush=True)
            print(f"[eval] all metrics: {self.out / 'eval' / f'step{step:06d}.json'}; plots: "
                  f"{self.out / 'eval' / 'index.html'}", flush=True)
        return metrics

    # -- set-up

    def _prepare_run_folder(self) -> None:
        """The run's config.yaml (rank 0) and what each rank saw of the job (``ranks/rank{r}.json``)."""
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
        barrier("run folder made")
        import deepspeed

        (self.out / "ranks").mkdir(exist_ok=True)
        record = {"rank": self.rank, "world_size": self.world, "local_rank": self.info.local_rank,
                  "backend": dist.get_backend(), "device": str(self.info.device), "pid": os.getpid(),
                  "host": os.uname().nodename, "python": sys.version.split()[0], "torch": torch.__version__,
                  "deepspeed": deepspeed.__version__}
        (self.out / "ranks" / f"rank{self.rank}.json").write_text(json.dumps(record, indent=1) + "\n")

    def _announce(self) -> None:
        if self.rank == 0:
            t = self.cfg.train
            resumed = f" resumed_from={self.resumed_from} at step {self.state.step}" if self.resumed_from else ""
            if self.checkpointer.changed_layout:
                resumed += f" on another layout ({self.checkpointer.changed_layout})"
            if self.batch_note:
                resumed += f"; {self.batch_note}"
            print(f"[train] world_size={self.world} micro_batch={t.micro_batch_size} accumulation="
                  f"{t.grad_accumulation_steps} global_batch={self.global_batch} steps={t.steps} zero_stage="
                  f"{t.zero_stage} precision={t.precision} device={self.info.device}{resumed}", flush=True)

    def _progress_bar(self, end: int):
        if self.rank != 0 or not sys.stdout.isatty():
            return None
        from tqdm import tqdm

        return tqdm(total=end, initial=self.state.step, desc="train", unit="step")
