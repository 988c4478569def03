"""Process state in one place: the process group, rank helpers, collectives without gradient, RNG
capture and restore, free ports and the stop-signal protocol.

Every launcher (``python``, ``torchrun``, ``accelerate launch``, ``srun`` through submitit) ends in
``init_distributed()``: the group is initialised from the environment (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT; a lone process gets a one-rank group on loopback) and rank and world size
are read back from torch.distributed, never from a launcher's own state. Training, evaluation,
tests and benchmarks all use it. The collectives *with* gradient live in ``pretrain.losses.gather``.

Every collective of ours runs inside ``with collective(name):`` (``COLLECTIVES``: the last ones this
process entered, with step and times), which ``pretrain.watchdog`` reports when a rank hangs;
``flight_recorder_env`` switches torch's own record of collectives on (DeepSpeed's included).
"""
from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import time
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

# ------------------------------------------------------------------------------ the process group


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def init_distributed(rank: Optional[int] = None, world_size: Optional[int] = None, port: Optional[int] = None,
                     cpu: bool = False, timeout: Optional[float] = None, hang_dir: Optional[Path] = None) -> DistInfo:
    """Joins (or makes) the default process group: NCCL on a GPU (``cuda:LOCAL_RANK``), gloo on CPU
    (or with ``cpu``). Launchers give the rendezvous in the environment; a process started by hand
    (``torch.multiprocessing.spawn`` in tests and benchmarks) passes ``rank``, ``world_size`` and
    ``port`` (loopback) instead. ``timeout``: seconds before a collective gives up (None: torch's default).
    ``hang_dir``: torch's flight recorder is switched on (``flight_recorder_env``) and NCCL's own
    dump on a timeout goes there."""
    if rank is not None:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                          LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and not cpu:
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if hang_dir is not None:
        flight_recorder_env(Path(hang_dir), nccl=backend == "nccl")
    if not dist.is_initialized():
        extra = {"timeout": timedelta(seconds=timeout)} if timeout else {}
        dist.init_process_group(backend=backend, **extra)  # env:// (DeepSpeed adopts this group)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


# entries each process keeps of the collectives torch saw (its own and DeepSpeed's): ~0.5 KB each
FLIGHT_RECORDER_ENTRIES = 2000
NCCL_DUMP_PREFIX = "nccl_trace_rank"


