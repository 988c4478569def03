"""``python -m launch.slurm``: flags, sweeps, dry runs and the task's rendezvous (fast, no Slurm), then
real jobs on a one-node Slurm on loopback (``make slurm-up``; ``.ci/run`` starts it): a 2-task
training job that is preempted mid-run, requeues itself and resumes to the end, and a 2-point sweep
submitted as a job array.

The Slurm tests skip, saying why, only where no Slurm answers; with PRETRAIN_REQUIRE_SLURM=1 (set by
``.ci/run``) they fail instead.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from launch.slurm import build_parser, main, make_plan, parse_sweeps, point_dirname, sweep_points
from launch.task import PORT_BASE, PORT_SPAN, PreemptionNotice, master_port, next_action, progress, rendezvous
from tests.helpers import ASSET_SHARDS, PYTHON, QUICKSTART, ROOT, tiny_overrides

# ----------------------------------------------------------------------------------------------
# Command line (no Slurm needed)
# ----------------------------------------------------------------------------------------------


def _plan(*argv: str):
    return make_plan(build_parser().parse_intermixed_args(["--config", str(QUICKSTART), *argv]))


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--nodes", "0"], "--nodes"),
        (["--gpus-per-node", "-1"], "--gpus-per-node"),
        (["--gpus-per-node", "4", "--tasks-per-node", "2"], "--tasks-per-node"),
        (["--tasks-per-node", "0"], "--tasks-per-node"),
        (["--cpus-per-task", "0"], "--cpus-per-task"),
        (["--time", "0"], "--time"),
        (["--max-requeues", "-1"], "--max-requeues"),
        (["--time", "10", "--signal-delay", "600"], "--signal-delay"),
        (["--local", "--nodes", "2"], "--nodes"),
        (["--sweep", "train.lr"], "--sweep"),
        (["--sweep", "train.lr=1e-3,"], "--sweep"),
        (["--sweep", "train.lr=1e-3,1e-3"], "--sweep"),
        (["--sweep", "train.lr=1,2", "--sweep", "train.lr=3,4"], "--sweep train.lr"),
        (["train.lr=1e-3", "--sweep", "train.lr=1e-3,1e-4"], "--sweep train.lr"),
        (["--sweep", "output_dir=a,b"], "--sweep output_dir"),
        (["--sweep", "train.steps=5,five"], "train.steps"),
        (["train.stepz=3"], "train.stepz"),
        (["oops"], "override 'oops'"),
        (["--output-root", "x", "output_dir=y"], "--output-root"),
        (["--name", "a/b"], "--name"),
    ],
)
def test_bad_input_stops_naming_the_flag(argv, flag, capsys, tmp_path):
    root = [] if "--output-root" in argv else ["--output-root", str(tmp_path)]
    code = main(["--config", str(QUICKSTART), *root, *argv])
    err = capsys.readouterr().err
    assert code == 2 and "error:" in err
    assert flag in err.split("error:", 1)[1], err
    assert not (tmp_path / "quickstart").exists()


def test_bad_config_file_and_argparse_errors(capsys, tmp_path):
    assert main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "--config: no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(QUICKSTART), "--nodes", "two"])
    assert exc.value.code == 2 and "--nodes" in capsys.readouterr().err


def test_sweep_expansion_and_run_folders(tmp_path):
    sweeps = parse_sweeps(["train.lr=1e-3,3e-4", "loss.name=clip,siglip,clip_lite", "data.train.urls=[a.tar,b.tar],c.tar"], [])
    assert sweeps[2] == ("data.train.urls", ["[a.tar,b.tar]", "c.tar"])  # commas inside [...] stay
    points = sweep_points(sweeps[:2])
    assert len(points) == 6
    assert points[0] == [("train.lr", "1e-3"), ("loss.name", "clip")]
    assert points[1] == [("train.lr", "1e-3"), ("loss.name", "siglip")]  # the first sweep varies slowest
    assert point_dirname(points[0]) == "train.lr-1e-3_loss.name-clip"
    assert point_dirname([("data.train.urls", "[a.tar, b/c.tar]")]) == "data.train.urls-_a.tar_b_c.tar"

    plan = _plan("--output-root", str(tmp_path), "--name", "lr", "--sweep", "train.lr=1e-3,3e-4",
                 "--sweep", "loss.name=clip,siglip", "train.steps=7")
    dirs = [r.output_dir for r in plan.runs]
    assert dirs == [tmp_path / "lr" / n for n in (
        "train.lr-1e-3_loss.name-clip", "train.lr-1e-3_loss.name-siglip",
        "train.lr-3e-4_loss.name-clip", "train.lr-3e-4_loss.name-siglip")]
    assert plan.runs[3].overrides == ["train.steps=7", "train.lr=3e-4", "loss.name=siglip",
                                      f"output_dir={tmp_path / 'lr' / 'train.lr-3e-4_loss.name-siglip'}"]
    assert plan.log_dir == tmp_path / "lr" / "slurm"
    # without a sweep: one run in output-root/name; an output_dir= override is the run folder itself
    assert [r.output_dir for r in _plan("--output-root", str(tmp_path)).runs] == [tmp_path / "quickstart"]
    assert [r.output_dir for r in _plan(f"output_dir={tmp_path}/mine").runs] == [tmp_path / "mine"]


def test_dry_run_prints_the_batch_script(capsys, tmp_path):
    code = main(["--config", str(QUICKSTART), "train.steps=50", "--nodes", "2", "--gpus-per-node", "4",
                 "--cpus-per-task", "8", "--partition", "gpu", "--time", "120", "--account", "acc", "--qos", "high",
                 "--constraint", "a100", "--max-requeues", "5", "--signal-delay", "120", "--output-root", str(tmp_path),
                 "--srun-arg=--container-image=img", "--setup", "module load cuda", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=8", "--partition=gpu",
                 "--time=120", "--account=acc", "--qos=high", "--constraint=a100", "--signal=USR2@120", "--requeue",
                 "--job-name=quickstart"):
        assert f"#SBATCH {line}\n" in out, (line, out)
    assert "--array" not in out
    srun = next(ln for ln in out.splitlines() if ln.startswith("srun "))
    assert "--kill-on-bad-exit=1" in srun and "--container-image=img" in srun and "submitit.core._submit" in srun
    assert "module load cuda" in out and f"export PYTHONPATH={ROOT}" in out
    assert "world size 8" in out and "at most 5 requeue(s)" in out
    assert f"output_dir={tmp_path / 'quickstart'}" in out and "train.steps=50" in out
    assert not (tmp_path / "quickstart").exists()  # a dry run writes nothing

    code = main(["--config", str(QUICKSTART), "--tasks-per-node", "2", "--output-root", str(tmp_path),
                 "--sweep", "train.lr=1e-3,3e-4", "--sweep", "train.seed=0,1", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0 and "#SBATCH --array=0-3%4\n" in out and "#SBATCH --ntasks-per-node=2\n" in out
    assert "--gpus-per-node" not in out
    assert len(re.findall(r"run \d \(train\.lr-", out)) == 4 and "train.lr-3e-4_train.seed-1" in out
    assert main(["--config", str(QUICKSTART), "--local", "--tasks-per-node", "2", "--dry-run"]) == 0
    assert "local executor" in capsys.readouterr().out


def test_rendezvous_from_submitit_job_environment(monkeypatch):
    """Slurm's variables, read through submitit's own JobEnvironment, become torch.distributed's."""
    import submitit

    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    for key, value in {"SLURM_JOB_ID": "4321", "SLURM_NTASKS": "8", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1",
                       "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_PROCID": "5", "SLURM_LOCALID": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    env = submitit.JobEnvironment()
    values = rendezvous(env)
    assert values == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "NODE_RANK": "1",
                      "GROUP_RANK": "1", "MASTER_ADDR": "gpu07", "MASTER_PORT": str(master_port("4321"))}
    assert "CUDA_VISIBLE_DEVICES" not in values  # the engine picks cuda:LOCAL_RANK among the node's GPUs
    local = SimpleNamespace(cluster="local", hostnames=["x"], num_nodes=1, num_tasks=2, global_rank=1,
                            local_rank=1, node=0, raw_job_id="777")
    assert rendezvous(local)["MASTER_ADDR"] == "127.0.0.1"
    ports = {master_port(str(j)) for j in range(1000, 1100)}
    assert len(ports) == 100 and all(PORT_BASE <= p < PORT_BASE + PORT_SPAN for p in ports)
    # every task computes the port in its own process: it must not depend on the process (a str hash would)
    for seed in ("1", "2"):
        other = subprocess.run([PYTHON, "-c", "from launch.task import master_port; print(master_port('4321'))"],
                               cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": seed})
        assert other.returncode == 0 and int(other.stdout) == master_port("4321"), other.stderr


def test_progress_from_checkpoint_and_metrics(tmp_path):
    """How far a run got: the newest complete checkpoint, or the last logged step if further."""
    overrides = [f"output_dir={tmp_path}", "train.steps=10", "train.stop_at_step=8"]
    assert progress(str(QUICKSTART), overrides) == (0, 8, None)
    for step in (2, 4):
        (tmp_path / "checkpoints" / f"step{step:06d}").mkdir(parents=True)
        (tmp_path / "checkpoints" / f"step{step:06d}" / "COMPLETE").write_text(json.dumps({"step": step}))
    (tmp_path / "checkpoints" / "step000006").mkdir()  # no COMPLETE marker: does not count
    rows = [{"step": s, "loss": 1.0} for s in (1, 2, 3, 4, 5)] + [{"step": 5, "eval/x": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9, "lo')
    assert progress(str(QUICKSTART), overrides) == (5, 8, tmp_path / "checkpoints" / "step000004")


def test_requeue_decisions():
    assert next_action(None, 5, 40, 0, 0, 3) == "done"  # no notice
    assert next_action("SIGUSR2", 40, 40, 0, 0, 3) == "done"  # the notice came after the last step
    assert next_action("SIGUSR2", 5, 40, 1, 0, 3) == "leave"  # rank 0 requeues
    assert next_action("SIGUSR2", 5, 40, 0, 2, 3) == "requeue"
    assert next_action("SIGUSR2", 5, 40, 0, 3, 3) == "limit"
    assert next_action("SIGUSR2", 5, 40, 0, 0, 0) == "limit"


def test_preemption_notice_reaches_the_trainer_installed_later():
    """A notice before the trainer owns SIGUSR1 neither kills the process nor gets lost."""
    old = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGUSR2)}
    got = []
    try:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        notice = PreemptionNotice().install()
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.5)  # the trainer is still "starting": the forwarded stop must wait for it
        assert notice.received == "SIGUSR2" and got == []
        signal.signal(signal.SIGUSR1, lambda signum, frame: got.append(signum))  # what pretrain.train does
        deadline = time.time() + 5
        while not got and time.time() < deadline:
            time.sleep(0.05)
        notice.close()
        assert got == [signal.SIGUSR1]
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


