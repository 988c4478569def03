"""The training entry point: ``python -m pretrain.train --config FILE [key=value ...]``.

The same ``main()`` runs under ``python`` (one process), ``torchrun``, ``accelerate launch`` and
``srun`` (``launch.slurm``); rank and world size come from torch.distributed. A run resumes from the
newest complete checkpoint in its output folder (``train.resume: auto``), saves on SIGTERM/SIGUSR1
before it exits (exit code 75, ``pretrain.cli.STOPPED``: run the same command again to resume; 0 when
finished, 1 when failed, 2 for a bad configuration), and skips (and counts) steps whose loss is not finite. The loop is
``pretrain.trainer.Trainer``.
"""
from __future__ import annotations

import argparse

import torch

from pretrain.checkpoint import CheckpointSaveError
from pretrain.cli import FAILED, OK, STOPPED, collector_paused, exit_process, run_cli
from pretrain.config import load_config
from pretrain.distributed import close_distributed
from pretrain.remote import RemoteSyncError
from pretrain.trainer import Trainer, TrainingError
from pretrain.watchdog import HangError


def parse_args(argv: list[str] | None) -> tuple[str | None, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m pretrain.train", description=__doc__)
    parser.add_argument("--config", help="YAML recipe (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=20")
    args = parser.parse_args(argv)
    return args.config, args.overrides


def _out_of_memory(err: Exception) -> str:
    return (f"out of memory ({err}). Lower train.micro_batch_size (raise train.grad_accumulation_steps to keep the "
            f"global batch and its negatives), raise train.zero_stage (3 shards the parameters too), set "
            f"model.towers.<m>.grad_checkpointing=true, use train.precision=bf16, or shrink the model; "
            f"`python -m pretrain.plan` with the same config shows what each part costs per rank.")


def main(argv: list[str] | None = None) -> int:
    config_path, overrides = parse_args(argv)

    def run() -> int:
        with collector_paused():  # start-up: imports, model, engine, loader
            trainer = Trainer(load_config(config_path, overrides))
        trainer.train()
        return STOPPED if trainer.stopped_by else OK  # stopped by a signal: saved, resume later

    return run_cli(run,
                   errors=[(TrainingError, FAILED), (CheckpointSaveError, FAILED), (HangError, FAILED), (RemoteSyncError, FAILED),
                           (torch.OutOfMemoryError, FAILED, _out_of_memory)],
                   cleanup=close_distributed)


if __name__ == "__main__":
    exit_process(main())
