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
``DIR`` may also be a URL of any of these (``s3://bucket/runs/name``, as ``train.remote_sync``
mirrors a run; any fsspec URL): it is downloaded to a local cache first (``pretrain.remote``), the
files checked against their checksums, and ``OUT`` defaults to its folder there.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pretrain.checkpoint import CheckpointError
from pretrain.cli import FAILED, USAGE, exit_process, run_cli
from pretrain.config import load_config
from pretrain.data import build_modalities
from pretrain.distributed import close_distributed, init_distributed
from pretrain.evaluation import evaluate, format_metrics
from pretrain.export import load_weights
from pretrain.options import ConfigError
from pretrain.remote import find_checkpoint  # a folder, or an s3:// (fsspec) URL fetched to a local cache


def run(args) -> None:
    found = find_checkpoint(args.checkpoint)
    if args.config is None and not found.config.is_file():
        raise CheckpointError(f"--checkpoint: no config.yaml at {found.config}; give --config")
    cfg = load_config(args.config or found.config, args.overrides)
    if not cfg.data.val.urls:
        raise ConfigError("data.val.urls: required for evaluation")
    out = Path(args.output) if args.output else found.run_dir
    info = init_distributed()
    modalities = build_modalities(cfg.data, train=False)
    model = load_weights(found, cfg, modalities).to(info.device)
    metrics = evaluate(model, cfg, modalities, info.device, step=found.step, output_dir=out)
    if info.rank == 0:
        print(format_metrics(metrics))
        print(f"[eval] checkpoint {found.folder} (step {found.step})")
        print(f"[eval] metrics: {out / 'eval' / f'step{found.step:06d}.json'}")
        if cfg.eval.plots:
            print(f"[eval] plots: {out / 'eval' / 'plots'}  (overview: {out / 'eval' / 'index.html'})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint, run or exported folder, or its URL (s3://...)")
    parser.add_argument("--config", help="YAML recipe (default: the run's config.yaml)")
    parser.add_argument("--output", help="folder for eval/ (default: the checkpoint's run folder)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.tasks=[retrieval]")
    args = parser.parse_args(argv)
    return run_cli(lambda: run(args), errors=[(CheckpointError, USAGE), (RuntimeError, FAILED)],
                   cleanup=close_distributed)


if __name__ == "__main__":
    exit_process(main())
