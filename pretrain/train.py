"""The training entry point: ``python -m pretrain.train --config FILE [key=value ...]``.

The same ``main()`` runs under ``python`` (one process), ``torchrun`` and ``accelerate launch``;
rank and world size come from torch.distributed. A run resumes from the newest complete
checkpoint in its output folder (``train.resume: auto``), saves on SIGTERM/SIGUSR1 before it
exits, and skips (and counts) steps whose loss is not finite.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from pretrain import checkpoint
from pretrain.config import Config, ConfigError, load_config, to_dict
from pretrain.data import make_loader
from pretrain.engine import build_engine, init_distributed
from pretrain.evaluation import format_metrics, run_evaluation
from pretrain.flops import StepFlops, peak_flops
from pretrain.losses import accumulate_step, build_loss
from pretrain.metrics import MetricsWriter
from pretrain.models import build_model

# DeepSpeed's ZeRO partitioning calls a torch collective that torch now marks deprecated.
warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite losses, a checkpoint that does not fit, ...)."""


def parse_args(argv: list[str] | None) -> tuple[str | None, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m pretrain.train", description=__doc__)
    parser.add_argument("--config", help="YAML recipe (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=20")
    args = parser.parse_args(argv)
    return args.config, args.overrides


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    names = sorted(values)
    t = torch.tensor([values[k] for k in names], dtype=torch.float64)
    if dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return dict(zip(names, t.tolist()))


def write_rank_record(out: Path, info) -> None:
    """What each rank saw of the job: rank, world size, backend, versions."""
    import deepspeed

    (out / "ranks").mkdir(exist_ok=True)
    record = {
        "rank": info.rank,
        "world_size": info.world_size,
        "local_rank": info.local_rank,
        "backend": dist.get_backend(),
        "device": str(info.device),
        "pid": os.getpid(),
        "host": os.uname().nodename,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
    }
    (out / "ranks" / f"rank{info.rank}.json").write_text(json.dumps(record, indent=1) + "\n")


class StopSignal:
    """Remembers a SIGTERM/SIGUSR1 (preemption, time limit) so the loop can save and exit cleanly."""

    def __init__(self):
        self.received: str | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name


def _injected_nan(step: int) -> bool:
    """Test hook: PRETRAIN_FAULT=nan_loss:A-B makes rank 0's loss NaN at steps A..B."""
    spec = os.environ.get("PRETRAIN_FAULT", "")
    if not spec.startswith("nan_loss:") or dist.get_rank() != 0:
        return False
    lo, _, hi = spec.split(":", 1)[1].partition("-")
    return int(lo) <= step <= int(hi or lo)


def _injected_death(step: int) -> None:
    """Test hook: PRETRAIN_FAULT=die:R:S makes rank R exit at once (code 13, no clean-up) at step S."""
    spec = os.environ.get("PRETRAIN_FAULT", "")
    if spec.startswith("die:"):
        r, s = spec.split(":")[1:3]
        if dist.get_rank() == int(r) and step == int(s):
            print(f"[train] rank {r}: injected death at step {s}", flush=True)
            os._exit(13)


def _resolve_resume(cfg: Config, ckpt_dir: Path) -> Path | None:
    mode = cfg.train.resume
    if mode == "none":
        return None
    if mode == "auto":
        return checkpoint.latest_complete(ckpt_dir)
    folder = Path(mode)
    if not (folder / checkpoint.COMPLETE).is_file():
        raise ConfigError(f"train.resume: {folder} is not a complete checkpoint folder")
    return folder


def train(cfg: Config) -> dict[str, float]:
    info = init_distributed()
    rank, world = info.rank, info.world_size
    t = cfg.train
    global_batch = t.micro_batch_size * t.grad_accumulation_steps * world
    if t.global_batch_size and t.global_batch_size != global_batch:
        raise ConfigError(
            f"train.global_batch_size: {t.global_batch_size} asked, but micro_batch_size {t.micro_batch_size} "
            f"x grad_accumulation_steps {t.grad_accumulation_steps} x world size {world} = {global_batch}"
        )
    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    dist.barrier()
    write_rank_record(out, info)
    stop = StopSignal()

    seed_everything(t.seed)
    loss_fn = build_loss(to_dict(cfg.loss))
    model = build_model(cfg.model, cfg.data, with_bias=loss_fn.uses_bias)
    engine, _, scheduler = build_engine(model, t, world)
    loader = make_loader(cfg.data.train, cfg.data, t.micro_batch_size, rank, world, t.seed, train=True)
    data_iter = iter(loader)

    step = 0
    resume_from = _resolve_resume(cfg, ckpt_dir)
    if resume_from is not None:
        try:
            step, extra = checkpoint.load(engine, resume_from, rank)
        except FileNotFoundError as err:
            raise TrainingError(f"cannot resume from {resume_from}: {err} (was it written by another world size?)")
        loader.load_state_dict(extra["loader"])  # the data stream continues where it stopped
        data_iter = iter(loader)
    writer = MetricsWriter(out, enabled=rank == 0)
    keys_file = None
    if t.log_keys:
        (out / "keys").mkdir(parents=True, exist_ok=True)
        keys_file = open(out / "keys" / f"rank{rank}.jsonl", "a" if resume_from else "w")
    end_step = min(t.steps, t.stop_at_step) if t.stop_at_step else t.steps
    if rank == 0:
        print(
            f"[train] world_size={world} micro_batch={t.micro_batch_size} accumulation={t.grad_accumulation_steps} "
            f"global_batch={global_batch} "
            f"steps={t.steps} zero_stage={t.zero_stage} precision={t.precision} device={info.device}"
            + (f" resumed_from={resume_from} at step {step}" if resume_from else ""),
            flush=True,
        )

    saved = {"step": step if resume_from is not None else -1}

    def save() -> None:
        if t.checkpoint and saved["step"] != step:
            saved["step"] = step
            folder = checkpoint.save(engine, ckpt_dir, step, rank, {"loader": loader.state_dict()}, t.keep_checkpoints)
            if rank == 0:
                print(f"[train] checkpoint: {folder}", flush=True)

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[t.precision]
    window = {"start": time.perf_counter(), "samples": 0, "wait": 0.0, "steps": 0}
    skipped_total, skipped_run, last = 0, 0, {}
    stopped_by = None
    progress = None
    if rank == 0 and sys.stdout.isatty():
        from tqdm import tqdm

        progress = tqdm(total=end_step, initial=step, desc="train", unit="step")
    accum = t.grad_accumulation_steps
    stop_flag = {"any": False}
    last_scales: dict = {}

    def guarded_loss(features, scale, bias, masks=None, step=None):
        """The loss, unless some rank's features are not finite (then NaN on every rank, and no
        rank enters the loss's collectives); also shares whether any rank got a stop signal."""
        finite = torch.stack([torch.isfinite(x).all() for x in (*features.values(), scale)]).all()
        # no host sync until the flags come back: both go in one collective
        flags = torch.stack([(~finite).float(), torch.tensor(float(stop.received is not None), device=info.device)])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stop_flag["any"] = stop_flag["any"] or bool(flags[1] > 0)
        if flags[0] > 0:
            return {"loss": torch.full((), float("nan"), device=info.device)}
        return loss_fn(features, scale, bias, masks=masks, step=step)

    def loss_is_finite(out: dict, step_number: int) -> bool:
        """Agreed over ranks (one small collective): is the loss finite everywhere?"""
        bad = not bool(torch.isfinite(out["loss"].detach()).all()) or _injected_nan(step_number)
        flag = torch.tensor([float(bad)], device=info.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return not bool(flag[0] > 0)

    def forward(batch):
        inputs = {m: x.to(info.device) for m, x in batch.modalities.items()}
        if dtype != torch.float32:  # floating inputs follow the parameters; token ids stay integers
            inputs = {m: x.to(dtype) if x.is_floating_point() else x for m, x in inputs.items()}
        masks = {m: k.to(info.device) for m, k in batch.masks.items()}
        features, scale, bias = engine(inputs, masks)
        features = {m: f.float() for m, f in features.items()}
        last_scales["value"] = (scale.detach().float(), None if bias is None else bias.detach().float())
        return features, scale.float(), None if bias is None else bias.float()

    def backward_and_step(tensor):
        engine.backward(tensor, scale_wrt_gas=False)  # the surrogates sum to the full-batch gradient
        engine.step()  # DeepSpeed updates at the last micro-batch of the step

    def run_step(batches: list, step: int):
        """Forward, loss and backward of one step (DeepSpeed updates unless the loss is not finite)."""
        if accum == 1:
            batch = batches[0]
            features, logit_scale, logit_bias = forward(batch)
            out_loss = guarded_loss(features, logit_scale, logit_bias,
                                    masks=model.loss_masks({m: k.to(info.device) for m, k in batch.masks.items()}),
                                    step=step)
            finite = loss_is_finite(out_loss, step + 1)
            if finite:
                engine.backward(out_loss["loss"])
                engine.step()
            return finite, out_loss, logit_scale, logit_bias
        verdict = {}

        def check(out):
            verdict["finite"] = loss_is_finite(out, step + 1)
            return verdict["finite"]

        loss_masks = [model.loss_masks({m: k.to(info.device) for m, k in b.masks.items()}) for b in batches]
        out_loss = accumulate_step(forward, batches, guarded_loss, masks=loss_masks, backward=backward_and_step,
                                   step=step, check=check)
        return verdict["finite"], out_loss, *last_scales["value"]

    peak = peak_flops(t.peak_tflops, t.precision, info.device)
    evaluating = cfg.eval.enabled and bool(cfg.data.val.urls)
    step_flops: dict = {}
    while step < end_step:
        _injected_death(step + 1)
        wait_start = time.perf_counter()
        batches = [next(data_iter) for _ in range(accum)]
        window["wait"] += time.perf_counter() - wait_start
        counting = StepFlops() if peak is not None and "flops" not in step_flops else contextlib.nullcontext()
        with counting:
            finite, out_loss, logit_scale, logit_bias = run_step(batches, step)
        if isinstance(counting, StepFlops):
            step_flops["flops"] = counting.flops
        step += 1
        if not finite:
            skipped_total += 1
            skipped_run += 1
            if rank == 0:
                print(f"[train] step {step}: non-finite loss, step skipped ({skipped_run} in a row)", flush=True)
            if skipped_run >= t.max_nonfinite_steps:
                raise TrainingError(
                    f"{skipped_run} consecutive steps with a non-finite loss (train.max_nonfinite_steps="
                    f"{t.max_nonfinite_steps}): lower train.lr, raise model.init_temperature, use fp32, or check the data"
                )
            scheduler.step()  # no backward, no update; the schedule stays on the step count
        else:
            skipped_run = 0
        window["samples"] += sum(len(b) for b in batches) * world
        window["steps"] += 1
        if keys_file is not None:
            keys_file.write(json.dumps({"step": step, "keys": [k for b in batches for k in b.keys]}) + "\n")
        if progress is not None:
            progress.update(1)
        if step % t.log_every == 0 or step == end_step:
            values = {k: float(v.detach()) for k, v in out_loss.items()}
            elapsed = time.perf_counter() - window["start"]
            values["data_wait_fraction"] = window["wait"] / max(elapsed, 1e-9)
            values = _mean_over_ranks(values)
            grad_norm = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
            values.update(
                global_batch=float(global_batch),
                lr=scheduler.get_last_lr()[0],
                temperature=1.0 / float(logit_scale.detach()),
                samples_per_s=window["samples"] / max(elapsed, 1e-9),
                skipped_steps=float(skipped_total),
            )
            if grad_norm is not None:
                values["grad_norm"] = float(grad_norm)
            if step_flops.get("flops"):
                step_time = elapsed / max(1, window["steps"])
                values["tflops_per_device"] = step_flops["flops"] / step_time / 1e12
                values["mfu"] = step_flops["flops"] / step_time / peak
            if logit_bias is not None:
                values["logit_bias"] = float(logit_bias.detach())
            values.update(loader.metrics(all_ranks=True))  # bad-data counts by reason, summed over ranks (collective)
            writer.log(step, values)
            last = values
            if rank == 0:
                print(
                    f"[train] step {step}/{t.steps} loss {values['loss']:.4f} lr {values['lr']:.2e} "
                    f"T {values['temperature']:.4f} {values['samples_per_s']:.0f} samples/s "
                    f"data wait {100 * values['data_wait_fraction']:.1f}%",
                    flush=True,
                )
            window = {"start": time.perf_counter(), "samples": 0, "wait": 0.0, "steps": 0}
        if stop_flag["any"]:
            stopped_by = stop.received or "a signal on another rank"
            break
        if evaluating and cfg.eval.every and step % cfg.eval.every == 0 and step < end_step:
            writer.log(step, run_evaluation(engine.module, cfg, rank, world, info.device, step, out))
            window = {"start": time.perf_counter(), "samples": 0, "wait": 0.0, "steps": 0}  # eval time is not step time
        if t.checkpoint_every and step % t.checkpoint_every == 0 and step < end_step:
            save()
    if progress is not None:
        progress.close()
    if keys_file is not None:
        keys_file.close()

    results: dict[str, float] = {"loss": last.get("loss", float("nan"))}
    save()
    if stopped_by is not None:
        if rank == 0:
            print(f"[train] stopped by {stopped_by} at step {step}; resume with the same command", flush=True)
        writer.close()
        dist.barrier()
        return results
    if evaluating and step >= t.steps:
        metrics = run_evaluation(engine.module, cfg, rank, world, info.device, step, out)
        writer.log(step, metrics)
        results.update(metrics)
        if rank == 0:
            (out / "eval.json").write_text(json.dumps({"step": step, **metrics}, indent=1) + "\n")
            print(format_eval(metrics), flush=True)
            print("\n".join(format_metrics(metrics).splitlines()[1:]), flush=True)  # every task's R@1 / top-k
            print(f"[eval] all metrics: {out / 'eval' / f'step{step:06d}.json'}; plots: {out / 'eval' / 'index.html'}",
                  flush=True)
    if rank == 0:
        print(f"[train] tensorboard logs: {writer.tb_dir}  (tensorboard --logdir {writer.tb_dir})", flush=True)
        print(f"[train] metrics: {writer.path}", flush=True)
    writer.close()
    dist.barrier()
    return results


def format_eval(metrics: dict[str, float]) -> str:
    lines = [f"[eval] held-out samples: {int(metrics['eval/samples'])}"]
    labels = {
        "eval/zeroshot_top1": "zero-shot top-1",
        "eval/i2t_r1": "image->text R@1",
        "eval/t2i_r1": "text->image R@1",
    }
    for key, label in labels.items():
        if key in metrics:
            lines.append(f"[eval] {label:<16} {100 * metrics[key]:6.2f}%   (chance {100 * metrics[key + '/chance']:.2f}%)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    config_path, overrides = parse_args(argv)
    try:
        cfg = load_config(config_path, overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    try:
        train(cfg)
    except (ConfigError, TrainingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except torch.OutOfMemoryError as err:
        print(
            f"error: out of memory ({err}). Lower train.micro_batch_size (raise train.grad_accumulation_steps "
            f"to keep the global batch and its negatives), raise train.zero_stage (3 shards the parameters too), "
            f"set model.towers.<m>.grad_checkpointing=true, use train.precision=bf16, or shrink the model.",
            file=sys.stderr,
        )
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
