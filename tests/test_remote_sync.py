"""``train.remote_sync``: the run folder mirrored to a real S3 server (moto's, started here in this
process on 127.0.0.1: real HTTP, the S3 client s3fs not mocked), as tests/test_s3.py starts it.

One end-to-end story on 2 ranks: a run is killed with SIGKILL in the middle of a checkpoint's upload
(tests.faults ``kill_in_upload``), one remote checkpoint is then corrupted, the local run folder is
deleted (a fresh machine), and the same command resumes from the bucket: the torn upload is never
used, the corrupted one is named, marked and skipped, the one before it is downloaded and the
losses continue the killed run's; afterwards the bucket holds the pruned set of whole checkpoints
and the run's logs, and ``pretrain.eval`` / ``pretrain.export`` read ``s3://`` URLs.
"""
from __future__ import annotations

import json
import math
import shutil

import pytest

from pretrain.checkpoint import COMPLETE, DAMAGED
from pretrain.distributed import free_port
from pretrain.remote import find_checkpoint
from tests.flaky import AWS_ENV  # dummy credentials for moto: nothing read from this machine
from tests.helpers import ASSET_SHARDS, QUICKSTART, losses, ok, tiny_overrides, torchrun

moto_server = pytest.importorskip("moto.server", reason="moto[server] is a test extra: make setup installs it")
s3fs = pytest.importorskip("s3fs", reason="s3fs is a test extra (and the 's3' extra): make setup installs it")

BUCKET = "pretrain-remote"
URL = f"s3://{BUCKET}/runs/tiny"


@pytest.fixture
def bucket(monkeypatch, tmp_path):
    """An empty bucket on a moto server on 127.0.0.1; this process configured as the runs are
    (FSSPEC_S3_ENDPOINT_URL lands in fsspec.config.conf when fsspec is imported, so set that), and
    a cache folder of its own for remote reads. Yields (endpoint, an s3fs client of the test's own)."""
    import fsspec.config

    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for k, v in AWS_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint})
    monkeypatch.setenv("PRETRAIN_CACHE", str(tmp_path / "cache"))
    try:
        fs = s3fs.S3FileSystem(endpoint_url=endpoint, key="testing", secret="testing", skip_instance_cache=True,
                               use_listings_cache=False)
        fs.mkdir(BUCKET)
        yield endpoint, fs
    finally:
        server.stop()


def _remote_checkpoints(fs) -> dict[str, set[str]]:
    """Remote checkpoint folder -> its files."""
    base = f"{BUCKET}/runs/tiny/checkpoints/"
    out: dict[str, set[str]] = {}
    for key in fs.find(base):
        tag, _, name = key[len(base):].partition("/")
        if name:
            out.setdefault(tag, set()).add(name)
    return out


def _args(out, steps: int = 8) -> list[str]:
    return tiny_overrides(ASSET_SHARDS, out, steps=steps) + [
        "train.checkpoint_every=2", "train.keep_checkpoints=3", "eval.enabled=false",
        f"train.remote_sync.url={URL}", "train.remote_sync.every=1"]


