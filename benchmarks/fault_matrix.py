"""Fault trials that take too long for every CI run, with a figure per row (benchmarks/RESULTS.md).

    python benchmarks/fault_matrix.py kill9 --kills 10            # N kill -9 of a whole 2-rank job
    python benchmarks/fault_matrix.py kill9 --async-checkpoint    # the same, checkpoints written in the background
    python benchmarks/fault_matrix.py hang --trials 5 --ranks 3   # N SIGSTOPs of one rank, stacks of the rest

``kill9``: a 2-rank run (the test-size towers on tests/assets/shards, checkpoints every
``--every`` steps) is killed with SIGKILL, every process of the job at once (the launcher's whole
process group, no clean-up), at ``--kills`` random moments: a seeded random number of steps into each
launch (1 to ``--every``), a seeded random fraction of a second after that step's log line (so
some kills land inside a checkpoint save), never in the last three steps; with ``--first-after K``
the first kill comes no earlier than after step K (so that even a single kill resumes from a checkpoint);
``--reference RUN`` compares with an existing uninterrupted run of the same recipe instead of a new one.
After each kill the same command runs again; it resumes from the newest complete checkpoint, and
its losses must equal an uninterrupted run's at every step it runs (fp32, CPU, 1e-5). Prints
"N of N exact" and writes every kill (step, delay, where the next run resumed) with ``--json``.
tests/test_train_robust.py runs it with one kill after the first checkpoint; this script runs many.
With ``--async-checkpoint`` the job saves with ``train.async_checkpoint`` (a background thread per
rank writes while training goes on, so a kill lands inside a write more often); each kill records
the checkpoint folders it left without COMPLETE (``torn``: a save was in flight), which the resume
must ignore.

    python benchmarks/fault_matrix.py flaky --trials 20            # reads through a flaky store

``flaky``: the train shards of tests/assets/shards (8 x 6 samples) read for one epoch over HTTP
(a Range-honouring server) or S3 (moto; s3fs's and botocore's own retries off, 8 KiB blocks), through
tests/flaky.py's proxy with a seeded random fault schedule per trial (HTTP: a cut every 2-4 responses
after 4,000-18,000 body bytes, a 503/500 every 3-6; S3: a cut every 3-5 responses after 1,500-7,500
bytes, a 503/500 every 4-7), with 0 or 2 loader workers and ``data.retries`` = ``--retries``
(default 3, the default). Every fault the proxy injects must be either one retry (``data/retries``)
or, where a stream took more than ``data.retries`` faults in a row without passing on a sample, the
one skipped shard that ends them (``data/skipped/...``), no key may come twice, and the keys lost
must be of skipped shards; a trial with nothing skipped must give the local read's keys in order
("exact"). ``--spent K`` more trials with ``data.retries=0``: each fault is then a skipped shard.

``hang``: a ``--ranks``-rank run (the same test-size recipe, no checkpoints, ``train.collective_timeout``
``--timeout``) in which one rank, drawn at random (seeded), is stopped with SIGSTOP a random
fraction of a second after a random step's log line. Each trial passes when the job ends naming
that rank, the message names a report (``output_dir/hang/rank<k>.txt``) of every other rank and
those files exist, each showing the collective its rank waits in (by its training thread's stack
or our open record), while the stopped rank wrote none. As a scheduler would, the script kills
the job once the rank is named (torchrun itself waits 30 s on a stopped worker). Prints "N of N"
and, per trial, where each live rank waited; ``--json`` writes them all.

    python benchmarks/fault_matrix.py upload --trials 10           # kill -9 during an upload to S3

``upload``: ``train.remote_sync`` to a local S3 server (moto, started by this script on 127.0.0.1).
Each trial is a 2-rank run (``--steps``, checkpoints every ``--every``, stopped ``--every`` steps
before the end) whose rank 0 is killed with SIGKILL in the middle of a checkpoint's upload (tests.faults
``kill_in_upload``: a seeded random one of the newest three checkpoints, before a seeded random one
of its files); every other trial then flips 8 bytes in a random file of the newest complete remote
checkpoint. The local run folder is deleted and the same command runs to the end from the bucket
alone: it must resume from the newest complete remote checkpoint whose files match (the torn one
never, the corrupted one named), its losses must equal an uninterrupted run's at every step (fp32,
1e-5), and the bucket must end with whole checkpoints only (at most ``train.keep_checkpoints``).
tests/test_remote_sync.py runs one such trial.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers import ASSET_SHARDS, tiny_overrides, torchrun_cmd  # noqa: E402 - the test-size run


def command(out: Path, steps: int, every: int, background: bool = False) -> list[str]:
    """The test-size quickstart on tests/assets/shards, 2 ranks, checkpoints every ``every`` steps
    (``background``: written by train.async_checkpoint)."""
    return torchrun_cmd(tiny_overrides(ASSET_SHARDS, out, steps) + [f"train.checkpoint_every={every}",
                                                                   "train.keep_checkpoints=2", "eval.enabled=false"]
                        + (["train.async_checkpoint=true"] if background else []))


def torn(out: Path) -> list[str]:
    """Checkpoint folders without COMPLETE (a save was in flight when the job died)."""
    ckpts = out / "checkpoints"
    return sorted(p.name for p in ckpts.iterdir() if p.is_dir() and not (p / "COMPLETE").is_file()) \
        if ckpts.is_dir() else []


def logged(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # a line cut by the kill
                continue
            if "loss" in row:
                rows.append(row)
    return rows


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) of every process, from /proc."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            out[int(stat.parent.name)] = (int(fields[1]), fields[0])
        except (OSError, IndexError, ValueError):
            continue
    return out


def job_processes(root: int) -> list[int]:
    """``root`` and all its descendants (torchrun puts each worker in a session of its own, so the
    launcher's process group alone is not the job)."""
    procs, job, grew = _processes(), {root}, True
    while grew:
        more = {pid for pid, (ppid, _) in procs.items() if ppid in job} - job
        job |= more
        grew = bool(more)
    return sorted(job)


def kill_job(root: int, timeout: float = 60) -> int:
    """SIGKILL to every process of the job at once; returns when none is left alive (zombies whose
    parent died count as dead). Returns how many were killed."""
    pids = job_processes(root)
    for pid in reversed(pids):  # the workers first, the launcher last: nobody gets to react
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        procs = _processes()
        if not any(pid in procs and procs[pid][1] not in ("Z", "X") for pid in pids):
            return len(pids)
        time.sleep(0.05)
    raise SystemExit(f"processes {pids} still alive {timeout} s after SIGKILL")


def run_until(out: Path, steps: int, every: int, after: int | None, delay: float, timeout: float = 600,
              at_least: int = 0, background: bool = False) -> dict:
    """One launch; with ``after``, SIGKILL to the whole job ``delay`` s after the launch logged that
    many steps (counted from where it resumed; at the latest after step ``steps - 3``; no earlier
    than after step ``at_least``)."""
    proc = subprocess.Popen(command(out, steps, every, background), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines, resumed, t0, kill_at, killed = [], 0, time.monotonic(), None, 0
    try:
        for line in proc.stdout:
            lines.append(line)
            if "resumed_from=" in line:
                resumed = int(line.split(" at step ")[1].split()[0])
            if after is not None and kill_at is None and line.startswith("[train] world_size="):
                kill_at = min(max(resumed + after, at_least), steps - 3)
                if kill_at <= resumed:
                    kill_job(proc.pid)
                    raise SystemExit(f"resumed at step {resumed} of {steps}: no room left for this kill; raise --steps")
            if kill_at is not None and line.startswith(f"[train] step {kill_at}/"):
                time.sleep(delay)
                killed = kill_job(proc.pid)  # every process of the job: none writes after this
                break
            if time.monotonic() - t0 > timeout:
                raise SystemExit(f"launch did not finish in {timeout} s:\n{''.join(lines[-30:])}")
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            kill_job(proc.pid)
    if after is None and proc.returncode != 0:
        raise SystemExit(f"the run failed (exit {proc.returncode}):\n{''.join(lines[-40:])}")
    if after is not None and not any(line.startswith(f"[train] step {kill_at}/") for line in lines):
        raise SystemExit(f"the run ended before step {kill_at}:\n{''.join(lines[-40:])}")
    return {"resumed_at": resumed, "exit": proc.returncode, "killed_after": kill_at, "processes_killed": killed}


def hang_trial(out: Path, ranks: int, timeout: float, stop_after: int, delay: float, victim: int) -> dict:
    """One launch; SIGSTOP of rank ``victim`` ``delay`` s after step ``stop_after``'s log line."""
    if out.exists():
        shutil.rmtree(out)
    args = ["eval.enabled=false", "train.checkpoint=false", f"train.collective_timeout={timeout:g}"]
    cmd = torchrun_cmd(tiny_overrides(ASSET_SHARDS, out, 10_000) + args, nproc=ranks)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines, stopped_at, named_after, ended_after = [], None, None, None
    try:
        for line in proc.stdout:
            lines.append(line)
            if stopped_at is None and line.startswith(f"[train] step {stop_after}/"):
                time.sleep(delay)
                pid = json.loads((out / "ranks" / f"rank{victim}.json").read_text())["pid"]
                os.kill(pid, signal.SIGSTOP)
                stopped_at = time.monotonic()
            if stopped_at is not None and named_after is None and f"rank {victim} (last heard" in line:
                named_after = time.monotonic() - stopped_at
            if stopped_at is not None and "ending the job" in line:
                # every live rank says so once it has written its report: then the job is over
                if sum("ending the job" in x for x in lines) >= ranks - 1:
                    ended_after = time.monotonic() - stopped_at
                    break
            if stopped_at is not None and time.monotonic() - stopped_at > 4 * timeout + 60:
                break
    finally:
        kill_job(proc.pid)
    output = "".join(lines)
    live = [r for r in range(ranks) if r != victim]
    reports = {r: out / "hang" / f"rank{r}.txt" for r in live}
    named_files = all(str(p) in output for p in reports.values())
    where = {}
    for r, path in reports.items():
        text = path.read_text() if path.is_file() else ""
        waiting = text.split("the training thread waits in:\n")[1].split("\n\n")[0].strip() if \
            "the training thread waits in:\n" in text else ""
        last = text.split("last collective of ours: ")[1].splitlines()[0] if "last collective of ours: " in text else ""
        where[r] = {"file": path.is_file(), "in_collective": bool(waiting),
                    "waiting_in": waiting.splitlines(), "last_of_ours": last}
    ok = (named_after is not None and named_files and not (out / "hang" / f"rank{victim}.txt").exists()
          and all(w["file"] and w["in_collective"] for w in where.values()))
    # which live ranks named the stopped one themselves, and which left on another's flag in the store
    named_it = sorted(r for r in live if f"[train] rank {r}: rank {victim} (last heard" in output)
    followed = sorted(r for r in live if f"[train] rank {r}: ending the job: " in output)
    return {"victim": victim, "stopped_after_step": stop_after, "delay_s": delay, "named_after_s": named_after,
            "named_by": named_it, "left_on_the_flag": followed,
            "ended_after_s": ended_after, "reports_named": named_files, "where": where, "ok": ok,
            "tail": None if ok else output[-3000:]}


def hang(args) -> dict:
    rng, trials = random.Random(args.seed), []
    for i in range(args.trials):
        victim, step, delay = rng.randrange(args.ranks), rng.randint(2, 5), round(rng.uniform(0.0, 0.5), 3)
        trial = hang_trial(Path(args.out) / f"trial{i}", args.ranks, args.timeout, step, delay, victim)
        trials.append(trial)
        waits = "; ".join(f"rank {r}: {w['waiting_in'][0] if w['waiting_in'] else '-'} [ours: {w['last_of_ours']}]"
                          for r, w in trial["where"].items())
        named, ended = (trial[k] or float("nan") for k in ("named_after_s", "ended_after_s"))
        print(f"trial {i + 1}: rank {victim} stopped {delay:.2f} s after step {step}; named after {named:.1f} s, "
              f"job over after {ended:.1f} s; {'ok' if trial['ok'] else 'FAILED'}; named by ranks {trial['named_by']}, "
              f"left on the flag: {trial['left_on_the_flag']}; {waits}", flush=True)
        if trial["tail"]:
            print(trial["tail"])
    good = sum(t["ok"] for t in trials)
    print(f"hang with stacks: {good} of {len(trials)} (the stopped rank named, every live rank's report written, "
          f"named and showing the collective it waits in)")
    return {"ranks": args.ranks, "timeout": args.timeout, "seed": args.seed, "trials": trials, "ok": good,
            "total": len(trials)}


def kill9(args) -> dict:
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    ref, chain = Path(args.reference) if args.reference else out / "reference", out / "chain"
    if not args.reference:
        run_until(ref, args.steps, args.every, None, 0.0, background=args.async_checkpoint)
    want = {r["step"]: r["loss"] for r in logged(ref)}
    if sorted(want) != list(range(1, args.steps + 1)):
        raise SystemExit(f"the reference {ref} logged steps {sorted(want)}, not 1..{args.steps}")
    rng = random.Random(args.seed)
    kills, seen = [], 0
    for i in range(args.kills + 1):
        last = i == args.kills
        after = None if last else rng.randint(1, args.every)  # steps into the launch
        delay = 0.0 if last else round(rng.uniform(0.0, args.max_delay), 3)
        launch = run_until(chain, args.steps, args.every, after, delay, at_least=args.first_after if i == 0 else 0,
                           background=args.async_checkpoint)
        step = launch["killed_after"]
        rows = logged(chain)
        new, seen = rows[seen:], len(rows)
        exact = all(math.isclose(r["loss"], want[r["step"]], rel_tol=1e-5, abs_tol=1e-6) for r in new)
        # this launch continued the kill before it: from a complete checkpoint, equal to the reference
        if i > 0:
            k = kills[-1]["kill_after_step"]
            kills[-1].update(resumed_at=launch["resumed_at"], steps_after=[r["step"] for r in new], exact=exact,
                             resumed_from_checkpoint=launch["resumed_at"] % args.every == 0,
                             # the save of step k had begun but was not complete when the job died
                             in_save=k % args.every == 0 and launch["resumed_at"] < k)
        if step is not None:
            kills.append({"kill_after_step": step, "delay_s": delay, "processes_killed": launch["processes_killed"],
                          "torn": torn(chain)})
        print(f"launch {i + 1}: resumed at step {launch['resumed_at']}, logged steps "
              f"{new[0]['step'] if new else '-'}..{new[-1]['step'] if new else '-'}"
              + (f", killed {delay:.2f} s after step {step}" if step is not None else ", finished")
              + f" ({'exact' if exact else 'NOT EXACT'})", flush=True)
    final = {r["step"]: r["loss"] for r in logged(chain)}
    complete = sorted(final) == list(range(1, args.steps + 1))
    good = sum(1 for k in kills if k.get("exact") and k.get("resumed_from_checkpoint"))
    in_write = sum(1 for k in kills if k["torn"])
    print(f"kill -9 of the whole job: {good} of {len(kills)} exact (every step 1..{args.steps} logged: {complete}); "
          f"{in_write} left a checkpoint folder without COMPLETE"
          + (" (checkpoints written in the background)" if args.async_checkpoint else ""))
    return {"steps": args.steps, "every": args.every, "seed": args.seed, "async_checkpoint": args.async_checkpoint,
            "kills": kills, "exact": good, "total": len(kills), "complete": complete, "torn": in_write}


def flaky(args) -> dict:
    import fsspec.config

    from tests.flaky import AWS_ENV, FlakyProxy, moto_s3, serve_folder
    from tests.helpers import data_config, flat, loader

    train = ASSET_SHARDS / "train"
    pattern = "shard-{000000..000007}.tar"

    def read(urls, workers, **extra):
        d = data_config({"urls": urls, "index": str(train / "index.json"), "shuffle_buffer": 4, "workers": workers},
                        retry_backoff=0.001, **extra)
        l = loader(d, batch=5, epochs=1)
        keys = flat(b.keys for b in l)
        return keys, l.metrics()

    os.environ.update({**AWS_ENV, "AWS_MAX_ATTEMPTS": "1", "AWS_RETRY_MODE": "standard"})
    import s3fs

    s3fs.S3FileSystem.retries = 1  # each fault reaches the loader (s3fs's own retries would absorb some)
    want = {w: read(str(train / pattern), w)[0] for w in (0, 2)}
    rng = random.Random(args.seed)
    rows = []
    with serve_folder(train) as http_base, moto_s3("flaky", {"train": train}) as s3_base:
        for i in range(args.trials + args.spent):
            spent = i >= args.trials
            store = ("http", "s3")[i % 2]
            workers = (0, 2)[(i // 2) % 2]
            if store == "http":  # a request per shard read: cut often, anywhere in the 20 KiB
                sched = {"cut_every": rng.randint(2, 4), "cut_after": rng.randint(4000, 18000),
                         "error_every": rng.randint(3, 6)}
            else:  # a HEAD and a GET per 8 KiB block: cut inside a block
                sched = {"cut_every": rng.randint(3, 5), "cut_after": rng.randint(1500, 7500),
                         "error_every": rng.randint(4, 7)}
            proxy = FlakyProxy(http_base if store == "http" else s3_base, **sched)
            fsspec.config.conf["s3"] = {"endpoint_url": proxy.url, "default_block_size": 8192}
            urls = f"{proxy.url}/{pattern}" if store == "http" else f"s3://flaky/train/{pattern}"
            t0 = time.monotonic()
            try:
                keys, metrics = read(urls, workers, retries=0 if spent else args.retries)
            finally:
                proxy.close()
            faults = len(proxy.faults())
            skipped = sum(v for k, v in metrics.items() if k.startswith("data/skipped/"))
            lost = {k for k in set(want[workers]) - set(keys)}
            exact = keys == want[workers] and skipped == 0
            ok_ = (metrics["data/retries"] + skipped == faults and len(keys) == len(set(keys))
                   and set(keys) <= set(want[workers]) and (exact or skipped > 0)
                   and len(lost) <= 6 * skipped)  # at most a shard's samples per skip
            row = {"store": store, "workers": workers, "retries": 0 if spent else args.retries, **sched,
                   "requests": len(proxy.log), "exact": exact,
                   "faults": faults, "cuts": len(proxy.faults("cut")), "data/retries": metrics["data/retries"],
                   "skipped": skipped, "samples": len(keys), "seconds": round(time.monotonic() - t0, 2), "ok": ok_}
            rows.append(row)
            print(json.dumps(row), flush=True)
    main_rows, spent_rows = rows[:args.trials], rows[args.trials:]
    good = sum(r["ok"] for r in main_rows)
    exact = sum(r["exact"] for r in main_rows)
    print(f"flaky store, data.retries={args.retries}: {good} of {args.trials} trials with every fault accounted "
          f"({sum(r['faults'] for r in main_rows)} faults = {sum(r['data/retries'] for r in main_rows):.0f} retries + "
          f"{sum(r['skipped'] for r in main_rows):.0f} skipped shards); {exact} of {args.trials} exact (every sample "
          f"once, in order, nothing skipped); data.retries=0: {sum(r['ok'] for r in spent_rows)} of {args.spent} "
          f"with each fault a skipped shard", flush=True)
    return {"seed": args.seed, "retries": args.retries, "trials": rows, "ok": good, "exact": exact,
            "total": args.trials, "spent_ok": sum(r["ok"] for r in spent_rows), "spent": args.spent}


def upload_command(out: Path, steps: int, every: int, url: str) -> list[str]:
    return torchrun_cmd(tiny_overrides(ASSET_SHARDS, out, steps) + [
        f"train.checkpoint_every={every}", "train.keep_checkpoints=3", "eval.enabled=false",
        f"train.remote_sync.url={url}", "train.remote_sync.every=1"], module="tests.faults")


def upload(args) -> dict:
    """Trials of a kill -9 during an upload, each resumed on an empty local folder from the bucket."""
    from moto.server import ThreadedMotoServer
    import s3fs

    from pretrain.distributed import free_port

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint, bucket = f"http://127.0.0.1:{port}", "fault-matrix"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
           "AWS_EC2_METADATA_DISABLED": "true", "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1",
           "FSSPEC_S3_ENDPOINT_URL": endpoint}
    env.pop("AWS_PROFILE", None)
    fs = s3fs.S3FileSystem(endpoint_url=endpoint, key="testing", secret="testing", skip_instance_cache=True,
                           use_listings_cache=False)
    fs.mkdir(bucket)

    def launch(run: Path, url: str, fault: str = "", *extra: str) -> tuple[int, str, float]:
        t0 = time.monotonic()
        proc = subprocess.run(upload_command(run, args.steps, args.every, url) + list(extra), cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900,
                              env={**env, "PRETRAIN_FAULT": fault})
        return proc.returncode, proc.stdout, time.monotonic() - t0

    def remote_folders(prefix: str) -> dict[str, set[str]]:
        found: dict[str, set[str]] = {}
        for key in fs.find(f"{prefix}/checkpoints/"):
            tag, _, name = key[len(prefix) + len("/checkpoints/"):].partition("/")
            if name:
                found.setdefault(tag, set()).add(name)
        return found

    try:
        code, text, _ = launch(out / "reference", f"s3://{bucket}/reference")
        if code != 0:
            raise SystemExit(f"the reference run failed (exit {code}):\n{text[-3000:]}")
        want = {r["step"]: r["loss"] for r in logged(out / "reference")}
        rng, stop = random.Random(args.seed), args.steps - args.every
        saves = list(range(args.every, stop + 1, args.every))
        trials = []
        for i in range(args.trials):
            run, prefix = out / f"trial{i}", f"{bucket}/trial{i}"
            step, nth, corrupt = rng.choice(saves[-3:]), rng.randint(1, 5), i % 2 == 1  # 5 files at 2 ranks, ZeRO-2
            code, text, first_s = launch(run, f"s3://{prefix}", f"kill_in_upload:{step}:{nth}",
                                         f"train.stop_at_step={stop}")
            killed = "injected kill -9 in the upload" in text
            folders = remote_folders(prefix)
            complete = sorted(int(t[4:]) for t, names in folders.items() if "COMPLETE" in names)
            torn = sorted(t for t, names in folders.items() if "COMPLETE" not in names)
            expect, corrupted = (complete[-1] if complete else 0), None
            if corrupt and complete:
                tag = f"step{expect:06d}"
                name = rng.choice(sorted(folders[tag] - {"COMPLETE"}))
                key = f"{prefix}/checkpoints/{tag}/{name}"
                data = bytearray(fs.cat_file(key))
                at = rng.randrange(max(1, len(data) - 8))
                data[at:at + 8] = bytes(b ^ 0xFF for b in data[at:at + 8])
                fs.pipe_file(key, bytes(data))
                corrupted, expect = f"{tag}/{name}", (complete[-2] if len(complete) > 1 else 0)
            shutil.rmtree(run)  # a fresh machine: the bucket alone
            code2, text2, second_s = launch(run, f"s3://{prefix}")
            resumed = 0
            for line in text2.splitlines():
                if "resumed_from=" in line:
                    resumed = int(line.split(" at step ")[1].split()[0])
            rows = {r["step"]: r["loss"] for r in logged(run)}
            exact = all(math.isclose(rows[s], want[s], rel_tol=1e-5, abs_tol=1e-6) for s in range(resumed + 1,
                                                                                                   args.steps + 1))
            after = remote_folders(prefix)
            whole = all("COMPLETE" in names for names in after.values()) and len(after) <= 3 and \
                f"step{args.steps:06d}" in after
            named = corrupted is None or any("is damaged" in line and corrupted.split("/")[1] in line
                                             for line in text2.splitlines())
            ok = code2 == 0 and killed and resumed == expect and exact and whole and named and all(
                f"{t} has no COMPLETE marker" in text2 for t in torn)
            trials.append({"kill_in_upload_of": step, "before_file": nth, "killed": killed, "exit": code,
                           "remote_complete": complete, "remote_torn": torn, "corrupted": corrupted,
                           "resumed_at": resumed, "expected": expect, "exact": exact, "bucket_whole_after": whole,
                           "ok": ok, "seconds": [round(first_s, 1), round(second_s, 1)]})
            print(f"trial {i + 1}: killed in the upload of step {step} before file {nth} (exit {code}); remote "
                  f"complete {complete}, torn {torn}" + (f", corrupted {corrupted}" if corrupted else "")
                  + f"; resumed at {resumed} (expected {expect}); {'ok' if ok else 'FAILED'}", flush=True)
            if not ok and args.stop_on_failure:
                print(text2[-4000:])
                break
    finally:
        server.stop()
    good = sum(t["ok"] for t in trials)
    print(f"kill -9 during an upload: {good} of {len(trials)} resumed from the newest complete remote checkpoint, exact")
    return {"steps": args.steps, "every": args.every, "seed": args.seed, "trials": trials, "exact": good,
            "total": len(trials), "complete": True}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="trial", required=True)
    k = sub.add_parser("kill9", help="N kill -9 of a whole 2-rank job, each resumed and compared")
    k.add_argument("--kills", type=int, default=10)
    k.add_argument("--steps", type=int, default=60)
    k.add_argument("--every", type=int, default=4, help="checkpoint every N steps (default 4)")
    k.add_argument("--max-delay", type=float, default=0.3, help="kill up to this long after the step's log line")
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--reference", metavar="RUN", help="a finished run of the same recipe and --steps (any "
                   "checkpoint interval) to compare with, instead of running one first")
    k.add_argument("--first-after", type=int, default=0, metavar="K",
                   help="the first kill no earlier than after step K (default 0: anywhere in the first --every steps)")
    k.add_argument("--async-checkpoint", action="store_true",
                   help="save with train.async_checkpoint (written by a background thread while training goes on)")
    k.add_argument("--out", default="runs/fault_matrix")
    k.add_argument("--json", metavar="FILE")
    f = sub.add_parser("flaky", help="one epoch read through a flaky HTTP / S3 store, N fault schedules")
    f.add_argument("--trials", type=int, default=20)
    f.add_argument("--spent", type=int, default=4, help="more trials with data.retries=0 (default 4)")
    f.add_argument("--retries", type=int, default=3, help="data.retries of the main trials (default 3)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--json", metavar="FILE")
    h = sub.add_parser("hang", help="N SIGSTOPs of one rank: the rank named, every other rank's stacks written")
    h.add_argument("--trials", type=int, default=5)
    h.add_argument("--ranks", type=int, default=3)
    h.add_argument("--timeout", type=float, default=6.0, help="train.collective_timeout (default 6 s)")
    h.add_argument("--seed", type=int, default=0)
    h.add_argument("--out", default="runs/fault_matrix_hang")
    h.add_argument("--json", metavar="FILE")
    u = sub.add_parser("upload", help="N kill -9 during an upload to S3 (moto), each resumed from the bucket alone")
    u.add_argument("--trials", type=int, default=10)
    u.add_argument("--steps", type=int, default=12)
    u.add_argument("--every", type=int, default=2, help="checkpoint every N steps (default 2)")
    u.add_argument("--seed", type=int, default=0)
    u.add_argument("--stop-on-failure", action="store_true")
    u.add_argument("--out", default="runs/fault_matrix_upload")
    u.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    if args.trial == "flaky":
        result = flaky(args)
        good = result["ok"] == result["total"] and result["spent_ok"] == result["spent"]
    elif args.trial == "upload":
        if args.steps < 2 * args.every + 4:
            p.error("--steps must be at least 2 x --every + 4")
        result = upload(args)
        good = result["exact"] == result["total"] and result["complete"]
    elif args.trial == "hang":
        result = hang(args)
        good = result["ok"] == result["total"]
    else:
        if args.steps < 2 * args.every + 4:
            p.error("--steps must be at least 2 x --every + 4")
        result = kill9(args)
        good = result["exact"] == result["total"] and result["complete"]
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
