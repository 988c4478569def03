"""A new modality without editing pretrain/: the depth plugin (tests/plugins/depth.py: a registered
decoder and tower, loaded through ``data.imports``) reads what a default ``data_tools build`` (no
--map) writes for a field of ``.npy`` files, ``KEY.depth.npy``, by the npy rule's default members;
nothing is dropped, and a run trains on image, text and depth."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from data_tools.build import build_shards
from tests.helpers import data_config, loader, ok, png_bytes, run_cmd, single, write, write_jsonl, write_shard

PLUGIN = "tests.plugins.depth"
DEPTH = {"decoder": "depth", "options": {"size": 16}}  # default members: the npy decoder's


def _depth_rows(root: Path, n: int) -> list[dict]:
    """n rows: an image (PNG file), a depth map (a 12 x 10 float32 .npy file of constant depth
    0.5 + i metres with one hole at [0, 0]), a caption, a URL (a second text), metadata and a label."""
    (root / "depth").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        write(root / f"img/{i:03d}.png", png_bytes(i, size=(8, 8)))
        depth = np.full((12, 10), 0.5 + i, dtype=np.float32)
        depth[0, 0] = 0.0  # a sensor's hole
        np.save(root / f"depth/{i:03d}.npy", depth)
        rows.append({"key": f"s{i:03d}", "image": f"img/{i:03d}.png", "depth": f"depth/{i:03d}.npy",
                     "caption": f"a room {i % 4} metres deep", "url": f"http://example.invalid/{i}",
                     "meta": {"room": i % 4}, "label": i % 4})
    return rows


def test_a_default_build_of_npy_files_is_read_by_the_plugin_decoder(tmp_path):
    rows = _depth_rows(tmp_path / "raw", 6)
    index = build_shards(write_jsonl(tmp_path / "raw" / "m.jsonl", rows), tmp_path / "shards", shard_size=3)
    assert index["required_members"] == ["cls", "depth.npy", "meta.json", "png", "txt", "url.txt"]
    d = data_config({"urls": f"{tmp_path}/shards/shard-{{000000..000001}}.tar"}, imports=[PLUGIN], image_size=8,
                    modalities={"image": {"decoder": "image"}, "text": {"decoder": "text"}, "depth": DEPTH})
    l = loader(d, batch=3, epochs=1, train=False, split=d.train)
    batches = list(l)
    assert [k for b in batches for k in b.keys] == [r["key"] for r in rows]
    assert l.metrics() == {"data/dropped_samples": 0.0, "data/retries": 0.0}  # nothing skipped, nothing dropped
    depth = batches[1].modalities["depth"]  # samples 3, 4, 5
    assert depth.shape == (3, 1, 16, 16) and batches[1].masks["depth"].all()
    for j, i in enumerate((3, 4, 5)):  # normalised log-depth, away from the hole's blur
        want = 2 * (math.log(0.5 + i) - math.log(0.1)) / (math.log(100) - math.log(0.1)) - 1
        assert depth[j, 0, 8:, 8:].sub(want).abs().max() < 1e-5
        assert depth[j, 0, 0, 0] > want  # the hole reads as far
    # the caption is the caption, never the URL (url.txt) or the metadata (meta.json)
    from pretrain.tokenizer import make_tokenizer

    tok = make_tokenizer("byte", d.context_length)
    assert batches[0].modalities["text"][1].equal(tok.encode("a room 1 metres deep"))


def test_two_npy_members_are_ambiguous_until_one_is_named(tmp_path):
    import io

    def npy(value):
        buf = io.BytesIO()
        np.save(buf, np.full((4, 4), value, dtype=np.float32))
        return buf.getvalue()

    url = str(write_shard(tmp_path / "two-000000.tar",
                          [(f"k{i}", {"txt": b"x", "near.npy": npy(1.0), "far.npy": npy(50.0)}) for i in range(2)]))
    (tmp_path / "sizes.json").write_text(json.dumps({"two-000000.tar": 2}))

    def read(members):
        opts = {**DEPTH, **({"members": members} if members else {})}
        d = data_config({"urls": url}, imports=[PLUGIN], labels=None,
                        modalities={"text": {"decoder": "text"}, "depth": opts})
        l = loader(d, batch=2, epochs=1, train=False, split=d.train)
        return list(l), l.metrics()

    batches, metrics = read(None)
    assert batches == [] and metrics == {"data/skipped/ambiguous_depth": 2.0, "data/dropped_samples": 2.0, "data/retries": 0.0}
    batches, metrics = read(["far.npy"])
    assert metrics == {"data/dropped_samples": 0.0, "data/retries": 0.0} and (batches[0].modalities["depth"] > 0.5).all()


@pytest.mark.slow
def test_the_depth_plugin_trains_on_a_default_split_build_with_nothing_dropped(tmp_path):
    """The CLI end to end: build (no --map, two splits), verify one split (index.json one folder
    up), then train image + text + depth with the plugin's decoder and tower, default members."""
    rows = _depth_rows(tmp_path / "raw", 16)
    manifest = write_jsonl(tmp_path / "raw" / "m.jsonl", rows)
    shards = tmp_path / "shards"
    ok(run_cmd([sys.executable, "-m", "data_tools", "build", "--input", str(manifest), "--output", str(shards),
                "--shard-size", "4", "--split", "train=0.75", "--split", "val=0.25"]))
    assert "OK:" in ok(run_cmd([sys.executable, "-m", "data_tools", "verify", str(shards / "train")]))
    modalities = {"image": {"decoder": "image"}, "text": {"decoder": "text"}, "depth": DEPTH}
    towers = {"image": {"type": "timm", "options": {"name": "test_resnet"}},
              "text": {"type": "text_transformer", "options": {"width": 32, "layers": 1, "heads": 2}},
              "depth": {"type": "depth_cnn", "options": {"channels": [8, 16]}}}
    out = tmp_path / "run"
    ok(single([f"output_dir={out}", f"data.train.urls={shards}/train/shard-{{000000..000002}}.tar", "data.val.urls=",
               f"data.imports=[{PLUGIN}]", f"data.modalities={json.dumps(modalities)}",
               f"model.towers={json.dumps(towers)}", "data.train.workers=0", "data.train.shuffle_buffer=0",
               "data.image_size=16", "data.context_length=24", "model.embed_dim=16", "train.steps=3",
               "train.micro_batch_size=4", "train.warmup_steps=1", "train.log_every=1", "train.checkpoint=false",
               "eval.enabled=false"], timeout=300))
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logged if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]  # the 12 train samples, one epoch, every one used
    assert all(math.isfinite(r["loss"]) and "clip/depth-text" in r for r in steps)
    bad = {k: v for r in logged for k, v in r.items() if k.startswith("data/skipped/") and v}
    assert not bad and all(r.get("data/dropped_samples", 0) == 0 for r in logged), (bad, logged)