# ----------------------------------------------------------------------------------------------
# A real Slurm on loopback
# ----------------------------------------------------------------------------------------------

STEPS = 30  # the preempted run: long enough that the notice lands mid-run (a step takes ~0.2 s here)
POLL = "0.5"


def _slurm_problem() -> str | None:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "Slurm is not installed (sinfo/sbatch missing): run `make slurm-up` as root"
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    if "is UP" not in ping.stdout:
        said = (ping.stdout.strip() or ping.stderr.strip() or "nothing").splitlines()[0]
        return f"slurmctld does not answer (`scontrol ping`: {said}): run `make slurm-up`"
    state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True).stdout.split()
    if not any(s.rstrip("*~#") in ("idle", "mixed", "allocated", "completing") for s in state):
        return f"no Slurm node takes jobs (sinfo: {state}): run `make slurm-up`"
    return None


@pytest.fixture(scope="module")
def slurm():
    problem = _slurm_problem()
    if problem:
        if os.environ.get("PRETRAIN_REQUIRE_SLURM") == "1":
            pytest.fail(f"PRETRAIN_REQUIRE_SLURM=1 but {problem}")
        pytest.skip(problem)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return ASSET_SHARDS


def _launch_cmd(shards: Path, root: Path, name: str, steps: int, *flags: str) -> list[str]:
    overrides = [o for o in tiny_overrides(shards, root / "unused", steps) if not o.startswith("output_dir=")]
    overrides.append("eval.enabled=false")  # evaluation is tested elsewhere; here it would only cost time
    overrides += ["train.zero_stage=0", "data.train.workers=0"]  # ZeRO and loader workers: tested elsewhere
    return [PYTHON, "-m", "launch.slurm", "--config", str(QUICKSTART), *overrides, "--output-root", str(root),
            "--name", name, "--time", "10", "--wait", "--poll", POLL, *flags]


