import json
import tarfile

import pytest
import webdataset

from data_tools.__main__ import main as cli
from data_tools.build import BuildError, StrictFailure, build_shards
from pretrain.tokenizer import ByteTokenizer
from tests.helpers import data_config, loader, make_caption_dataset


def _manifest_rows(manifest):
    return [json.loads(line) for line in manifest.read_text().splitlines()]


def test_round_trip_every_sample_equal(tmp_path):
    manifest = make_caption_dataset(tmp_path / "raw", n=23)
    # one extra JSON-valued field, to cover the .json member path
    rows = _manifest_rows(manifest)
    with open(manifest, "w") as f:
        for r in rows:
            r["meta"] = {"source": "test", "n": len(r["key"])}
            f.write(json.dumps(r) + "\n")
    out = tmp_path / "shards"
    rc = cli(["build", "--input", str(manifest), "--output", str(out), "--shard-size", "5",
              "--map", "image=png", "--map", "caption=txt", "--map", "label=cls"])
    assert rc == 0
    index = json.loads((out / "index.json").read_text())
    assert index["total_samples"] == 23
    assert [s["samples"] for s in index["shards"]] == [5, 5, 5, 5, 3]
    assert json.loads((out / "sizes.json").read_text()) == {s["name"]: s["samples"] for s in index["shards"]}

    expected = {
        r["key"]: {
            "png": (manifest.parent / r["image"]).read_bytes(),
            "txt": r["caption"].encode(),
            "cls": str(r["label"]).encode(),
            "meta.json": json.dumps(r["meta"]).encode(),
        }
        for r in rows
    }
    # read back with plain webdataset (no decoding: raw bytes)
    urls = [str(out / s["name"]) for s in index["shards"]]
    got = {}
    for sample in webdataset.WebDataset(urls, shardshuffle=False):
        key = sample.pop("__key__")
        got[key] = {k: v for k, v in sample.items() if not k.startswith("__")}
    assert got == expected
    # members of a sample are adjacent, mtime 0, no owner
    with tarfile.open(urls[0]) as tar:
        names = tar.getnames()
        for m in tar.getmembers():
            assert m.mtime == 0 and m.uname == "" and m.uid == 0
    keys_in_order = [n.split(".", 1)[0] for n in names]
    assert keys_in_order == sorted(keys_in_order)


def test_build_is_deterministic(tmp_path):
    manifest = make_caption_dataset(tmp_path / "raw", n=12)
    a = build_shards(manifest, tmp_path / "a", shard_size=4, mapping={"caption": "txt"})
    b = build_shards(manifest, tmp_path / "b", shard_size=4, mapping={"caption": "txt"})
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]


def test_project_pipeline_reads_shards(tmp_path):
    manifest = make_caption_dataset(tmp_path / "raw", n=10)
    build_shards(manifest, tmp_path / "s", shard_size=3,
                 mapping={"image": "png", "caption": "txt", "label": "cls"})
    # the default modalities (image, text) and labels, as a recipe reads them
    d = data_config(val={"urls": str(tmp_path / "s" / "shard-{000000..000003}.tar")},
                    modalities={"image": {"decoder": "image"}, "text": {"decoder": "text"}}, image_size=16)
    batches = list(loader(d, batch=4, train=False))
    rows = {r["key"]: r for r in _manifest_rows(manifest)}
    tok = ByteTokenizer(24)
    keys = [k for b in batches for k in b.keys]
    assert sorted(keys) == sorted(rows)
    for b in batches:
        assert b.modalities["image"].shape[1:] == (3, 16, 16) and b.masks["image"].all()
        for k, label, text in zip(b.keys, b.labels.tolist(), b.modalities["text"]):
            assert label == rows[k]["label"] and tok.decode(text) == rows[k]["caption"]


@pytest.mark.parametrize(
    "row, kind, words",
    [
        ({"key": "a.b", "caption": "x"}, "bad_key", r"m.jsonl: line 2, field 'key': key 'a.b' contains '.'"),
        ({"key": "a/b", "caption": "x"}, "bad_key", r"m.jsonl: line 2, field 'key': key 'a/b' contains '/'"),
        ({"key": "k"}, "missing_value", r"line 2, key 'k', field 'caption': no value for 'caption'"),
    ],
)
def test_bad_row_skipped_and_named(tmp_path, row, kind, words):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"key": "good", "caption": "fine"}) + "\n" + json.dumps(row) + "\n")
    index = build_shards(manifest, tmp_path / "out")
    assert index["total_samples"] == 1 and index["failures"] == {"total": 1, "by_kind": {kind: 1}}
    (failure,) = [json.loads(l) for l in (tmp_path / "out" / "failures.jsonl").read_text().splitlines()]
    assert failure["line"] == 2 and failure["kind"] == kind
    with pytest.raises(StrictFailure, match=words.replace("m.jsonl: ", "")):
        build_shards(manifest, tmp_path / "strict", strict=True)
    assert not (tmp_path / "strict" / "index.json").exists()


def test_duplicate_key_and_bad_json_named(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"key": "a", "caption": "x"}\n{"key": "a", "caption": "y"}\n')
    with pytest.raises(StrictFailure, match=r"line 2, key 'a': duplicate key 'a' \(first at line 1\)"):
        build_shards(manifest, tmp_path / "out", strict=True)
    index = build_shards(manifest, tmp_path / "out")
    assert index["total_samples"] == 1 and index["failures"]["by_kind"] == {"duplicate_key": 1}
    manifest.write_text('{"key": "a", "caption": "x"}\n{not json\n')
    with pytest.raises(StrictFailure, match=r"line 2: not valid JSON"):
        build_shards(manifest, tmp_path / "out2", strict=True)
    assert not (tmp_path / "out2" / "index.json").exists()
    # a first line that is not JSON at all: not a JSONL manifest, stop at once
    manifest.write_text("key,caption\na,x\n")
    with pytest.raises(BuildError, match=r"m.jsonl:1: not valid JSON.*is this a JSONL manifest"):
        build_shards(manifest, tmp_path / "out3")


def test_cli_bad_flag_message(tmp_path, capsys):
    manifest = make_caption_dataset(tmp_path / "raw", n=2)
    assert cli(["build", "--input", str(manifest), "--output", str(tmp_path / "o"), "--map", "caption"]) == 2
    assert "--map: expected FIELD=MEMBER" in capsys.readouterr().err
    assert cli(["build", "--input", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "o")]) == 2
    assert "--input: no such file" in capsys.readouterr().err


def test_tar_bytes_equal_tarfile_writer(tmp_path):
    """The builder's tars are byte for byte what ``tarfile`` writes for the same members (sorted,
    mode 0444, mtime 0, no owner, USTAR), so shards of the demo keep their bytes from release to release."""
    import io

    manifest = make_caption_dataset(tmp_path / "raw", n=7)
    index = build_shards(manifest, tmp_path / "s", shard_size=4,
                         mapping={"image": "png", "caption": "txt", "label": "cls"})
    rows = _manifest_rows(manifest)
    for shard, chunk in zip(index["shards"], (rows[:4], rows[4:])):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for r in chunk:
                members = {"png": (manifest.parent / r["image"]).read_bytes(),
                           "txt": r["caption"].encode(), "cls": str(r["label"]).encode()}
                for name in sorted(members):
                    info = tarfile.TarInfo(f"{r['key']}.{name}")
                    info.size, info.mtime, info.mode = len(members[name]), 0, 0o444
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    tar.addfile(info, io.BytesIO(members[name]))
        assert (tmp_path / "s" / shard["name"]).read_bytes() == buf.getvalue()
