"""A real 2-rank training run (torchrun, gloo, DeepSpeed ZeRO-2, a DataLoader worker per rank) over
a shard set with broken samples and a truncated shard: it finishes, and metrics.jsonl reports the
skipped samples by reason, summed over both ranks."""
import json
import math

import pytest

from tests.helpers import TINY_MODEL, png_bytes, run_cmd, torchrun_cmd, write_index, write_shard

STEPS, MICRO_BATCH = 8, 6


@pytest.fixture(scope="module")
def broken_shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("broken")
    counts = {}
    for s in range(8):
        samples = [(f"s{s}_{i}", {"png": png_bytes(10 * s + i), "txt": f"class number {i % 4}".encode(),
                                  "cls": str(i % 4).encode()}) for i in range(6)]
        if s == 0:
            samples.append((f"s{s}_badpng", {"png": b"\x89PNG\r\n\x1a\nnot really", "txt": b"class number 1"}))
        if s == 1:
            samples.append((f"s{s}_badtxt", {"png": png_bytes(999), "txt": b"class \xff\xfe"}))
        if s == 2:
            samples.append((f"s{s}_notxt", {"png": png_bytes(998)}))
        if s == 3:
            samples[0][1]["pyd"] = b"\x80\x04K\x01."  # a pickle: refused, the sample itself is fine
        path = write_shard(folder / f"shard-{s:06d}.tar", samples)
        counts[path.name] = len(samples)
        if s == 7:  # truncated inside the fourth sample
            raw = path.read_bytes()
            path.write_bytes(raw[: raw.index(b"s7_3.png") + 600])
    write_index(folder, counts)
    return folder


@pytest.mark.slow
def test_two_rank_training_over_broken_shards_reports_skips(broken_shards, tmp_path):
    out = tmp_path / "run"
    overrides = [
        f"output_dir={out}",
        f"data.train.urls={broken_shards}/shard-{{000000..000007}}.tar",
        "data.train.shuffle_buffer=8",
        "data.train.workers=1",
        *TINY_MODEL,
        f"train.steps={STEPS}",
        f"train.micro_batch_size={MICRO_BATCH}",
        "train.warmup_steps=1",
        "train.log_every=4",
        "train.checkpoint=false",
        "eval.enabled=false",
    ]
    cmd = torchrun_cmd(overrides)
    proc = run_cmd(cmd, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    assert "[data] skipped (" in proc.stderr  # the bounded log of the bad samples
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [4, 8] and all(math.isfinite(r["loss"]) for r in steps)
    last = steps[-1]
    # 2 ranks x 8 steps x 6 = 96 samples from 49 good ones a pass: each rank read its part of the
    # set about twice, so every broken thing was met at least once and at most three times
    for reason in ("undecodable_image", "bad_utf8", "missing_text", "refused_member", "corrupt_tar"):
        assert 1 <= last[f"data/skipped/{reason}"] <= 3, (reason, last)
    assert last["data/dropped_samples"] == (last["data/skipped/undecodable_image"] + last["data/skipped/bad_utf8"]
                                            + last["data/skipped/missing_text"])
    assert steps[0]["data/dropped_samples"] <= last["data/dropped_samples"]
