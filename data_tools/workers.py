"""Worker processes for ``build --workers N``.

Each worker is a fresh ``python -m data_tools.workers`` process (not a ``multiprocessing`` child:
nothing of the caller's ``__main__`` is re-imported, so a build can be started from any script,
notebook or stdin). It reads pickled messages on stdin (the settings, then groups to build, then
``None``) and answers on a private copy of its stdout: ``("progress", rows)``, ``("done", record)``,
``("strict", message)`` or ``("error", traceback)``. On Linux a worker is killed with its parent,
so a ``kill -9`` of the build leaves no worker writing behind it.
"""
from __future__ import annotations

import os
import pickle
import selectors
import struct
import subprocess
import sys
import time
import traceback
from pathlib import Path

from data_tools.errors import BuildError, StrictFailure

_LEN = struct.Struct("<Q")


def _send(stream, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_LEN.pack(len(data)) + data)
    stream.flush()


def _read_exact(stream, n: int) -> bytes | None:
    # Unbuffered reads straight from the descriptor: a buffered reader could swallow the next
    # message while select() then reports the pipe as empty.
    fd = stream.fileno()
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _recv(stream):
    head = _read_exact(stream, _LEN.size)
    if head is None:
        raise EOFError
    body = _read_exact(stream, _LEN.unpack(head)[0])
    if body is None:
        raise EOFError
    return pickle.loads(body)


def die_with_parent(parent_pid: int) -> None:
    """Linux: this process gets SIGKILL when its parent dies (no orphans after ``kill -9``)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass
    if os.getppid() != parent_pid:
        os._exit(1)


class Pool:
    """N worker processes fed one group at a time (whoever is free takes the next)."""

    def __init__(self, n: int, settings):
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.procs = [
            subprocess.Popen([sys.executable, "-m", "data_tools.workers", str(os.getpid())],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
            for _ in range(n)
        ]
        for p in self.procs:
            _send(p.stdin, settings)

    def run(self, tasks: list, on_progress) -> None:
        """Runs every task; ``on_progress(rows_done_so_far)`` is called as workers report."""
        todo = list(reversed(tasks))
        sel = selectors.DefaultSelector()
        busy = 0
        for p in self.procs:
            if todo:
                _send(p.stdin, todo.pop())
                sel.register(p.stdout, selectors.EVENT_READ, p)
                busy += 1
            else:
                _send(p.stdin, None)
        rows = 0
        while busy:
            events = sel.select(timeout=0.5)
            for key, _ in events:
                p = key.data
                try:
                    kind, payload = _recv(p.stdout)
                except EOFError:
                    code = p.wait()
                    raise BuildError(f"a worker process died (exit code {code}); run the same command again to resume") from None
                if kind == "progress":
                    rows += payload
                    on_progress(rows)
                elif kind == "done":
                    if todo:
                        _send(p.stdin, todo.pop())
                    else:
                        _send(p.stdin, None)
                        sel.unregister(p.stdout)
                        busy -= 1
                elif kind == "strict":
                    raise StrictFailure(payload)
                else:
                    raise BuildError(f"a worker failed:\n{payload}")
        sel.close()

    def close(self, kill: bool = False) -> None:
        for p in self.procs:
            if kill and p.poll() is None:
                p.kill()
        for p in self.procs:
            for stream in (p.stdin, p.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
            p.wait()


class _Ticker:
    """Counts rows and reports them to the parent at most every 0.2 s."""

    def __init__(self, out):
        self.out, self.pending, self.last = out, 0, time.monotonic()

    def __call__(self, n: int) -> None:
        self.pending += n
        now = time.monotonic()
        if now - self.last >= 0.2:
            self.flush()
            self.last = now

    def flush(self) -> None:
        if self.pending:
            _send(self.out, ("progress", self.pending))
            self.pending = 0


def _main() -> None:
    die_with_parent(int(sys.argv[1]))
    from data_tools.build import run_group

    inp = sys.stdin.buffer
    # Answers go through a private copy of stdout; anything else printed lands on stderr.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    settings = _recv(inp)
    tick = _Ticker(out)
    while True:
        try:
            task = _recv(inp)
        except EOFError:
            return
        if task is None:
            return
        try:
            run_group(task, settings, tick)
            tick.flush()
            _send(out, ("done", None))
        except StrictFailure as err:
            _send(out, ("strict", str(err)))
            return
        except BaseException:
            _send(out, ("error", traceback.format_exc()))
            return


if __name__ == "__main__":
    _main()
