"""``verify`` and ``stats``, and shards read by this project's pipeline (ours and img2dataset's layout)."""
from __future__ import annotations

import io
import json
import random
import re
import tarfile
import time

import pytest
import torch

from data_tools.__main__ import main as cli
from data_tools.build import build_shards
from pretrain.config import config_from_dict
from pretrain.data import build_modalities, expand_urls, make_loader
from tests.helpers import MAP, caption_rows, jpg_bytes, wav_bytes, write, write_jsonl


@pytest.fixture
def built(tmp_path):
    rows = caption_rows(tmp_path / "raw", 10)
    out = tmp_path / "shards"
    index = build_shards(write_jsonl(tmp_path / "raw" / "m.jsonl", rows), out, shard_size=4, mapping=MAP)
    return out, index, rows


def _verify(capsys, out, *extra):
    rc = cli(["verify", str(out), *extra])
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


def test_verify_clean_build(built, capsys):
    out, index, _ = built
    rc, text = _verify(capsys, out)
    assert rc == 0 and text.startswith(f"OK: {out}: 3 shards, 10 samples") and "cls, png, txt" in text
    rc, text = _verify(capsys, out, "--decode")
    assert rc == 0


def test_verify_catches_flipped_byte(built, capsys):
    out, index, _ = built
    shard = out / index["shards"][1]["name"]
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF  # inside the first sample's PNG data
    shard.write_bytes(bytes(data))
    rc, text = _verify(capsys, out)
    assert rc == 1 and "FAILED" in text
    assert "shard-000001.tar: sha256" in text and "does not match index.json" in text


def test_verify_catches_truncated_and_missing_shards(built, capsys):
    out, index, _ = built
    first = out / index["shards"][0]["name"]
    first.write_bytes(first.read_bytes()[:3000])
    (out / index["shards"][2]["name"]).unlink()
    rc, text = _verify(capsys, out)
    assert rc == 1
    assert "shard-000000.tar: 3000 bytes, index.json says" in text
    assert "shard-000000.tar: does not read as a tar archive" in text or "is truncated" in text
    assert "shard-000002.tar: missing" in text


