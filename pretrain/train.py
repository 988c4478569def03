"""The training entry point: ``python -m pretrain.train --config FILE [key=value ...]``.

The same ``main()`` runs under ``python`` (one process), ``torchrun`` and ``accelerate launch``;
rank and world size come from torch.distributed.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from pretrain.config import Config, ConfigError, load_config, to_dict
from pretrain.data import make_loader
from pretrain.engine import build_engine, init_distributed
from pretrain.evaluate import evaluate
from pretrain.losses import build_loss
from pretrain.metrics import MetricsWriter
from pretrain.models import build_model


# DeepSpeed's ZeRO partitioning calls a torch collective that torch now marks deprecated.
warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)


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
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
    }
    (out / "ranks" / f"rank{info.rank}.json").write_text(json.dumps(record, indent=1) + "\n")


def _mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    names = sorted(values)
    t = torch.tensor([values[k] for k in names], dtype=torch.float64)
    if dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return dict(zip(names, t.tolist()))


def train(cfg: Config) -> dict[str, float]:
    info = init_distributed()
    rank, world = info.rank, info.world_size
    out = Path(cfg.output_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    dist.barrier()
    write_rank_record(out, info)

    seed_everything(cfg.train.seed)
    loss_fn = build_loss(to_dict(cfg.loss))
    model = build_model(cfg.model, cfg.data.context_length, with_bias=loss_fn.uses_bias)
    engine, _, scheduler = build_engine(model, cfg.train, world)
    loader = make_loader(
        cfg.data.train, cfg.data, cfg.train.micro_batch_size, rank, world, cfg.train.seed, train=True
    )
    writer = MetricsWriter(out, enabled=rank == 0)
    keys_file = None
    if cfg.train.log_keys:
        (out / "keys").mkdir(parents=True, exist_ok=True)
        keys_file = open(out / "keys" / f"rank{rank}.jsonl", "w")
    if rank == 0:
        print(
            f"[train] world_size={world} micro_batch={cfg.train.micro_batch_size} "
            f"global_batch={cfg.train.micro_batch_size * world} steps={cfg.train.steps} "
            f"zero_stage={cfg.train.zero_stage} device={info.device}",
            flush=True,
        )

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.train.precision]
    data_iter = iter(loader)
    step, window_start, window_samples = 0, time.perf_counter(), 0
    last: dict[str, float] = {}
    while step < cfg.train.steps:
        batch = next(data_iter)
        inputs = {m: x.to(info.device) for m, x in batch.modalities.items()}
        if dtype != torch.float32:
            inputs["image"] = inputs["image"].to(dtype)
        features, logit_scale, logit_bias = engine(inputs)
        features = {m: f.float() for m, f in features.items()}
        masks = {m: k.to(info.device) for m, k in batch.masks.items()}
        out_loss = loss_fn(
            features, logit_scale.float(), None if logit_bias is None else logit_bias.float(), masks=masks, step=step
        )
        engine.backward(out_loss["loss"])
        engine.step()
        step += 1
        window_samples += len(batch) * world
        if keys_file is not None:
            keys_file.write(json.dumps({"step": step, "keys": batch.keys}) + "\n")
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            values = {k: float(v.detach()) for k, v in out_loss.items()}
            values = _mean_over_ranks(values)
            elapsed = time.perf_counter() - window_start
            values.update(
                lr=scheduler.get_last_lr()[0],
                temperature=1.0 / float(logit_scale.detach()),
                **{"samples_per_s": window_samples / max(elapsed, 1e-9)},
            )
            writer.log(step, values)
            last = values
            if rank == 0:
                print(
                    f"[train] step {step}/{cfg.train.steps} loss {values['loss']:.4f} "
                    f"lr {values['lr']:.2e} T {values['temperature']:.4f} "
                    f"{values['samples_per_s']:.0f} samples/s",
                    flush=True,
                )
            window_start, window_samples = time.perf_counter(), 0
    if keys_file is not None:
        keys_file.close()

    results: dict[str, float] = {"loss": last.get("loss", float("nan"))}
    if cfg.train.checkpoint:
        ckpt_dir = out / "checkpoints"
        engine.save_checkpoint(str(ckpt_dir), tag=f"step{step}", client_state={"step": step})
        if rank == 0:
            print(f"[train] checkpoint: {ckpt_dir / f'step{step}'}", flush=True)
    if cfg.eval.enabled and cfg.data.val.urls:
        metrics = evaluate(engine.module, cfg, rank, world, info.device)
        writer.log(step, metrics)
        results.update(metrics)
        if rank == 0:
            (out / "eval.json").write_text(json.dumps({"step": step, **metrics}, indent=1) + "\n")
            print(format_eval(metrics), flush=True)
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
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