@pytest.mark.slow
def test_kill_during_upload_then_a_fresh_machine_resumes_from_the_bucket(bucket, tmp_path):
    endpoint, fs = bucket
    env = {**AWS_ENV, "FSSPEC_S3_ENDPOINT_URL": endpoint}
    out = tmp_path / "run"
    # 1. 8 steps, stopped at 6 (checkpoints 2, 4, 6); kill -9 of rank 0 as step 6's 2nd file goes up
    first = torchrun(_args(out) + ["train.stop_at_step=6"], module="tests.faults",
                     env={**env, "PRETRAIN_FAULT": "kill_in_upload:6:2"})
    assert first.returncode not in (0, 75), first.stdout[-3000:]
    assert "injected kill -9 in the upload of checkpoints/step000006/" in first.stdout, first.stdout[-3000:]
    want = losses(out)
    assert sorted(want) == list(range(1, 7))
    remote = _remote_checkpoints(fs)
    assert {t for t, names in remote.items() if COMPLETE in names} == {"step000002", "step000004"}
    assert len(remote["step000006"]) == 1 and COMPLETE not in remote["step000006"]  # torn: 1 file of many
    assert remote["step000004"] == set(json.loads((out / "checkpoints" / "step000004" / COMPLETE).read_text())["files"]) | {COMPLETE}
    # 2. 8 bytes of an optimizer partition of the newest complete remote checkpoint flipped
    (optim,) = [n for n in remote["step000004"] if n.startswith("zero_pp_rank_1_")]
    key = f"{BUCKET}/runs/tiny/checkpoints/step000004/{optim}"
    data = bytearray(fs.cat_file(key))
    data[len(data) // 2: len(data) // 2 + 8] = bytes(b ^ 0xFF for b in data[len(data) // 2: len(data) // 2 + 8])
    fs.pipe_file(key, bytes(data))
    logged_before = fs.cat_file(f"{BUCKET}/runs/tiny/metrics.jsonl").decode()

    # a reader (eval/export) of the run URL: the torn step 6 unseen, step 4 named, step 2 read; nothing marked
    found = find_checkpoint(URL)
    assert (found.kind, found.step, found.folder.name) == ("deepspeed", 2, "step000002")
    assert found.config.is_file() and str(found.folder).startswith(str(tmp_path / "cache"))
    assert COMPLETE in _remote_checkpoints(fs)["step000004"]

    # 3. a fresh machine: no local folder; the same command resumes from the bucket
    shutil.rmtree(out)
    text = ok(torchrun(_args(out), env=env))
    assert "step000006 has no COMPLETE marker" in text, text[-3000:]
    (damaged,) = [line for line in text.splitlines() if "is damaged" in line]
    assert "step000004" in damaged and f"{optim} (SHA-256 differs" in damaged
    assert "falling back to the previous complete checkpoint" in damaged
    assert f"resumed_from={out / 'checkpoints' / 'step000002'} at step 2" in text, text[-3000:]
    got = losses(out)
    assert sorted(got) == list(range(1, 9))
    for step in (3, 4, 5, 6):  # the killed run's losses, continued exactly
        assert math.isclose(got[step], want[step], rel_tol=1e-5, abs_tol=1e-6), (step, got[step], want[step])
    # the logs continue the remote ones (fetched, then appended to) and are synced at the end
    logged = (out / "metrics.jsonl").read_text()
    assert logged.startswith(logged_before) and fs.cat_file(f"{BUCKET}/runs/tiny/metrics.jsonl").decode() == logged
    for name in ("config.yaml", "ranks/rank1.json"):
        assert fs.cat_file(f"{BUCKET}/runs/tiny/{name}") == (out / name).read_bytes(), name
    assert fs.find(f"{BUCKET}/runs/tiny/tensorboard")
    # pruned remotely as locally (keep 3): only whole checkpoints, the damaged and torn ones replaced
    remote = _remote_checkpoints(fs)
    assert sorted(remote) == ["step000004", "step000006", "step000008"]
    for tag, names in remote.items():
        assert COMPLETE in names and DAMAGED not in names
        assert (out / "checkpoints" / tag / COMPLETE).read_bytes() == fs.cat_file(
            f"{BUCKET}/runs/tiny/checkpoints/{tag}/{COMPLETE}")
    assert fs.cat_file(f"{BUCKET}/runs/tiny/checkpoints/latest").decode().strip() == "step000008"

    # 4. eval and export read s3:// (the run's newest checkpoint, and a checkpoint folder)
    from pretrain.eval import main as eval_main
    from pretrain.export import main as export_main

    assert export_main(["--checkpoint", URL, "--output", str(tmp_path / "exported")]) == 0
    assert (tmp_path / "exported" / "model.safetensors").is_file()
    cached = tmp_path / "cache" / "remote" / "s3" / BUCKET / "runs" / "tiny" / "checkpoints" / "step000008"
    assert {p.name: p.read_bytes() for p in cached.iterdir()} == {
        p.name: p.read_bytes() for p in (out / "checkpoints" / "step000008").iterdir()}
    assert eval_main(["--checkpoint", f"{URL}/checkpoints/step000006", "--output", str(tmp_path / "ev"),
                      "eval.enabled=true", "eval.plots=false"]) == 0
    assert json.loads((tmp_path / "ev" / "eval" / "step000006.json").read_text())["eval/samples"] == 12
    assert export_main(["--checkpoint", f"s3://{BUCKET}/nothing", "--output", str(tmp_path / "x")]) == 2


def test_config_names_the_field(monkeypatch):
    """A URL of an unknown or unwritable scheme, a local path, every <= 0, an unknown key, and a
    missing filesystem (s3fs not importable) each stop with a message naming the field."""
    import sys

    import fsspec  # noqa: F401 - its registry module below (fsspec.registry is the mapping it exports)

    from pretrain.config import load_config
    from pretrain.options import ConfigError

    base = ["train.remote_sync.url=s3://bucket/run"]
    assert load_config(QUICKSTART, base + ["train.remote_sync.every=0.5"]).train.remote_sync.every == 0.5
    cases = {
        "train.remote_sync.url=zz://bucket/run": "train.remote_sync.url: unknown URL scheme zz://",
        "train.remote_sync.url=https://host/run": "train.remote_sync.url: https:// cannot be written to",
        "train.remote_sync.url=runs/x": "train.remote_sync.url: expected a URL such as s3://",
        "train.remote_sync.every=0": "train.remote_sync.every: must be > 0 seconds, got 0",
        "train.remote_sync.evry=3": "train.remote_sync.evry: unknown key (did you mean every?",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError) as err:
            load_config(QUICKSTART, base + [override])
        assert str(err.value).startswith(message), (override, err.value)
    with pytest.raises(ConfigError, match=r"^train\.remote_sync\.url: required"):
        load_config(QUICKSTART, ["train.remote_sync={every: 5}"])
    monkeypatch.setitem(sys.modules, "s3fs", None)  # as when it is not installed
    monkeypatch.delitem(sys.modules["fsspec.registry"]._registry, "s3", raising=False)  # an s3 class known before
    with pytest.raises(ConfigError, match=r"^train\.remote_sync\.url: s3:// URLs need .*pip install -e '\.\[s3\]'"):
        load_config(QUICKSTART, base)
