"""A hung rank ends the job with its name, and every live rank says where it stood.

Every rank runs a ``Heartbeat`` thread from the start of training to its end: every few seconds it
adds 1 to its own counter in the job's rendezvous store (its own client connection to the
MASTER_ADDR:MASTER_PORT server every launcher already runs) and reads the other ranks' counters.
A rank whose counter has not moved for ``train.collective_timeout`` seconds by this rank's clock
(a stopped, frozen or lost process: the thread runs even while the training thread waits inside a
collective, since waiting collectives release the GIL) is named on stderr and this rank leaves
with exit code 1; the launcher then ends the rest. A store that stops answering for as long ends
the job the same way (it lives in rank 0's process, or in torchrun's agent). Live ranks that are
only slow (a long evaluation, a checkpoint save) keep beating and are never named.

Counters, not clock times, so that clocks of different hosts never need to agree. The process
group's own timeout (``init_distributed(timeout=...)``) is set to twice the collective timeout: the
backstop for live ranks that wait on each other forever (a collective called by some ranks only).

Where each rank stood (``output_dir/hang/rank<k>.txt``). Before a rank ends the job it writes, from
this thread while the training thread still waits, its report (``write_report``): the collective
it waits in as its stack shows it (torch.distributed's function, DeepSpeed's caller, our code), the
last collectives of ours it entered (``pretrain.distributed.COLLECTIVES``: name, step, entered,
left), the collectives torch's flight recorder saw (DeepSpeed's included; the whole record beside it
as ``flight_rank<k>.json``) and the Python stack of every thread. Then it raises a flag in the store
(``<prefix>hang``, the reason beside it) that every other rank's heartbeat reads with its counters:
each live rank writes its own report, says so in the store (``<prefix>hang/file/<k>``: the path),
and leaves too; the rank that raised the flag waits (up to two beats and a few seconds) until every
rank it still hears from has written, then names the files in its message. A collective that
times out on the process group's timeout (``Heartbeat.timeouts()`` around the training loop) does
the same from the training thread and raises ``HangError`` naming the files. A SIGTERM/SIGUSR1 that
arrives while the training thread waits in a collective (its handler cannot run until it returns)
is seen here through the signal wake-up descriptor: after a beat with the thread still in the same
place, this rank writes its report (the launcher's grace before SIGKILL is ~30 s) and lets the
stop go on as usual.
"""
from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator, Optional

import torch.distributed as dist

from pretrain.distributed import COLLECTIVES, STOP_SIGNALS

PREFIX = "pretrain/heartbeat"
FLIGHT_ENTRIES_SHOWN = 8  # the flight recorder's newest entries in the report (all of them in the json)


class HangError(RuntimeError):
    """A collective timed out; the message names the reports (``output_dir/hang``)."""


def is_collective_timeout(err: BaseException) -> bool:
    """What torch raises when a collective waits past the process group's timeout (gloo: "Timed out
    waiting ... ms", "Application timeout caused pair closure"; NCCL: a DistBackendError)."""
    backend_error = getattr(dist, "DistBackendError", None)
    if backend_error is not None and isinstance(err, backend_error):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("timed out" in text or "application timeout" in text)


