"""Meeting users' data where it is: a default shard build is read by the default decoders (images
under their extension, text as txt, integer labels as cls); img2dataset's folders count from their
_stats.json; local tars with no counts at all are counted from their tar headers; remote shards
without counts still stop with a message."""
from __future__ import annotations

import io
import json
import logging
import sys

import numpy as np
import pytest
from PIL import Image

from data_tools.build import build_shards
from pretrain.data import DataSourceError
from tests.helpers import QUICKSTART, TINY_MODEL, caption_rows, data_config, loader, ok, run_cmds, write_jsonl, write_shard


def _jpg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_a_default_build_names_members_by_the_shared_convention(tmp_path):
    rows = caption_rows(tmp_path / "raw", 3)  # key, image (a .png file), caption, label
    for r in rows:
        r["url"] = f"http://example.invalid/{r['key']}"  # a second text field
        r["meta"] = {"width": 8}
        r["thumb"] = r["image"]  # a second image file
    index = build_shards(write_jsonl(tmp_path / "raw" / "m.jsonl", rows), tmp_path / "out")
    assert index["required_members"] == ["cls", "meta.json", "png", "thumb.png", "txt", "url.txt"]
    # with one text field of any name, it is the txt
    rows = [{"key": r["key"], "image": r["image"], "sentence": r["caption"]} for r in rows]
    index = build_shards(write_jsonl(tmp_path / "raw" / "m2.jsonl", rows), tmp_path / "out2")
    assert index["required_members"] == ["png", "txt"]


def _img2dataset(folder, shards: list[int]):
    """img2dataset's output: NNNNN.tar (jpg, txt, json members), NNNNN_stats.json, NNNNN.parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    urls, i = [], 0
    for s, n in enumerate(shards):
        samples = []
        for _ in range(n):
            key = f"{s:05d}{i:04d}"
            meta = {"url": f"http://example.invalid/{i}.jpg", "key": key, "status": "success", "caption": f"class {i % 4}"}
            samples.append((key, {"jpg": _jpg(i), "txt": f"class number {i % 4}".encode(), "json": json.dumps(meta).encode()}))
            i += 1
        urls.append(str(write_shard(folder / f"{s:05d}.tar", samples)))
        (folder / f"{s:05d}_stats.json").write_text(json.dumps({"count": n + 1, "successes": n, "failed_to_download": 1}))
        pq.write_table(pa.Table.from_pylist([{"key": k, "caption": m["txt"].decode()} for k, m in samples]),
                       folder / f"{s:05d}.parquet")
    return urls


def test_img2dataset_folders_count_from_their_stats(tmp_path):
    urls = _img2dataset(tmp_path / "i2d", [5, 7])
    d = data_config({"urls": urls}, modalities={"image": {"decoder": "image"}, "text": {"decoder": "text"}},
                    image_size=8)
    l = loader(d)
    assert l.epoch_samples == 12 and "_stats.json" in l.describe()
    batch = next(iter(l))
    assert batch.modalities["image"].shape[1:] == (3, 8, 8) and batch.masks["text"].all()


def test_local_tars_with_no_counts_are_counted_from_their_headers(tmp_path, caplog):
    urls = [str(write_shard(tmp_path / f"own-{s}.tar", [(f"k{s}_{i}", {"txt": b"x"}) for i in range(n)]))
            for s, n in enumerate([3, 4, 6])]
    with caplog.at_level(logging.WARNING, logger="pretrain.data"):
        l = loader(data_config({"urls": urls}))
    assert l.epoch_samples == 13 and "tar headers" in l.describe()
    assert any("counted 13 samples in 3 shards from their tar headers" in r.getMessage() for r in caplog.records)
    # remote shards with no counts keep the clear error (fsspec's in-memory filesystem stands in for one)
    import fsspec

    fs = fsspec.filesystem("memory")
    for u in urls:
        fs.pipe(f"memory://counts/{u.rsplit('/', 1)[1]}", open(u, "rb").read())
    remote = [f"memory://counts/own-{s}.tar" for s in range(3)]
    with pytest.raises(DataSourceError, match=r"no sample count for 3 of 3 shards"):
        loader(data_config({"urls": remote}))
    # ... unless an index.json or sizes.json lies in their folder
    fs.pipe("memory://counts/sizes.json", json.dumps({"own-0.tar": 3, "own-1.tar": 4, "own-2.tar": 6}).encode())
    assert loader(data_config({"urls": remote})).epoch_samples == 13


@pytest.mark.slow
def test_default_build_and_img2dataset_folder_train_with_the_quickstart_recipe(tmp_path):
    """The quickstart recipe with only the URLs changed: a default build (no --map) and an
    img2dataset folder (no index.json, no count keys)."""
    rows = caption_rows(tmp_path / "raw", 24)
    rows = [{"key": r["key"], "image": r["image"], "text": r["caption"], "label": r["label"]} for r in rows]
    build_shards(write_jsonl(tmp_path / "raw" / "m.jsonl", rows), tmp_path / "default", shard_size=6)
    _img2dataset(tmp_path / "i2d", [12, 12])
    sources = {"default": f"{tmp_path}/default/shard-{{000000..000003}}.tar", "i2d": f"{tmp_path}/i2d/{{00000..00001}}.tar"}
    cmds = [[sys.executable, "-m", "pretrain.train", "--config", str(QUICKSTART), f"output_dir={tmp_path / f'run_{name}'}",
             f"data.train.urls={urls}", "data.val.urls=", "data.train.workers=0", "train.steps=2",
             "train.micro_batch_size=6", "train.log_every=1", "train.checkpoint=false", *TINY_MODEL]
            for name, urls in sources.items()]
    for name, proc in zip(sources, run_cmds(cmds, timeout=300)):  # both at once
        ok(proc)
        out = tmp_path / f"run_{name}"
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2] and rows[-1].get("data/dropped_samples", 0) == 0, (name, rows)
