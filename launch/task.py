"""What each task of a submitit job runs: rendezvous, ``pretrain.train.main()``, requeue when preempted.

submitit starts one process per task (``srun`` on Slurm, subprocesses with ``--local``) and calls
``TrainTask()`` in it. The task

1. turns submitit's job environment into the torch.distributed variables every launcher gives
   ``pretrain.train.main()``: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, NODE_RANK, MASTER_ADDR
   (the job's first node) and MASTER_PORT (derived from the job id, so every task agrees on it
   without talking). CUDA_VISIBLE_DEVICES is left as Slurm sets it (all the node's GPUs of the job),
   so the engine's choice of ``cuda:LOCAL_RANK`` holds;
2. replaces submitit's handler of the preemption notice (SIGUSR2, which Slurm sends
   ``--signal-delay`` seconds before the time limit and submitit's ``job._interrupt()`` sends):
   submitit's own handler would requeue from inside the signal handler, in the middle of a
   training step and before anything is saved. Here the notice is passed on to the training loop
   as SIGUSR1, which saves a checkpoint at the next step boundary on every rank and returns;
3. after ``main()`` returns (0: finished, 75: stopped by a signal with a checkpoint; anything else
   fails the task), if a notice came and the run has not reached its last step, rank 0
   requeues the job (``scontrol requeue`` on Slurm; exit code 144, which makes submitit's local
   controller restart the tasks, with ``--local``), at most ``max_requeues`` times. The requeued
   job runs the same task again and ``train.resume: auto`` continues from the newest complete
   checkpoint, so the step counter never goes back.

SIGTERM (``scancel``, or Slurm preempting with PreemptMode=REQUEUE/CANCEL) also makes the loop save
and return, but is not a reason to requeue here: Slurm requeues preempted jobs itself where the
cluster says so, and a cancelled job stays cancelled.
"""
from __future__ import annotations

import atexit
import json
import os
import re
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pretrain.cli import OK, STOPPED
from pretrain.distributed import STOP_SIGNAL  # what pretrain.train saves and stops on (the shared protocol)

PREEMPT_SIGNAL = signal.SIGUSR2  # the notice: sbatch --signal=USR2@<delay>, submitit's job._interrupt()
PORT_BASE, PORT_SPAN = 15000, 15000  # MASTER_PORT in [15000, 30000): below Linux's ephemeral range


class RequeueLimitError(RuntimeError):
    """The job was preempted (or restarted) more often than --max-requeues allows."""


def log(message: str) -> None:
    print(f"[launch] {message}", flush=True)


