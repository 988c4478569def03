"""Checkpoints: atomic, resumable, pruned; and the one reader of checkpoint folders.

Layout under ``output_dir/checkpoints/``::

    step000040/            DeepSpeed's files (model, ZeRO-partitioned optimizer, scheduler, scaler)
        rank00000.pt       per rank: the training state (RNG states, the data loader's position,
                           the skip counters; see ``pretrain.trainer.TrainState``)
        COMPLETE           written last: a checkpoint without it is ignored; it records the
                           step and each file's size and SHA-256 (hashed by the ranks in parallel)
    latest                 the tag of the newest complete checkpoint (replaced atomically)

A kill at any moment during a save leaves the previous complete checkpoint as ``latest``; the
half-written folder is ignored on resume and removed by the next successful save. A resume checks
the files against COMPLETE first: a truncated, altered or missing file is named, the folder's
marker renamed to DAMAGED (the next save removes it), and ``train.resume: auto`` falls back to the
previous complete checkpoint (a named ``train.resume`` folder stops with the message instead).
Checkpoints written before checksums (no file list in COMPLETE) are loaded unchecked.

``Checkpointer`` decides when a step saves (``train.checkpoint_every``, the last step, a stop) and
resumes a run (``train.resume``); ``find_checkpoint`` tells what a folder given on a command line
is (a checkpoint, a run, an export), for ``pretrain.eval``, ``pretrain.export`` and ``launch``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from pretrain.distributed import gather_objects, world_size
from pretrain.distributed import rank as this_rank
from pretrain.options import ConfigError, require

COMPLETE = "COMPLETE"
DAMAGED = "DAMAGED"
EXPORT_WEIGHTS = "model.safetensors"


@dataclass(kw_only=True)  # built from the config by name
class CheckpointConfig:
    """The checkpoint fields of ``train.*``."""

    checkpoint: bool = True  # save checkpoints (always at the end and on SIGTERM/SIGUSR1)
    checkpoint_every: int = 0  # also every N steps (0: only at the end)
    keep_checkpoints: int = 2  # newest complete checkpoints kept
    resume: str = "auto"  # auto: newest complete checkpoint in output_dir if any; none; or a folder

    def check_checkpoint(self, key: str = "train") -> None:
        require(self.checkpoint_every >= 0, f"{key}.checkpoint_every", f"must be >= 0, got {self.checkpoint_every}")
        require(self.keep_checkpoints >= 1, f"{key}.keep_checkpoints", f"must be >= 1, got {self.keep_checkpoints}")


# ------------------------------------------------------------------------------- reading folders


def tag_for(step: int) -> str:
    return f"step{step:06d}"


def is_complete(folder: Path) -> bool:
    return (Path(folder) / COMPLETE).is_file()


def checkpoint_step(folder: Path) -> int:
    """The step a checkpoint folder holds: from its COMPLETE marker, else the digits of its name."""
    folder = Path(folder)
    if is_complete(folder):
        try:
            return int(json.loads((folder / COMPLETE).read_text())["step"])
        except (ValueError, KeyError, TypeError):
            pass  # a damaged marker: the folder's name still tells the step (the resume check names it)
    digits = "".join(ch for ch in folder.name if ch.isdigit())
    return int(digits) if digits else 0


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted((p for p in ckpt_dir.iterdir() if p.is_dir() and is_complete(p)), key=checkpoint_step)


def latest_complete(ckpt_dir: Path) -> Optional[Path]:
    done = complete_checkpoints(ckpt_dir)
    return done[-1] if done else None


def previous_layout(cfg: CheckpointConfig, ckpt_dir: Path):
    """(folder, ``pretrain.layout.SavedLayout``) of the checkpoint ``train.resume`` would pick (the
    newest complete one under ``auto``): its ZeRO stage, world size, precision and global batch from
    its DeepSpeed config; None on a fresh start or where the folder cannot be read (the resume names it)."""
    if cfg.resume == "none":
        return None
    folder = Path(cfg.resume) if cfg.resume != "auto" else latest_complete(ckpt_dir)
    if folder is None or not is_complete(folder):
        return None
    from pretrain.layout import saved_layout

    try:
        return folder, saved_layout(folder)
    except (OSError, RuntimeError, ValueError):
        return None  # a damaged folder: the resume names it


def previous_global_batch(cfg: CheckpointConfig, ckpt_dir: Path) -> Optional[int]:
    """The global batch (samples per optimizer step) of the checkpoint ``train.resume`` would pick
    (the newest complete one under ``auto``), from its DeepSpeed config; None on a fresh start."""
    found = previous_layout(cfg, ckpt_dir)
    return found[1].global_batch if found is not None else None


class CheckpointError(RuntimeError):
    """A folder is not the checkpoint, run or export it was given as."""


@dataclass
class FoundCheckpoint:
    kind: str  # "deepspeed" (a training checkpoint) or "export" (model.safetensors + config.yaml)
    folder: Path
    step: int
    config: Path  # the run's config.yaml
    run_dir: Path  # the run folder (the export folder for an export)


def find_checkpoint(path: str | Path, what: str = "--checkpoint") -> FoundCheckpoint:
    """A checkpoint folder, a run folder (its newest complete checkpoint) or an exported folder."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{what}: no such folder: {folder}")
    if (folder / EXPORT_WEIGHTS).is_file():
        return FoundCheckpoint("export", folder, 0, folder / "config.yaml", folder)
    if (folder / "checkpoints").is_dir() and not is_complete(folder):
        latest = latest_complete(folder / "checkpoints")
        if latest is None:
            raise CheckpointError(f"{what}: no complete checkpoint under {folder / 'checkpoints'}")
        folder = latest
    if not any(folder.glob("*model_states.pt")):
        raise CheckpointError(f"{what}: {folder} is not a checkpoint, run or exported folder")
    run = folder.parent.parent
    return FoundCheckpoint("deepspeed", folder, checkpoint_step(folder), run / "config.yaml", run)