def _loss_steps(run: Path) -> list[int]:
    """Steps of the training rows in metrics.jsonl, in file order (a line still being written is left out)."""
    path = run / "metrics.jsonl"
    text = path.read_text() if path.is_file() else ""
    rows = [json.loads(line) for line in text.split("\n")[:-1] if line.strip()]
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    return [r["step"] for r in rows if "loss" in r]


def _scontrol(job_id: str) -> dict:
    text = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", text))


def _cancel(job_id: str | None) -> None:
    if job_id:
        subprocess.run(["scancel", job_id], capture_output=True)


@pytest.fixture(scope="module")
def preempted(slurm, shards, tmp_path_factory):
    """A 2-task job through `launch.slurm --wait`, sent Slurm's pre-timeout notice after 3 steps."""
    root = tmp_path_factory.mktemp("slurm_runs")
    run = root / "preempt"
    log = root / "launcher.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = _launch_cmd(shards, root, "preempt", STEPS, "--tasks-per-node", "2", "--max-requeues", "2")
    job_id = None
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if job_id is None:
                found = re.search(r"submitted job (\d+)", log.read_text())
                job_id = found.group(1) if found else None
            if job_id and len(_loss_steps(run)) >= 3:
                break
            time.sleep(0.1)
        assert proc.poll() is None and job_id, f"the job did not reach step 3:\n{log.read_text()[-3000:]}"
        # what Slurm sends every task --signal-delay seconds before the time limit (sbatch --signal=USR2@S)
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
        signalled_at = _loss_steps(run)[-1]
        code = proc.wait(timeout=300)
    except BaseException:
        proc.kill()
        _cancel(job_id)
        raise
    logs = {t: (run / "slurm" / f"{job_id}_{t}_log.out").read_text() for t in (0, 1)}
    return SimpleNamespace(code=code, output=log.read_text(), job_id=job_id, run=run, logs=logs,
                           signalled_at=signalled_at, info=_scontrol(job_id))


