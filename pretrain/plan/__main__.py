"""``python -m pretrain.plan --config FILE [key=value ...] --nodes N --gpus-per-node G [--gpu-memory GiB |
--gpu NAME] [--json]``: the plan of ``pretrain.plan`` printed for a recipe (its docstring says what is
counted). The config is read as training reads it: the same errors, exit code 2 for a bad key, value
or flag (``pretrain.cli.run_cli``). A module of its own: it reads configs (``pretrain.config``), which
the library, imported by the trainer for ``train.zero_stage: auto``, must not.
"""
from __future__ import annotations

import argparse
import json
from typing import Optional

import torch

from pretrain.cli import collector_paused, exit_process, run_cli
from pretrain.config import load_config
from pretrain.options import ConfigError
from pretrain.plan import GIB, GPUS, MARGIN, PlanError, format_plan, gpu_capacity, local_capacity, make_plan




def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m pretrain.plan", description="What a recipe costs per rank at "
                                     "every ZeRO stage, before a launch (pretrain.plan)")
    parser.add_argument("--config", help="YAML recipe (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, as training takes them")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=None,
                        help="ranks per node (GPUs; on CPU, processes); default: this machine's GPUs, or 1")
    mem = parser.add_mutually_exclusive_group()
    mem.add_argument("--gpu-memory", type=float, default=None, help="GiB per GPU")
    mem.add_argument("--gpu", default=None, help=f"a GPU by name ({', '.join(GPUS)})")
    parser.add_argument("--margin", type=float, default=MARGIN, help="share of memory kept free (default 0.10)")
    parser.add_argument("--json", action="store_true", help="the same figures as one JSON object")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)

    def run() -> int:
        for flag, value in (("--nodes", args.nodes), ("--gpus-per-node", args.gpus_per_node)):
            if value is not None and value < 1:
                raise ConfigError(f"{flag}: must be >= 1, got {value}")
        if not 0 <= args.margin < 1:
            raise ConfigError(f"--margin: must be in [0, 1), got {args.margin}")
        with collector_paused():
            cfg = load_config(args.config, args.overrides)
            per_node = args.gpus_per_node or (torch.cuda.device_count() or 1)
            if args.gpu_memory is not None:
                if args.gpu_memory <= 0:
                    raise ConfigError(f"--gpu-memory: must be > 0 GiB, got {args.gpu_memory}")
                capacity, device = int(args.gpu_memory * GIB), f"{args.gpu_memory:g} GiB (--gpu-memory)"
            elif args.gpu is not None:
                try:
                    capacity, device = gpu_capacity(args.gpu)
                except PlanError as err:
                    raise ConfigError(str(err)) from None
            else:
                capacity, device = local_capacity(per_node)
            plan = make_plan(cfg, args.nodes, per_node, capacity, device, config=args.config or "", margin=args.margin)
        print(json.dumps(plan.to_json(), indent=1) if args.json else format_plan(plan), flush=True)
        return 0

    return run_cli(run, prog="")


if __name__ == "__main__":
    exit_process(main())