# ------------------------------------------------------------------------------------ checksums


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_manifest(folder: Path) -> dict[str, dict]:
    """Collective: name -> {bytes, sha256} of every file under ``folder`` (but the markers), each
    rank hashing its share."""
    rank, world = this_rank(), world_size()
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                   if p.is_file() and p.name not in (COMPLETE, DAMAGED, f"{COMPLETE}.tmp"))
    mine = {n: {"bytes": (folder / n).stat().st_size, "sha256": _sha256(folder / n)} for n in names[rank::world]}
    return {k: v for part in gather_objects(mine) for k, v in part.items()}


def damaged_files(folder: Path) -> list[str]:
    """Collective: the files of a complete checkpoint that differ from what its COMPLETE marker
    recorded ("name (why)"), each rank checking its share; [] when all match or nothing was recorded."""
    rank, world = this_rank(), world_size()
    try:
        recorded = json.loads((folder / COMPLETE).read_text()).get("files")
        problems = [] if recorded is None or isinstance(recorded, dict) else [f"{COMPLETE} (no file list)"]
    except (OSError, ValueError, AttributeError) as err:
        recorded, problems = None, [f"{COMPLETE} (unreadable: {err})"]
    bad = []
    for name in sorted(recorded or {})[rank::world]:
        path, want = folder / name, recorded[name]
        if not path.is_file():
            bad.append(f"{name} (missing)")
        elif path.stat().st_size != want["bytes"]:
            bad.append(f"{name} ({path.stat().st_size} bytes, {want['bytes']} written)")
        elif _sha256(path) != want["sha256"]:
            bad.append(f"{name} (SHA-256 differs from the one written)")
    return problems + sorted(b for part in gather_objects(bad) for b in part)


def mark_damaged(folder: Path, problems: list[str]) -> None:
    """COMPLETE -> DAMAGED (with the reasons): no longer a resume candidate; the next save prunes it."""
    (folder / DAMAGED).write_text(json.dumps({"problems": problems, "time": time.time()}) + "\n")
    (folder / COMPLETE).unlink(missing_ok=True)


# -------------------------------------------------------------------------------- saving, loading


