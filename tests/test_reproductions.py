"""Issue 8's paper reproductions at test size, through the real tools (benchmarks/reproduce.py runs
them at full size): Symile's binary XOR built by ``python -m data_tools.synthetic`` and the shard
CLI, trained by ``python -m pretrain.train`` with configs/xor_symile.yaml and configs/xor_clip.yaml
(the two runs at once, one process each), evaluated at the end of training. d = 4 bits: b is
picked among all 16 candidate vectors given (a, c)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np

from tests.helpers import PYTHON, ROOT, run_cmd

DIM = 4
STEPS = 60


def test_xor_generator(tmp_path):
    from data_tools.synthetic import write_xor

    summary = write_xor(tmp_path, dim=6, samples=200, val_samples=50, seed=3, missing_frac=0.25)
    rows = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    assert (len(train), len(val)) == (200, 50)
    assert sum("c" not in r for r in train) == 50 == summary["missing_train_rows"]  # exactly 25%
    assert all("c" in r for r in val)  # held-out rows are complete
    full = [r for r in rows if "c" in r]
    a, b, c = (np.array([r[m]["bits"] for r in full]) for m in "abc")
    assert a.shape == (200, 6) and set(np.unique(a)) == {0, 1}
    assert (c == a ^ b).all()
    assert 0.4 < a.mean() < 0.6 and 0.4 < b.mean() < 0.6
    # the bits do not depend on the missing fraction; the seed changes them
    again = write_xor(tmp_path / "again", dim=6, samples=200, val_samples=50, seed=3, missing_frac=0.0)
    assert again["missing_train_rows"] == 0
    rows2 = [json.loads(line) for line in (tmp_path / "again" / "manifest.jsonl").read_text().splitlines()]
    assert [r["a"] for r in rows2] == [r["a"] for r in rows]
    write_xor(tmp_path / "other", dim=6, samples=200, seed=4)
    rows3 = [json.loads(line) for line in (tmp_path / "other" / "manifest.jsonl").read_text().splitlines()]
    assert [r["a"] for r in rows3] != [r["a"] for r in rows[:200]]


def _pattern(folder: Path) -> str:
    return f"{folder}/shard-{{000000..{len(list(folder.glob('shard-*.tar'))) - 1:06d}}}.tar"


def test_xor_symile_near_perfect_clip_at_chance(tmp_path):
    data = tmp_path / "xor"
    for cmd in (
        [PYTHON, "-m", "data_tools.synthetic", "xor", "--dim", str(DIM), "--samples", "2048", "--val-samples", "1000",
         "--seed", "0", "--output", str(data)],
        [PYTHON, "-m", "data_tools", "build", "--input", str(data / "manifest.jsonl"), "--output", str(data / "shards"),
         "--split-column", "split", "--shard-size", "512", "--no-progress"],
    ):
        proc = run_cmd(cmd, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    fields = json.dumps({"fields": ["bits"], "size": DIM})
    common = [
        f"data.train.urls={_pattern(data / 'shards' / 'train')}",
        f"data.val.urls={_pattern(data / 'shards' / 'val')}",
        *(f"data.modalities.{m}.options={fields}" for m in "abc"),
        f"train.steps={STEPS}", "train.micro_batch_size=128", "train.log_every=20",
    ]
    procs = {}
    for name in ("symile", "clip"):  # both at once: one process each, one thread each
        out = tmp_path / name
        cmd = [PYTHON, "-m", "pretrain.train", "--config", str(ROOT / "configs" / f"xor_{name}.yaml"), f"output_dir={out}", *common]
        env = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        procs[name] = (out, subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                             env={**os.environ, **env}))
    results = {}
    for name, (out, proc) in procs.items():
        log, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, log[-6000:]
        results[name] = json.loads((out / "eval.json").read_text())

    sym, clip = results["symile"], results["clip"]
    chance = 1 / 2**DIM
    for m in (sym, clip):  # every candidate vector of b is there, and every held-out sample queries
        assert m["eval/symile/b/candidates"] == 2**DIM and m["eval/symile_pairwise/b/candidates"] == 2**DIM
        assert m["eval/symile/b/r1/chance"] == chance
        assert m["eval/symile/b/queries"] == 1000
    # Symile's multilinear inner product recovers b from (a, c) ...
    assert sym["eval/symile/b/r1"] >= 0.9, sym
    # ... CLIP, scored as the Symile paper scores pairwise models, stays at chance (so does its MIP)
    assert clip["eval/symile_pairwise/b/r1"] <= chance + 0.05, clip
    assert clip["eval/symile/b/r1"] <= chance + 0.05, clip


def test_demo_rich_variant_renders_what_its_caption_says(tmp_path):
    from data_tools.demo import COLOURS, POSITIONS, WORDS, write_demo
    from PIL import Image

    assert write_demo(tmp_path / "rich", variant="rich") == write_demo(tmp_path / "plain")
    rich = [json.loads(line) for line in (tmp_path / "rich" / "train.jsonl").read_text().splitlines()]
    plain = [json.loads(line) for line in (tmp_path / "plain" / "train.jsonl").read_text().splitlines()]
    assert [(r["key"], r["label"]) for r in rich] == [(r["key"], r["label"]) for r in plain]  # the same split
    seen_colours, seen_positions = set(), set()
    for r in rich[:200]:
        colour = next(c for c in COLOURS if c in r["caption"])
        position = next(p for p in POSITIONS if p in r["caption"])
        assert WORDS[r["label"]] in r["caption"] or str(r["label"]) in r["caption"], r
        seen_colours.add(colour)
        seen_positions.add(position)
        img = Image.open(tmp_path / "rich" / r["image"])
        assert img.mode == "RGB" and img.size == (16, 16)
        px = np.asarray(img).astype(int)
        row, col = POSITIONS[position]
        inside = np.zeros((16, 16), bool)
        inside[row:row + 8, col:col + 8] = True
        assert px[~inside].max() == 0 and px[inside].max() > 0  # the digit is where the caption says
        on = np.asarray(COLOURS[colour]) > 0
        assert px[..., ~on].max() == 0 and px[inside][:, on].max() > 200  # in the caption's colour
    assert seen_colours == set(COLOURS) and seen_positions == set(POSITIONS)


def test_clip_lite_experiment_minimal_grid(tmp_path):
    """benchmarks/reproduce.py clip-lite on a minimal grid: CLIP (linear head) and CLIP-Lite
    (milinear head + cooperative prior), batch 16, 4 steps, one seed, an evaluation half-way; the
    untrained-backbone floor beside them."""
    out, js = tmp_path / "runs", tmp_path / "r.json"
    proc = run_cmd([PYTHON, str(ROOT / "benchmarks" / "reproduce.py"), "clip-lite", "--out", str(out), "--json", str(js),
                    "--cells", "clip-linear", "lite-milinear-coop", "--batches", "16", "--seeds", "0", "--lrs", "2e-3",
                    "--steps", "4", "--budget-samples", "64", "--step-batches", "--curve-points", "2", "--side-seeds",
                    "--fractions", "--no-rich"], timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = json.loads(js.read_text())["clip-lite"]
    runs = {r["cell"]: r for r in res["main"]["runs"] if r["budget"] == "samples"}
    assert set(runs) == {"clip-linear", "lite-milinear-coop"}
    assert {cell: res["lr_chosen"][cell] for cell in runs} == {"clip-linear": 2e-3, "lite-milinear-coop": 2e-3}
    for r in runs.values():
        assert (r["steps"], r["samples"], r["probe_train_samples"]) == (4, 64, 1438)
        for key in ("probe", "zeroshot", "i2t_r1", "t2i_r1"):
            assert 0.0 <= r[key] <= 1.0, (key, r)
        assert [c["step"] for c in r["curve"]] == [2, 4] and all(0.0 <= c["probe"] <= 1.0 for c in r["curve"])
    for e in res["main"]["samples_matched"]:
        assert e["probe"]["n"] == 1 and e["probe"]["mean"] == runs[e["cell"]]["probe"]
    assert 0.0 <= res["floor"]["runs"][0]["probe"] <= 1.0
    logged = {cell: (out / f"main_{cell}_b16_samples_s0" / "metrics.jsonl").read_text() for cell in runs}
    assert '"clip_lite/prior"' in logged["lite-milinear-coop"] and '"clip_lite/jsd"' in logged["lite-milinear-coop"]
    assert "clip_lite/prior" not in logged["clip-linear"]
    assert res["main"]["runs"][0]["probe_width"] == 256  # the backbone's features (the MLP's hidden layer), not the head's
