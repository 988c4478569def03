"""Evaluate a trained model: ``python -m pretrain.eval --checkpoint DIR [--config FILE] [key=value ...]``.

``DIR`` is a checkpoint folder (``RUN/checkpoints/step000200``, any ZeRO stage: the partitions are
consolidated as ``pretrain.export`` does), a run folder (its newest complete checkpoint), or an
exported folder (``model.safetensors`` + ``config.yaml``). The config is ``--config FILE`` with the
overrides, or, without ``--config``, the run's own ``config.yaml`` with the overrides
(``eval.tasks=[retrieval,linear_probe] eval.symile.candidates=100 data.val.urls=...``).

Writes ``OUT/eval/step{N}.json``, ``OUT/eval/plots/*.png`` and ``OUT/eval/index.html``, where
``OUT`` is ``--output`` or the run folder of the checkpoint (the exported folder for an export),
and prints a summary. One process, or several under ``torchrun`` (each rank embeds its part of
the split; the parts are gathered). The tasks and metric keys: ``pretrain/evaluation/__init__.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain.config import ConfigError, load_config


class CheckpointError(RuntimeError):
    pass


def resolve_checkpoint(path: str | Path) -> tuple[str, Path, int, Path, Path]:
    """(kind, folder, step, config.yaml of the run, default output folder); kind is ``export`` or
    ``deepspeed``."""
    from pretrain.checkpoint import COMPLETE, latest_complete

    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"--checkpoint: no such folder: {folder}")
    if (folder / "model.safetensors").is_file():
        step = 0
        cfg = folder / "config.yaml"
        return "export", folder, step, cfg, folder
    if (folder / "checkpoints").is_dir() and not (folder / COMPLETE).exists():
        latest = latest_complete(folder / "checkpoints")
        if latest is None:
            raise CheckpointError(f"--checkpoint: no complete checkpoint under {folder / 'checkpoints'}")
        folder = latest
    if not any(folder.glob("*model_states.pt")):
        raise CheckpointError(f"--checkpoint: {folder} is not a checkpoint, run or exported folder")
    if (folder / COMPLETE).is_file():
        step = int(json.loads((folder / COMPLETE).read_text())["step"])
    else:
        digits = "".join(ch for ch in folder.name if ch.isdigit())
        step = int(digits) if digits else 0
    run = folder.parent.parent
    return "deepspeed", folder, step, run / "config.yaml", run


def load_model(kind: str, folder: Path, cfg):
    """A plain (no DeepSpeed) model with the checkpoint's full fp32 weights."""
    from pretrain.export import consolidated_state_dict, model_from_state

    if kind == "export":
        from safetensors.torch import load_file

        state = load_file(str(folder / "model.safetensors"))
    else:
        state = consolidated_state_dict(folder)
    try:
        return model_from_state(cfg, state)
    except RuntimeError as err:
        raise CheckpointError(
            f"the checkpoint's weights do not fit the model of this config ({str(err).splitlines()[0]}); "
            f"leave out --config to use the run's own config.yaml"
        ) from None


def _init_distributed() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world, device


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint, run or exported folder")
    parser.add_argument("--config", help="YAML recipe (default: the run's config.yaml)")
    parser.add_argument("--output", help="folder for eval/ (default: the checkpoint's run folder)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.tasks=[retrieval]")
    args = parser.parse_args(argv)
    try:
        kind, folder, step, run_cfg, default_out = resolve_checkpoint(args.checkpoint)
        if args.config is None and not run_cfg.is_file():
            raise CheckpointError(f"--checkpoint: no config.yaml at {run_cfg}; give --config")
        cfg = load_config(args.config or run_cfg, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not cfg.data.val.urls:
        print("config error: data.val.urls: required for evaluation", file=sys.stderr)
        return 2
    out = Path(args.output) if args.output else default_out
    try:
        rank, world, device = _init_distributed()
        from pretrain.evaluation import format_metrics, run_evaluation

        model = load_model(kind, folder, cfg).to(device)
        metrics = run_evaluation(model, cfg, rank, world, device, step, out)
        if rank == 0:
            print(format_metrics(metrics))
            print(f"[eval] checkpoint {folder} (step {step})")
            print(f"[eval] metrics: {out / 'eval' / f'step{step:06d}.json'}")
            if cfg.eval.plots:
                print(f"[eval] plots: {out / 'eval' / 'plots'}  (overview: {out / 'eval' / 'index.html'})")
    except (CheckpointError, ConfigError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