def test_two_task_job_trains_to_the_end(preempted):
    """One job of 2 tasks (ranks 0 and 1 of one world), with a checkpoint and metrics at the end."""
    p = preempted
    assert p.code == 0, p.output[-4000:] + p.logs[0][-4000:]
    assert f"job {p.job_id}: COMPLETED, exit code 0:0" in p.output and "all runs completed" in p.output
    assert p.info["JobState"] == "COMPLETED" and p.info["NumTasks"] == "2", p.info
    records = [json.loads((p.run / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in records] == [0, 1] and [r["world_size"] for r in records] == [2, 2]
    assert records[0]["pid"] != records[1]["pid"] and records[0]["host"] == records[1]["host"]
    port = master_port(p.job_id)
    for task in (0, 1):
        assert f"job {p.job_id} task {task}/2 on" in p.logs[task] and f"MASTER_PORT={port}" in p.logs[task]
    final = p.run / "checkpoints" / f"step{STEPS:06d}"
    assert json.loads((final / "COMPLETE").read_text())["step"] == STEPS
    assert {"rank00000.pt", "rank00001.pt"} <= {f.name for f in final.iterdir()}
    assert (p.run / "config.yaml").is_file() and list((p.run / "tensorboard").glob("events.out.tfevents.*"))


def test_preempted_job_requeues_and_resumes(preempted):
    """The notice makes every rank save; rank 0 requeues; the restart resumes; steps never go back."""
    p = preempted
    assert p.code == 0, p.output[-4000:] + p.logs[0][-4000:]
    assert p.info["Restarts"] == "1", p.info
    assert "restarts 1" in p.output
    stopped = re.search(r"\[train\] stopped by SIGUSR1 at step (\d+)", p.logs[0])
    assert stopped, p.logs[0][-3000:]
    k = int(stopped.group(1))
    assert p.signalled_at <= k < STEPS
    assert "SIGUSR2: preemption or time limit ahead" in p.logs[0] and "SIGUSR2" in p.logs[1]
    assert f"requeueing job {p.job_id} (restart 1 of at most 2)" in p.logs[0]
    assert f"resumed_from={p.run / 'checkpoints' / f'step{k:06d}'} at step {k}" in p.logs[0]
    assert "restart 1 (at most 2)" in p.logs[1]  # both tasks ran again
    assert json.loads((p.run / "checkpoints" / f"step{k:06d}" / "COMPLETE").read_text())["step"] == k
    # every step logged once, in order, across the restart: the counter never went back
    assert _loss_steps(p.run) == list(range(1, STEPS + 1))


def test_resubmitted_on_fewer_tasks_the_run_continues(preempted, shards):
    """The same run folder submitted again with 1 task instead of 2 (and two more steps): it resumes
    its last checkpoint on the new layout and completes (issue 27)."""
    p = preempted
    root = p.run.parent
    proc = subprocess.run(_launch_cmd(shards, root, "preempt", STEPS + 2, "--tasks-per-node", "1"),
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    job = re.search(r"job (\d+): COMPLETED", proc.stdout)
    assert proc.returncode == 0 and job, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (p.run / "slurm" / f"{job.group(1)}_0_log.out").read_text()
    assert f"at step {STEPS} on another layout (ZeRO-0 x 2 ranks -> ZeRO-0 x 1 ranks)" in log, log[-3000:]
    assert json.loads((p.run / "ranks" / "rank0.json").read_text())["world_size"] == 1
    assert _loss_steps(p.run)[-2:] == [STEPS + 1, STEPS + 2]
    assert json.loads((p.run / "checkpoints" / f"step{STEPS + 2:06d}" / "COMPLETE").read_text())["step"] == STEPS + 2


def test_sweep_is_a_job_array(slurm, shards, tmp_path, capsys):
    """--sweep train.lr=a,b: one array job, one run folder per value, each trained to the end."""
    # in this process (the CLI as a subprocess is tested above): the launcher's config check does not
    # import torch/timm again; ZeRO-0 without a loader worker is the shortest tiny run
    argv = _launch_cmd(shards, tmp_path, "sweep", 3, "train.zero_stage=0", "data.train.workers=0",
                       "--sweep", "train.lr=0.002,0.0005")[3:]
    code = main(argv)
    out = capsys.readouterr().out
    found = re.search(r"submitted job array (\d+) \(2 runs\)", out)
    if code != 0:
        _cancel(found.group(1) if found else None)
    assert code == 0 and found, out[-4000:]
    array = found.group(1)
    for index, lr in enumerate(("0.002", "0.0005")):
        run = tmp_path / "sweep" / f"train.lr-{lr}"
        assert f"job {array}_{index}: COMPLETED" in out
        assert _scontrol(f"{array}_{index}")["ArrayJobId"] == array
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert cfg["train"]["lr"] == float(lr) and cfg["output_dir"] == str(run)
        assert json.loads((run / "checkpoints" / "step000003" / "COMPLETE").read_text())["step"] == 3
        assert _loss_steps(run) == [1, 2, 3]
        assert json.loads((run / "ranks" / "rank0.json").read_text())["world_size"] == 1


def test_wait_reports_a_failed_job_and_exits_1(slurm, shards, tmp_path):
    """A run that fails inside the job (its shards are not there): --wait says so, shows the task's
    error and exits 1 (not 0, not 75)."""
    cmd = _launch_cmd(shards, tmp_path, "fails", 2, "--tasks-per-node", "1")
    cmd += [f"data.train.urls={tmp_path}/missing/shard-{{000000..000001}}.tar"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "not every run completed" in proc.stdout and "error:" in proc.stdout, proc.stdout[-3000:]
