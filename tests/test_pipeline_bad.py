"""Bad and hostile shards: skipped, counted by reason, logged at a bounded rate; the stream goes on.
Nothing from a shard is unpickled or torch-loaded, and member names never touch the filesystem."""
from __future__ import annotations

import io
import logging
import os
import pathlib
import pickle
import tarfile

import numpy as np
import pytest
import torch

from pretrain.data import Decoder, register_decoder
from tests.helpers import data_config, deadline, flat, loader, png_bytes, take, write_index, write_shard

IMAGE_TEXT = {"image": {"decoder": "image", "options": {"size": 8}}, "text": {"decoder": "text", "members": ["txt"]}}


def _good(key: str, i: int, label=True) -> tuple[str, dict[str, bytes]]:
    m = {"png": png_bytes(i), "txt": f"caption {key}".encode()}
    if label:
        m["cls"] = str(i % 3).encode()
    return key, m


@pytest.fixture(scope="module")
def bad_set(tmp_path_factory):
    """Three shards: one mixing good and bad samples, one truncated mid-member, one not a tar."""
    folder = tmp_path_factory.mktemp("bad")
    png = png_bytes(99)
    mixed = [
        _good("g0", 0), _good("g1", 1), _good("g2", 2),
        ("bad_img", {"png": b"\x89PNG\r\n\x1a\n garbage", "txt": b"x"}),
        ("trunc_img", {"png": png[: len(png) // 2], "txt": b"x"}),
        ("bad_utf8", {"png": png, "txt": b"caption \xff\xfe"}),
        ("no_txt", {"png": png}),
        ("no_img", {"txt": b"only text"}),
        ("bad_cls", {"png": png, "txt": b"labelled badly", "cls": b"seven"}),
        _good("g3", 3),
    ]
    write_shard(folder / "b-000000.tar", mixed)
    full = write_shard(folder / "b-000001.tar", [_good(f"t{i}", i) for i in range(6)])
    raw = full.read_bytes()
    cut = raw.index(b"t3.png") + 512 + 20  # inside the data of sample t3's image
    full.write_bytes(raw[:cut])
    (folder / "b-000002.tar").write_bytes(os.urandom(3000))
    write_index(folder, {"b-000000.tar": 10, "b-000001.tar": 6, "b-000002.tar": 5})
    return [str(folder / f"b-{i:06d}.tar") for i in range(3)]


GOOD = {"g0", "g1", "g2", "g3", "bad_cls", "t0", "t1", "t2"}
COUNTS = {"undecodable_image": 2, "bad_utf8": 1, "missing_text": 1, "missing_image": 1, "bad_label": 1,
          "corrupt_tar": 2}


def _metrics(counts: dict[str, int], dropped: int) -> dict[str, float]:
    out = {f"data/skipped/{k}": float(v) for k, v in sorted(counts.items())}
    out["data/dropped_samples"] = float(dropped)
    out["data/retries"] = 0.0  # local shards: never retried
    return out


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_bad_samples_are_skipped_and_counted_by_reason(bad_set, workers, caplog):
    d = data_config({"urls": bad_set, "shuffle_buffer": 4, "workers": workers}, modalities=IMAGE_TEXT,
                    bad_log_per_minute=3)
    l = loader(d, batch=2, epochs=1)
    with caplog.at_level(logging.WARNING, logger="pretrain.data"), deadline(60):
        batches = list(l)
    keys = flat(b.keys for b in batches)
    assert sorted(keys) == sorted(GOOD)
    labels = {k: int(v) for b in batches for k, v in zip(b.keys, b.labels)}
    assert labels["bad_cls"] == -1 and labels["g1"] == 1  # an optional label that is bad: -1, sample kept
    assert l.metrics() == _metrics(COUNTS, dropped=5)
    if workers == 0:  # the bounded log: 3 lines a minute although there are 8 events
        lines = [r.getMessage() for r in caplog.records if r.name == "pretrain.data"]
        assert len(lines) == 3 and all(line.startswith("[data] skipped (") for line in lines)
        assert any("b-00000" in line for line in lines)


def test_counts_survive_an_exact_resume(bad_set):
    """Events of a window that is re-read after a resume are not counted twice."""
    d = data_config({"urls": bad_set, "shuffle_buffer": 4}, modalities=IMAGE_TEXT)
    ref = loader(d, batch=1, epochs=1)
    want = flat(b.keys for b in ref)
    for cut in (1, 3, 5, 7):
        first = loader(d, batch=1, epochs=1)
        head = take(iter(first), cut)
        second = loader(d, batch=1, epochs=1)
        second.load_state_dict(first.state_dict())
        assert flat(head) + flat(b.keys for b in second) == want
        assert second.metrics() == ref.metrics() == _metrics(COUNTS, dropped=5), cut


def test_a_broken_dataset_stops_with_a_clear_error(tmp_path):
    url = write_shard(tmp_path / "x-000000.tar", [(f"k{i}", {"png": b"broken", "txt": b"t"}) for i in range(30)])
    write_index(tmp_path, {"x-000000.tar": 30})
    d = data_config({"urls": str(url)}, modalities=IMAGE_TEXT, max_consecutive_bad=10)
    with pytest.raises(RuntimeError, match=r"10 samples in a row dropped .*undecodable_image"):
        next(iter(loader(d)))
    # endless training over shards that yield nothing: an error, not a hang
    (tmp_path / "y").mkdir()
    for i in range(2):
        (tmp_path / "y" / f"y-{i:06d}.tar").write_bytes(b"")
    d = data_config({"urls": [str(tmp_path / "y" / f"y-{i:06d}.tar") for i in range(2)], "samples": 10})
    with deadline(30), pytest.raises(RuntimeError, match="no samples read in 3 epochs in a row"):
        next(iter(loader(d)))


# ---------------------------------------------------------------------------------------- hostile


class _Touch:
    """Unpickling this creates a file: pathlib.Path.touch(path)."""

    def __init__(self, path):
        self.path = pathlib.Path(path)

    def __reduce__(self):
        return (pathlib.Path.touch, (self.path,))


def _add(tar: tarfile.TarFile, name: str, data: bytes = b"", **kw) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    for k, v in kw.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data) if data else None)


@pytest.fixture()
def hostile(tmp_path):
    marker = tmp_path / "PWNED"
    payload = pickle.dumps(_Touch(marker))
    # the payload is live: unpickling it elsewhere does create its file
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Touch(proof)))
    assert proof.exists()
    proof.unlink()
    pth = io.BytesIO()
    torch.save({"weights": _Touch(marker)}, pth)
    npy = io.BytesIO()
    np.save(npy, np.array([_Touch(marker), 1], dtype=object), allow_pickle=True)
    abs_target = tmp_path / "abs_target.txt"
    shard = tmp_path / "shards" / "h-000000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as tar:
        _add(tar, "k0.png", png_bytes(0)), _add(tar, "k0.txt", b"zero"), _add(tar, "k0.pyd", payload)
        _add(tar, "k1.png", png_bytes(1)), _add(tar, "k1.txt", b"one"), _add(tar, "k1.pth", pth.getvalue())
        _add(tar, "k2.png", png_bytes(2)), _add(tar, "k2.txt", b"two"), _add(tar, "k2.pickle", payload)
        _add(tar, "sub/dir/k3.png", png_bytes(3)), _add(tar, "sub/dir/k3.txt", b"three")
        _add(tar, "../escape.txt", b"escaped")
        _add(tar, str(abs_target), b"absolute")
        _add(tar, "k4.png", png_bytes(4)), _add(tar, "k4.txt", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        _add(tar, "k5.png", type=tarfile.LNKTYPE, linkname="k0.png"), _add(tar, "k5.txt", b"five")
        _add(tar, "k6.png", png_bytes(6)), _add(tar, "k6.txt", b"six"), _add(tar, "k6.npy", npy.getvalue())
    write_index(shard.parent, {"h-000000.tar": 8})
    return {"url": str(shard), "marker": marker, "escape": tmp_path / "escape.txt", "abs": abs_target,
            "root": tmp_path}


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_hostile_shard_nothing_unpickled_and_names_never_touch_the_filesystem(hostile, workers, monkeypatch):
    work = hostile["root"] / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    before = sorted(p.relative_to(hostile["root"]) for p in hostile["root"].rglob("*"))
    modalities = {**IMAGE_TEXT, "vec": {"decoder": "npy", "required": False, "options": {"shape": [2]}}}
    d = data_config({"urls": hostile["url"], "workers": workers}, modalities=modalities, labels=None)
    l = loader(d, batch=1, epochs=1)
    with deadline(60):
        batches = list(l)
    keys = flat(b.keys for b in batches)
    assert keys == ["k0", "k1", "k2", "sub/dir/k3", "k6"]  # "/" in a key is only a string
    assert not batches[-1].masks["vec"].any()  # the pickled .npy was refused: placeholder, mask False
    assert l.metrics() == _metrics({"refused_member": 3, "unsafe_member_name": 2, "non_file_member": 2,
                                    "pickled_npy": 1, "missing_text": 1, "missing_image": 1}, dropped=2)
    assert not hostile["marker"].exists()
    assert not hostile["escape"].exists() and not hostile["abs"].exists()
    after = sorted(p.relative_to(hostile["root"]) for p in hostile["root"].rglob("*"))
    assert after == before  # nothing written anywhere under the test folder (cwd included)


def test_refused_formats_cannot_be_asked_for():
    class Pickled(Decoder):
        members = ("pyd",)

    with pytest.raises(ValueError, match="always refused"):
        register_decoder("test_pickled", Pickled)
    from pretrain.config import ConfigError

    for ext in ("pth", "pickle", "PYD", "weights.pt"):
        with pytest.raises(ConfigError, match=r"members\[0\]: .* always refused"):
            data_config(modalities={"text": {"decoder": "text", "members": [ext]}})


# ---------------------------------------------------------------------------------- tar formats


def _tar_bytes(fmt, members: list[tuple[str, bytes]], mode="w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode, format=fmt) as tar:
        for name, data in members:
            _add(tar, name, data)
    return buf.getvalue()


@pytest.mark.parametrize("fmt, mode", [(tarfile.USTAR_FORMAT, "w"), (tarfile.GNU_FORMAT, "w"),
                                       (tarfile.PAX_FORMAT, "w"), (tarfile.PAX_FORMAT, "w:gz"),
                                       (tarfile.GNU_FORMAT, "w:bz2"), (tarfile.USTAR_FORMAT, "w:xz")])
def test_tar_formats_read_like_tarfile_does(tmp_path, fmt, mode):
    from pretrain.data import iter_shard

    long_dir = "d" * 60 + "/" + "e" * 60  # > 100 characters: ustar prefix, GNU long name or pax path
    members = [("a.txt", b"alpha"), ("a.cls", b"1"), (f"{long_dir}/b.txt", b"beta" * 300),
               ("caf\u00e9.txt", "\u00e9t\u00e9".encode()), ("c.txt", b""), ("c.json", b"{}")]
    if fmt == tarfile.USTAR_FORMAT:
        members = [m for m in members if "\u00e9" not in m[0]]
    path = tmp_path / "f.tar"
    path.write_bytes(_tar_bytes(fmt, members, mode))
    events = []
    got = [(s.key, s.members) for s in iter_shard(str(path), None, lambda i: True, lambda *a: events.append(a), 1 << 20)]
    with tarfile.open(path) as tar:  # the reference: tarfile's own reading, grouped by key
        want: list[tuple[str, dict]] = []
        for info in tar:
            key, ext = info.name.split("/")[-1].split(".", 1)
            key = info.name[: len(info.name) - len(ext) - 1]
            if not want or want[-1][0] != key:
                want.append((key, {}))
            want[-1][1][ext] = tar.extractfile(info).read()
    assert got == want and not events


def test_broken_tar_headers_are_corrupt_not_fatal(tmp_path):
    from pretrain.data import iter_shard

    good = _tar_bytes(tarfile.USTAR_FORMAT, [("a.txt", b"x" * 700), ("b.txt", b"y"), ("c.txt", b"z")])
    cases = {
        "checksum": good[:148] + b"0000000\0" + good[156:],  # first header's checksum wrong
        "cut_header": good[: 512 * 5 + 100],  # third header cut short: a is whole, b may not be
        "cut_data": good[: 512 + 300],  # first member's data cut short
        "huge_size": good[:124] + b"77777777777\0" + good[136:1024],  # 8 GiB declared, then EOF
    }
    for name, data in cases.items():
        (tmp_path / f"{name}.tar").write_bytes(data)
        events = []
        keys = [s.key for s in iter_shard(str(tmp_path / f"{name}.tar"), None, lambda i: True,
                                           lambda *a: events.append(a), 1 << 20)]
        assert [e[0] for e in events] == ["corrupt_tar"], (name, events)
        assert keys == ([] if name != "cut_header" else ["a"]), (name, keys)