def leave(code: int) -> None:
    """End the task now, without a result file (the job is not over) and without the interpreter's
    slow teardown: everything is saved, and Slurm restarts the requeued job only once every process
    of the old one is gone."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _exit_once_reported(result_file: Path) -> None:
    """At interpreter exit after a finished run: once submitit has written this task's result, skip
    the slow teardown of torch/DeepSpeed (seconds per task, and the job counts as running until
    every task is gone). Without the result file the normal exit (and its status) goes on."""
    if Path(result_file).is_file():
        leave(0)


def master_port(job_id: str) -> int:
    """A port every task of one job derives alike from the job id (different jobs: different ports)."""
    digits = re.sub(r"\D", "", str(job_id)) or "0"
    return PORT_BASE + int(digits) % PORT_SPAN


def rendezvous(env) -> dict[str, str]:
    """torch.distributed's variables from a submitit JobEnvironment (Slurm or local)."""
    nodes = max(1, env.num_nodes)
    if env.cluster == "slurm":
        master = env.hostnames[0]
    else:
        master = "127.0.0.1"
    return {
        "RANK": str(env.global_rank),
        "WORLD_SIZE": str(env.num_tasks),
        "LOCAL_RANK": str(env.local_rank),
        "LOCAL_WORLD_SIZE": str(max(1, env.num_tasks // nodes)),
        "NODE_RANK": str(env.node),
        "GROUP_RANK": str(env.node),
        "MASTER_ADDR": master,
        "MASTER_PORT": str(master_port(env.raw_job_id)),
    }


def restarts_file(env) -> Path:
    return Path(os.environ.get("SUBMITIT_FOLDER", ".")) / f"{env.job_id}_requeues"


def restart_count(env) -> int:
    """How many times this job has been restarted: Slurm counts them (any cause; the variable is set
    from the first restart on); locally, we do."""
    if env.cluster == "slurm":
        return int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    path = restarts_file(env)
    return int(path.read_text().strip() or 0) if path.is_file() else 0


def _last_logged_step(metrics: Path) -> int:
    """The last training step in metrics.jsonl (the trainer always logs its last step)."""
    step = 0
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if "loss" in row:
                step = max(step, int(row["step"]))
    return step


def progress(config: str | None, overrides: list[str]) -> tuple[int, int, Path | None]:
    """(how far the run got, its last step, the newest complete checkpoint): the step is the newest
    checkpoint's, or the last logged one where that is further (train.checkpoint=false)."""
    from pretrain.checkpoint import checkpoint_step, latest_complete
    from pretrain.config import load_config

    cfg = load_config(config, overrides)
    latest = latest_complete(Path(cfg.output_dir) / "checkpoints")
    step = checkpoint_step(latest) if latest is not None else 0
    step = max(step, _last_logged_step(Path(cfg.output_dir) / "metrics.jsonl"))
    return int(step), cfg.train.end_step, latest


def next_action(notice: str | None, step: int, end: int, rank: int, restarts: int, max_requeues: int) -> str:
    """After main() returned: 'done' (finished, or no notice), 'leave' (a rank > 0: rank 0 requeues),
    'requeue' (rank 0, requeues left) or 'limit' (rank 0, --max-requeues reached)."""
    if notice is None or step >= end:
        return "done"
    if rank != 0:
        return "leave"
    return "limit" if restarts >= max_requeues else "requeue"


class PreemptionNotice:
    """Catches the preemption notice and hands it to the training loop as SIGUSR1.

    The forwarding runs in a thread that waits until the trainer has installed its own SIGUSR1
    handler, so a notice that lands while the process is still importing or building the model is
    not lost (until then SIGUSR1 is held by a no-op here instead of killing the process).
    """

    def __init__(self, signum: int = PREEMPT_SIGNAL):
        self.signum = signum
        self.received: str | None = None
        self._event = threading.Event()
        self._closed = False

    def install(self) -> "PreemptionNotice":
        signal.signal(self.signum, self._on_notice)
        if signal.getsignal(STOP_SIGNAL) in (signal.SIG_DFL, None):
            signal.signal(STOP_SIGNAL, self._hold)
        threading.Thread(target=self._forward, name="preemption-notice", daemon=True).start()
        return self

    def _hold(self, signum, frame) -> None:  # SIGUSR1 before the trainer takes it over: keep running
        pass

    def _on_notice(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        self._event.set()

    def _forward(self) -> None:
        self._event.wait()
        if self._closed:
            return
        log(f"{self.received}: preemption or time limit ahead; asking the trainer to save and stop")
        while not self._closed:
            if signal.getsignal(STOP_SIGNAL) != self._hold:
                os.kill(os.getpid(), STOP_SIGNAL)
                return
            time.sleep(0.2)

    def close(self) -> None:
        self._closed = True
        self._event.set()


@dataclass
class TrainTask:
    """The callable submitit pickles and runs in every task of a job."""

    config: str | None
    overrides: list[str] = field(default_factory=list)
    max_requeues: int = 3
    omp_threads: int = 0  # OMP_NUM_THREADS for the task (0: leave as is)

    def argv(self) -> list[str]:
        return (["--config", self.config] if self.config else []) + list(self.overrides)

    def __call__(self) -> dict:
        import submitit

        env = submitit.JobEnvironment()
        values = rendezvous(env)
        os.environ.update(values)
        if self.omp_threads and "OMP_NUM_THREADS" not in os.environ:
            os.environ["OMP_NUM_THREADS"] = str(self.omp_threads)
        rank = env.global_rank
        restarts = restart_count(env)
        log(
            f"job {env.job_id} task {rank}/{env.num_tasks} on {socket.gethostname()} (node {env.node}/{env.num_nodes}): "
            + " ".join(f"{k}={values[k]}" for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))
            + f"; restart {restarts} (at most {self.max_requeues})"
        )
        if restarts > self.max_requeues:
            raise RequeueLimitError(
                f"job {env.job_id} was restarted {restarts} times, more than --max-requeues {self.max_requeues}"
            )
        notice = PreemptionNotice().install()
        from pretrain.train import main

        try:
            code = main(self.argv())
        finally:
            notice.close()
        if code not in (OK, STOPPED):
            raise RuntimeError(f"pretrain.train.main exited with status {code} (its message is in this task's log)")
        step, end, latest = progress(self.config, self.overrides)
        result = {"rank": rank, "job_id": env.job_id, "step": step, "end_step": end, "restarts": restarts,
                  "complete": step >= end, "stopped": code == STOPPED}
        action = next_action(notice.received, step, end, rank, restarts, self.max_requeues)
        if action == "done":
            if notice.received is not None:
                log(f"{notice.received} came after the last step ({step}/{end}): nothing to requeue")
            atexit.register(_exit_once_reported, env.paths.result_pickle)
            return result
        if action == "leave":
            log(f"saved at step {step}/{end}; rank 0 requeues the job")
            leave(0)
        if action == "limit":  # stopped, not failed: launch.slurm --wait exits 75 (resume later)
            log(f"preempted at step {step}/{end} and not requeued: --max-requeues {self.max_requeues} reached. "
                f"The newest checkpoint is {latest}; submitting the same command again resumes from it.")
            atexit.register(_exit_once_reported, env.paths.result_pickle)
            return result
        log(f"saved at step {step}/{end} ({latest}); requeueing job {env.job_id} "
            f"(restart {restarts + 1} of at most {self.max_requeues})")
        if env.cluster != "slurm":
            restarts_file(env).write_text(f"{restarts + 1}\n")
        try:
            env._requeue(self.max_requeues - restarts - 1)  # Slurm: scontrol requeue
            code = 0
        except SystemExit as exit_:  # the local executor's requeue is an exit code (144) for its controller
            code = exit_.code if isinstance(exit_.code, int) else 1
        leave(code)
