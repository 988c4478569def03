"""Small real shard sets and tiny-model overrides shared by the training tests."""
from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import PYTHON, ROOT, build, free_port, make_caption_dataset, run_cmd

QUICKSTART = ROOT / "configs" / "quickstart.yaml"


# the quickstart's image and text towers shrunk to test size
TINY_MODEL = [
    "data.image_size=16",
    "data.context_length=24",
    "model.towers.image.options.name=test_resnet",
    "model.embed_dim=16",
    "model.towers.text.options.width=32",
    "model.towers.text.options.layers=1",
    "model.towers.text.options.heads=2",
]


def make_shards(base: Path) -> Path:
    build(make_caption_dataset(base / "train", n=48, seed=1), base / "shards" / "train", shard_size=6)
    build(make_caption_dataset(base / "val", n=12, seed=2), base / "shards" / "val", shard_size=6)
    return base / "shards"


def tiny_overrides(shards: Path, out: Path, steps: int, micro_batch: int = 6) -> list[str]:
    return [
        f"output_dir={out}",
        f"data.train.urls={shards}/train/shard-{{000000..000007}}.tar",
        f"data.val.urls={shards}/val/shard-{{000000..000001}}.tar",
        "data.train.shuffle_buffer=4",
        *TINY_MODEL,
        f"train.steps={steps}",
        f"train.micro_batch_size={micro_batch}",
        "train.warmup_steps=1",
        "train.log_every=1",
        "eval.classnames=[a, b, c, d]",
        "eval.templates=['class number {}']",
    ]


def torchrun(args: list[str], nproc: int = 2, env: dict | None = None, timeout: int = 600):
    cmd = [PYTHON, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           "-m", "pretrain.train", "--config", str(QUICKSTART), *args]
    return run_cmd(cmd, timeout=timeout, env=env)


def single(args: list[str], env: dict | None = None, timeout: int = 600):
    return run_cmd([PYTHON, "-m", "pretrain.train", "--config", str(QUICKSTART), *args], timeout=timeout, env=env)


def losses(out: Path) -> dict[int, float]:
    """step -> logged loss (later lines win, as after a resume)."""
    result = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            result[row["step"]] = row["loss"]
    return result


def ok(proc) -> str:
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return proc.stdout
