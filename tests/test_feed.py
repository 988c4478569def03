"""Issue 29, feeding a GPU from a few cores: the web-like benchmark shards, decode-time downscaling
(``draft``), uint8 image batches normalised on the device, GPU JPEG decode, and the benchmark in a
tiny mode."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest


def test_webimages_shards(tmp_path):
    from data_tools.synthetic import main
    from pretrain.data.tarstream import count_samples

    out = tmp_path / "web"
    assert main(["webimages", "--samples", "10", "--shard-size", "4", "--output", str(out), "--seed", "3"]) == 0
    summary = json.loads((out / "synthetic.json").read_text())
    index = json.loads((out / "index.json").read_text())
    assert [s["samples"] for s in index["shards"]] == [4, 4, 2] and index["total_samples"] == 10
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 4, "00001.tar": 4, "00002.tar": 2}
    assert index["required_members"] == ["jpg", "json", "txt"]
    assert count_samples(str(out / "00000.tar")) == 4
    assert 256 <= summary["short_side"]["min"] <= summary["short_side"]["max"] <= 512
    assert 0.05 < summary["bytes_per_pixel"] < 1.0 and summary["decode_ms_per_mpix"] > 0
    # deterministic whatever the number of writing processes
    again = tmp_path / "again"
    assert main(["webimages", "--samples", "10", "--shard-size", "4", "--output", str(again), "--seed", "3",
                 "--workers", "2", "--no-measure"]) == 0
    digest = lambda d: [hashlib.sha256((d / f"{i:05d}.tar").read_bytes()).hexdigest() for i in range(3)]  # noqa: E731
    assert digest(out) == digest(again)
    assert main(["webimages", "--samples", "0", "--output", str(tmp_path / "bad")]) == 2
