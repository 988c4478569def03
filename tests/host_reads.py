"""The trainer with every read of a tensor's value on the host counted, for the tests:
``python -m tests.host_reads --config ... [overrides]`` (env ``HOST_READS_OUT``: where the counts go).

``Tensor.item``, ``tolist``, ``__bool__``, ``__int__``, ``__float__`` and ``__index__`` are wrapped;
each call made while a training step runs is attributed to the first frame of this project
(``pretrain/``; the data pipeline's own host-side reads are left out) or of DeepSpeed that called
it, per step. Log steps, evaluations and checkpoint saves (where reading is the point) are marked,
so a test can check the steady-state steps: ``{step: {"pretrain": n, "deepspeed": m, "logged": bool}}``.
"""
from __future__ import annotations

import json
import os
import sys
from collections import defaultdict

import torch

from pretrain import checkpoint, train, trainer
from pretrain.step import ContrastiveStep

COUNTS: dict = defaultdict(lambda: defaultdict(int))
NOW = {"step": 0, "quiet": 0}
LOGGED: set = set()


def _origin() -> str | None:
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if "/tests/" in name:
            return None
        if "/pretrain/" in name:
            if os.environ.get("HOST_READS_WHERE") and "/pretrain/data/" not in name:
                print(f"[host read] {name}:{frame.f_lineno}", file=sys.stderr)
            return None if "/pretrain/data/" in name else "pretrain"
        if "/deepspeed/" in name:
            return "deepspeed"
        frame = frame.f_back
    return None


def _count(method: str) -> None:
    original = getattr(torch.Tensor, method)

    def counted(self, *args, **kwargs):
        if NOW["step"] and not NOW["quiet"]:
            origin = _origin()
            if origin is not None:
                COUNTS[NOW["step"]][origin] += 1
        return original(self, *args, **kwargs)

    setattr(torch.Tensor, method, counted)


def _quiet(cls, name: str, mark_logged: bool = False) -> None:
    original = getattr(cls, name)

    def run(self, *args, **kwargs):
        NOW["quiet"] += 1
        if mark_logged:
            LOGGED.add(NOW["step"])
        try:
            return original(self, *args, **kwargs)
        finally:
            NOW["quiet"] -= 1

    setattr(cls, name, run)


def install() -> None:
    for method in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        _count(method)
    call = ContrastiveStep.__call__

    def step(self, batches, index, **kwargs):
        NOW["step"] = index + 1
        return call(self, batches, index, **kwargs)

    ContrastiveStep.__call__ = step
    _quiet(trainer.StepLogger, "log", mark_logged=True)
    _quiet(trainer.PeriodicEvaluation, "run", mark_logged=True)
    _quiet(checkpoint.Checkpointer, "save")


if __name__ == "__main__":
    install()
    code = train.main()
    path = os.environ["HOST_READS_OUT"].replace("{rank}", os.environ.get("RANK", "0"))
    with open(path.replace("{world}", os.environ.get("WORLD_SIZE", "1")), "w") as f:
        json.dump({s: {**c, "logged": s in LOGGED} for s, c in COUNTS.items()} | {
            s: {"logged": True} for s in LOGGED if s not in COUNTS}, f, indent=1)
    sys.exit(code)
