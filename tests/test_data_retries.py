"""Retried shard reads against a flaky store on loopback (tests/flaky.py): the committed train
shards served over HTTP (Range requests honoured) and from a local S3 server (moto), each behind a
proxy that cuts every few responses mid-tar and answers 500/503 to others. Every sample of the epoch
arrives exactly once and in the order of a fault-free read, ``data/retries`` equals the number of
faults the proxy injected, nothing is skipped; with the retries spent, the shard counts under the
existing reasons. A ``pipe:`` command that dies mid-shard is run again.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.flaky import AWS_ENV, FlakyProxy, moto_s3, serve_folder
from tests.helpers import ASSET_SHARDS, data_config, deadline, flat, loader, take

TRAIN = ASSET_SHARDS / "train"
INDEX = str(TRAIN / "index.json")  # the counts, read locally: the proxy's faults are for the shards
PATTERN = "shard-{000000..000007}.tar"


def _config(urls, workers: int = 0, **data):
    return data_config({"urls": urls, "index": INDEX, "shuffle_buffer": 4, "workers": workers}, retry_backoff=0.001,
                       **data)


@pytest.fixture(scope="module")
def reference() -> list[str]:
    """The epoch's keys in order, read from the local files."""
    return flat(b.keys for b in loader(_config(str(TRAIN / PATTERN)), batch=5, epochs=1))


def _shard_of(key: str) -> str:
    from pretrain.data.tarstream import iter_shard

    if not _SHARDS:
        for i in range(8):
            name = f"shard-{i:06d}.tar"
            _SHARDS.update((raw.key, name) for raw in iter_shard(str(TRAIN / name), None, lambda i: True,
                                                               lambda *a: None, 2**20))
    return _SHARDS[key]


_SHARDS: dict[str, str] = {}


def _shard_keys() -> list[str]:
    _shard_of("s00000")
    return list(_SHARDS)


def _faults(proxy: FlakyProxy) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in proxy.faults():
        out[r.fault] = out.get(r.fault, 0) + 1
    return out


def test_http_reads_survive_cuts_and_errors_and_resume_from_the_same_position(reference):
    """Through the proxy (a cut every 3rd response after 7000 body bytes, 503/500 every 5th):
    the same keys in the same order; one retry per fault; each retry after a cut is a Range request
    at a tar header before the cut. Stopped after 2 batches and resumed, the saved position's byte
    offset is where the resumed read starts (a Range request), and the stream continues exactly."""
    with serve_folder(TRAIN) as base, deadline(60):
        proxy = FlakyProxy(base, cut_every=3, cut_after=7000, error_every=5)
        try:
            cfg = _config(f"{proxy.url}/{PATTERN}")
            first = loader(cfg, batch=5, epochs=1)
            head = flat(take(iter(first), 2))
            state = json.loads(json.dumps(first.state_dict()))
            first.close()
            slot = state["workers"][0]
            assert slot["tar_byte"] > 0 and slot["tar_byte"] % 512 == 0, slot  # mid-shard, at a header
            before = len(proxy.log)
            second = loader(cfg, batch=5, epochs=1)
            second.load_state_dict(state)
            got = head + flat(b.keys for b in second)
            resumed = proxy.log[before]
            metrics = second.metrics()
        finally:
            proxy.close()
    assert got == reference  # every sample once, in order
    assert resumed.range == f"bytes={slot['tar_byte']}-", (resumed, slot)
    faults = _faults(proxy)
    assert faults.get("cut", 0) >= 3 and faults.get("503", 0) >= 1 and faults.get("500", 0) >= 1, faults
    assert metrics == {"data/dropped_samples": 0.0, "data/retries": float(sum(faults.values()))}, (metrics, faults)
    for i, r in enumerate(proxy.log):  # a cut is followed by a Range request for the same shard, at or before the cut
        if r.fault == "cut":
            again = next(n for n in proxy.log[i + 1:] if n.path == r.path and n.fault is None)
            offset = int(again.range.removeprefix("bytes=").rstrip("-")) if again.range else 0
            was = int(r.range.removeprefix("bytes=").rstrip("-")) if r.range else 0
            assert offset % 512 == 0 and was <= offset <= was + r.sent, (r, again)
            assert offset > was or r.sent < 1024, (r, again)  # progress kept unless the cut came first


