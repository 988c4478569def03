"""The run folder on object storage: ``train.remote_sync: {url, every}`` (as OpenCLIP's ``--remote-sync``).

The run folder stays local (``output_dir``: checkpoints are written, hashed and resumed there as
always) and is mirrored to ``url``, any fsspec URL (``s3://bucket/runs/name``; ``gs://``, ``az://``,
``file://`` ... where their filesystem is installed), with the same layout::

    url/checkpoints/step000040/...   each checkpoint folder, uploaded once it is complete locally:
                                     every file, then COMPLETE last (its checksums manifest, as written)
    url/checkpoints/latest           the newest complete checkpoint there
    url/config.yaml, metrics.jsonl, tensorboard/, eval/, ranks/, keys/, slurm/ ...
                                     every other file of the run folder, every ``every`` seconds and at
                                     the end (submitit's folder too, as ``slurm/``, where it lies outside)

Who uploads: rank 0, in a background thread (``RemoteSync``), so training never waits for the
store. The run folder is one folder every rank writes into (a checkpoint's COMPLETE already lists
every rank's files), so one uploader sees it all, and it alone orders the marker after the files;
per-rank uploaders would need a collective to know that all their files are up before the marker,
i.e. a stop of training or a second channel between ranks. Each file is read once: hashed while it
streams out and checked against COMPLETE, so a file damaged on the local disk after the save never
gets a marker remotely. Checkpoints go in order, oldest first (local pruning bounds the backlog to
``train.keep_checkpoints``); a folder pruned locally while it uploads is abandoned, never marked.
After each upload the remote side is pruned as the local one is: the newest ``keep_checkpoints``
complete ones stay; older ones and folders without COMPLETE (torn uploads, damaged ones) go.

A kill at any moment leaves at most one remote folder without COMPLETE; it is never read: resume,
eval and export list COMPLETE markers only, and the next upload of that step replaces its files.

Resume (``train.resume: auto``): before anything is built (the global batch and ``zero_stage: auto``
read the checkpoint to resume), the newest complete checkpoint of the bucket is downloaded into the
local folder when it is newer than the newest local one (so a fresh machine with an empty folder
continues the run). Every rank downloads its share of the files, hashing as it writes; a file that
differs from COMPLETE is named, the remote folder is marked DAMAGED (COMPLETE replaced, as locally)
and the previous remote checkpoint is tried: the fallback of ``pretrain.checkpoint``. The run
folder's other files missing locally come along (metrics.jsonl, TensorBoard, ...), so logs continue.
The local resume then checks the folder again as it checks any.

Readers (``python -m pretrain.eval --checkpoint s3://...``, ``pretrain.export``) find their
checkpoint with ``find_checkpoint`` here: for a URL, ``fetch_for_reading`` downloads a checkpoint folder, the newest complete checkpoint of a run folder (a damaged one named
and skipped; a reader marks nothing), or an exported folder to a local cache (``PRETRAIN_CACHE``,
default ``~/.cache/multimodal-pretrain``; a folder already there with the same COMPLETE is reused)
and hands back the local path.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pretrain import checkpoint
from pretrain.checkpoint import (COMPLETE, DAMAGED, EXPORT_WEIGHTS, CheckpointError, FoundCheckpoint, checkpoint_step,
                                 complete_checkpoints, latest_complete)
from pretrain.distributed import barrier, gather_objects, world_size
from pretrain.options import require

CHUNK = 8 * 2**20
# schemes fsspec reads but cannot write a folder to
_NOT_WRITABLE = {"http", "https", "pipe", "ftp", "github", "zip", "tar", "libarchive", "reference"}
# this project's extras that install an fsspec filesystem, by URL scheme
_EXTRAS = {"s3": "s3", "s3a": "s3"}


class RemoteSyncError(RuntimeError):
    """The object store could not be read or written (the message names the URL and the cause)."""


# ------------------------------------------------------------------------------------- the config


def url_problem(url: str) -> Optional[str]:
    """Why ``url`` cannot hold a run folder (None when it can): no URL, a scheme fsspec does not
    know or cannot write, or a filesystem that is not installed (s3fs for ``s3://``)."""
    if not url:
        return "required: the object-store folder the run folder is mirrored to, e.g. s3://bucket/runs/name"
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme:
        return (f"expected a URL such as s3://bucket/runs/name, got {url!r} (the local run folder is "
                "output_dir itself)")
    if not rest.strip("/"):
        return f"{url!r} names no bucket or folder"
    if scheme in _NOT_WRITABLE:
        return f"{scheme}:// cannot be written to; give an object store (s3://, gs://, az://, ...) or file://"
    import fsspec

    try:
        fsspec.get_filesystem_class(scheme)
    except ValueError:
        return (f"unknown URL scheme {scheme}:// (fsspec knows {len(fsspec.available_protocols())}, e.g. s3, gs, az, "
                "file; see fsspec.available_protocols())")
    except ImportError as err:
        extra = _EXTRAS.get(scheme)
        how = f"pip install -e '.[{extra}]'" if extra else "install the fsspec filesystem for it"
        return f"{scheme}:// URLs need a filesystem that is not installed ({err}): {how}"
    return None


@dataclass(kw_only=True)  # built from the config by name
class RemoteSyncConfig:
    """``train.remote_sync``: the run folder mirrored to object storage (see the module docstring)."""

    url: str = ""  # the remote run folder: s3://bucket/runs/name (any writable fsspec URL)
    every: float = 300.0  # seconds between syncs of the run folder's other files (checkpoints go when complete)

    def check(self, key: str = "train.remote_sync") -> None:
        problem = url_problem(self.url)
        require(problem is None, f"{key}.url", problem or "")
        require(math.isfinite(self.every) and self.every > 0, f"{key}.every",
                f"must be > 0 seconds, got {self.every}")


# --------------------------------------------------------------------------- one remote folder


def _hash_copy(src, dst) -> tuple[int, str]:
    """Copies the open file ``src`` to ``dst``; returns (bytes, SHA-256 hex)."""
    digest, size = hashlib.sha256(), 0
    while True:
        chunk = src.read(CHUNK)
        if not chunk:
            return size, digest.hexdigest()
        dst.write(chunk)
        digest.update(chunk)
        size += len(chunk)


def _mismatch(name: str, size: int, sha: str, want: Optional[dict]) -> Optional[str]:
    """The damaged-file line of ``pretrain.checkpoint.damaged_files`` for a copy that differs from
    what COMPLETE recorded, or None."""
    if want is None:
        return None
    if size != want["bytes"]:
        return f"{name} ({size} bytes, {want['bytes']} written)"
    if sha != want["sha256"]:
        return f"{name} (SHA-256 differs from the one written)"
    return None


class RemoteFolder:
    """A run folder (or a checkpoint or export folder) at an fsspec URL: listing, markers, copies."""

    def __init__(self, url: str):
        import fsspec

        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.root = self.root.rstrip("/")
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        self._local_fs = bool({"file", "local"} & set(protocols))  # needs its folders made

    def path(self, rel: str = "") -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def where(self, rel: str = "") -> str:
        """The URL of ``rel``, for messages."""
        return f"{self.url}/{rel}" if rel else self.url

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def files(self, rel: str = "") -> list[str]:
        """Every file under ``rel``, relative to it, sorted (fresh: the listing cache is dropped)."""
        self.fs.invalidate_cache()
        base = self.path(rel)
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return []
        return sorted(p[len(base) + 1:] for p in found if p.startswith(base + "/"))

    def checkpoints(self, rel: str = "checkpoints") -> tuple[list[tuple[int, str, bytes]], dict[str, list[str]]]:
        """(complete checkpoints as (step, tag, COMPLETE's bytes), oldest first; every folder under
        ``rel`` -> its files). A folder without COMPLETE is not complete, whatever else it holds."""
        folders: dict[str, list[str]] = {}
        for name in self.files(rel):
            tag, sep, inner = name.partition("/")
            if sep:
                folders.setdefault(tag, []).append(inner)
        complete = []
        for tag, names in folders.items():
            if COMPLETE in names:
                marker = self.fs.cat_file(self.path(f"{rel}/{tag}/{COMPLETE}"))
                complete.append((_marker_step(marker, tag), tag, marker))
        return sorted(complete), folders

    def put(self, local: Path, rel: str, want: Optional[dict] = None, name: str = "") -> Optional[str]:
        """Uploads ``local`` to ``rel``, hashing it as it streams out; a copy that differs from
        ``want`` (COMPLETE's entry) is named (as ``name``), and is not to be marked complete."""
        path = self.path(rel)
        if self._local_fs:
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with open(local, "rb") as src, self.fs.open(path, "wb") as dst:
            size, sha = _hash_copy(src, dst)
        return _mismatch(name or rel, size, sha, want)

    def put_bytes(self, rel: str, data: bytes) -> None:
        path = self.path(rel)
        if self._local_fs:
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        self.fs.pipe_file(path, data)

    def get(self, rel: str, local: Path, name: str, want: Optional[dict] = None) -> Optional[str]:
        """Downloads ``rel`` to ``local``, hashing it as it is written; names (as ``name``) a copy
        that is missing or differs from ``want``."""
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            src = self.fs.open(self.path(rel), "rb")
        except FileNotFoundError:
            return f"{name} (missing)"
        with src, open(local, "wb") as dst:
            size, sha = _hash_copy(src, dst)
        return _mismatch(name, size, sha, want)

    def remove(self, rel: str) -> None:
        try:
            self.fs.rm(self.path(rel), recursive=True)
        except FileNotFoundError:
            pass

    def mark_damaged(self, rel: str, problems: list[str]) -> None:
        """COMPLETE -> DAMAGED (with the reasons), as ``pretrain.checkpoint.mark_damaged`` does locally."""
        self.put_bytes(f"{rel}/{DAMAGED}", (json.dumps({"problems": problems, "time": time.time()}) + "\n").encode())
        self.remove(f"{rel}/{COMPLETE}")


def _marker_step(marker: bytes, tag: str) -> int:
    try:
        return int(json.loads(marker)["step"])
    except (ValueError, KeyError, TypeError):  # a damaged marker: its name still tells the step
        digits = "".join(ch for ch in tag if ch.isdigit())
        return int(digits) if digits else 0


def _recorded(marker: bytes) -> tuple[Optional[dict], list[str]]:
    """(name -> {bytes, sha256} from COMPLETE, or None for checkpoints written before checksums;
    problems with the marker itself)."""
    try:
        files = json.loads(marker).get("files")
    except (ValueError, AttributeError) as err:
        return None, [f"{COMPLETE} (unreadable: {err})"]
    if files is not None and not isinstance(files, dict):
        return None, [f"{COMPLETE} (no file list)"]
    return files, []


def _attempts(what, tries: int = 3, pause: float = 1.0):
    """``what()``, tried again after a pause on errors of the store (not on a file that is not there)."""
    for attempt in range(tries):
        try:
            return what()
        except FileNotFoundError:
            raise
        except Exception:  # noqa: BLE001 - the store's errors have no common type (botocore, aiohttp, OSError)
            if attempt == tries - 1:
                raise
            time.sleep(pause * 2**attempt)


# ----------------------------------------------------------------------- the training run's side


class RemoteSync:
    """One run's mirror. ``begin`` (collective) fetches a newer remote checkpoint for the resume;
    ``start`` starts rank 0's uploader; ``close`` (collective) waits for its last pass. Without
    ``train.remote_sync`` every method does nothing."""

    def __init__(self, cfg: Optional[RemoteSyncConfig], out: Path, rank: int, keep: int):
        self.cfg, self.out, self.rank, self.keep = cfg, Path(out), rank, keep
        self.ckpt_dir = self.out / "checkpoints"
        self.remote = RemoteFolder(cfg.url) if cfg is not None else None
        self._thread: Optional[threading.Thread] = None
        self._closing = threading.Event()
        self._seen: dict[str, tuple[int, int]] = {}  # run-folder file -> (size, mtime) last uploaded
        self._done: dict[str, bytes] = {}  # checkpoint tag -> the COMPLETE uploaded with it
        self.error: Optional[str] = None  # the last pass's failure, while it lasts
        self._said: tuple[str, float] = ("", 0.0)
        self.extra = self._submitit_folder()

    @classmethod
    def begin(cls, train, out: Path, rank: int) -> "RemoteSync":
        """Collective. The run's mirror; under ``train.resume: auto`` the newest complete remote
        checkpoint is in the local folder afterwards when it was newer than the local ones."""
        sync = cls(train.remote_sync, out, rank, train.keep_checkpoints)
        if sync.remote is not None and train.resume == "auto":
            sync.fetch_newer()
        return sync

    # -- resume

    def fetch_newer(self) -> Optional[Path]:
        """Collective: downloads the newest complete remote checkpoint newer than every local one
        (a damaged one named, marked and skipped); returns its local folder, or None."""
        local = latest_complete(self.ckpt_dir)
        newest_local = checkpoint_step(local) if local is not None else -1
        listing: tuple = ([], {}, None)
        if self.rank == 0:
            try:
                listing = (*_attempts(self.remote.checkpoints), None)
            except Exception as err:  # noqa: BLE001 - every rank must hear of it
                listing = ([], {}, f"{type(err).__name__}: {err}")
        complete, folders, error = gather_objects(listing)[0]
        if error is not None:
            raise RemoteSyncError(f"train.remote_sync.url: cannot list {self.remote.where('checkpoints')}: {error}")
        if self.rank == 0:
            done = {tag for _, tag, _ in complete}
            for tag in sorted(set(folders) - done):
                print(f"[train] remote {self.remote.where('checkpoints/' + tag)} has no COMPLETE marker (an "
                      "interrupted upload or a damaged checkpoint): not used", flush=True)
        for step, tag, marker in reversed(complete):
            if step <= newest_local:
                break
            problems = self._download(tag, marker, folders[tag])
            if not problems:
                if self.rank == 0:
                    self._fetch_run_files()
                    print(f"[train] fetched {self.remote.where('checkpoints/' + tag)} (step {step}, newer than the "
                          f"local checkpoints) into {self.ckpt_dir / tag}", flush=True)
                self._done[tag] = marker
                return self.ckpt_dir / tag
            if self.rank == 0:
                print(f"[train] checkpoint {self.remote.where('checkpoints/' + tag)} is damaged: {'; '.join(problems)}; "
                      "falling back to the previous complete checkpoint", flush=True)
                self.remote.mark_damaged(f"checkpoints/{tag}", problems)
                shutil.rmtree(self.ckpt_dir / tag, ignore_errors=True)
        barrier()
        return None

    def _download(self, tag: str, marker: bytes, names: list[str]) -> list[str]:
        """Collective: the remote checkpoint ``tag`` into the local folder, every rank its share,
        checked against ``marker``; COMPLETE (the same bytes) written last. Returns the problems."""
        folder = self.ckpt_dir / tag
        if self.rank == 0:
            shutil.rmtree(folder, ignore_errors=True)  # a leftover of an interrupted download or save
            folder.mkdir(parents=True)
        barrier()
        recorded, problems = _recorded(marker)
        wanted = sorted(recorded) if recorded is not None else [n for n in names if n not in (COMPLETE, DAMAGED)]
        errors = []
        for name in ([] if problems else wanted[self.rank::world_size()]):
            want = recorded.get(name) if recorded is not None else None
            try:
                problem = _attempts(lambda: self.remote.get(f"checkpoints/{tag}/{name}", folder / name, name, want))
            except Exception as err:  # noqa: BLE001 - a store that fails is not a damaged checkpoint: stop
                errors.append(f"{name}: {type(err).__name__}: {err}")
                continue
            if problem:
                problems.append(problem)
        parts = gather_objects((problems, errors))
        errors = [e for _, part in parts for e in part]
        if errors:
            raise RemoteSyncError(f"cannot download {self.remote.where('checkpoints/' + tag)} (train.remote_sync.url): "
                                  f"{'; '.join(errors)}; the same command tries again")
        problems = sorted({p for part, _ in parts for p in part})
        if not problems and self.rank == 0:
            (folder / f"{COMPLETE}.tmp").write_bytes(marker)
            os.replace(folder / f"{COMPLETE}.tmp", folder / COMPLETE)
            (self.ckpt_dir / "latest.tmp").write_text(tag + "\n")
            os.replace(self.ckpt_dir / "latest.tmp", self.ckpt_dir / "latest")
        barrier()
        return problems

    def _fetch_run_files(self) -> None:
        """The remote run folder's other files that are missing locally (logs continue, not restart);
        a failure here only costs the history of the logs, so it is said and the run goes on."""
        try:
            for rel in self.remote.files():
                if rel.startswith(("checkpoints/", "slurm/")) or (self.out / rel).exists():
                    continue
                _attempts(lambda: self.remote.get(rel, self.out / rel, rel))
                st = (self.out / rel).stat()
                self._seen[rel] = (st.st_size, st.st_mtime_ns)
        except Exception as err:  # noqa: BLE001 - the store's errors have no common type
            print(f"[train] could not fetch the run's logs from {self.remote.url} ({type(err).__name__}: {err}); "
                  "metrics.jsonl and TensorBoard start anew here (the bucket's copies are overwritten)", flush=True)

    # -- the uploader

    def start(self) -> "RemoteSync":
        """Rank 0: the uploader thread (a pass every second for new checkpoints; the other files
        every ``every`` seconds)."""
        if self.remote is not None and self.rank == 0 and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="remote-sync", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        next_files = 0.0
        while not self._closing.wait(min(1.0, self.cfg.every)):
            try:
                if time.monotonic() >= next_files:
                    next_files = time.monotonic() + self.cfg.every
                    self.sync_files()
                self.sync_checkpoints()
                self.error = None
            except Exception as err:  # noqa: BLE001 - a store that fails now may answer at the next pass
                self._fail(err, "will try again")
        for attempt in range(3):  # the last pass: the run's final files and checkpoint
            try:
                self.sync_files()
                self.sync_checkpoints()
                self.error = None
                return
            except Exception as err:  # noqa: BLE001
                self._fail(err, "will try again" if attempt < 2 else "giving up")
                time.sleep(2 ** attempt)

    def _fail(self, err: Exception, then: str) -> None:
        self.error = f"{type(err).__name__}: {err}"
        now = time.monotonic()
        if self._said[0] != self.error or now - self._said[1] > 60:  # the same failure at most once a minute
            print(f"[remote] sync to {self.remote.url} failed: {self.error}; {then}", flush=True)
            self._said = (self.error, now)

    def sync_files(self) -> None:
        """Uploads the run folder's files (all but checkpoints/) that changed since their last upload."""
        places = [(self.out, "")] + ([(self.extra, "slurm/")] if self.extra is not None else [])
        for base, prefix in places:
            for dirpath, dirnames, filenames in os.walk(base):
                if Path(dirpath) == self.out:
                    dirnames[:] = [d for d in dirnames if d != "checkpoints"]
                for name in filenames:
                    path = Path(dirpath) / name
                    rel = prefix + str(path.relative_to(base))
                    try:
                        st = path.stat()
                        if self._seen.get(rel) == (st.st_size, st.st_mtime_ns):
                            continue
                        self.remote.put(path, rel)
                    except FileNotFoundError:  # gone meanwhile (a temporary file replaced)
                        continue
                    self._seen[rel] = (st.st_size, st.st_mtime_ns)  # as before the read: a change meanwhile goes next time

    def sync_checkpoints(self) -> None:
        """Uploads every complete local checkpoint not yet up (oldest first), then prunes remotely."""
        pending = []
        for folder in complete_checkpoints(self.ckpt_dir):
            try:
                marker = (folder / COMPLETE).read_bytes()
            except FileNotFoundError:  # pruned meanwhile
                continue
            if self._done.get(folder.name) != marker:
                pending.append((folder, marker))
        if not pending:
            return
        complete, folders = self.remote.checkpoints()
        remote_markers = {tag: m for _, tag, m in complete}
        changed = False
        for folder, marker in pending:
            if remote_markers.get(folder.name) == marker:  # already there (uploaded before a restart)
                self._done[folder.name] = marker
                continue
            changed |= self._upload(folder, marker, replace=folder.name in folders)
        if changed:
            self._prune()

    def _upload(self, folder: Path, marker: bytes, replace: bool) -> bool:
        """One checkpoint folder: its files, then COMPLETE. Returns whether it went up whole."""
        rel = f"checkpoints/{folder.name}"
        if replace:  # a torn upload, a damaged or stale copy: never mixed with these files
            self.remote.remove(rel)
        recorded, _ = _recorded(marker)
        names = sorted(recorded) if recorded is not None else sorted(
            str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name not in (COMPLETE, DAMAGED))
        problems = []
        for name in names:
            try:
                problem = self.remote.put(folder / name, f"{rel}/{name}", recorded.get(name) if recorded else None, name)
            except FileNotFoundError:
                print(f"[remote] {folder} was pruned locally before its upload ended: not uploaded", flush=True)
                self._done[folder.name] = marker
                return False
            if problem:
                problems.append(problem)
        if problems:
            print(f"[remote] {folder} differs from its COMPLETE on the local disk ({'; '.join(problems)}): "
                  "not marked complete remotely", flush=True)
            self._done[folder.name] = marker
            return False
        self.remote.put_bytes(f"{rel}/{COMPLETE}", marker)  # last: now it counts
        self._done[folder.name] = marker
        print(f"[remote] checkpoint {folder.name} -> {self.remote.where(rel)}", flush=True)
        return True

    def _prune(self) -> None:
        """Remotely as locally: the newest ``keep`` complete checkpoints stay; older ones and
        folders without COMPLETE (torn uploads, damaged ones) go; ``latest`` names the newest."""
        complete, folders = self.remote.checkpoints()
        keep = {tag for _, tag, _ in complete[-self.keep:]}
        for tag in folders:
            if tag not in keep:
                self.remote.remove(f"checkpoints/{tag}")
        if complete:
            self.remote.put_bytes("checkpoints/latest", (complete[-1][1] + "\n").encode())

    def close(self, stopped: bool = False) -> None:
        """Collective: rank 0's last pass (the final files and checkpoint), every rank waiting with
        it in short collectives (a long upload never meets the process group's timeout). A last pass
        that fails stops a finished run with the reason (the local folder holds everything); a run
        stopped by a signal only says so (its exit code asks for the resume)."""
        if self.remote is None:
            return
        self._closing.set()
        while True:
            if self._thread is not None:
                self._thread.join(timeout=1.0)
            done = self._thread is None or not self._thread.is_alive()
            state = gather_objects((done, self.error if done else None))
            if all(d for d, _ in state):
                break
        error = state[0][1]
        if error is None:
            return
        message = (f"the run folder {self.out} could not be synced to {self.remote.url} (train.remote_sync.url): "
                   f"{error}; the local folder holds everything")
        if stopped:
            if self.rank == 0:
                print(f"[train] {message}", flush=True)
            return
        raise RemoteSyncError(message)

    def _submitit_folder(self) -> Optional[Path]:
        """submitit's log folder when it lies outside the run folder (a sweep's shared one)."""
        folder = os.environ.get("SUBMITIT_FOLDER")
        if not folder or "%" in folder or self.remote is None:
            return None
        folder = Path(folder).resolve()
        inside = folder == self.out.resolve() or self.out.resolve() in folder.parents
        return None if inside or not folder.is_dir() else folder


# ------------------------------------------------------------------------------- eval and export


def cache_root() -> Path:
    """Where remote checkpoints are downloaded for reading: ``PRETRAIN_CACHE``, else
    ``$XDG_CACHE_HOME/multimodal-pretrain``, else ``~/.cache/multimodal-pretrain``."""
    if os.environ.get("PRETRAIN_CACHE"):
        return Path(os.environ["PRETRAIN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "multimodal-pretrain"


def _cache_for(url: str) -> Path:
    scheme, _, rest = url.rstrip("/").partition("://")
    return cache_root() / "remote" / scheme / rest.lstrip("/")


def find_checkpoint(path: str | Path, what: str = "--checkpoint") -> FoundCheckpoint:
    """``pretrain.checkpoint.find_checkpoint`` of a local folder or of a URL (``s3://...``: a
    checkpoint, run or exported folder, downloaded to the local cache first): what
    ``pretrain.eval`` and ``pretrain.export`` read ``--checkpoint`` with."""
    if "://" in str(path):
        path = fetch_for_reading(str(path), what)
    return checkpoint.find_checkpoint(path, what)


def _parent(url: str) -> str:
    return url.rstrip("/").rpartition("/")[0]


def fetch_for_reading(url: str, what: str = "--checkpoint") -> Path:
    """A remote checkpoint folder, run folder (its newest complete checkpoint whose files match
    their checksums) or exported folder, downloaded to the local cache; returns the local path of
    the same kind (a checkpoint folder ``<cache>/.../RUN/checkpoints/TAG`` beside the run's
    config.yaml, as remotely). ``pretrain.checkpoint.CheckpointError`` naming ``what`` when it is
    none of them, is damaged (a checkpoint folder named) or cannot be read."""
    url = url.rstrip("/")
    problem = url_problem(url)
    if problem is not None:
        raise CheckpointError(f"{what}: {problem}")
    try:
        remote = RemoteFolder(url)
        if remote.exists(EXPORT_WEIGHTS):
            local = _cache_for(url)
            for name in remote.files():
                _attempts(lambda: remote.get(name, local / name, name))
            return local
        if remote.exists(COMPLETE):  # a checkpoint folder (RUN/checkpoints/TAG)
            marker = remote.fs.cat_file(remote.path(COMPLETE))
            tag = url.rpartition("/")[2]
            problems = _fetch_alone(RemoteFolder(_parent(url)), tag, marker, _cache_for(_parent(url)))
            if problems:
                raise CheckpointError(f"{what}: checkpoint {url} is damaged: {'; '.join(problems)}")
            _config_beside(_parent(_parent(url)))
            return _cache_for(url)
        complete, folders = remote.checkpoints()
        if not folders:
            raise CheckpointError(f"{what}: {url} is not a checkpoint, run or exported folder")
        for step, tag, marker in reversed(complete):
            problems = _fetch_alone(RemoteFolder(f"{url}/checkpoints"), tag, marker, _cache_for(f"{url}/checkpoints"))
            if not problems:
                _config_beside(url)
                return _cache_for(url)
            print(f"[checkpoint] {remote.where('checkpoints/' + tag)} is damaged: {'; '.join(problems)}; "
                  "using the previous complete checkpoint", flush=True)
        raise CheckpointError(f"{what}: no complete checkpoint under {remote.where('checkpoints')}"
                              + (" whose files match their checksums" if complete else ""))
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - the store's errors (credentials, no bucket, network)
        raise CheckpointError(f"{what}: cannot read {url}: {type(err).__name__}: {err}") from None


def _config_beside(run_url: str) -> None:
    """The run's config.yaml into its cached folder (where the remote run has one)."""
    remote, local = RemoteFolder(run_url), _cache_for(run_url)
    if remote.exists("config.yaml"):
        tmp = local / f".config.yaml.{os.getpid()}"
        _attempts(lambda: remote.get("config.yaml", tmp, "config.yaml"))
        os.replace(tmp, local / "config.yaml")


def _fetch_alone(remote: RemoteFolder, tag: str, marker: bytes, local: Path) -> list[str]:
    """One process: the checkpoint folder ``remote/tag`` into ``local/tag`` (kept when its
    COMPLETE is the same), through a private folder renamed into place. Returns the problems."""
    dest = local / tag
    if (dest / COMPLETE).is_file() and (dest / COMPLETE).read_bytes() == marker:
        return []
    recorded, problems = _recorded(marker)
    if problems:
        return problems
    part = local / f".{tag}.{os.getpid()}.part"
    shutil.rmtree(part, ignore_errors=True)
    names = sorted(recorded) if recorded is not None else [n for n in remote.files(tag) if n not in (COMPLETE, DAMAGED)]
    for name in names:
        want = recorded.get(name) if recorded is not None else None
        problem = _attempts(lambda: remote.get(f"{tag}/{name}", part / name, name, want))
        if problem:
            problems.append(problem)
    if problems:
        shutil.rmtree(part, ignore_errors=True)
        return problems
    (part / COMPLETE).write_bytes(marker)
    shutil.rmtree(dest, ignore_errors=True)  # a stale copy
    try:
        os.rename(part, dest)
    except OSError:  # another process (a rank of the same evaluation) put it there first
        shutil.rmtree(part, ignore_errors=True)
    return []
