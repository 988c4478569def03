"""Checkpoints written in the background (``train.async_checkpoint``).

A save is cut in two. On the training thread, as in a synchronous save: the barriers and whatever
DeepSpeed gathers (ZeRO-3's parameters, the optimizer's state dicts) through
``engine.save_checkpoint``, whose checkpoint engine is swapped for the length of the call for one
that *snapshots* each state dict it is handed instead of writing it (``snapshot``: every tensor's
storage copied once, into pinned host memory from a GPU or by a memcpy on CPU, so that the next
steps may change the parameters), and this rank's training state likewise. Then one background
thread per rank writes the files with the very call the synchronous save makes (DeepSpeed's own
``TorchCheckpointEngine.save``; ``torch.save`` for the rank file), so every byte is as a synchronous
save would write it; hashes what it wrote (SHA-256) and reports {file: bytes, sha256} to rank 0's
thread through the job's rendezvous store (not a collective: the process group stays the training
thread's; not a file: a full disk must still be able to say so). Rank 0's thread waits for every
rank's report, hashes the few files the training thread wrote (DeepSpeed's recovery script), and
commits: ``pretrain.checkpoint.mark_complete`` (COMPLETE last, ``latest``, pruning), the same as a
synchronous save.

One save is in flight at a time. ``wait`` (collective, on the training thread) joins it and makes
every rank agree on its outcome; the checkpointer calls it before the next save, and the trainer at
the end of the run (a stop by a signal ends the same way, so the checkpoint it promises is complete
before the exit). A failed background write on any rank (a full disk) calls ``on_failure`` at once
(the trainer turns it into a stop at the next step, agreed like a stop signal), and ``wait`` then
raises ``CheckpointSaveError`` on every rank with the failing rank's message, after rank 0 removed
the torn folder. A process killed during the write leaves the folder without COMPLETE: the previous
checkpoint stays ``latest``.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

from pretrain import checkpoint as ckpt
from pretrain.distributed import gather_objects

STORE_PREFIX = "pretrain/checkpoint"

# --------------------------------------------------------------------------------------- snapshot

_ATOMS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size, torch.layout,
          torch.memory_format, type)

# storages of snapshots taken from a device -> the location their source had ("cuda:0"), so that the
# file records it as a synchronous save would; read by the tagger below while the writer thread saves
_device_of: dict[int, str] = {}
_tagging = threading.local()


def _original_location(storage) -> Optional[str]:
    if not getattr(_tagging, "on", False):
        return None
    return _device_of.get(getattr(storage, "_cdata", None))


def _register_tagger() -> None:
    """Once per process, before the first background save (ahead of torch's own taggers)."""
    if not getattr(_register_tagger, "done", False):
        torch.serialization.register_package(1, _original_location, lambda obj, location: None)
        _register_tagger.done = True


class Snapshot:
    """A host copy of a state dict: ``value`` (same containers, same sharing), and, where it came from
    a GPU, the event its copies end with."""

    def __init__(self, value, event=None, device_storages: tuple = ()):
        self.value, self.event, self._device_storages = value, event, device_storages

    def ready(self) -> None:
        if self.event is not None:
            self.event.synchronize()

    @contextlib.contextmanager
    def tagged(self) -> Iterator[None]:
        """Inside: ``torch.save`` of ``value`` records each device storage's original location."""
        _tagging.on = True
        try:
            yield
        finally:
            _tagging.on = False

    def release(self) -> None:
        for key in self._device_storages:
            _device_of.pop(key, None)
        self.value = None


def snapshot(obj: Any) -> Snapshot:
    """A copy of ``obj`` that later steps cannot change, which ``torch.save`` writes byte for byte as
    it writes ``obj``: each tensor storage copied once (views of one storage stay views of one copy,
    at the same offsets and strides: ZeRO's flat buffers), containers of the same types, an object met
    twice copied once, tensors' types, ``requires_grad`` and attributes kept; a device's storages go
    to pinned host memory (non-blocking: ``ready()`` waits for the copies); other objects by
    ``copy.deepcopy``."""
    memo: dict[int, Any] = {}
    storages: dict[int, Any] = {}  # source storage's _cdata -> its host copy (torch.save's identity)
    device_storages: list[int] = []
    on_device = []

    def storage_copy(source):
        key = source._cdata
        if key not in storages:
            if source.device.type == "cpu":
                storages[key] = source.clone()
            else:
                host = torch.empty(source.nbytes(), dtype=torch.uint8, pin_memory=True).untyped_storage()
                host.copy_(source, non_blocking=True)
                storages[key] = host
                _device_of[host._cdata] = torch.serialization.location_tag(source)
                device_storages.append(host._cdata)
                on_device.append(source.device)
        return storages[key]

    def tensor(t: torch.Tensor) -> torch.Tensor:
        if t.layout != torch.strided or t.is_quantized or t.is_conj() or t.is_neg() or type(t) not in (
                torch.Tensor, torch.nn.Parameter):
            raise TypeError(f"async checkpoint: cannot snapshot a {type(t).__name__} ({t.layout}, {t.dtype}); "
                            "set train.async_checkpoint=false")
        out = torch.empty((0,), dtype=t.dtype)
        out.set_(storage_copy(t.untyped_storage()), t.storage_offset(), t.size(), t.stride())
        if type(t) is torch.nn.Parameter:
            out = torch.nn.Parameter(out, requires_grad=t.requires_grad)
        elif t.requires_grad:
            out.requires_grad_(True)
        state = getattr(t, "__dict__", None)
        if state:
            out.__dict__.update(copy_of(state))
        return out

    def copy_of(x):
        if isinstance(x, _ATOMS):
            return x
        if id(x) in memo:
            return memo[id(x)]
        if isinstance(x, torch.Tensor):
            out = tensor(x)
        elif isinstance(x, dict):
            out = copy.copy(x)  # the same type (OrderedDict, defaultdict, ...), keys in their order
            memo[id(x)] = out
            for k, v in x.items():
                out[k] = copy_of(v)
            return out
        elif isinstance(x, list):
            out = copy.copy(x)
            memo[id(x)] = out
            out[:] = [copy_of(v) for v in x]
            return out
        elif isinstance(x, tuple):
            items = [copy_of(v) for v in x]
            if all(a is b for a, b in zip(items, x)):
                out = x  # nothing mutable inside: the tuple itself
            else:
                out = type(x)(*items) if hasattr(x, "_fields") else type(x)(items)
        else:
            out = copy.deepcopy(x, memo)
        memo[id(x)] = out
        memo.setdefault(id(memo), []).append(x)  # (deepcopy's rule: keep the originals alive)
        return out

    value = copy_of(obj)
    event = None
    if on_device:
        event = torch.cuda.Event()  # the copies were queued on the current stream: later steps run after them
        event.record()
    return Snapshot(value, event, tuple(device_storages))


# ------------------------------------------------------------------------------- deferred writes


@dataclass
class PendingFile:
    path: Path
    state: Snapshot
    write: Callable[[Any, str], None]  # (object, path): the call a synchronous save makes


class _Deferring:
    """Stands in for DeepSpeed's checkpoint engine during one ``save_checkpoint``: each state dict it
    is handed is snapshotted and kept for the writer thread, to be written by the real engine's own
    ``save``; everything else (directories, commit) passes through."""

    def __init__(self, inner, deferred: "Deferred"):
        self._inner, self._deferred, self._files = inner, deferred, deferred.files

    def save(self, state_dict, path: str) -> None:
        start = time.perf_counter()
        self._files.append(PendingFile(Path(path), snapshot(state_dict), self._inner.save))
        self._deferred.snapshot_s += time.perf_counter() - start

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _torch_save(obj, path) -> None:
    torch.save(obj, path)


def write_file(pending: PendingFile) -> None:
    """Writes one file as the synchronous save would (the fault probes of tests/faults.py wrap it)."""
    pending.state.ready()
    with pending.state.tagged():
        pending.write(pending.state.value, str(pending.path))


# ------------------------------------------------------------------------------------- the writer


class Deferred:
    """The files of one save, snapshotted on the training thread."""

    def __init__(self):
        self.files: list[PendingFile] = []
        self.snapshot_s = 0.0  # seconds spent copying the state

    def add(self, path: Path, state: Any) -> None:
        """A file the synchronous save writes with ``torch.save`` (this rank's training state)."""
        start = time.perf_counter()
        self.files.append(PendingFile(Path(path), snapshot(state), _torch_save))
        self.snapshot_s += time.perf_counter() - start


class BackgroundWriter:
    """This rank's background checkpoint writer for the DeepSpeed engine ``ds_engine``; at most one
    save in flight.

    ``on_failure(reason)``: called from the writer thread when this rank's write fails (the trainer
    stops the run at the next step); ``wait`` raises the failure on every rank."""

    def __init__(self, ds_engine, rank: int, world: int, on_failure: Optional[Callable[[str], None]] = None):
        from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

        from pretrain.options import ConfigError

        kind = type(ds_engine.checkpoint_engine)
        if kind is not TorchCheckpointEngine:  # the only one whose writes can be deferred as they are
            raise ConfigError(f"train.async_checkpoint: DeepSpeed's checkpoint engine here is {kind.__name__}, "
                              "which writes (or defers) on its own; set train.async_checkpoint=false with it")
        _register_tagger()
        self.rank, self.world, self.on_failure = rank, world, on_failure
        self.pending: Optional[_Save] = None
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.prefix = f"{STORE_PREFIX}/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{attempt}/"
        self.last_stall = 0.0  # seconds the last save held the training thread (snapshot included)
        self.last_snapshot = 0.0  # ... of which copying the state
        self.last_write = 0.0  # seconds its background part took (write, hash, commit)

    @property
    def busy(self) -> bool:
        return self.pending is not None and self.pending.thread.is_alive()

    @contextlib.contextmanager
    def deferring(self, ds_engine) -> Iterator[Deferred]:
        """Inside, ``ds_engine.save_checkpoint`` snapshots instead of writing; the files are in the
        ``Deferred`` yielded (add this rank's own with ``add``)."""
        inner = ds_engine.checkpoint_engine
        deferred = Deferred()
        ds_engine.checkpoint_engine = _Deferring(inner, deferred)
        try:
            yield deferred
        finally:
            ds_engine.checkpoint_engine = inner

    def start(self, deferred: Deferred, ckpt_dir: Path, folder: Path, step: int, keep: int, began: float) -> None:
        assert self.pending is None, "wait() for the save in flight first"
        self.pending = _Save(self, deferred.files, Path(ckpt_dir), Path(folder), step, keep)
        self.last_stall = time.perf_counter() - began
        self.last_snapshot = deferred.snapshot_s
        self.pending.thread.start()

    def wait(self) -> None:
        """Collective: the save in flight (if any) finished on every rank, and is committed; raises
        ``CheckpointSaveError`` on every rank where some rank's write failed.

        Rank 0's thread commits as soon as every rank has reported; where that has not happened yet
        it stops waiting, and the reports travel here instead (a collective, so a rank that died is
        an error here rather than a wait without end)."""
        save, self.pending = self.pending, None
        if save is None:
            return
        save.abandon.set()
        save.thread.join()
        self.last_write = save.seconds
        reports = gather_objects(save.report)
        errors = [r["error"] for r in reports if "error" in r]
        if errors:
            if self.rank == 0:
                import shutil

                shutil.rmtree(save.folder, ignore_errors=True)  # every rank's writer has stopped
            raise ckpt.CheckpointSaveError(errors[0])
        if self.rank == 0 and not save.committed:
            save.commit([r["files"] for r in reports])


class _Save:
    """One rank's part of one save, on its own thread: write and hash this rank's files, report;
    on rank 0, wait for every rank's report and commit."""

    def __init__(self, writer: BackgroundWriter, files: list[PendingFile], ckpt_dir: Path, folder: Path, step: int,
                 keep: int):
        self.writer, self.files, self.ckpt_dir, self.folder = writer, files, ckpt_dir, folder
        self.step, self.keep = step, keep
        self.report: dict = {}  # {"files": {name: {bytes, sha256}}} or {"error": the message the run stops with}
        self.committed = False
        self.abandon = threading.Event()  # rank 0: wait() takes over the waiting for the other ranks
        self.started, self.seconds = time.perf_counter(), 0.0
        self.key = f"{writer.prefix}{folder.name}/"
        self.thread = threading.Thread(target=self._run, name=f"checkpoint-{folder.name}", daemon=True)

    def _run(self) -> None:
        rank, store = self.writer.rank, None
        try:
            store = self._connect()
            written: dict[str, dict] = {}
            for pending in self.files:
                write_file(pending)
                pending.state.release()  # the host copy goes as soon as it is on disk
                name = str(pending.path.relative_to(self.folder))
                written[name] = {"bytes": pending.path.stat().st_size, "sha256": ckpt._sha256(pending.path)}
            self.report = {"files": written}
        except Exception as err:  # noqa: BLE001 - any failure stops the run with its reason
            self.report = {"error": str(ckpt.save_error(self.ckpt_dir, self.folder, self.step, rank, err, remove=False))}
            for pending in self.files:  # free at once what this rank took (a full disk); wait() removes the folder
                pending.path.unlink(missing_ok=True)
        finally:
            for pending in self.files:
                pending.state.release()
            self.files = []
        try:
            if rank != 0 and store is not None:
                store.set(f"{self.key}{rank}", json.dumps(self.report))
            elif rank == 0 and "files" in self.report:
                reports = self._reports(store)
                if reports is not None and not any("error" in r for r in reports):
                    self.commit([self.report["files"]] + [r["files"] for r in reports])
        except Exception as err:  # noqa: BLE001
            self.report = self.report if "error" in self.report else {
                "error": f"rank {rank} could not complete the checkpoint of step {self.step} in {self.folder}: "
                         f"{type(err).__name__}: {err}"}
        self.seconds = time.perf_counter() - self.started
        if "error" in self.report and self.writer.on_failure is not None:
            self.writer.on_failure(self.report["error"])

    def _connect(self):
        """The rendezvous store, on a connection of this thread's own (as the heartbeat's)."""
        if self.writer.world == 1:
            return None
        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                             timeout=timedelta(seconds=60), wait_for_workers=False)

    def _reports(self, store) -> Optional[list[dict]]:
        """Rank 0: the other ranks' reports, once all are in (None if ``wait`` took over first)."""
        if store is None:
            return []
        keys = [f"{self.key}{r}" for r in range(1, self.writer.world)]
        while not store.check(keys):
            if self.abandon.wait(0.02):
                return None
        reports = [json.loads(v) for v in store.multi_get(keys)]
        for key in keys:
            store.delete_key(key)
        return reports

    def commit(self, parts: list[dict[str, dict]]) -> None:
        """Rank 0, every rank's files written (``parts``: each rank's {name: {bytes, sha256}}): hashes
        what the training thread wrote itself (DeepSpeed's recovery script), then the marker."""
        files = {name: v for part in parts for name, v in part.items()}
        for path in sorted(self.folder.rglob("*")):
            name = str(path.relative_to(self.folder))
            if path.is_file() and name not in files and path.name not in (ckpt.COMPLETE, ckpt.DAMAGED):
                files[name] = {"bytes": path.stat().st_size, "sha256": ckpt._sha256(path)}
        ckpt.mark_complete(self.ckpt_dir, self.folder, self.step, dict(sorted(files.items())), self.keep)
        self.committed = True
        sys.stdout.write(f"[train] checkpoint: {self.folder} (written in the background in "
                         f"{time.perf_counter() - self.started:.1f} s)\n")
        sys.stdout.flush()
