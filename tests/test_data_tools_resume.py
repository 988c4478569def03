"""Process-level guarantees of ``build``: byte-identical output whatever --workers, a real ``kill -9``
then the same command gives the uninterrupted result, progress only on a terminal."""
from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_tools.build import build_shards
from data_tools.members import Processing
from tests.helpers import ROOT, all_files, caption_rows, png_bytes, write, write_jsonl

pytestmark = pytest.mark.slow


def _mixed_manifest(raw: Path, n: int) -> Path:
    """n good rows plus a few bad ones (missing file, truncated image, empty text, duplicate key)."""
    rows = caption_rows(raw, n)
    good = png_bytes(1, size=(32, 32))
    write(raw / "img" / "trunc.png", good[: len(good) // 2])
    rows[3] = {**rows[3], "image": "img/absent.png"}
    rows[11] = {**rows[11], "image": "img/trunc.png"}
    rows[17] = {**rows[17], "caption": ""}
    rows[23] = {**rows[23], "key": rows[5]["key"]}
    for i, r in enumerate(rows):
        r["split"] = "val" if i % 7 == 0 else "train"
    return write_jsonl(raw / "m.jsonl", rows)


def test_output_byte_identical_whatever_workers(tmp_path):
    manifest = _mixed_manifest(tmp_path / "raw", 120)
    opts = dict(shard_size=9, mapping={"image": "png", "caption": "txt", "label": "cls"}, split_column="split",
                max_shard_bytes=14 * 1024, progress=False)
    outs = {}
    for workers in (1, 2, 3):
        out = tmp_path / f"w{workers}"
        build_shards(manifest, out, workers=workers, **opts)
        outs[workers] = all_files(out)
    assert outs[1] == outs[2] == outs[3]
    index = json.loads(outs[1]["index.json"])
    assert index["failures"]["total"] == 4 and index["total_samples"] == 116
    assert "workers" not in index["options"]
    assert sum(1 for s in index["shards"] if s["samples"] < 9) > 2  # byte limit and failures cut shards


# ------------------------------------------------------------------------------- kill -9 and resume


def _slow_dataset(raw: Path, n: int) -> Path:
    """Images that are re-encoded (PNG -> JPEG at most 48 px) so a build takes a few seconds."""
    rng = np.random.default_rng(0)
    (raw / "img").mkdir(parents=True)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(raw / "img" / f"{i}.png", compress_level=1)
        rows.append({"key": f"k{i:05d}", "image": f"img/{i}.png", "caption": f"caption {i}", "label": i % 10})
    rows[40]["image"] = "img/missing.png"
    rows[77]["caption"] = ""
    return write_jsonl(raw / "m.jsonl", rows)


def _command(manifest: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "data_tools", "build", "--input", str(manifest), "--output", str(out),
            "--shard-size", "20", "--workers", "2", "--map", "image=png", "--map", "caption=txt",
            "--map", "label=cls", "--image-format", "jpg", "--image-max-side", "48", "--no-progress"]


def _workers_of(pid: int) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"data_tools.workers" in cmd and str(pid).encode() in cmd:
            found.append(int(proc.name))
    return found


def _run_and_kill(cmd: list[str], out: Path, when, finishing: bool = False) -> bool:
    """Starts the build, SIGKILLs it once ``when(out)`` holds; False if it finished first."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if when(out):
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            # the workers die with it (no orphan keeps writing)
            for _ in range(100):
                if not _workers_of(proc.pid):
                    break
                time.sleep(0.05)
            assert not _workers_of(proc.pid), "worker processes outlived a kill -9 of the build"
            if not finishing:  # (while finishing, the index may already be written: the build is complete)
                assert not (out / "index.json").exists()
            for shard in out.glob("shard-*.tar"):  # whatever is under a final name is complete
                assert ".tmp" not in shard.name
            return True
        time.sleep(0.01)
    assert proc.wait() == 0, proc.stderr.read().decode()[-3000:]
    return False


def _sidecars(out: Path) -> int:
    return len(list((out / ".build" / "all").glob("g*.json"))) if (out / ".build" / "all").exists() else 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc to find the worker processes")
def test_kill_9_then_same_command_equals_uninterrupted_build(tmp_path):
    manifest = _slow_dataset(tmp_path / "raw", 400)
    reference = tmp_path / "reference"
    build_shards(manifest, reference, shard_size=20, mapping={"image": "png", "caption": "txt", "label": "cls"},
                 processing=Processing(image_format="jpg", image_max_side=48), progress=False)
    out = tmp_path / "out"
    cmd = _command(manifest, out)
    kills = 0
    # 1: while the workers are mid-way through their first groups
    kills += _run_and_kill(cmd, out, lambda o: any((o / ".build" / "all").glob("*.tar.tmp.*"))
                           if (o / ".build" / "all").exists() else False)
    done_after_first = _sidecars(out)
    # 2: once a third of the groups are done (the finished ones are kept, not redone)
    kills += _run_and_kill(cmd, out, lambda o: _sidecars(o) >= 7)
    # 3: as soon as the final renames have begun (may finish first: then the build is simply complete)
    _run_and_kill(cmd, out, lambda o: (o / "shard-000000.tar").exists(), finishing=True)
    assert kills == 2, "the build finished before it could be killed: make the dataset slower"
    assert done_after_first < 20
    # and the same command once more, to the end
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped 2 of 400 input rows" in proc.stdout
    got, want = all_files(out), all_files(reference)
    assert sorted(got) == sorted(want)
    for name in want:  # shards, index.json, sizes.json, failures.jsonl: byte for byte
        assert got[name] == want[name], name
    assert not (out / ".build").exists()

    # kill -9 at random moments (seeded, spread over a fresh build's duration), the same command
    # each time, until one run completes
    fresh = tmp_path / "fresh"
    t0 = time.monotonic()
    subprocess.run(_command(manifest, fresh), cwd=ROOT, capture_output=True, timeout=300, check=True)
    duration = time.monotonic() - t0
    out2 = tmp_path / "out2"
    rng = np.random.default_rng(4)
    kills = 0
    for attempt in range(3):  # three runs killed at random moments (if they have not finished yet) ...
        proc = subprocess.Popen(_command(manifest, out2), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            proc.wait(timeout=float(rng.uniform(0.05, 0.5)) * duration)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
            continue
        assert proc.returncode == 0, proc.stderr.read().decode()[-3000:]
    # ... then the same command once more, to the end
    final = subprocess.run(_command(manifest, out2), cwd=ROOT, capture_output=True, timeout=300)
    assert final.returncode == 0, final.stderr.decode()[-3000:]
    assert kills >= 1  # at least one build was really interrupted
    assert all_files(out2) == want
    verify = subprocess.run([sys.executable, "-m", "data_tools", "verify", str(out2)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr


# ------------------------------------------------------------------------------------ progress


def test_progress_bar_only_on_a_terminal(tmp_path):
    manifest = write_jsonl(tmp_path / "raw" / "m.jsonl", caption_rows(tmp_path / "raw", 30))
    base = [sys.executable, "-m", "data_tools", "build", "--input", str(manifest), "--shard-size", "5"]
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["TERM"] = "xterm"

    def on_tty(out: Path, extra_env: dict) -> str:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns, as a terminal has
        proc = subprocess.Popen(base + ["--output", str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=slave,
                                env={**env, **extra_env})
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        assert proc.wait(timeout=120) == 0
        os.close(master)
        return b"".join(chunks).decode(errors="replace")

    shown = on_tty(tmp_path / "tty", {})
    # tqdm's bar, redrawn in place up to the end: "building: 100%|####| 30/30 [00:01<00:00, 25.1row/s]"
    assert "\r" in shown and re.search(r"building: 100%\|.+\| 30/30 \[\d+:\d\d<\d+:\d\d, [\d.?]+row/s\]", shown)
    assert on_tty(tmp_path / "ci", {"CI": "true"}) == ""  # quiet in CI even on a terminal
    piped = subprocess.run(base + ["--output", str(tmp_path / "pipe")], cwd=ROOT, capture_output=True, text=True,
                           env=env, timeout=120)
    assert piped.returncode == 0 and piped.stderr == ""
    assert "wrote 30 samples in 6 shards" in piped.stdout
