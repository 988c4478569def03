"""Checkpoints: atomic, resumable, pruned.

Layout under ``output_dir/checkpoints/``::

    step000040/            DeepSpeed's files (model, ZeRO-partitioned optimizer, scheduler, scaler)
        rank00000.pt       per rank: RNG states and the data loader's position
        COMPLETE           written last: a checkpoint without it is ignored
    latest                 the tag of the newest complete checkpoint (replaced atomically)

A kill at any moment during a save leaves the previous complete checkpoint as ``latest``; the
half-written folder is ignored on resume and removed by the next successful save.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

COMPLETE = "COMPLETE"


def tag_for(step: int) -> str:
    return f"step{step:06d}"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: json.loads((p / COMPLETE).read_text())["step"])


def latest_complete(ckpt_dir: Path) -> Path | None:
    done = complete_checkpoints(ckpt_dir)
    return done[-1] if done else None


def _fault(point: str, step: int) -> None:
    """Test hook: PRETRAIN_FAULT=crash_in_save:STEP kills the process in the middle of that save."""
    spec = os.environ.get("PRETRAIN_FAULT", "")
    if spec == f"{point}:{step}":
        os._exit(17)


def save(engine, ckpt_dir: Path, step: int, rank: int, extra: dict, keep: int) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder."""
    tag = tag_for(step)
    folder = ckpt_dir / tag
    if rank == 0 and folder.exists():  # a leftover from an interrupted save of the same step
        shutil.rmtree(folder)
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step}, save_latest=False)
    torch.save({"rng": rng_state(), **extra}, folder / f"rank{rank:05d}.pt")
    _fault("crash_in_save", step)
    dist.barrier()
    if rank == 0:
        (folder / COMPLETE).write_text(json.dumps({"step": step, "time": time.time()}) + "\n")
        tmp = ckpt_dir / "latest.tmp"
        tmp.write_text(tag + "\n")
        os.replace(tmp, ckpt_dir / "latest")
        prune(ckpt_dir, keep)
    dist.barrier()
    return folder


def prune(ckpt_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; drop older ones and incomplete leftovers."""
    done = complete_checkpoints(ckpt_dir)
    newest = done[-1] if done else None
    for old in done[: max(0, len(done) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
    for p in ckpt_dir.iterdir():
        if p.is_dir() and not (p / COMPLETE).exists() and p != newest:
            shutil.rmtree(p, ignore_errors=True)


def load(engine, folder: Path, rank: int) -> tuple[int, dict]:
    """Restores engine state (model, optimizer, scheduler, scaler) and this rank's RNG; returns
    (step, this rank's extra state)."""
    _, client = engine.load_checkpoint(str(folder.parent), tag=folder.name)
    if client is None:
        raise RuntimeError(f"checkpoint {folder} could not be loaded")
    # our own file, written by this code: not a stranger's shard, so a full unpickle is fine
    extra = torch.load(folder / f"rank{rank:05d}.pt", weights_only=False)
    set_rng_state(extra.pop("rng"))
    return int(client["step"]), extra
