"""Submit training to Slurm through submitit: ``python -m launch.slurm --config FILE [key=value ...]``.

    python -m launch.slurm --config configs/quickstart.yaml train.steps=20000 \\
        --nodes 2 --gpus-per-node 8 --partition gpu --time 1440 --max-requeues 5 --wait
    python -m launch.slurm --config configs/quickstart.yaml --sweep train.lr=1e-4,3e-4 --sweep loss.name=clip,siglip
    python -m launch.slurm --config configs/quickstart.yaml --tasks-per-node 2 --local --wait

One task per GPU (``--tasks-per-node`` on CPU nodes); every task calls ``pretrain.train.main()``
with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT taken from submitit's job
environment (``launch.task``). Slurm sends SIGUSR2 ``--signal-delay`` seconds before the time
limit; the training loop then saves a checkpoint, the job requeues itself (at most
``--max-requeues`` times) and resumes from that checkpoint. ``--sweep key=v1,v2`` (repeatable:
the cartesian product) submits a job array with one run folder per point. ``--dry-run`` prints the
batch script instead of submitting; ``--wait`` follows the job(s) to the end and exits 0 only if
all completed, 75 if none failed but one stopped before its last step (submit again to resume), 1
if one failed; ``--local`` runs the same job on this machine through submitit's local executor.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from launch.task import PREEMPT_SIGNAL, TrainTask
from pretrain.cli import FAILED, INTERRUPTED, OK, STOPPED, USAGE, exit_process, run_cli

ROOT = Path(__file__).resolve().parents[1]  # the folder holding launch/ and pretrain/
FINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL",
    "DEADLINE", "REVOKED",
}


class UsageError(Exception):
    """Bad command-line input; the message starts with the flag it is about."""


def say(message: str) -> None:
    print(f"[launch.slurm] {message}", flush=True)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m launch.slurm",
        description="Submit pretrain.train to Slurm through submitit (or run it locally with --local).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  python -m launch.slurm --config configs/quickstart.yaml --nodes 2 --gpus-per-node 8 --partition gpu --time 1440\n"
            "  python -m launch.slurm --config configs/quickstart.yaml --tasks-per-node 2 --sweep train.lr=1e-3,3e-4 --dry-run\n"
        ),
    )
    p.add_argument("--config", help="YAML recipe (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, as for pretrain.train")
    g = p.add_argument_group("resources")
    g.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    g.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node; one task per GPU (default 0: CPU nodes)")
    g.add_argument("--tasks-per-node", type=int, help="tasks (ranks) per node; on GPU nodes it must equal --gpus-per-node")
    g.add_argument("--cpus-per-task", type=int, help="CPUs per task (also sets OMP_NUM_THREADS in the task)")
    g.add_argument("--partition", help="Slurm partition")
    g.add_argument("--time", type=int, default=60, metavar="MIN", help="time limit in minutes per run (default 60)")
    g.add_argument("--account", help="Slurm account")
    g.add_argument("--qos", help="Slurm quality of service")
    g.add_argument("--constraint", help="Slurm node features (--constraint)")
    g = p.add_argument_group("runs")
    g.add_argument("--output-root", metavar="DIR", help="runs go to DIR/NAME (default: runs); or give output_dir=...")
    g.add_argument("--name", help="run and job name (default: the config file's name)")
    g.add_argument("--sweep", action="append", default=[], metavar="key=v1,v2",
                   help="sweep a config key over values (repeatable: all combinations); a job array, one run each")
    g.add_argument("--max-requeues", type=int, default=3, metavar="K",
                   help="requeue after preemption or time limit at most K times (default 3)")
    g.add_argument("--signal-delay", type=int, default=90, metavar="S",
                   help="Slurm sends SIGUSR2 S seconds before the time limit: the run saves and requeues (default 90)")
    g = p.add_argument_group("job environment")
    g.add_argument("--setup", action="append", default=[], metavar="CMD",
                   help="shell line run in the batch script before the tasks start (repeatable), e.g. 'module load cuda'")
    g.add_argument("--srun-arg", action="append", default=[], metavar="ARG",
                   help="extra srun argument (repeatable), e.g. --srun-arg=--container-image=IMAGE (pyxis)")
    g.add_argument("--python", metavar="CMD", help="python command in the job (default: this interpreter)")
    g = p.add_argument_group("what to do")
    g.add_argument("--dry-run", action="store_true", help="print what would be submitted; submit nothing")
    g.add_argument("--wait", action="store_true", help="follow the job(s) to the end; exit 0: all completed, 75: one stopped (resume), 1: one failed")
    g.add_argument("--local", action="store_true", help="run through submitit's local executor on this machine (no Slurm)")
    g.add_argument("--poll", type=float, default=5.0, metavar="S", help="seconds between status checks with --wait (default 5)")
    return p


def split_values(text: str) -> list[str]:
    """'1e-3,3e-4' -> ['1e-3', '3e-4']; commas inside [...] or {...} (YAML lists) do not split."""
    values, depth, current = [], 0, ""
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += ch
    values.append(current)
    return [v.strip() for v in values]


def parse_sweeps(specs: list[str], overrides: list[str]) -> list[tuple[str, list[str]]]:
    fixed = {o.split("=", 1)[0].strip() for o in overrides}
    sweeps: list[tuple[str, list[str]]] = []
    for spec in specs:
        key, sep, rest = spec.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--sweep {spec!r}: expected key=v1,v2,...")
        if key == "output_dir":
            raise UsageError("--sweep output_dir: each run's folder comes from --output-root/--name and the swept values")
        values = split_values(rest)
        if any(v == "" for v in values):
            raise UsageError(f"--sweep {spec!r}: empty value (expected key=v1,v2,...)")
        if len(set(values)) != len(values):
            raise UsageError(f"--sweep {spec!r}: a value is repeated")
        if key in (k for k, _ in sweeps):
            raise UsageError(f"--sweep {key}: swept twice")
        if key in fixed:
            raise UsageError(f"--sweep {key}: also given as an override {key}=...")
        sweeps.append((key, values))
    return sweeps


def sweep_points(sweeps: list[tuple[str, list[str]]]) -> list[list[tuple[str, str]]]:
    """The cartesian product, first sweep slowest: [[(k1, a), (k2, x)], [(k1, a), (k2, y)], ...]."""
    if not sweeps:
        return [[]]
    keys = [k for k, _ in sweeps]
    return [list(zip(keys, combo)) for combo in itertools.product(*(vals for _, vals in sweeps))]


def point_dirname(point: list[tuple[str, str]]) -> str:
    """[('train.lr', '1e-3'), ('loss.name', 'clip')] -> 'train.lr-1e-3_loss.name-clip' (safe for a path)."""
    name = "_".join(f"{k}-{v}" for k, v in point)
    return re.sub(r"[^A-Za-z0-9.+=-]+", "_", name).strip("_") or "run"


@dataclass
class Run:
    """One training run: its folder and the overrides pretrain.train gets."""

    point: list[tuple[str, str]]
    output_dir: Path
    overrides: list[str]


@dataclass
class Plan:
    args: argparse.Namespace
    config: str | None
    name: str
    run_root: Path
    log_dir: Path
    tasks_per_node: int
    runs: list[Run]

    @property
    def world_size(self) -> int:
        return self.args.nodes * self.tasks_per_node


def make_plan(args: argparse.Namespace) -> Plan:
    """Check every flag and the config of every run; raise UsageError naming the flag."""
    if args.nodes < 1:
        raise UsageError(f"--nodes: must be >= 1, got {args.nodes}")
    if args.gpus_per_node < 0:
        raise UsageError(f"--gpus-per-node: must be >= 0, got {args.gpus_per_node}")
    if args.tasks_per_node is not None:
        if args.tasks_per_node < 1:
            raise UsageError(f"--tasks-per-node: must be >= 1, got {args.tasks_per_node}")
        if args.gpus_per_node and args.tasks_per_node != args.gpus_per_node:
            raise UsageError(
                f"--tasks-per-node: {args.tasks_per_node} with --gpus-per-node {args.gpus_per_node}: "
                "one task per GPU (leave --tasks-per-node out on GPU nodes)"
            )
        tasks_per_node = args.tasks_per_node
    else:
        tasks_per_node = args.gpus_per_node or 1
    if args.cpus_per_task is not None and args.cpus_per_task < 1:
        raise UsageError(f"--cpus-per-task: must be >= 1, got {args.cpus_per_task}")
    if args.time < 1:
        raise UsageError(f"--time: must be >= 1 minute, got {args.time}")
    if args.max_requeues < 0:
        raise UsageError(f"--max-requeues: must be >= 0, got {args.max_requeues}")
    if args.signal_delay < 1 or args.signal_delay >= args.time * 60:
        raise UsageError(f"--signal-delay: must be between 1 and the time limit ({args.time * 60} s), got {args.signal_delay}")
    if args.poll <= 0:
        raise UsageError(f"--poll: must be > 0, got {args.poll}")
    if args.local and args.nodes != 1:
        raise UsageError(f"--nodes: --local runs on this machine, one node only (got {args.nodes})")
    if args.python is not None and not args.python.strip():
        raise UsageError("--python: empty command")
    for item in args.overrides:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise UsageError(f"override {item!r}: expected key=value (flags start with --)")
    if args.config is not None and not Path(args.config).is_file():
        raise UsageError(f"--config: no such file: {args.config}")
    config = str(Path(args.config).resolve()) if args.config else None

    name = args.name or (Path(args.config).stem if args.config else "run")
    if not re.fullmatch(r"[A-Za-z0-9._+=-]+", name):
        raise UsageError(f"--name {name!r}: use letters, digits and . _ + = - only")
    given_dir = [o.split("=", 1)[1] for o in args.overrides if o.split("=", 1)[0].strip() == "output_dir"]
    overrides = [o for o in args.overrides if o.split("=", 1)[0].strip() != "output_dir"]
    if given_dir:
        if args.output_root is not None:
            raise UsageError("--output-root: give either --output-root (runs go to DIR/NAME) or output_dir=..., not both")
        run_root = Path(given_dir[-1]).expanduser().resolve()
    else:
        run_root = (Path(args.output_root or "runs").expanduser() / name).resolve()

    sweeps = parse_sweeps(args.sweep, overrides)
    runs = []
    for point in sweep_points(sweeps):
        out = run_root / point_dirname(point) if point else run_root
        runs.append(Run(point, out, overrides + [f"{k}={v}" for k, v in point] + [f"output_dir={out}"]))
    if len({r.output_dir for r in runs}) != len(runs):
        raise UsageError("--sweep: two points map to the same run folder; use values that differ in letters or digits")

    from pretrain.config import ConfigError, load_config

    for run in runs:
        try:
            load_config(config, run.overrides)
        except ConfigError as err:
            where = f" (sweep point {point_dirname(run.point)})" if run.point else ""
            raise UsageError(f"config error{where}: {err}") from None
    return Plan(args, config, name, run_root, run_root / "slurm", tasks_per_node, runs)


# ----------------------------------------------------------------------------------------------
# Executors
# ----------------------------------------------------------------------------------------------


def python_command(plan: Plan) -> str:
    return plan.args.python or shlex.quote(sys.executable)


def slurm_parameters(plan: Plan) -> dict:
    a = plan.args
    params: dict = {
        "job_name": plan.name,
        "nodes": a.nodes,
        "ntasks_per_node": plan.tasks_per_node,
        "time": a.time,
        # the notice before the time limit goes to every task; submitit's USR2 default, pinned here
        # so that SUBMITIT_PREEMPT_SIGNAL cannot move it onto the trainer's own SIGUSR1
        "additional_parameters": {"signal": f"{PREEMPT_SIGNAL.name[3:]}@{a.signal_delay}", "requeue": True},
        "setup": [f"export PYTHONPATH={shlex.quote(str(ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}", *a.setup],
        "srun_args": ["--kill-on-bad-exit=1", *a.srun_arg],
    }
    if a.gpus_per_node:
        params["gpus_per_node"] = a.gpus_per_node
    for key in ("cpus_per_task", "partition", "account", "qos", "constraint"):
        if getattr(a, key) is not None:
            params[key] = getattr(a, key)
    return params


def slurm_executor(plan: Plan, dry_run: bool = False):
    import submitit

    cls = submitit.SlurmExecutor
    if dry_run:  # no srun needed to print the batch script
        class _PlanOnly(submitit.SlurmExecutor):
            @classmethod
            def affinity(cls) -> int:
                return 1

        cls = _PlanOnly
    ex = cls(folder=plan.log_dir, max_num_timeout=plan.args.max_requeues, python=python_command(plan))
    ex.update_parameters(**slurm_parameters(plan))
    return ex


def local_executor(plan: Plan):
    import submitit

    ex = submitit.LocalExecutor(folder=plan.log_dir, max_num_timeout=plan.args.max_requeues, python=python_command(plan))
    ex.update_parameters(
        timeout_min=plan.args.time,
        tasks_per_node=plan.tasks_per_node,
        gpus_per_node=plan.args.gpus_per_node,
        signal_delay_s=plan.args.signal_delay,
    )
    return ex


def tasks_for(plan: Plan) -> list[TrainTask]:
    return [TrainTask(plan.config, run.overrides, plan.args.max_requeues, plan.args.cpus_per_task or 0) for run in plan.runs]


def describe(plan: Plan) -> str:
    a = plan.args
    where = "this machine (submitit local executor)" if a.local else f"Slurm partition {a.partition or '(default)'}"
    gpus = f", {a.gpus_per_node} GPUs per node" if a.gpus_per_node else " (CPU)"
    return (
        f"{len(plan.runs)} run(s) on {where}: {a.nodes} node(s) x {plan.tasks_per_node} task(s) = world size "
        f"{plan.world_size}{gpus}, time limit {a.time} min, notice {a.signal_delay} s before it, "
        f"at most {a.max_requeues} requeue(s)"
    )


def dry_run(plan: Plan) -> int:
    say(f"dry run: {describe(plan)}")
    say(f"logs would go to {plan.log_dir}")
    for i, (run, task) in enumerate(zip(plan.runs, tasks_for(plan))):
        label = f"run {i}" + (f" ({point_dirname(run.point)})" if run.point else "")
        say(f"{label}: {run.output_dir}")
        print("    each task: " + shlex.join(["python", "-m", "pretrain.train", *task.argv()]))
    print("    with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR (first node), MASTER_PORT (from the job id) set per task")
    if plan.args.local:
        say("--local: the tasks run as subprocesses of submitit's local controller (no batch script)")
        return 0
    ex = slurm_executor(plan, dry_run=True)
    if len(plan.runs) > 1:
        ex = copy.deepcopy(ex)
        ex.parameters["map_count"] = len(plan.runs)
    script = ex._make_submission_file_text(ex._submitit_command_str, "dry-run")
    say(f"sbatch script{' (job array)' if len(plan.runs) > 1 else ''}:")
    print(script.replace("%j", "<jobid>").replace("%A", "<arrayid>").replace("%a", "<index>").replace("%t", "<task>"))
    return 0


# ----------------------------------------------------------------------------------------------
# Submission and waiting
# ----------------------------------------------------------------------------------------------


def submit(plan: Plan) -> list:
    if plan.args.local:
        # the local controller inherits this environment: make launch/ importable in the tasks
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        ex = local_executor(plan)
    else:
        ex = slurm_executor(plan)
    tasks = tasks_for(plan)
    plan.log_dir.mkdir(parents=True, exist_ok=True)
    if len(tasks) == 1:
        return [ex.submit(tasks[0])]
    with ex.batch():
        jobs = [ex.submit(t) for t in tasks]
    return jobs


def report_submitted(plan: Plan, jobs: list) -> None:
    kind = "local job" if plan.args.local else "job"
    if len(jobs) == 1:
        say(f"submitted {kind} {jobs[0].job_id}: {describe(plan)}")
    else:
        say(f"submitted job array {str(jobs[0].job_id).split('_')[0]} ({len(jobs)} runs): {describe(plan)}")
    for run, job in zip(plan.runs, jobs):
        paths = job.paths
        say(f"job {job.job_id}: run dir {run.output_dir}")
        say(f"job {job.job_id}: logs {paths.stdout} and {paths.stderr.name} (task 0; one pair per task)")
    if not plan.args.local:
        first = str(jobs[0].job_id).split("_")[0]
        say(f"follow: squeue -j {first}   tail -f {jobs[0].paths.stdout}   cancel: scancel {first}")


class SlurmUnreachable(RuntimeError):
    """scontrol failed for another reason than an unknown job (slurmctld busy or restarting)."""


def scontrol_job(job_id: str) -> dict | None:
    """`scontrol show job -o` as a dict (None once Slurm has forgotten the job)."""
    try:
        proc = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True,
                              timeout=60)
    except subprocess.TimeoutExpired as err:
        raise SlurmUnreachable(f"scontrol show job {job_id}: no answer in 60 s") from err
    if proc.returncode != 0 or "JobId=" not in proc.stdout:
        if "invalid job id" in (proc.stderr + proc.stdout).lower():
            return None
        raise SlurmUnreachable(f"scontrol show job {job_id}: {(proc.stderr or proc.stdout).strip()}")
    line = proc.stdout.strip().splitlines()[0]
    fields = {}
    for token in re.split(r"\s+(?=[A-Za-z:/]+=)", line):
        key, _, value = token.partition("=")
        fields[key] = value
    return fields


def sacct_state(job_id: str) -> dict | None:
    proc = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State,ExitCode", "-j", str(job_id)],
                          capture_output=True, text=True)
    if proc.returncode != 0 or not proc.stdout.strip():
        return None
    state, _, code = proc.stdout.strip().splitlines()[-1].partition("|")
    return {"JobState": state.split()[0], "ExitCode": code, "Restarts": "?"}


def task0_outcome(job) -> tuple[str, object] | None:
    from submitit.core.utils import pickle_load

    path = job.paths.result_pickle
    try:
        return pickle_load(path) if path.exists() else None
    except Exception:  # noqa: BLE001 - a half-written or foreign file is no outcome
        return None


def wait_slurm(jobs: list, poll: float) -> dict[str, dict]:
    """Follow each job until it ends for good (a requeued job is followed through its restarts)."""
    pending = {str(j.job_id) for j in jobs}
    last: dict[str, tuple] = {}
    final: dict[str, dict] = {}
    seen_final: dict[str, tuple] = {}
    while pending:
        for jid in sorted(pending):
            try:
                info = scontrol_job(jid)
            except SlurmUnreachable as err:
                say(f"{err}; trying again")
                continue
            if info is None:
                info = sacct_state(jid) or {"JobState": "UNKNOWN", "ExitCode": "?", "Restarts": "?"}
                final[jid] = info
                pending.discard(jid)
                say(f"job {jid}: {info['JobState']} (no longer known to slurmctld)")
                continue
            state = info.get("JobState", "UNKNOWN")
            key = (state, info.get("Restarts"), info.get("Reason"))
            if last.get(jid) != key:
                restarts = info.get("Restarts", "0")
                extra = f", restarts {restarts}" if restarts not in ("0", None) else ""
                reason = info.get("Reason", "None")
                say(f"job {jid}: {state}{extra}" + (f" ({reason})" if reason not in ("None", "", None) else ""))
                last[jid] = key
            if state in FINAL_STATES:
                # a final state seen twice with the same restart count is not the middle of a requeue
                if seen_final.get(jid) == key:
                    final[jid] = info
                    pending.discard(jid)
                seen_final[jid] = key
            else:
                seen_final.pop(jid, None)
        if pending:
            time.sleep(poll)
    return final


def _tail(path: Path, lines: int) -> str:
    """The trainer's own error lines in a task's stderr if any, else its last lines."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    kept = [ln for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in kept if re.match(r"^(\[rank\d+\]: )?(config )?error: ", ln)]
    return "\n".join("    " + ln for ln in (errors or kept)[-lines:])


