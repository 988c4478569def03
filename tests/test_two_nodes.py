"""Two nodes on one machine (issue 17.5): two torchrun node agents, 127.0.0.1 and 127.0.0.2, 2
processes each, meeting through a c10d rendezvous. The 4-rank job trains, saves and resumes; a node
that dies (its agent and workers killed at once) ends the other node's agent promptly, non-zero."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from benchmarks.fault_matrix import kill_job
from tests.helpers import ASSET_SHARDS, PYTHON, QUICKSTART, ROOT, free_port, losses, tiny_overrides

pytestmark = pytest.mark.slow
NODES = ("127.0.0.1", "127.0.0.2")  # all of 127.0.0.0/8 is loopback: a second "host" without a network


def start_node(addr: str, endpoint: str, args: list[str], log: Path) -> subprocess.Popen:
    cmd = [PYTHON, "-u", "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint={endpoint}", "--rdzv-id=two-nodes", f"--local-addr={addr}", "--max-restarts=0",
           "-m", "pretrain.train", "--config", str(QUICKSTART), *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def test_two_nodes_train_save_resume_and_a_dead_node_ends_the_other(tmp_path):
    """Job 1 trains 3 steps and saves; job 2 resumes from that checkpoint on both nodes, and after
    step 5 node 2 dies (its agent and workers killed at once): node 1's agent exits non-zero promptly."""
    out = tmp_path / "run"
    args = tiny_overrides(ASSET_SHARDS, out, steps=100_000, micro_batch=3) + ["eval.enabled=false",
                                                                             "data.train.workers=0"]
    codes, logs = run_job(args + ["train.stop_at_step=3"], tmp_path, "first")
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    records = [json.loads((out / "ranks" / f"rank{r}.json").read_text()) for r in range(4)]
    assert all(r["world_size"] == 4 for r in records) and sorted(r["rank"] for r in records) == [0, 1, 2, 3]
    step3 = out / "checkpoints" / "step000003"
    assert {f"rank{r:05d}.pt" for r in range(4)} <= {p.name for p in step3.iterdir()}
    assert sorted(losses(out)) == [1, 2, 3]

    endpoint = f"{NODES[0]}:{free_port(NODES[0])}"
    logs = [tmp_path / f"second_node{i}.log" for i in range(2)]
    nodes = [start_node(addr, endpoint, args, log) for addr, log in zip(NODES, logs)]
    try:
        deadline = time.monotonic() + 300
        while "[train] step 5/" not in logs[0].read_text() + logs[1].read_text():
            assert time.monotonic() < deadline and all(p.poll() is None for p in nodes), \
                logs[0].read_text()[-3000:] + logs[1].read_text()[-3000:]
            time.sleep(0.2)
        killed = kill_job(nodes[1].pid)  # node 2 dies: its agent and both workers, at once
        died = time.monotonic()
        code = nodes[0].wait(timeout=180)
        seconds = time.monotonic() - died
    finally:
        for p in nodes:
            if p.poll() is None:
                kill_job(p.pid)
    text = logs[0].read_text() + logs[1].read_text()
    print(f"dead node: the other node's agent exited {seconds:.1f} s after the kill (exit {code}, {killed} processes killed)")
    assert f"resumed_from={step3} at step 3" in text and "[train] step 4/" in text, text[-3000:]
    assert killed >= 3
    assert code != 0, text[-3000:]
    assert seconds < 60, seconds


def run_job(args: list[str], tmp: Path, name: str, timeout: float = 400) -> tuple[list[int], list[str]]:
    endpoint = f"{NODES[0]}:{free_port(NODES[0])}"
    logs = [tmp / f"{name}_node{i}.log" for i in range(2)]
    nodes = [start_node(addr, endpoint, args, log) for addr, log in zip(NODES, logs)]
    try:
        codes = [p.wait(timeout=timeout) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                kill_job(p.pid)
    return codes, [log.read_text() for log in logs]
