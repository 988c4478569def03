"""Makes the small fixtures committed under tests/assets/ (run from the repository root).

    python tests/assets/make_assets.py shards       # caption shards: train 48 / val 12 samples
    python tests/assets/make_assets.py checkpoint   # a tiny run with a checkpoint at step 2

``shards``: 8x8 PNG images (one colour pattern per class, 4 classes), captions "class number N"
and ``.cls`` labels, built with the project's own shard CLI (6 samples a shard) into
``shards/train`` and ``shards/val``, each with its ``index.json``. The build is deterministic:
running it again gives the same tars (index.json differs only in the temporary manifest path it
records).

``checkpoint``: one process trains the tiny CLIP of ``TINY_RUN`` below on those shards for 4 steps
with a checkpoint every 2, then keeps ``run_v1/``: the run's ``config.yaml`` and ``metrics.jsonl``
(the losses of all 4 steps) and the step-2 checkpoint. The committed one was written by the code
of commit a28e316, before the trainer and config were restructured; tests/test_compat.py resumes
it with today's code and compares steps 3 and 4 with the losses recorded then.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the repository's packages
SHARDS = HERE / "shards"
RUN = HERE / "run_v1"

# relative to the repository root: the saved data position holds the shard URLs as given
TRAIN_URLS = "tests/assets/shards/train/shard-{000000..000007}.tar"
VAL_URLS = "tests/assets/shards/val/shard-{000000..000001}.tar"
TINY_RUN = [
    f"data.train.urls={TRAIN_URLS}",
    f"data.val.urls={VAL_URLS}",
    "data.train.shuffle_buffer=4",
    "data.train.workers=0",
    "data.image_size=16",
    "data.context_length=24",
    "model.towers.image.type=mlp",  # small files: an MLP over the pixels, a one-layer text encoder
    "model.towers.image.options={hidden: [16]}",
    "model.embed_dim=16",
    "model.towers.text.options.width=16",
    "model.towers.text.options.layers=1",
    "model.towers.text.options.heads=2",
    "train.steps=4",
    "train.micro_batch_size=6",
    "train.warmup_steps=1",
    "train.log_every=1",
    "train.checkpoint_every=2",
    "train.keep_checkpoints=2",
    "eval.enabled=false",
]


def make_shards() -> None:
    from tests.helpers import build, make_caption_dataset

    with tempfile.TemporaryDirectory() as tmp:
        for split, n, seed in (("train", 48, 1), ("val", 12, 2)):
            out = SHARDS / split
            shutil.rmtree(out, ignore_errors=True)
            build(make_caption_dataset(Path(tmp) / split, n, seed=seed), out, shard_size=6)


def make_checkpoint() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "pretrain.train", "--config", "configs/quickstart.yaml", f"output_dir={run}",
               *TINY_RUN]
        subprocess.run(cmd, cwd=ROOT, check=True)
        shutil.rmtree(RUN, ignore_errors=True)
        (RUN / "checkpoints").mkdir(parents=True)
        for name in ("config.yaml", "metrics.jsonl"):
            shutil.copy(run / name, RUN / name)
        shutil.copytree(run / "checkpoints" / "step000002", RUN / "checkpoints" / "step000002")
        (RUN / "checkpoints" / "latest").write_text("step000002\n")


if __name__ == "__main__":
    what = sys.argv[1:] or ["shards"]
    if "shards" in what:
        make_shards()
    if "checkpoint" in what:
        make_checkpoint()