def flight_recorder_env(hang_dir: Path, nccl: bool) -> None:
    """Switches torch's flight recorder on, before the process group exists (torch reads the
    environment when it makes the recorder): a ring of the last collectives this process issued
    through torch.distributed, DeepSpeed's included, with their sequence numbers and states, which
    ``pretrain.watchdog`` writes beside the stacks on a hang. (torch 2.14 records gloo's collectives
    too.) On NCCL, torch's own watchdog also writes the recorder to ``hang_dir/nccl_trace_rank<k>``
    when a collective times out (TORCH_NCCL_DUMP_ON_TIMEOUT). Values already in the environment win."""
    if not any(os.environ.get(k) for k in ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE")):
        # the recorder's own name where torch has it (it warns on the old one), NCCL's older name before
        renamed = hasattr(torch._C._distributed_c10d, "_dump_fr_trace")
        os.environ["TORCH_FR_BUFFER_SIZE" if renamed else "TORCH_NCCL_TRACE_BUFFER_SIZE"] = str(FLIGHT_RECORDER_ENTRIES)
    if nccl:
        hang_dir.mkdir(parents=True, exist_ok=True)  # NCCL's watchdog writes there, it does not make folders
        os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
        prefix = str(hang_dir / NCCL_DUMP_PREFIX)  # torch appends the rank
        os.environ.setdefault("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", prefix)
        os.environ.setdefault("TORCH_FR_DUMP_TEMP_FILE", prefix)


def close_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# -------------------------------------------------------------------- the record of our collectives


class CollectiveLog:
    """The last collectives this process entered through our wrappers (``collective(name)``): name,
    training step, time entered and left (None while inside), the error that ended it. Written by
    the training thread, read by the watchdog's thread when a rank hangs (``pretrain.watchdog``):
    what the stack alone does not say (which step, since when). Costs two clock reads a collective."""

    def __init__(self, keep: int = 16):
        self.entries: deque = deque(maxlen=keep)  # [name, step, entered, left, error]
        self.step: Optional[int] = None  # the training step under way (the trainer sets it)

    def __call__(self, name: str) -> "_Inside":
        return _Inside(self, name)

    def snapshot(self) -> list[dict]:
        """The entries, oldest first, as plain dicts (safe to call from another thread)."""
        return [dict(zip(("name", "step", "entered", "left", "error"), e)) for e in list(self.entries)]


class _Inside:
    """``with COLLECTIVES(name):`` (a class, not a generator: a third of the cost per collective)."""

    __slots__ = ("log", "entry")

    def __init__(self, log: CollectiveLog, name: str):
        self.log, self.entry = log, [name, None, 0.0, None, None]

    def __enter__(self) -> None:
        self.entry[1], self.entry[2] = self.log.step, time.time()
        self.log.entries.append(self.entry)

    def __exit__(self, kind, err, tb) -> bool:
        self.entry[3] = time.time()
        if err is not None:
            self.entry[4] = f"{kind.__name__}: {err}"
        return False


COLLECTIVES = CollectiveLog()
collective = COLLECTIVES  # ``with collective("name"): dist.barrier()``


def is_distributed() -> bool:
    """True inside a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier(name: str = "barrier") -> None:
    if is_distributed():
        with collective(name):
            dist.barrier()


def gather_objects(value, name: str = "gather_objects") -> list:
    """Every rank's picklable ``value``, in rank order (collective in a group of several ranks)."""
    if not is_distributed():
        return [value]
    out = [None] * dist.get_world_size()
    with collective(name):
        dist.all_gather_object(out, value)
    return out


# ------------------------------------------------------------------ collectives without gradient


@dataclass(frozen=True)
class BatchLayout:
    """Where this rank's rows sit in the global batch."""

    rank: int
    sizes: tuple[int, ...]  # local batch size of every rank

    @property
    def world(self) -> int:
        return len(self.sizes)

    @property
    def offset(self) -> int:
        return sum(self.sizes[: self.rank])

    @property
    def local(self) -> int:
        return self.sizes[self.rank]

    @property
    def total(self) -> int:
        return sum(self.sizes)


def batch_layout(n: int, device: torch.device) -> BatchLayout:
    """Every rank's local batch size (one small all_gather)."""
    if not is_distributed():
        return BatchLayout(0, (n,))
    local = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    with collective("batch_layout"):
        dist.all_gather(sizes, local)
    return BatchLayout(dist.get_rank(), tuple(int(s.item()) for s in sizes))


# torch >= 2.14 names the flat-buffer collectives *_single; older releases *_into_tensor / *_tensor.
all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@torch.no_grad()
def all_gather_nograd(x: torch.Tensor, layout: BatchLayout) -> torch.Tensor:
    """Every rank's rows of ``x`` (uneven sizes allowed), concatenated in rank order: one flat
    all-gather with rows padded to the longest rank."""
    if layout.world == 1 or not is_distributed():
        return x
    if x.dtype == torch.bool:
        return all_gather_nograd(x.to(torch.uint8), layout).bool()
    longest = max(layout.sizes)
    if longest == 0:
        return x.new_zeros((0, *x.shape[1:]))
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    flat = x.new_empty((layout.world * longest, *x.shape[1:]))
    with collective("all_gather_nograd"):
        all_gather_flat(flat, padded)
    if len(set(layout.sizes)) == 1:
        return flat
    return torch.cat([flat[r * longest : r * longest + n] for r, n in enumerate(layout.sizes)])


def mean_over_ranks(values: dict[str, float], device: Optional[torch.device] = None) -> dict[str, float]:
    """The mean of each value over the ranks (one all_reduce; reads the result on the host)."""
    names = sorted(values)
    t = torch.tensor([values[k] for k in names], dtype=torch.float64, device=device)
    if is_distributed():
        with collective("mean_over_ranks"):
            dist.all_reduce(t)
        t /= dist.get_world_size()
    return dict(zip(names, t.tolist()))


_PARTITIONED_BUILD = {"on": False}


@contextlib.contextmanager
def partitioned_build(init_context):
    """Runs a build inside ``init_context`` (``deepspeed.zero.Init``) and lets modules built in it
    know (``building_partitioned()``): code that initialises weights after construction must then
    gather them first."""
    _PARTITIONED_BUILD["on"] = True
    post_init = getattr(init_context, "_post_init_method", None)
    if post_init is not None:
        def partition(module: torch.nn.Module):
            # DeepSpeed cannot partition a 0-dim parameter (e.g. open_clip's CLIP.logit_scale, made
            # while a tower builds the whole CLIP and keeps a part): give it shape (1,), which
            # broadcasts the same; the project's own scalars have that shape already
            for name, p in list(module.named_parameters(recurse=False)):
                if p.dim() == 0:
                    setattr(module, name, torch.nn.Parameter(p.detach().reshape(1), requires_grad=p.requires_grad))
            return post_init(module)

        init_context._post_init_method = partition
    try:
        with init_context:
            yield
    finally:
        _PARTITIONED_BUILD["on"] = False


def building_partitioned() -> bool:
    return _PARTITIONED_BUILD["on"]


def gathered(module: torch.nn.Module, modifier_rank: Optional[int] = 0):
    """The full parameters of a module built partitioned (``construction``), for code that reads or
    writes them whole (loading weights, initialising); a no-op for a module built as usual."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


# -------------------------------------------------------------------------------- random streams


def rng_state() -> dict:
    """Python's, NumPy's and torch's global generators (CUDA's too when present)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restores what ``rng_state`` (or ``torch_rng_state``) captured."""
    if "python" in state:
        random.setstate(state["python"])
    if "numpy" in state:
        np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def torch_rng_state() -> dict:
    """torch's generators only (what dropout draws from): cheap enough to take per micro-batch."""
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------- the signal protocol

# A training process saves a checkpoint at the next step boundary and returns when it gets one of
# STOP_SIGNALS (SIGTERM: scancel, a preemption; SIGUSR1: the launcher's "save and stop"); every
# rank stops at the same step. ``launch.task`` turns Slurm's preemption notice into STOP_SIGNAL.
STOP_SIGNAL = signal.SIGUSR1
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignal:
    """Remembers the first stop signal received; ``received`` names it (None before)."""

    def __init__(self, signals: tuple = STOP_SIGNALS):
        self.received: Optional[str] = None
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signal.Signals(signum).name

    def ask(self, reason: str) -> None:
        """A stop the program itself asks for (a failed background checkpoint save): the same path
        as a signal (every rank stops at the same step); ``reason`` is what ``received`` names."""
        self.received = self.received or reason