class Heartbeat:
    def __init__(self, rank: int, world: int, timeout: float, period: Optional[float] = None,
                 hang_dir: Optional[Path] = None):
        self.rank, self.world, self.timeout = rank, world, float(timeout)
        self.period = period or max(0.5, min(5.0, self.timeout / 6))
        self.hang_dir = Path(hang_dir) if hang_dir is not None else None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._reported = threading.Lock()  # one report per process (the thread's or the training thread's)
        self._wake: Optional[tuple[socket.socket, socket.socket]] = None  # signal wake-up: (read, write)
        self._old_wakeup_fd = -1
        self.heard: list[float] = [time.monotonic()] * world  # when each rank's counter last moved
        # a new attempt of an elastic (torchrun --max-restarts) job must not read the last one's counters
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.prefix = f"{PREFIX}/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{attempt}/"
        self.hang_key = f"{self.prefix}hang"

    def start(self) -> "Heartbeat":
        if self.world > 1 and self.timeout > 0 and "MASTER_ADDR" in os.environ:
            self._watch_signals()
            self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._wake is not None:
            with contextlib.suppress(OSError):
                self._wake[1].send(b"\0")  # (not a signal number) wakes the thread now
        if self._thread is not None:
            self._thread.join(timeout=2 * self.period + 5)
        if self._wake is not None and threading.current_thread() is threading.main_thread():
            with contextlib.suppress(ValueError):
                signal.set_wakeup_fd(self._old_wakeup_fd)
            for s in self._wake:
                s.close()
            self._wake = None

    @contextlib.contextmanager
    def timeouts(self) -> Iterator[None]:
        """Around the training loop: a collective that times out (the process group's timeout) writes
        this rank's report, asks every other rank for theirs, and raises ``HangError`` naming them."""
        try:
            yield
        except Exception as err:
            if not is_collective_timeout(err):
                raise
            reason = f"a collective timed out on rank {self.rank} ({type(err).__name__}: {str(err)[:300]})"
            files = self.report(reason, error=err)
            raise HangError(f"{reason}; where each rank stood: {_names(files)}") from err

    # -- the report

    def silent(self, now: Optional[float] = None) -> list[int]:
        now = time.monotonic() if now is None else now
        if self._thread is None:
            return []
        return [r for r in range(self.world) if r != self.rank and now - self.heard[r] > self.timeout]

    def report(self, reason: str, error: Optional[BaseException] = None, store=None,
               silent: Optional[list[int]] = None) -> list[str]:
        """Writes this rank's report, raises the hang flag for the others and waits until every rank
        still heard from has written its own; returns the files written (this rank's first)."""
        if not self._reported.acquire(blocking=False):
            return []  # the other thread is reporting already
        mine = self._write(reason, error)
        if self.world == 1 or "MASTER_ADDR" not in os.environ:
            return [mine] if mine else []
        if self._thread is None:  # no heartbeats (train.collective_timeout 0): nobody would read the flag
            return [mine] if mine else []
        silent = self.silent() if silent is None else silent
        live = [r for r in range(self.world) if r != self.rank and r not in silent]
        files = {self.rank: mine} if mine else {}
        try:
            store = store or self._connect()
            if mine:
                store.set(f"{self.hang_key}/file/{self.rank}", mine)
            store.set(f"{self.hang_key}/why", f"rank {self.rank}: {reason}")
            store.add(self.hang_key, 1)
            keys = {r: f"{self.hang_key}/file/{r}" for r in live}
            deadline = time.monotonic() + 2 * self.period + 5
            while live and time.monotonic() < deadline and not store.check(list(keys.values())):
                time.sleep(0.1)
            for r, key in keys.items():
                if store.check([key]):
                    files[r] = store.get(key).decode()
        except Exception as err:  # noqa: BLE001 - a store that does not answer: this rank's report alone
            print(f"[train] rank {self.rank}: could not ask the other ranks for their stacks ({err})",
                  file=sys.stderr, flush=True)
        return [files[r] for r in sorted(files, key=lambda r: (r != self.rank, r))]

    def _write(self, reason: str, error: Optional[BaseException] = None) -> Optional[str]:
        if self.hang_dir is None:
            return None
        try:
            return str(write_report(self.hang_dir, self.rank, self.world, reason, error=error))
        except Exception as err:  # noqa: BLE001 - the job ends anyway; say why the file is missing
            print(f"[train] rank {self.rank}: could not write its stacks to {self.hang_dir} ({err})",
                  file=sys.stderr, flush=True)
            return None

    # -- the thread

    def _connect(self):
        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                             timeout=timedelta(seconds=max(2 * self.period, 2.0)), wait_for_workers=False)

    def _watch_signals(self) -> None:
        """A stop signal's number also goes to a socket this thread reads (Python runs the handler
        only when the training thread returns to Python, which a waiting collective does not)."""
        if threading.current_thread() is not threading.main_thread():
            return
        read, write = socket.socketpair()
        read.setblocking(False)
        write.setblocking(False)
        try:
            self._old_wakeup_fd = signal.set_wakeup_fd(write.fileno(), warn_on_full_buffer=False)
        except ValueError:
            read.close()
            write.close()
            return
        self._wake = (read, write)

    def _wait(self, seconds: float) -> list[int]:
        """Sleeps a beat (or until stopped); returns the stop signals that arrived meanwhile."""
        if self._wake is None:
            self._stop.wait(seconds)
            return []
        ready, _, _ = select.select([self._wake[0]], [], [], seconds)
        if not ready:
            return []
        with contextlib.suppress(OSError):
            return [n for n in self._wake[0].recv(64) if n in {int(s) for s in STOP_SIGNALS}]
        return []

    def _run(self) -> None:
        store, start = None, time.monotonic()
        keys = [f"{self.prefix}{r}" for r in range(self.world)] + [self.hang_key]
        counts = [None] * self.world
        self.heard = [start] * self.world
        store_heard = start
        signalled = None  # [signal name, where the training thread stood, when] of a stop signal not judged yet
        while True:
            arrived = self._wait(self.period)
            if self._stop.is_set():
                return
            now = time.monotonic()
            if arrived and signalled is None:
                signalled = [signal.Signals(arrived[0]).name, _main_position(), now]
            elif signalled is not None and now - signalled[2] >= self.period:  # (other signals wake it early)
                signalled = self._judge_signal(*signalled)
            try:
                store = store or self._connect()
                store.add(keys[self.rank], 1)
                # two requests per beat whatever the world size; until every rank has beaten once, one
                # per rank (adding 0 reads without waiting, and creates the counter of a rank not yet there)
                values = ([int(v) for v in store.multi_get(keys)] if store.check(keys)
                          else [store.add(k, 0) for k in keys])
                for r, c in enumerate(values[: self.world]):
                    if c != counts[r]:
                        counts[r], self.heard[r] = c, now
                store_heard = now
                if values[self.world] > 0:  # another rank ends the job: this rank's report first
                    self._follow(store)
            except Exception:  # noqa: BLE001 - a store that does not answer: judged by how long below
                store = None
                if now - store_heard > self.timeout:
                    self._leave(f"the job's rendezvous store ({os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}, "
                                f"held by rank 0 or the launcher) has not answered for {now - store_heard:.0f} s")
                continue
            silent = self.silent(now)
            if silent:
                names = ", ".join(f"rank {r} (last heard {now - self.heard[r]:.0f} s ago)" for r in silent)
                self._leave(f"{names} stopped answering", store=store, silent=silent)

    def _leave(self, what: str, store=None, silent: Optional[list[int]] = None) -> None:
        if self._stop.is_set():
            return
        why = f"{what} (train.collective_timeout={self.timeout:g} s)"
        if store is not None:
            files = self.report(why, store=store, silent=silent or [])
        else:  # the store is gone: no flag to raise, this rank's report alone
            files = [f for f in [self._write(why)] if f] if self._reported.acquire(blocking=False) else []
        print(f"[train] rank {self.rank}: {why}; ending the job. Where each rank stood: {_names(files)}",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)

    def _follow(self, store) -> None:
        """Another rank raised the hang flag: this rank's report, its path in the store, and out."""
        if self._stop.is_set() or not self._reported.acquire(blocking=False):
            return
        try:
            why = store.get(f"{self.hang_key}/why").decode()
        except Exception:  # noqa: BLE001 - the flag without its reason (the store went away meanwhile)
            why = "another rank ended the job"
        mine = self._write(f"{why} (reported by that rank)")
        with contextlib.suppress(Exception):
            if mine:
                store.set(f"{self.hang_key}/file/{self.rank}", mine)
        print(f"[train] rank {self.rank}: ending the job: {why}. Where this rank stood: "
              f"{_names([mine] if mine else [])}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)

    def _judge_signal(self, name: str, before: Optional[tuple], _: float) -> Optional[list]:
        """Beats after a stop signal: the training thread found in the same collective call a beat
        apart (the same frame object at the same instruction) cannot stop at a step boundary: its
        report now. Returns what to judge at the next beat (None: judged)."""
        now = _main_position()
        if not _in_collective(_main_frames()) or self.hang_dir is None:
            return None  # the stop goes its usual way
        if now is None or before is None or now[0] is not before[0] or now[1] != before[1]:
            return [name, now, time.monotonic()]  # entered a collective since: judged a beat from now
        if not self._reported.acquire(blocking=False):
            return None
        mine = self._write(f"{name} arrived while this rank waited in a collective (still there a beat, "
                           f"{self.period:g} s, later; the stop waits for it to return)")
        self._reported.release()  # a later hang or timeout may still write its own report
        print(f"[train] rank {self.rank}: {name} arrived while it waits in a collective; where it stands: "
              f"{_names([mine] if mine else [])}", file=sys.stderr, flush=True)
        return None


def _names(files: list[str]) -> str:
    return ", ".join(files) if files else "(no report written)"


# ------------------------------------------------------------------------------------- the report


def _main_frames() -> list:
    """The training (main) thread's frames, innermost first."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    out = []
    while frame is not None:
        out.append(frame)
        frame = frame.f_back
    return out


def _main_position() -> Optional[tuple]:
    """The training thread's innermost frame and instruction. The frame itself, not its id: held
    for a beat, its address cannot be reused by a later call's frame, so ``is`` means not moved."""
    frames = _main_frames()
    return (frames[0], frames[0].f_lasti) if frames else None


def _short(filename: str) -> str:
    """A path from the package down (``torch/distributed/...``, ``deepspeed/...``, ``pretrain/...``)."""
    parts = filename.replace("\\", "/").split("/")[:-1]
    found = [len(parts) - 1 - parts[::-1].index(p) for p in ("pretrain", "deepspeed", "torch", "tests", "benchmarks")
             if p in parts]
    return "/".join(filename.replace("\\", "/").split("/")[max(found):]) if found else filename


def _in_collective(frames: list) -> bool:
    """In torch.distributed or DeepSpeed's comm (the innermost frames), or inside one of our
    recorded collectives (``work.wait()`` of an asynchronous one shows only our frame)."""
    entries = COLLECTIVES.entries
    inside_ours = bool(entries) and entries[-1][3] is None
    return inside_ours or any(_kind(f) in ("torch.distributed", "DeepSpeed comm") for f in frames[:6])


def _kind(frame) -> str:
    path = _short(frame.f_code.co_filename)
    for prefix, kind in (("torch/distributed/", "torch.distributed"), ("deepspeed/comm/", "DeepSpeed comm"),
                         ("deepspeed/", "DeepSpeed"), ("pretrain/", "ours")):
        if path.startswith(prefix):
            return kind
    return ""


def waiting_in(frames: list) -> list[str]:
    """Where a stack stands, innermost first: torch.distributed's function, DeepSpeed's comm call
    and its DeepSpeed caller, our code (one line each, the innermost frame of each kind)."""
    seen, lines = set(), []
    for frame in frames:
        kind = _kind(frame)
        if kind and kind not in seen:
            seen.add(kind)
            lines.append(f"{kind}: {frame.f_code.co_name} ({_short(frame.f_code.co_filename)}:{frame.f_lineno})")
    return lines


def _clock(t: Optional[float]) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%H:%M:%S.%f")[:-3] if t else "-"


def _flight_recorder(hang_dir: Path, rank: int) -> list[str]:
    """The collectives torch's flight recorder kept (when switched on: ``flight_recorder_env``), the
    newest few as lines; the whole record to ``flight_rank<k>.json``."""
    try:
        from torch._C import _distributed_c10d as c10d

        backend = dist.get_backend() if dist.is_initialized() else ""
        dump = c10d._dump_nccl_trace_json if backend == "nccl" else c10d._dump_fr_trace_json
        record = json.loads(dump())
    except Exception as err:  # noqa: BLE001 - an older torch, no recorder: the report goes on without it
        return [f"(torch's flight recorder could not be read: {err})"]
    entries = record.get("entries") or []
    if not entries:
        return ["(none: torch's flight recorder is off; TORCH_NCCL_TRACE_BUFFER_SIZE > 0 switches it on)"]
    path = hang_dir / f"flight_rank{rank}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    lines = []
    for pg, status in (record.get("pg_status") or {}).items():
        lines.append(f"process group {pg}: last enqueued #{status.get('last_enqueued_collective')}, "
                     f"last started #{status.get('last_started_collective')}, "
                     f"last completed #{status.get('last_completed_collective')}")
    for e in entries[-FLIGHT_ENTRIES_SHOWN:]:
        pg, name = (list(e.get("process_group") or []) + ["?", "?"])[:2]
        group = pg if name in ("undefined", "", "?") else f"{pg} ({name})"
        lines.append(f"#{e.get('collective_seq_id')} {e.get('profiling_name')} process group {group} "
                     f"sizes {e.get('input_sizes')} state {e.get('state')} created "
                     f"{_clock(e.get('time_created_ns', 0) / 1e9)}")
    lines.append(f"(all {len(entries)} entries: {path})")
    return lines


def write_report(hang_dir: Path, rank: int, world: int, reason: str, error: Optional[BaseException] = None) -> Path:
    """``hang_dir/rank<k>.txt``: why, where the training thread waits, our last collectives, the
    flight recorder's, and every thread's Python stack (``error``'s traceback for the training
    thread when it has left the collective by raising)."""
    hang_dir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    frames = sys._current_frames()
    names = {t.ident: t.name for t in threading.enumerate()}
    main = threading.main_thread().ident
    out = [f"rank {rank} of {world}, pid {os.getpid()} on {os.uname().nodename}, "
           f"{datetime.fromtimestamp(now, timezone.utc).isoformat(timespec='milliseconds')}",
           f"why: {reason}", ""]
    if error is not None:
        tb = error.__traceback__
        stack = [f for f, _ in traceback.walk_tb(tb)][::-1]  # innermost first
        out.append("the training thread left a collective with an error; it waited in:")
        out += [f"  {line}" for line in waiting_in(stack)] or ["  (no collective frame in its traceback)"]
    else:
        main_frames = _main_frames()
        if _in_collective(main_frames):
            out.append("the training thread waits in:")
            out += [f"  {line}" for line in waiting_in(main_frames)]
        else:
            out.append("the training thread is not inside a collective now; it stands in:")
            out += [f"  {line}" for line in waiting_in(main_frames)]
            if main_frames:
                f = main_frames[0]
                out.append(f"  innermost: {f.f_code.co_name} ({_short(f.f_code.co_filename)}:{f.f_lineno})")
    entries = COLLECTIVES.snapshot()
    if entries:
        last = entries[-1]
        state = (f"still inside after {now - last['entered']:.1f} s" if last["left"] is None else
                 f"left {now - last['left']:.1f} s ago" + (f" with {last['error']}" if last["error"] else ""))
        out += ["", f"last collective of ours: {last['name']} at step {last['step']}, entered "
                    f"{_clock(last['entered'])} UTC, {state}", "our collectives before it (oldest first):"]
        for e in entries[:-1]:
            took = f"{1000 * (e['left'] - e['entered']):.1f} ms" if e["left"] else "not left"
            out.append(f"  step {e['step']}: {e['name']}, entered {_clock(e['entered'])}, {took}"
                       + (f", {e['error']}" if e["error"] else ""))
    else:
        out += ["", "last collective of ours: none entered yet"]
    out += ["", "torch's flight recorder (every collective through torch.distributed, DeepSpeed's included):"]
    out += [f"  {line}" for line in _flight_recorder(hang_dir, rank)]
    out += ["", f"Python stacks of all {len(frames)} threads (innermost last):"]
    for ident, frame in sorted(frames.items(), key=lambda kv: (kv[0] != main, names.get(kv[0], ""))):
        label = names.get(ident, "?") + (" (training thread)" if ident == main else "")
        out.append(f"--- thread {label}, id {ident}")
        out += [line.rstrip("\n") for line in traceback.format_stack(frame)]
    if error is not None:
        out += ["", "--- the training thread's traceback at the error"]
        out += [line.rstrip("\n") for line in traceback.format_exception(error)]
    path = hang_dir / f"rank{rank}.txt"
    tmp = path.with_suffix(".txt.tmp")
    tmp.write_text("\n".join(out) + "\n")
    os.replace(tmp, path)
    return path