def _rewrite_first_shard(out, index, edit) -> None:
    """Rewrites shard 0 with ``edit(name, data)`` applied to each member (None drops it) and patches
    its size and checksum into index.json, so that only what ``edit`` did is wrong."""
    import hashlib

    shard = out / index["shards"][0]["name"]
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in members:
            data = edit(m.name, data)
            if data is not None:
                tar.addfile(m, io.BytesIO(data))
    shard.write_bytes(buf.getvalue())
    index["shards"][0]["sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
    index["shards"][0]["bytes"] = len(buf.getvalue())
    (out / "index.json").write_text(json.dumps(index))


def test_verify_catches_lost_member_and_stray_shard(built, capsys):
    """A shard rewritten without one member, its checksum patched into the index: the member check catches it."""
    out, index, _ = built
    _rewrite_first_shard(out, index, lambda name, data: None if name == "s0001.txt" else data)
    (out / "shard-000009.tar").write_bytes(b"")
    rc, text = _verify(capsys, out)
    assert rc == 1
    assert "sample 's0001' lacks required member(s) txt" in text
    assert "shard-000009.tar: a shard that index.json does not list" in text
    assert "sha256" not in text


def test_verify_decode_catches_an_image_that_does_not_decode(built, capsys):
    """A PNG member replaced by other bytes of the same length, the index patched to match: the tar,
    the checksums and the members are all in order, so only --decode can tell, and it does."""
    out, index, _ = built

    def garble(name, data):  # a PNG signature, then zeros
        return b"\x89PNG\r\n\x1a\n" + bytes(len(data) - 8) if name == "s0001.png" else data

    _rewrite_first_shard(out, index, garble)
    rc, text = _verify(capsys, out)
    assert rc == 0, text  # without decoding nothing is wrong
    rc, text = _verify(capsys, out, "--decode")
    assert rc == 1 and "s0001.png" in text, text


def test_verify_without_index(tmp_path, capsys):
    rc, text = _verify(capsys, tmp_path)
    assert rc == 1 and "index.json: missing" in text


def test_verify_and_stats_of_one_split_find_the_index_one_folder_up(tmp_path, capsys):
    """After a --split build, index.json lies in shards/, the shards in shards/train and shards/val:
    verify and stats of one split's folder check that split against it, and only that split."""
    rows = caption_rows(tmp_path / "raw", 12)
    out = tmp_path / "shards"
    index = build_shards(write_jsonl(tmp_path / "raw" / "m.jsonl", rows), out, shard_size=3, mapping=MAP,
                         split_ratios={"train": 0.75, "val": 0.25})
    assert not (out / "train" / "index.json").exists()
    rc, text = _verify(capsys, out / "train")
    assert rc == 0 and text.startswith(f"OK: {out / 'train'}: 3 shards, 9 samples")
    assert "../index.json (split train)" in text
    assert cli(["stats", str(out / "val"), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["samples"] == 3 and st["source"] == "../index.json"
    assert [s["name"] for s in st["per_shard"]] == ["val/shard-000000.tar"]
    # a broken val shard fails val, not train; a stray shard in train is caught there
    val = out / "val" / "shard-000000.tar"
    val.write_bytes(val.read_bytes()[:2000])
    assert _verify(capsys, out / "train")[0] == 0
    rc, text = _verify(capsys, out / "val")
    assert rc == 1 and "val/shard-000000.tar: 2000 bytes, index.json says" in text
    (out / "train" / "shard-000007.tar").write_bytes(b"")
    rc, text = _verify(capsys, out / "train")
    assert rc == 1 and "train/shard-000007.tar: a shard that index.json does not list" in text
    assert index["splits"]["train"]["samples"] == 9
    # a folder the index one up does not list is not a shard folder
    (out / "other").mkdir()
    rc, text = _verify(capsys, out / "other")
    assert rc == 1 and "index.json: missing" in text and "lists no shard in other/" in text


def test_verify_rejects_a_broken_or_foreign_index(built, capsys):
    out, index, _ = built
    del index["shards"][1]["sha256"]
    (out / "index.json").write_text(json.dumps(index))
    rc, text = _verify(capsys, out)
    assert rc == 1 and ("index.json: not a shard index (shards[1] needs a string 'name', an integer 'samples', "
                        "an integer 'bytes' and a string 'sha256')") in text
    (out / "index.json").write_text(json.dumps({"shards": []}))
    rc, text = _verify(capsys, out)
    assert rc == 1 and "not a shard index (format None, expected 'multimodal-pretrain-shards/1')" in text


def test_stats_from_index_and_json(built, capsys):
    out, index, _ = built
    assert cli(["stats", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"{out}: 10 samples in 3 shards" in text
    assert re.search(r"^image\s+10\s+100\.0%$", text, re.M) and re.search(r"^label\s+10\s+100\.0%$", text, re.M)
    assert re.search(r"^shard-000002\.tar\s+2\s", text, re.M)
    assert cli(["stats", str(out), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["samples"] == 10 and st["members"]["png"] == {"samples": 10, "fraction": 1.0}
    assert [s["samples"] for s in st["per_shard"]] == [4, 4, 2]


# ---------------------------------------------------------------- img2dataset's layout


def _img2dataset_shards(folder, n_shards=2, per_shard=5):
    """Shards as img2dataset writes them: NNNNN.tar with KEY.jpg, KEY.txt, KEY.json (real mtimes and
    owners, webdataset's TarWriter member order), plus its _stats.json and .parquet beside."""
    folder.mkdir(parents=True)
    expected = {}
    for s in range(n_shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                caption = f"a photo number {s * per_shard + i}"
                meta = {"url": f"http://example.invalid/{key}.jpg", "caption": caption, "key": key,
                        "status": "success", "width": 24, "height": 20}
                image = jpg_bytes(s * 100 + i, size=(24, 20))
                for ext, data in (("jpg", image), ("txt", caption.encode()), ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime, info.uname, info.mode = len(data), time.time(), "bigdata", 0o644
                    tar.addfile(info, io.BytesIO(data))
                expected[key] = (image, caption)
        (folder / f"{s:05d}_stats.json").write_text(json.dumps({"count": per_shard, "successes": per_shard}))
        (folder / f"{s:05d}.parquet").write_bytes(b"PAR1")
    return expected


def _read_with_pipeline(urls: list[str], image_size: int) -> tuple[list[dict], object]:
    """Every sample of ``urls`` through this project's loader (evaluation: one pass in shard order,
    image, text and class-label decoders): [{key, image, image_mask, text, text_mask, label}], the decoders."""
    data = config_from_dict({"data": {"train": {"urls": "unused.tar"}, "val": {"urls": urls}, "image_size": image_size},
                             "eval": {"enabled": False}}).data
    modalities = build_modalities(data, train=False)
    samples = []
    for batch in make_loader(data.val, modalities, data, 4, rank=0, world_size=1, seed=0, train=False):
        for i, key in enumerate(batch.keys):
            samples.append({"key": key, "label": int(batch.labels[i]),
                            **{m: batch.modalities[m][i] for m in ("image", "text")},
                            **{f"{m}_mask": bool(batch.masks[m][i]) for m in ("image", "text")}})
    return samples, modalities


def test_pipeline_reads_img2dataset_layout(tmp_path, capsys):
    expected = _img2dataset_shards(tmp_path / "i2d")
    urls = expand_urls(str(tmp_path / "i2d" / "{00000..00001}.tar"))
    samples, modalities = _read_with_pipeline(urls, image_size=12)
    assert sorted(s["key"] for s in samples) == sorted(expected)
    image_decoder, tok = modalities["image"].decoder, modalities["text"].decoder.tokenizer
    for s in samples:
        image, caption = expected[s["key"]]
        assert s["image"].shape == (3, 12, 12) and s["image_mask"] and s["text_mask"]
        assert s["label"] == -1  # img2dataset writes no .cls
        assert tok.decode(s["text"]) == caption
        # the pixels are this sample's image (as the loader ships them: uint8, normalised on the device)
        assert torch.equal(s["image"], image_decoder.host_decode(image, "jpg", random.Random(0)))
    # stats reads any shard folder, without an index
    assert cli(["stats", str(tmp_path / "i2d")]) == 0
    text = capsys.readouterr().out
    assert "10 samples in 2 shards" in text and "(from tar headers)" in text
    assert re.search(r"^json\s+10\s+100\.0%$", text, re.M) and re.search(r"^image\s+10\s+100\.0%$", text, re.M)


def test_build_writes_img2dataset_style_members(tmp_path):
    """--map gives OpenCLIP/img2dataset names (jpg, txt, json); the project's pipeline reads them."""
    raw = tmp_path / "raw"
    rows = []
    for i in range(6):
        (raw / "img").mkdir(parents=True, exist_ok=True)
        (raw / "img" / f"{i}.jpg").write_bytes(jpg_bytes(i, size=(20, 20)))
        rows.append({"key": f"{i:09d}", "image": f"img/{i}.jpg", "caption": f"caption {i}",
                     "meta": {"width": 20, "height": 20}})
    out = tmp_path / "out"
    build_shards(write_jsonl(raw / "m.jsonl", rows), out, shard_size=3,
                 mapping={"image": "jpg", "caption": "txt", "meta": "json"})
    with tarfile.open(out / "shard-000000.tar") as tar:
        assert tar.getnames() == ["000000000.jpg", "000000000.json", "000000000.txt",
                                  "000000001.jpg", "000000001.json", "000000001.txt",
                                  "000000002.jpg", "000000002.json", "000000002.txt"]
    samples, modalities = _read_with_pipeline(expand_urls(str(out / "shard-{000000..000001}.tar")), image_size=8)
    tok = modalities["text"].decoder.tokenizer
    assert [tok.decode(s["text"]) for s in samples] == [r["caption"] for r in rows]
    assert all(s["image"].shape == (3, 8, 8) and s["image_mask"] for s in samples)


def test_stats_partial_modalities(tmp_path, capsys):
    write(tmp_path / "a.wav", wav_bytes())
    rows = [{"key": "a", "caption": "x", "audio": "a.wav", "extra": "more words"},
            {"key": "b", "caption": "y"}, {"key": "c", "caption": "z"}]
    build_shards(write_jsonl(tmp_path / "m.jsonl", rows), tmp_path / "o", optional=("audio", "extra"))
    assert cli(["stats", str(tmp_path / "o"), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["modalities"]["audio"] == {"samples": 1, "fraction": 1 / 3}
    assert st["modalities"]["text"]["samples"] == 3  # caption.txt and extra.txt: counted once per sample
    assert st["members"]["extra.txt"]["samples"] == 1
