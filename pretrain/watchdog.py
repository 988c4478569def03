"""A hung rank ends the job with its name, instead of a silent hang.

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
"""
from __future__ import annotations

import os
import sys
import threading
import time
from datetime import timedelta
from typing import Optional

import torch.distributed as dist

PREFIX = "pretrain/heartbeat"


class Heartbeat:
    def __init__(self, rank: int, world: int, timeout: float, period: Optional[float] = None):
        self.rank, self.world, self.timeout = rank, world, float(timeout)
        self.period = period or max(0.5, min(5.0, self.timeout / 6))
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        # a new attempt of an elastic (torchrun --max-restarts) job must not read the last one's counters
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.prefix = f"{PREFIX}/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{attempt}/"

    def start(self) -> "Heartbeat":
        if self.world > 1 and self.timeout > 0 and "MASTER_ADDR" in os.environ:
            self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.period + 5)

    # -- the thread

    def _connect(self):
        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                             timeout=timedelta(seconds=max(2 * self.period, 2.0)), wait_for_workers=False)

    def _run(self) -> None:
        store, start = None, time.monotonic()
        keys = [f"{self.prefix}{r}" for r in range(self.world)]
        counts = [None] * self.world
        heard = [start] * self.world  # when each rank's counter last moved (this rank's clock)
        store_heard = start
        while not self._stop.wait(self.period):
            now = time.monotonic()
            try:
                store = store or self._connect()
                store.add(keys[self.rank], 1)
                # two requests per beat whatever the world size; until every rank has beaten once, one
                # per rank (adding 0 reads without waiting, and creates the counter of a rank not yet there)
                values = ([int(v) for v in store.multi_get(keys)] if store.check(keys)
                          else [store.add(k, 0) for k in keys])
                for r, c in enumerate(values):
                    if c != counts[r]:
                        counts[r], heard[r] = c, now
                store_heard = now
            except Exception:  # noqa: BLE001 - a store that does not answer: judged by how long below
                store = None
                if now - store_heard > self.timeout:
                    self._leave(f"the job's rendezvous store ({os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}, "
                                f"held by rank 0 or the launcher) has not answered for {now - store_heard:.0f} s")
                continue
            silent = [r for r in range(self.world) if r != self.rank and now - heard[r] > self.timeout]
            if silent:
                names = ", ".join(f"rank {r} (last heard {now - heard[r]:.0f} s ago)" for r in silent)
                self._leave(f"{names} stopped answering")

    def _leave(self, what: str) -> None:
        if self._stop.is_set():
            return
        print(f"[train] rank {self.rank}: {what} (train.collective_timeout={self.timeout:g} s); ending the job",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)