def save(engine, ckpt_dir: Path, step: int, rank: int, state: Callable[[], dict], keep: int) -> Path:
    """Collective: every rank calls it. ``state()`` gives this rank's training state (taken after
    the engine's files are written, so the random streams are those the run continues with).
    Returns the folder."""
    tag = tag_for(step)
    folder = ckpt_dir / tag
    if rank == 0 and folder.exists():  # a leftover from an interrupted save of the same step
        shutil.rmtree(folder)
    dist.barrier()
    try:
        groups = getattr(getattr(engine, "basic_optimizer", None), "group_names", None)
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step, "optimizer_groups": groups},
                               save_latest=False)
        torch.save(state(), folder / f"rank{rank:05d}.pt")
    except (OSError, RuntimeError) as err:  # a full disk, a quota, a lost mount (torch wraps some as RuntimeError)
        free = shutil.disk_usage(ckpt_dir).free  # torch's own message often hides the cause
        shutil.rmtree(folder, ignore_errors=True)  # never half-written: free what it took
        before = latest_complete(ckpt_dir)
        cause = (f"the file system is full ({free} bytes were free)" if free < 64 * 2**20
                 else f"{free / 2**30:.1f} GiB free there")
        raise CheckpointSaveError(
            f"rank {rank} could not write the checkpoint of step {step} to {folder}: {cause}; {err}. "
            + (f"The previous complete checkpoint {before} stays in force; " if before else "No earlier checkpoint; ")
            + "free space (or point output_dir elsewhere) and run the same command to resume") from None
    _commit(ckpt_dir, folder, step, rank, keep)
    return folder


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (the message names the rank, folder and cause)."""


def _commit(ckpt_dir: Path, folder: Path, step: int, rank: int, keep: int) -> None:
    """Once every rank has written its files: their checksums, the COMPLETE marker, ``latest``, pruning."""
    dist.barrier()
    files = file_manifest(folder)
    if rank == 0:  # the marker itself appears whole or not at all
        (folder / f"{COMPLETE}.tmp").write_text(json.dumps({"step": step, "time": time.time(), "files": files}) + "\n")
        os.replace(folder / f"{COMPLETE}.tmp", folder / COMPLETE)
        tmp = ckpt_dir / "latest.tmp"
        tmp.write_text(folder.name + "\n")
        os.replace(tmp, ckpt_dir / "latest")
        prune(ckpt_dir, keep)
    dist.barrier()


def prune(ckpt_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; drop older ones and incomplete leftovers."""
    done = complete_checkpoints(ckpt_dir)
    newest = done[-1] if done else None
    for old in done[: max(0, len(done) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
    for p in ckpt_dir.iterdir():
        if p.is_dir() and not is_complete(p) and p != newest:
            shutil.rmtree(p, ignore_errors=True)


def load(engine, folder: Path, rank: int) -> tuple[int, dict]:
    """Restores the engine (model, optimizer, scheduler, scaler); returns (step, this rank's
    training state as saved)."""
    _, client = engine.load_checkpoint(str(folder.parent), tag=folder.name)
    if client is None:
        raise RuntimeError(f"checkpoint {folder} could not be loaded")
    # our own file, written by this code: not a stranger's shard, so a full unpickle is fine
    state = torch.load(folder / f"rank{rank:05d}.pt", weights_only=False)
    return int(client["step"]), state


class Checkpointer:
    """Saves and resumes one run's checkpoints; decides itself which steps save.

    ``engine`` is a ``pretrain.engine.Engine``; ``state`` the run's training state: ``state.step``,
    ``state_dict()`` / ``load_state_dict()``, ``layout_changed(saved)`` and ``load_layout(every
    rank's saved, step)`` (``pretrain.trainer.TrainState``).

    A checkpoint of the same layout (world size, ZeRO stage, loader workers) loads as DeepSpeed
    wrote it, bit for bit. One of another layout is read by parameter name and put into this
    engine (``pretrain.layout``), and the data position of every old rank is dealt to the new ones
    (``pretrain.data.pipeline.relayout``)."""

    def __init__(self, cfg: CheckpointConfig, ckpt_dir: Path, engine, rank: int):
        self.cfg, self.dir, self.rank = cfg, Path(ckpt_dir), rank
        self.engine, self.bundle = engine.ds, engine
        self.last_saved: Optional[int] = None
        self.changed_layout: Optional[str] = None  # "ZeRO-2 x 2 ranks -> ZeRO-3 x 4 ranks", after such a resume

    def resume_folder(self) -> Optional[Path]:
        """The checkpoint to resume from, its files checked (collective): under ``auto`` the newest
        complete one whose files match their checksums (damaged ones are named and marked)."""
        if self.cfg.resume == "none":
            return None
        if self.cfg.resume != "auto":
            folder = Path(self.cfg.resume)
            if not is_complete(folder):
                raise ConfigError(f"train.resume: {folder} is not a complete checkpoint folder")
            problems = damaged_files(folder)
            if problems:
                raise RuntimeError(f"checkpoint {folder} is damaged: {'; '.join(problems)} (train.resume names it; "
                                   "resume: auto would fall back to an earlier one)")
            return folder
        candidates = complete_checkpoints(self.dir)
        for folder in reversed(candidates):
            problems = damaged_files(folder)
            if not problems:
                return folder
            dist.barrier()  # every rank has read the marker before rank 0 renames it
            if self.rank == 0:
                print(f"[train] checkpoint {folder} is damaged: {'; '.join(problems)}; falling back to the "
                      "previous complete checkpoint", flush=True)
                mark_damaged(folder, problems)
        if candidates:
            raise RuntimeError(f"every complete checkpoint under {self.dir} is damaged (named above); move them "
                               "away to start over, or set train.resume: none")
        return None

    def resume(self, state) -> Optional[Path]:
        """Loads the checkpoint ``train.resume`` names (if any) into the engine and ``state``."""
        folder = self.resume_folder()
        if folder is None:
            return None
        from pretrain.layout import saved_layout

        old, world, stage = saved_layout(folder), world_size(), self.engine.zero_optimization_stage()
        groups = self.bundle.optimizer.group_names
        saved_groups = old.optimizer_groups or self._default_groups()
        regrouped = saved_groups != groups
        if (old.world_size, old.zero_stage) == (world, stage) and not regrouped:
            # our own file, written by this code: not a stranger's shard, so a full unpickle is fine
            mine = torch.load(folder / f"rank{self.rank:05d}.pt", weights_only=False)
            if not state.layout_changed(mine):
                step, saved = load(self.engine, folder, self.rank)
                state.load_state_dict({**saved, "step": step})
                self.last_saved = step
                return folder
            self.engine.load_checkpoint(str(folder.parent), tag=folder.name)  # the data's layout alone changed
        else:
            self._load_other_layout(folder, [n for g in saved_groups for n in g])
            self.changed_layout = (f"ZeRO-{old.zero_stage} x {old.world_size} ranks -> ZeRO-{stage} x {world} ranks"
                                   if (old.world_size, old.zero_stage) != (world, stage) else "")
            if regrouped:
                self.changed_layout += ("; " if self.changed_layout else "") + (
                    f"optimizer groups {len(saved_groups)} -> {len(groups)}")
        step = checkpoint_step(folder)
        saved = [torch.load(folder / f"rank{r:05d}.pt", weights_only=False) for r in range(old.world_size)]
        state.load_layout(saved, step)
        self.last_saved = step
        return folder

    def _default_groups(self) -> list[list[str]]:
        """The groups a checkpoint that does not record them was written with: the two of every
        earlier version."""
        from pretrain.optim import optimizer_groups

        return optimizer_groups(self.engine.module, settings={})

    def _load_other_layout(self, folder: Path, saved_order: list[str]) -> None:
        from pretrain.layout import load_full_state, read_full_state
        from pretrain.optim import FusedSGD, Lookahead

        kind = self.bundle.optimizer
        if isinstance(kind, (FusedSGD, Lookahead)):
            what = "train.lookahead's slow weights" if isinstance(kind, Lookahead) else "train.optimizer sgd's momentum"
            raise RuntimeError(f"cannot resume from {folder} on another layout or with other optimizer groups: {what} "
                               "are not carried across (DeepSpeed's universal converter keeps Adam's moments only); "
                               "resume it on the ZeRO stage, number of ranks and groups that wrote it")
        try:
            full = read_full_state(folder, self.dir, saved_order)
            load_full_state(self.bundle, full)
        except (ValueError, FileNotFoundError) as err:
            raise RuntimeError(f"cannot resume from {folder} on this layout: {err}") from None

    def due(self, step: int) -> bool:
        """Whether ``save`` at ``step`` writes a periodic checkpoint."""
        return self.cfg.checkpoint and bool(self.cfg.checkpoint_every) and step % self.cfg.checkpoint_every == 0

    def save(self, state, last: bool = False) -> Optional[Path]:
        """Saves at every ``checkpoint_every``-th step and at the last one (``last``: the run ends
        here, finished or stopped); never twice for one step. Collective."""
        if not self.cfg.checkpoint or self.last_saved == state.step or not (last or self.due(state.step)):
            return None
        self.last_saved = state.step
        folder = save(self.engine, self.dir, state.step, self.rank, state.state_dict, self.cfg.keep_checkpoints)
        if self.rank == 0:
            print(f"[train] checkpoint: {folder}", flush=True)
        return folder