def test_spent_retries_count_the_shard_under_the_existing_reasons(reference):
    """data.retries=0 behaves as before retries existed: a cut after some samples is a corrupt tar
    (its other samples lost for the epoch), an error at the open an unreadable shard; a store that
    always fails makes every shard unreadable after data.retries tries each."""
    with serve_folder(TRAIN) as base, deadline(60):
        proxy = FlakyProxy(base, cut_every=3, cut_after=7000, error_every=5)
        try:
            once = loader(_config(f"{proxy.url}/{PATTERN}", retries=0), batch=5, epochs=1)
            got = flat(b.keys for b in once)
        finally:
            proxy.close()
        faults = _faults(proxy)
        assert once.metrics() == {"data/skipped/corrupt_tar": float(faults["cut"]),
                                  "data/skipped/unreadable_shard": float(faults["503"] + faults.get("500", 0)),
                                  "data/dropped_samples": 0.0, "data/retries": 0.0}, (once.metrics(), faults)
        # the rest of each faulted shard is lost (the windows shuffle what is left: compare as sets)
        assert len(got) == len(set(got)) and set(got) < set(reference)
        faulted = {r.path.rsplit("/", 1)[1] for r in proxy.faults()}
        assert {_shard_of(k) for k in set(reference) - set(got)} <= faulted, faulted
        down = FlakyProxy(base, always=503)
        try:
            never = loader(_config(f"{down.url}/{PATTERN}", retries=2), batch=5, epochs=1)
            assert list(never) == []
        finally:
            down.close()
    assert never.metrics() == {"data/skipped/unreadable_shard": 8.0, "data/dropped_samples": 0.0, "data/retries": 16.0}
    assert len(down.log) == 8 * 3


def test_s3_reads_survive_cuts_and_errors(reference, monkeypatch):
    """s3:// through s3fs against moto behind the proxy, s3fs's and botocore's own retries off (so
    each fault reaches the loader; with them on they absorb some first) and 8 KiB blocks (a ranged
    GET each, so cuts land mid-shard): the same keys in order, one retry per fault, none skipped."""
    pytest.importorskip("moto.server", reason="moto[server] is a test extra: make setup installs it")
    s3fs = pytest.importorskip("s3fs", reason="s3fs is a test extra (and the 's3' extra): make setup installs it")
    import fsspec.config

    for k, v in {**AWS_ENV, "AWS_MAX_ATTEMPTS": "1", "AWS_RETRY_MODE": "standard"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    with moto_s3("flaky", {"train": TRAIN}) as endpoint, deadline(90):
        proxy = FlakyProxy(endpoint, cut_every=3, cut_after=7000, error_every=5)
        try:
            monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": proxy.url, "default_block_size": 8192})
            l = loader(_config(f"s3://flaky/train/{PATTERN}"), batch=5, epochs=1)
            got = flat(b.keys for b in l)
        finally:
            proxy.close()
    faults = _faults(proxy)
    assert got == reference
    assert faults.get("cut", 0) >= 3 and faults.get("503", 0) >= 1 and faults.get("500", 0) >= 1, faults
    assert l.metrics() == {"data/dropped_samples": 0.0, "data/retries": float(sum(faults.values()))}, (l.metrics(), faults)
    # a cut mid-shard was continued by a ranged GET that starts at a tar header after byte 0
    ranges = [int(r.range.split("=")[1].split("-")[0]) for r in proxy.log if r.method == "GET" and r.range]
    assert any(o > 0 and o % 512 == 0 for o in ranges)


def test_a_pipe_command_that_dies_mid_shard_is_run_again(tmp_path):
    """Each shard's command dies (exit 3) after 7000 bytes the first time (a marker file says it
    ran); run again, its first bytes up to the next sample are dropped: every key once, in the order
    of the local read; two loader worker processes, whose retries add up in ``data/retries``."""
    urls = []
    for i in range(8):
        shard, marker = TRAIN / f"shard-{i:06d}.tar", tmp_path / f"ran-{i}"
        urls.append(f"pipe:if [ -e {marker} ]; then cat {shard}; else touch {marker}; head -c 7000 {shard}; exit 3; fi")
    with deadline(60):
        want = flat(b.keys for b in loader(_config(str(TRAIN / PATTERN), workers=2), batch=5, epochs=1))
        l = loader(data_config({"urls": urls, "samples": 48, "shuffle_buffer": 4, "workers": 2}, retry_backoff=0.001),
                   batch=5, epochs=1)
        got = flat(b.keys for b in l)
    assert got == want and sorted(got) == sorted(_shard_keys())
    assert l.metrics() == {"data/dropped_samples": 0.0, "data/retries": 8.0}


def test_a_saved_byte_offset_continues_the_shard_and_one_that_is_no_header_reads_it_from_the_start(caplog):
    """The position a retry and a resume use: (byte offset of a sample's header, its index) starts
    the read there; an offset where no tar header is (the shard was rewritten since) falls back to
    reading from the start and skipping by index, with a warning, nothing counted."""
    from pretrain.data.tarstream import iter_shard

    shard, events = str(TRAIN / "shard-000000.tar"), []

    def keys(start):
        return [s.key for s in iter_shard(shard, None, lambda i: True, lambda *a: events.append(a), 2**20,
                                          start=start)]

    whole = list(iter_shard(shard, None, lambda i: True, lambda *a: events.append(a), 2**20))
    assert [s.index for s in whole] == list(range(6)) and all(s.next_at % 512 == 0 for s in whole)
    at = whole[2].next_at
    assert keys((at, 3)) == [s.key for s in whole[3:]]
    assert Path(shard).read_bytes()[at + 512:at + 1024] != bytes(512)  # member data, not a header
    with caplog.at_level("WARNING", logger="pretrain.data"):
        assert keys((at + 512, 3)) == [s.key for s in whole[3:]]
    assert events == [] and "no tar header at byte" in caplog.text
