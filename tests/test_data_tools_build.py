"""``python -m data_tools build``: every input kind round-trips, splits, limits, processing, bad inputs, flags."""
from __future__ import annotations

import csv
import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import webdataset
from PIL import Image

from data_tools.__main__ import main as cli
from data_tools.build import BuildError, StrictFailure, build_shards
from data_tools.members import Processing
from tests.helpers import MAP, all_files, caption_rows, jpg_bytes, png_bytes, wav_bytes, write, write_jsonl

# ------------------------------------------------------------------------------------- helpers


def read_samples(out: Path, index: dict | None = None) -> dict[str, dict[str, bytes]]:
    """Every sample of a build, read back with plain webdataset (raw bytes, no decoders)."""
    index = index or json.loads((out / "index.json").read_text())
    got: dict[str, dict[str, bytes]] = {}
    urls = [str(out / s["name"]) for s in index["shards"]]
    for sample in webdataset.WebDataset(urls, shardshuffle=False):
        key = sample.pop("__key__")
        assert key not in got, f"duplicate key {key}"
        got[key] = {k: v for k, v in sample.items() if not k.startswith("__")}
    return got


def failures(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "failures.jsonl").read_text().splitlines()]


# -------------------------------------------------------------------------------- input kinds


def test_csv_round_trip(tmp_path):
    raw = tmp_path / "raw"
    rows = caption_rows(raw, 9)
    rows[4]["caption"] = 'a "quoted", comma\nand a newline'
    manifest = raw / "m.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, ["key", "image", "caption", "label"])
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "out"
    assert cli(["build", "--input", str(manifest), "--output", str(out), "--shard-size", "4",
                "--map", "image=png", "--map", "caption=txt", "--map", "label=cls"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert [s["samples"] for s in index["shards"]] == [4, 4, 1]
    assert index["options"]["format"] == "csv" and index["required_members"] == ["cls", "png", "txt"]
    expected = {r["key"]: {"png": (raw / r["image"]).read_bytes(), "txt": r["caption"].encode(),
                           "cls": str(r["label"]).encode()} for r in rows}
    assert read_samples(out) == expected


def test_parquet_round_trip_value_types(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    raw = tmp_path / "raw"
    rows = caption_rows(raw, 6)
    for i, r in enumerate(rows):
        r["tags"] = [f"t{i}", "x"]
        r["meta"] = {"n": i, "ok": True}
        r["score"] = i / 4
        r["blob"] = bytes([i, 0, 255])
        r["hf"] = {"bytes": jpg_bytes(i), "path": f"orig{i}.jpg"}  # a Hugging Face image struct
    pq.write_table(pa.Table.from_pylist(rows), raw / "m.parquet")
    out = tmp_path / "out"
    index = build_shards(raw / "m.parquet", out, shard_size=4, mapping=MAP)
    assert index["total_samples"] == 6 and index["failures"]["total"] == 0
    got = read_samples(out)
    for r in rows:
        assert got[r["key"]] == {
            "png": (raw / r["image"]).read_bytes(), "txt": r["caption"].encode(), "cls": str(r["label"]).encode(),
            "tags.json": json.dumps(r["tags"]).encode(), "meta.json": json.dumps(r["meta"]).encode(),
            "score.json": json.dumps(r["score"]).encode(), "blob.bin": r["blob"], "jpg": r["hf"]["bytes"],
        }


def test_folder_round_trip_stem_groups(tmp_path):
    root = tmp_path / "folder"
    expected = {}
    for i in range(5):
        stem = f"{i:04d}"
        files = {"jpg": jpg_bytes(i), "txt": f"caption {i}".encode(), "wav": wav_bytes(freq=200 + 50 * i),
                 "meta.json": json.dumps({"i": i}).encode()}
        for ext, data in files.items():
            write(root / f"{stem}.{ext}", data)
        expected[stem] = files
    write(root / "sub" / "0000.jpg", jpg_bytes(99))  # nested folder: its own sample, key from its path
    write(root / "sub" / "0000.txt", "nested")
    write(root / "sub" / "0000.wav", wav_bytes())
    write(root / "sub" / "0000.meta.json", "{}")
    expected["sub_0000"] = {"jpg": jpg_bytes(99), "txt": b"nested", "wav": wav_bytes(), "meta.json": b"{}"}
    write(root / ".hidden.txt", "ignored")
    out = tmp_path / "out"
    index = build_shards(root, out, shard_size=4)
    assert index["options"]["format"] == "folder" and "classes" not in index
    assert read_samples(out) == expected
    # --map renames a folder member by its extension
    index = build_shards(root, tmp_path / "out2", shard_size=10, mapping={"meta.json": "json", "wav": "audio.wav"})
    assert set(read_samples(tmp_path / "out2")["0001"]) == {"jpg", "txt", "json", "audio.wav"}


def test_image_folder_classes_give_cls(tmp_path):
    root = tmp_path / "imagefolder"
    for c, cls_name in enumerate(["cat", "dog", "eel"]):
        for i in range(3):
            write(root / cls_name / f"{i}.png", png_bytes(10 * c + i))
    out = tmp_path / "out"
    index = build_shards(root, out, shard_size=4)
    assert index["classes"] == ["cat", "dog", "eel"]
    got = read_samples(out)
    assert len(got) == 9
    for c, cls_name in enumerate(["cat", "dog", "eel"]):
        for i in range(3):
            assert got[f"{cls_name}_{i}"] == {"png": png_bytes(10 * c + i), "cls": str(c).encode()}
    build_shards(root, tmp_path / "nolabels", shard_size=4, class_folders="no")
    assert read_samples(tmp_path / "nolabels")["dog_1"] == {"png": png_bytes(11)}


def test_keys_generated_and_sanitized(tmp_path):
    m = write_jsonl(tmp_path / "m.jsonl", [{"caption": "a"}, {"caption": "b"}])
    assert sorted(read_samples_of(build_shards(m, tmp_path / "o1"), tmp_path / "o1")) == ["000000000", "000000001"]
    m = write_jsonl(tmp_path / "m2.jsonl", [{"id": "img 1.jpg", "caption": "a"}, {"id": 7, "caption": "b"}])
    index = build_shards(m, tmp_path / "o2", key_column="id", sanitize_keys=True)
    assert sorted(read_samples_of(index, tmp_path / "o2")) == ["7", "img_1_jpg"]


def read_samples_of(index, out):
    return read_samples(out, index)


# ------------------------------------------------------------------------------------- splits


def test_split_by_column(tmp_path):
    raw = tmp_path / "raw"
    rows = caption_rows(raw, 10)
    for i, r in enumerate(rows):
        r["split"] = "val" if i % 5 == 0 else "train"
    out = tmp_path / "out"
    index = build_shards(write_jsonl(raw / "m.jsonl", rows), out, shard_size=3, mapping=MAP, split_column="split")
    assert index["splits"]["train"] == {"shards": 3, "samples": 8, "bytes": index["splits"]["train"]["bytes"],
                                        "pattern": "train/shard-{000000..000002}.tar"}
    assert index["splits"]["val"]["samples"] == 2 and index["splits"]["val"]["pattern"] == "val/shard-000000.tar"
    assert json.loads((out / "train" / "sizes.json").read_text()) == {
        "shard-000000.tar": 3, "shard-000001.tar": 3, "shard-000002.tar": 2}
    got = read_samples(out)
    assert sorted(got) == sorted(r["key"] for r in rows)
    assert all(set(v) == {"png", "txt", "cls"} for v in got.values())  # the split column is not a member
    val = {s["name"] for s in index["shards"] if s["split"] == "val"}
    assert val == {"val/shard-000000.tar"}


def test_split_by_ratio_exact_seeded(tmp_path):
    rows = [{"key": f"k{i:03d}", "caption": f"c{i}"} for i in range(101)]
    m = write_jsonl(tmp_path / "m.jsonl", rows)

    def split_keys(out, seed):
        index = build_shards(m, out, shard_size=16, split_ratios={"train": 0.8, "val": 0.1, "test": 0.1}, seed=seed)
        by = {}
        for s in index["shards"]:
            with tarfile.open(out / s["name"]) as tar:
                by.setdefault(s["split"], set()).update(n.split(".")[0] for n in tar.getnames())
        return index, by

    index, a = split_keys(tmp_path / "a", 0)
    assert {k: v["samples"] for k, v in index["splits"].items()} == {"train": 81, "val": 10, "test": 10}
    assert set().union(*a.values()) == {r["key"] for r in rows} and sum(map(len, a.values())) == 101
    _, b = split_keys(tmp_path / "b", 0)
    _, c = split_keys(tmp_path / "c", 1)
    assert a == b and a["val"] != c["val"]


# ------------------------------------------------------------------------------------- limits


def test_shard_size_and_max_shard_bytes(tmp_path):
    rows = [{"key": f"k{i:02d}", "caption": "x" * (300 + 40 * i)} for i in range(30)]
    m = write_jsonl(tmp_path / "m.jsonl", rows)
    out = tmp_path / "out"
    assert cli(["build", "--input", str(m), "--output", str(out), "--shard-size", "8", "--max-shard-bytes", "12K"]) == 0
    index = json.loads((out / "index.json").read_text())
    sizes = [s["bytes"] for s in index["shards"]]
    assert all(b <= 12 * 1024 for b in sizes) and all(s["samples"] <= 8 for s in index["shards"])
    assert len(index["shards"]) > math.ceil(30 / 8)  # the byte limit did cut shards
    assert [p.stat().st_size for p in sorted(out.glob("shard-*.tar"))] == sizes
    names = []
    for s in index["shards"]:
        with tarfile.open(out / s["name"]) as tar:
            names += [n.split(".")[0] for n in tar.getnames()]
    assert names == [r["key"] for r in rows]  # input order kept across shards


# ---------------------------------------------------------------------------------- processing


def test_image_reencode_and_resize(tmp_path):
    raw = tmp_path / "raw"
    write(raw / "wide.png", png_bytes(1, size=(40, 20)))
    write(raw / "small.jpg", jpg_bytes(2, size=(10, 6)))
    m = write_jsonl(raw / "m.jsonl", [{"key": "a", "image": "wide.png"}, {"key": "b", "image": "small.jpg"}])
    out = tmp_path / "out"
    assert cli(["build", "--input", str(m), "--output", str(out), "--map", "image=png",
                "--image-format", "jpg", "--image-max-side", "16"]) == 0
    got = read_samples(out)
    assert set(got["a"]) == {"jpg"} and set(got["b"]) == {"jpg"}  # the member extension follows the format
    with Image.open(io.BytesIO(got["a"]["jpg"])) as img:
        assert img.format == "JPEG" and img.size == (16, 8)
    assert got["b"]["jpg"] == (raw / "small.jpg").read_bytes()  # already JPEG and small: bytes kept
    # no re-encode flags: bytes pass through untouched
    build_shards(m, tmp_path / "plain", mapping={"image": "png"})
    assert read_samples(tmp_path / "plain")["a"]["png"] == (raw / "wide.png").read_bytes()


def test_audio_resample_to_flac(tmp_path):
    raw = tmp_path / "raw"
    write(raw / "a.wav", wav_bytes(rate=8000, seconds=0.5))
    m = write_jsonl(raw / "m.jsonl", [{"key": "a", "audio": "a.wav", "text": "hello"}])
    out = tmp_path / "out"
    build_shards(m, out, mapping={"audio": "wav", "text": "txt"},
                 processing=Processing(audio_format="flac", audio_rate=16000))
    got = read_samples(out)["a"]
    assert set(got) == {"flac", "txt"}
    data, rate = sf.read(io.BytesIO(got["flac"]))
    assert rate == 16000 and abs(len(data) - 8000) <= 2
    spectrum = np.abs(np.fft.rfft(data))
    assert abs(np.argmax(spectrum) * rate / len(data) - 440) < 5  # the tone survived the resampling


def test_text_normalization(tmp_path):
    m = write_jsonl(tmp_path / "m.jsonl", [{"key": "a", "caption": "  Cafe\u0301  with\n\ttabs  "}])
    build_shards(m, tmp_path / "o", mapping={"caption": "txt"}, processing=Processing(normalize_text=True))
    assert read_samples(tmp_path / "o")["a"]["txt"] == "Caf\u00e9 with tabs".encode()
    build_shards(m, tmp_path / "raw", mapping={"caption": "txt"})
    assert read_samples(tmp_path / "raw")["a"]["txt"] == "  Cafe\u0301  with\n\ttabs  ".encode()


# ---------------------------------------------------------------------------------- bad inputs


def _bad_inputs(raw: Path) -> tuple[Path, dict[str, str]]:
    """A manifest with two good rows and one row per bad-input kind; returns it and key -> kind."""
    write(raw / "ok.png", png_bytes(0))
    good_png = png_bytes(5, size=(32, 32))
    write(raw / "trunc.png", good_png[: len(good_png) // 2])
    good_jpg = jpg_bytes(6, size=(64, 48))
    write(raw / "trunc.jpg", good_jpg[: len(good_jpg) - 100])
    write(raw / "garbage.png", b"this is not an image at all" * 10)
    good_wav = wav_bytes(seconds=0.5)
    write(raw / "trunc.wav", good_wav[: len(good_wav) // 2])
    write(raw / "latin1.txt", "caf\xe9".encode("latin-1"))
    write(raw / "empty.txt", b"")
    rows = [
        ({"key": "good1", "image": "ok.png", "caption": "fine"}, None),
        ({"key": "missing", "image": "nope.png", "caption": "x"}, "missing_file"),
        ({"key": "truncpng", "image": "trunc.png", "caption": "x"}, "bad_image"),
        ({"key": "truncjpg", "image": "trunc.jpg", "caption": "x"}, "bad_image"),
        ({"key": "garbage", "image": "garbage.png", "caption": "x"}, "bad_image"),
        ({"key": "truncwav", "image": "ok.png", "caption": "x", "audio": "trunc.wav"}, "bad_audio"),
        ({"key": "emptytext", "image": "ok.png", "caption": "   "}, "empty_text"),
        ({"key": "emptyfile", "image": "ok.png", "caption": "empty.txt"}, "empty_text"),
        ({"key": "latin1", "image": "ok.png", "caption": "latin1.txt"}, "non_utf8_text"),
        ({"key": "surrogate", "image": "ok.png", "caption": "\ud800"}, "non_utf8_text"),
        ({"key": "nan", "image": "ok.png", "caption": "x", "score": float("nan")}, "unsupported_value"),
        ({"key": "good1", "image": "ok.png", "caption": "again"}, "duplicate_key"),
        ({"key": "dot.ted", "image": "ok.png", "caption": "x"}, "bad_key"),
        ({"key": "nullcap", "image": "ok.png", "caption": None}, "missing_value"),
        ({"key": "badlabel", "image": "ok.png", "caption": "x", "label": "cat"}, "bad_label"),
        ({"key": "good2", "image": "ok.png", "caption": "also fine"}, None),
    ]
    manifest = raw / "m.jsonl"
    with open(manifest, "w") as f:
        for row, _ in rows:
            f.write(json.dumps(row) + "\n")  # json.dumps writes NaN and lone surrogates as JSON allows
    return manifest, {r["key"]: kind for r, kind in rows if kind}


BAD_OPTS = dict(mapping={"image": "png", "caption": "txt", "label": "cls", "audio": "wav"},
                optional=("audio", "score", "label"))


def test_each_bad_input_kind_is_skipped_and_reported(tmp_path, capsys):
    manifest, kinds = _bad_inputs(tmp_path / "raw")
    out = tmp_path / "out"
    index = build_shards(manifest, out, shard_size=4, **BAD_OPTS)
    assert sorted(read_samples(out)) == ["good1", "good2"]
    reported = failures(out)
    assert len(reported) == len(kinds) == index["failures"]["total"]
    by_key = {f.get("key", f["line"]): f for f in reported}
    for key, kind in kinds.items():
        f = by_key.get(key) or next(x for x in reported if kind == x["kind"] and "key" not in x)
        assert f["kind"] == kind, (key, f)
        assert f["reason"] and f["line"] >= 2
    dup = next(f for f in reported if f["kind"] == "duplicate_key")
    assert dup["line"] == 12 and "first at line 1" in dup["reason"]
    expected_counts: dict[str, int] = {}
    for kind in kinds.values():
        expected_counts[kind] = expected_counts.get(kind, 0) + 1
    assert index["failures"]["by_kind"] == dict(sorted(expected_counts.items()))
    # the CLI's summary counts them too
    args = ["build", "--input", str(manifest), "--output", str(tmp_path / "cli"), "--map", "image=png",
            "--map", "caption=txt", "--map", "label=cls", "--map", "audio=wav",
            "--optional", "audio", "--optional", "score", "--optional", "label"]
    assert cli(args) == 0
    text = capsys.readouterr().out
    assert f"skipped {len(kinds)} of {len(kinds) + 2} input rows" in text and "bad_image 3" in text
    # --strict: the first bad input stops the build, named
    assert cli(args + ["--strict"]) == 1
    err = capsys.readouterr().err
    assert "error: --strict: line 2, key 'missing', field 'image': missing file: nope.png" in err


@pytest.mark.parametrize("key", ["truncpng", "truncjpg", "garbage", "truncwav", "emptytext", "latin1",
                                 "nan", "badlabel", "nullcap", "dot.ted"])
def test_strict_stops_at_each_kind(tmp_path, key):
    manifest, kinds = _bad_inputs(tmp_path / "raw")
    all_lines = manifest.read_text().splitlines()
    lines = [all_lines[0], next(l for l in all_lines if json.loads(l)["key"] == key)]
    manifest.write_text("\n".join(lines) + "\n")
    fields = set().union(*(json.loads(l) for l in lines))
    # --map/--optional must name fields of this input (a typo stops the build)
    opts = dict(mapping={f: m for f, m in BAD_OPTS["mapping"].items() if f in fields},
                optional=tuple(f for f in BAD_OPTS["optional"] if f in fields))
    with pytest.raises(StrictFailure, match=rf"^--strict: line 2, .*{'' if key == 'dot.ted' else key}"):
        build_shards(manifest, tmp_path / "out", strict=True, **opts)
    assert not (tmp_path / "out" / "index.json").exists()
    index = build_shards(manifest, tmp_path / "out", **opts)
    assert index["failures"]["by_kind"] == {kinds[key]: 1}


def test_csv_non_utf8_cell_and_parquet_unsupported_type(tmp_path):
    raw = tmp_path / "raw"
    write(raw / "m.csv", b"key,caption\na,fine\nb,caf\xe9\n")
    index = build_shards(raw / "m.csv", tmp_path / "o1", mapping={"caption": "txt"})
    assert index["total_samples"] == 1
    assert [(f["key"], f["kind"], f["line"]) for f in failures(tmp_path / "o1")] == [("b", "non_utf8_text", 3)]

    pa = pytest.importorskip("pyarrow")
    import datetime

    import pyarrow.parquet as pq

    pq.write_table(pa.table({"key": ["a", "b"], "caption": ["x", "y"],
                             "when": [None, datetime.datetime(2026, 1, 1)]}), raw / "m.parquet")
    index = build_shards(raw / "m.parquet", tmp_path / "o2", optional=("when",))
    assert index["total_samples"] == 1
    (f,) = failures(tmp_path / "o2")
    assert f["key"] == "b" and f["kind"] == "unsupported_value" and "datetime" in f["reason"] and f["row"] == 1


def test_all_rows_bad_is_an_error(tmp_path):
    m = write_jsonl(tmp_path / "m.jsonl", [{"key": "a", "image": "missing.jpg"}])
    with pytest.raises(BuildError, match=r"no sample passed the checks: 1 of 1 rows rejected \(missing_file 1\)"):
        build_shards(m, tmp_path / "out")
    assert not (tmp_path / "out" / "index.json").exists() and len(failures(tmp_path / "out")) == 1


# --------------------------------------------------------------------------- flags and manifests


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--shard-size", "0"], "--shard-size: must be a positive number"),
        (["--workers", "0"], "--workers: must be at least 1"),
        (["--max-shard-bytes", "4K"], "--max-shard-bytes: must be at least 10240 (one tar record), got 4096"),
        (["--prefix", "a/b"], "--prefix:"),
        (["--map", "caption"], "--map: expected FIELD=MEMBER"),
        (["--map", "captoin=txt"], "--map captoin=txt: no field 'captoin' in the input (fields: key, image, caption, label)"),
        (["--ignore", "nope"], "--ignore nope: no field 'nope'"),
        (["--split-column", "nope"], "--split-column: no field 'nope'"),
        (["--split", "train=0.7", "--split", "val=0.2"], "--split: the fractions must add up to 1, they add up to 0.9"),
        (["--split", "train"], "--split: expected NAME=FRACTION"),
        (["--split", "a=0.5", "--split", "b=0.5", "--split-column", "label"], "--split-column and --split are exclusive"),
        (["--image-max-side", "-3"], "--image-max-side: must be a positive"),
        (["--audio-rate", "0"], "--audio-rate: must be a positive"),
        (["--image-quality", "101"], "--image-quality: must be 1..100"),
        (["--no-decode-check", "--full-decode-check"], "are exclusive"),
    ],
)
def test_bad_flags_stop_at_once(tmp_path, capsys, extra, words):
    m = write_jsonl(tmp_path / "raw" / "m.jsonl", caption_rows(tmp_path / "raw", 2))
    out = tmp_path / "out"
    assert cli(["build", "--input", str(m), "--output", str(out)] + extra) == 2
    assert words in capsys.readouterr().err
    assert not out.exists()  # nothing written


def test_argparse_rejects_unknown_choices(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli(["build", "--input", "x.jsonl", "--output", str(tmp_path), "--image-format", "gif"])
    assert exc.value.code == 2 and "--image-format: invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["build", "--input", "x.jsonl", "--output", str(tmp_path), "--max-shard-bytes", "lots"])
    assert "expected a size like" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, content, words",
    [
        ("m.jsonl", b"\x89PNG\r\n binary", "is this a JSONL manifest"),
        ("m.jsonl", b"[1, 2]\n", "each line must be a JSON object"),
        ("m.csv", b"", "a CSV manifest needs a header line"),
        ("m.csv", b"a,a\n1,2\n", "duplicate column names ['a']"),
        ("m.parquet", b"not parquet", "cannot read"),
        ("m.txt", b"{}", "cannot tell the manifest type of 'm.txt'"),
    ],
)
def test_unreadable_manifest_stops_at_once(tmp_path, capsys, name, content, words):
    path = write(tmp_path / name, content)
    assert cli(["build", "--input", str(path), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --input:") and words in err
    assert cli(["build", "--input", str(tmp_path / "absent.jsonl"), "--output", str(tmp_path / "out")]) == 2
    assert "--input: no such file or folder" in capsys.readouterr().err


def test_summary_table_and_quiet_without_terminal(tmp_path, capsys):
    m = write_jsonl(tmp_path / "raw" / "m.jsonl", caption_rows(tmp_path / "raw", 5))
    assert cli(["build", "--input", str(m), "--output", str(tmp_path / "o"), "--shard-size", "2",
                "--split", "train=0.6", "--split", "val=0.4"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].split() == ["split", "shards", "samples", "bytes", "shards", "pattern"]
    assert lines[2].split()[:3] == ["train", "2", "3"] and lines[3].split()[:3] == ["val", "1", "2"]
    assert lines[4].split()[:3] == ["total", "3", "5"]
    assert "no input rejected (5 rows)" in captured.out
    assert captured.err == ""  # no progress bar: pytest's stderr is not a terminal


def test_rebuild_replaces_and_removes_stale_shards(tmp_path):
    m = write_jsonl(tmp_path / "raw" / "m.jsonl", caption_rows(tmp_path / "raw", 12))
    out = tmp_path / "out"
    build_shards(m, out, shard_size=2, mapping=MAP)
    assert len(list(out.glob("shard-*.tar"))) == 6
    index = build_shards(m, out, shard_size=5, mapping=MAP)
    assert sorted(p.name for p in out.glob("shard-*.tar")) == [s["name"] for s in index["shards"]]
    assert len(index["shards"]) == 3 and not (out / ".build").exists()
    fresh = build_shards(m, tmp_path / "fresh", shard_size=5, mapping=MAP)
    assert all_files(out) == {k.replace(str(tmp_path / "fresh"), str(out)): v for k, v in all_files(tmp_path / "fresh").items()}
    assert fresh["shards"] == index["shards"]


def test_key_too_long_for_a_tar_header(tmp_path):
    m = write_jsonl(tmp_path / "m.jsonl", [{"key": "k" * 120, "caption": "x"}, {"key": "ok", "caption": "y"}])
    index = build_shards(m, tmp_path / "o", mapping={"caption": "txt"})
    assert index["total_samples"] == 1
    (f,) = failures(tmp_path / "o")
    assert f["kind"] == "tar_limit" and "longer than 100 bytes" in f["reason"]


def test_split_named_all_gets_its_own_folder(tmp_path):
    m = write_jsonl(tmp_path / "m.jsonl", [{"key": "a", "caption": "x", "part": "all"},
                                           {"key": "b", "caption": "y", "part": "rest"}])
    index = build_shards(m, tmp_path / "o", split_column="part")
    assert [s["name"] for s in index["shards"]] == ["all/shard-000000.tar", "rest/shard-000000.tar"]
    assert not list((tmp_path / "o").glob("*.tar"))
