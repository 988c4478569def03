"""Where each rank stood on a hang (pretrain.watchdog), on a real 2-process gloo group: a collective
that outlives the process group's timeout, with a SIGTERM that comes while it waits; and NCCL's
flight recorder where CUDA is. (The watchdog's own case, a SIGSTOP'd rank in a training run, is
tests/test_train_robust.py's test_a_hung_rank_ends_the_job_naming_it.)

The worker of the gloo case runs as ``python -m tests.test_hang gloo RANK PORT FOLDER``."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable  # (not tests.helpers: its imports would slow every worker's start)

PG_TIMEOUT = 4.0  # seconds before rank 0's barrier gives up
STEP = 7  # the training step the workers' collectives are recorded under


def _worker(rank: int, port: int, folder: Path) -> None:
    import torch
    import torch.distributed as dist

    from pretrain.distributed import COLLECTIVES, StopSignal, collective, init_distributed
    from pretrain.watchdog import HangError, Heartbeat

    hang = folder / "hang"
    init_distributed(rank, 2, port, cpu=True, timeout=PG_TIMEOUT, hang_dir=hang)
    stop = StopSignal()  # SIGTERM: saved for the next step boundary, which a waiting collective never reaches
    beat = Heartbeat(rank, 2, timeout=60, period=0.5, hang_dir=hang).start()
    COLLECTIVES.step = STEP
    with collective("test: warm-up (all_reduce)"):
        dist.all_reduce(torch.ones(2))
    if rank == 1:
        _slow_work()  # never in the barrier: rank 1's heartbeat ends this process when rank 0 asks
        os._exit(5)
    (folder / "ready").write_text(str(os.getpid()))
    try:
        with beat.timeouts():
            with collective("test: a barrier rank 1 never joins"):
                print(f"rank 0 enters the barrier at {time.time():.2f}", flush=True)
                dist.barrier()
    except HangError as err:
        (folder / "error.txt").write_text(f"{err}\nstop signal seen after the wait: {stop.received}\n")
        print(f"rank 0 leaves at {time.time():.2f}", flush=True)
        os._exit(0)
    os._exit(4)


def _slow_work() -> None:
    time.sleep(60)


def _wait_for(predicate, seconds: float, what: str):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"no {what} within {seconds} s")


def test_a_timed_out_collective_and_a_signal_during_the_wait_leave_every_ranks_stacks(tmp_path):
    """Rank 0 waits in a barrier rank 1 never joins. A SIGTERM meanwhile cannot stop it (its handler
    waits for the collective to return): a beat later rank 0 writes where it stands, the barrier
    named. At the process group's timeout the barrier raises: rank 0 writes its report again and asks
    rank 1 (which was not in a collective at all) for its own through the store; rank 1 writes it and
    leaves; rank 0's HangError names both files."""
    from pretrain.distributed import free_port

    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([PYTHON, "-m", "tests.test_hang", "gloo", str(r), str(port), str(tmp_path)], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        pid = int(_wait_for(lambda: (tmp_path / "ready").is_file() and (tmp_path / "ready").read_text(), 120,
                            "rank 0 in its barrier"))
        time.sleep(0.3)
        os.kill(pid, signal.SIGTERM)
        report = tmp_path / "hang" / "rank0.txt"
        signalled = _wait_for(lambda: report.is_file() and report.read_text(), PG_TIMEOUT - 1, "report after SIGTERM")
        outputs = [p.communicate(timeout=60)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 1], outputs
    # the signal's report: the barrier it waits in, by our record and by its stack
    assert "why: SIGTERM arrived while this rank waited in a collective" in signalled, signalled
    assert f"last collective of ours: test: a barrier rank 1 never joins at step {STEP}" in signalled
    assert "still inside after" in signalled
    assert "torch.distributed: barrier (torch/distributed/distributed_c10d.py:" in signalled.split("last collective")[0]
    assert "rank 0: SIGTERM arrived while it waits in a collective; where it stands:" in outputs[0], outputs[0]
    # the timeout: rank 0's message names both reports
    error = (tmp_path / "error.txt").read_text()
    mine, theirs = tmp_path / "hang" / "rank0.txt", tmp_path / "hang" / "rank1.txt"
    assert error.startswith("a collective timed out on rank 0 (RuntimeError: "), error
    assert f"where each rank stood: {mine}, {theirs}" in error, error
    assert "stop signal seen after the wait: SIGTERM" in error  # the stop itself went its usual way after
    text = mine.read_text()
    assert "why: a collective timed out on rank 0" in text
    assert "the training thread left a collective with an error; it waited in:\n  torch.distributed: barrier" in text
    assert f"last collective of ours: test: a barrier rank 1 never joins at step {STEP}" in text
    assert "with RuntimeError" in text.split("our collectives before it")[0]  # it left by the error
    assert "--- the training thread's traceback at the error" in text
    assert "RuntimeError" in text.split("traceback at the error")[1]
    # rank 1: not in a collective; its stack shows where it was, all its threads (the heartbeat too)
    other = theirs.read_text()
    assert "why: rank 0: a collective timed out on rank 0" in other and "(reported by that rank)" in other
    assert "the training thread is not inside a collective now" in other
    assert f"last collective of ours: test: warm-up (all_reduce) at step {STEP}" in other and "left " in other
    threads = other.split("Python stacks of all ")[1]
    count = int(threads.split(" threads")[0])
    assert count >= 2 and threads.count("--- thread ") == count, threads
    assert "--- thread MainThread (training thread)" in threads and "--- thread heartbeat" in threads
    assert "in _slow_work" in threads.split("--- thread heartbeat")[0] or "in _slow_work" in threads
    assert "rank 1: ending the job: rank 0: a collective timed out" in outputs[1], outputs[1]
    # torch's flight recorder (on gloo too in this torch): the barrier is the last collective rank 0 issued
    assert "gloo:barrier" in text.split("torch's flight recorder")[1].split("Python stacks")[0]
    assert (tmp_path / "hang" / "flight_rank0.json").is_file()


def test_nccl_flight_recorder_is_switched_on_into_the_hang_folder(tmp_path):
    """On CUDA the process group is NCCL: the recorder is on before the group is made, NCCL's own
    dump on a timeout goes to output_dir/hang, and a report lists the NCCL collectives it saw."""
    import torch
    import torch.distributed as dist

    from pretrain.distributed import free_port

    if not (torch.cuda.is_available() and dist.is_nccl_available()):
        pytest.skip("needs CUDA/NCCL: torch's NCCL flight recorder (gloo's record is tested on CPU)")
    out = subprocess.run([PYTHON, "-m", "tests.test_hang", "nccl", str(free_port()), str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    hang = tmp_path / "hang"
    assert f"TORCH_NCCL_DEBUG_INFO_TEMP_FILE={hang / 'nccl_trace_rank'}" in out.stdout, out.stdout
    assert "TORCH_NCCL_DUMP_ON_TIMEOUT=1" in out.stdout and "TORCH_FR_BUFFER_SIZE=2000" in out.stdout
    text = (hang / "rank0.txt").read_text()
    assert "nccl:all_reduce" in text.split("torch's flight recorder")[1], text


def _nccl_worker(port: int, folder: Path) -> None:
    import torch
    import torch.distributed as dist

    from pretrain.distributed import init_distributed
    from pretrain.watchdog import write_report

    for key in ("TORCH_NCCL_TRACE_BUFFER_SIZE", "TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_DUMP_ON_TIMEOUT",
                "TORCH_NCCL_DEBUG_INFO_TEMP_FILE", "TORCH_FR_DUMP_TEMP_FILE"):
        os.environ.pop(key, None)
    info = init_distributed(0, 1, port, hang_dir=folder / "hang")
    assert dist.get_backend() == "nccl", dist.get_backend()
    x = torch.ones(4, device=info.device)
    dist.all_reduce(x)
    torch.cuda.synchronize()
    for key in ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_DUMP_ON_TIMEOUT", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE"):
        print(f"{key}={os.environ.get(key)}")
    write_report(folder / "hang", 0, 1, "test: the NCCL record")
    dist.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1] == "gloo":
        _worker(int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
    else:
        _nccl_worker(int(sys.argv[2]), Path(sys.argv[3]))