def wait_and_report(plan: Plan, jobs: list) -> int:
    """0 when every run finished; 75 (STOPPED) when none failed but some stopped before their last
    step with a checkpoint (submit the same command again to resume); 1 when one failed."""
    ok, failed = True, False
    if plan.args.local:
        for job in jobs:
            while not job.done():
                time.sleep(plan.args.poll)
        states = {str(j.job_id): {} for j in jobs}
    else:
        states = wait_slurm(jobs, plan.args.poll)
    for run, job in zip(plan.runs, jobs):
        info = states[str(job.job_id)]
        outcome = task0_outcome(job)
        if outcome is None:
            result = "no result written by task 0"
            good, failed = False, True
        elif outcome[0] == "success":
            r = outcome[1]
            result = f"step {r['step']}/{r['end_step']}" + ("" if r["complete"] else " (stopped; resume later)")
            good = bool(r["complete"])
        else:
            lines = [ln for ln in str(outcome[1]).strip().splitlines() if ln.strip()]
            result = "error: " + (lines[-1] if lines else "?")
            good, failed = False, True
        if plan.args.local:
            say(f"job {job.job_id}: finished, {result}; run dir {run.output_dir}")
        else:
            failed = failed or info["JobState"] not in ("COMPLETED", "CANCELLED", "PREEMPTED", "REQUEUED")
            good = good and info["JobState"] == "COMPLETED"
            say(
                f"job {job.job_id}: {info['JobState']}, exit code {info.get('ExitCode', '?')}, "
                f"restarts {info.get('Restarts', '?')}, {result}; run dir {run.output_dir}"
            )
        ok = ok and good
        if not good:
            tail = _tail(job.paths.stderr, 8)
            if tail:
                say(f"job {job.job_id}: from task 0's stderr:\n" + tail)
            say(f"job {job.job_id}: see {job.paths.stderr} and {job.paths.stdout}")
    say("all runs completed" if ok else "not every run completed")
    return OK if ok else FAILED if failed else STOPPED


class SubmissionError(Exception):
    """sbatch (or submitit) refused the job(s); its own message is the useful part."""


def run(args) -> int:
    plan = make_plan(args)
    if args.dry_run:
        return dry_run(plan)
    try:
        jobs = submit(plan)
    except Exception as err:  # noqa: BLE001 - sbatch's own message is the useful part
        raise SubmissionError(f"submission failed: {err}") from None
    report_submitted(plan, jobs)
    if not args.wait:
        return 0
    try:
        return wait_and_report(plan, jobs)
    except KeyboardInterrupt:
        ids = " ".join(str(j.job_id) for j in jobs)
        say(f"stopped waiting; the job(s) keep running ({ids})")
        return INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    usage = (UsageError, USAGE, lambda err: f"{err}\n(python -m launch.slurm --help lists the flags)")
    return run_cli(lambda: run(args), prog="python -m launch.slurm", errors=[usage, (SubmissionError, FAILED)])


if __name__ == "__main__":
    exit_process(main())
