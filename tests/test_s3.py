"""``s3://`` shards from a real S3-compatible server: moto's, started here in this process on
127.0.0.1 (real HTTP; the S3 client, s3fs over aiobotocore, is not mocked). The committed test
shards are uploaded to a bucket; training streams them under torchrun with a DataLoader worker per
rank, stops mid-epoch, resumes, and matches the uninterrupted run; evaluation reads the val shards
from the bucket. The endpoint reaches s3fs the way a user's would: fsspec's own configuration
(``FSSPEC_S3_ENDPOINT_URL``) and the AWS credential variables (dummy values).
"""
from __future__ import annotations

import json
import math

import pytest

from pretrain.distributed import free_port
from tests.flaky import AWS_ENV  # dummy credentials for moto: nothing read from this machine
from tests.helpers import (ASSET_SHARDS, PYTHON, data_config, flat, loader, losses, ok, run_cmd, take, tiny_overrides,
                           torchrun)

moto_server = pytest.importorskip("moto.server", reason="moto[server] is a test extra: make setup installs it")
s3fs = pytest.importorskip("s3fs", reason="s3fs is a test extra (and the 's3' extra): make setup installs it")

BUCKET = "pretrain-test"
TRAIN = f"s3://{BUCKET}/train/shard-{{000000..000007}}.tar"
TRAIN_INDEX = f"s3://{BUCKET}/train/index.json"


@pytest.fixture(scope="module")
def endpoint():
    """A moto S3 server on 127.0.0.1 holding the committed train/ and val/ shards (with index.json)."""
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    try:
        fs = s3fs.S3FileSystem(endpoint_url=url, key="testing", secret="testing", skip_instance_cache=True)
        fs.mkdir(BUCKET)
        for split in ("train", "val"):
            fs.put(str(ASSET_SHARDS / split), f"{BUCKET}/{split}", recursive=True)
        assert len(fs.glob(f"{BUCKET}/train/shard-*.tar")) == 8
        yield url
    finally:
        server.stop()


@pytest.fixture
def s3_here(endpoint, monkeypatch):
    """This process (and the DataLoader workers it forks) configured like the subprocesses:
    FSSPEC_S3_ENDPOINT_URL lands in ``fsspec.config.conf`` when fsspec is imported, so set that."""
    import fsspec.config

    for k, v in AWS_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint})


def test_loader_streams_s3_shards_and_resumes_mid_epoch(s3_here):
    """Counts from the bucket's index.json; a forked worker reads the same samples in the same order
    as from local files; a saved position continues exactly, mid-epoch (48 samples, 5 per batch)."""
    local = data_config({"urls": f"{ASSET_SHARDS}/train/shard-{{000000..000007}}.tar", "shuffle_buffer": 4})
    remote = data_config({"urls": TRAIN, "index": TRAIN_INDEX, "shuffle_buffer": 4, "workers": 1})
    want = flat(take(iter(loader(local, batch=5)), 7))
    first = loader(remote, batch=5)
    assert first.epoch_samples == 48
    it = iter(first)
    head = flat(take(it, 4))
    state = json.loads(json.dumps(first.state_dict()))
    first.close()
    resumed = loader(remote, batch=5)
    resumed.load_state_dict(state)
    assert head + flat(take(iter(resumed), 3)) == want
    resumed.close()


def test_missing_s3fs_names_the_key_and_the_extra():
    """Without s3fs (an import of it fails, as when it is not installed) the error names the config
    key, the URL and how to install the extra."""
    code = ("import sys; sys.modules['s3fs'] = None\n"
            "from tests.helpers import data_config, loader\n"
            f"loader(data_config({{'urls': {TRAIN!r}, 'index': {TRAIN_INDEX!r}}}))\n")
    proc = run_cmd([PYTHON, "-c", code], timeout=120, env=AWS_ENV)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("pretrain.data.sources.DataSourceError: data.train.urls: "), last
    assert f"s3://{BUCKET}/" in last and "s3fs" in last and "pip install -e '.[s3]'" in last, last


def _args(out) -> list[str]:
    return tiny_overrides(f"s3://{BUCKET}", out, steps=6) + [
        f"data.train.index={TRAIN_INDEX}",
        "data.train.workers=1",
        "data.val.workers=1",
        "train.checkpoint_every=3",
        "train.log_keys=true",
    ]


def _keys(out, rank):
    rows = [json.loads(line) for line in (out / "keys" / f"rank{rank}.jsonl").read_text().splitlines()]
    return {r["step"]: r["keys"] for r in rows}


@pytest.mark.slow
def test_two_rank_training_from_s3_resumes_exactly_and_evaluates(endpoint, uninterrupted_run, tmp_path):
    """2 ranks stream the asset shards from the bucket, stop at step 3 (mid-epoch) and resume: every
    loss, each rank's data stream and the final evaluation (read from the bucket's val shards) equal
    the same run's on the local copies of those shards (tests/conftest.py's uninterrupted_run)."""
    env = {**AWS_ENV, "FSSPEC_S3_ENDPOINT_URL": endpoint}
    whole, out = uninterrupted_run, tmp_path / "run"
    first = ok(torchrun(_args(out) + ["train.stop_at_step=3"], env=env))
    assert (out / "checkpoints" / "latest").read_text().strip() == "step000003"
    assert "[eval]" not in first
    second = ok(torchrun(_args(out), env=env))
    assert "at step 3" in second
    want, got = losses(whole), losses(out)
    assert sorted(got) == sorted(want) == list(range(1, 7))
    for step in range(1, 7):
        assert math.isclose(got[step], want[step], rel_tol=1e-5, abs_tol=1e-6), (step, got[step], want[step])
    for rank in range(2):  # the stream from the bucket continued where it stopped
        assert _keys(out, rank) == _keys(whole, rank)
    # evaluation at the end read the 12 held-out samples from the bucket's val shards, alike in both runs
    scores = [json.loads((run / "eval" / "step000006.json").read_text()) for run in (whole, out)]
    for s in scores:
        assert s["eval/samples"] == 12 and "eval/zeroshot_top1" in s
        s.pop("eval/seconds")
    assert scores[0] == pytest.approx(scores[1])
