"""The real training entry point on 2 gloo ranks with DeepSpeed ZeRO-2, under torchrun and accelerate."""
import json
import math
from pathlib import Path

import pytest

from tests.conftest import PYTHON, ROOT, build, free_port, make_caption_dataset, run_cmd

STEPS = 4
MICRO_BATCH = 6


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    train = build(make_caption_dataset(base / "train", n=48, seed=1), base / "shards" / "train", shard_size=6)
    val = build(make_caption_dataset(base / "val", n=12, seed=2), base / "shards" / "val", shard_size=6)
    assert len(train["shards"]) == 8 and len(val["shards"]) == 2
    return base / "shards"


def _overrides(shards: Path, out: Path) -> list[str]:
    return [
        f"output_dir={out}",
        f"data.train.urls={shards}/train/shard-{{000000..000007}}.tar",
        f"data.val.urls={shards}/val/shard-{{000000..000001}}.tar",
        "data.train.shuffle_buffer=4",
        "data.image_size=16",
        "data.context_length=24",
        "model.image.name=test_resnet",
        "model.embed_dim=16",
        "model.text.width=32",
        "model.text.layers=1",
        "model.text.heads=2",
        f"train.steps={STEPS}",
        f"train.micro_batch_size={MICRO_BATCH}",
        "train.warmup_steps=1",
        "train.log_every=2",
        "train.log_keys=true",
        "train.zero_stage=2",
        "eval.classnames=[a, b, c, d]",
        "eval.templates=['class number {}']",
    ]


def _check_run(out: Path, proc) -> None:
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    # both ranks belong to one job of world size 2
    records = [json.loads((out / "ranks" / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in records] == [0, 1]
    assert all(r["world_size"] == 2 and r["backend"] == "gloo" for r in records)
    assert records[0]["pid"] != records[1]["pid"]
    # each rank saw different samples, every step a full micro-batch
    seen = []
    for r in range(2):
        rows = [json.loads(line) for line in (out / "keys" / f"rank{r}.jsonl").read_text().splitlines()]
        assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
        assert all(len(row["keys"]) == MICRO_BATCH for row in rows)
        seen.append({k for row in rows for k in row["keys"]})
    assert seen[0] and seen[1] and not (seen[0] & seen[1])
    # finite loss logged; eval keys present
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == STEPS // 2 and all(isinstance(v, float) and math.isfinite(v) for v in losses)
    evals = [m for m in metrics if "eval/zeroshot_top1" in m]
    assert len(evals) == 1 and evals[0]["eval/samples"] == 12
    for key in ("eval/zeroshot_top1", "eval/i2t_r1", "eval/t2i_r1"):
        assert 0.0 <= evals[0][key] <= 1.0
    # a DeepSpeed checkpoint with model and (ZeRO-2 partitioned) optimizer states of both ranks
    ckpt = out / "checkpoints" / f"step{STEPS:06d}"
    files = sorted(p.name for p in ckpt.iterdir())
    assert "mp_rank_00_model_states.pt" in files or "zero_pp_rank_0_mp_rank_00_model_states.pt" in files, files
    assert sum("optim_states" in f for f in files) == 2, files
    assert {"COMPLETE", "rank00000.pt", "rank00001.pt"} <= set(files), files
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step{STEPS:06d}"
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "config.yaml").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_torchrun_two_ranks_zero2(shards, tmp_path, loss):
    out = tmp_path / "run"
    cmd = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "pretrain.train", "--config", str(ROOT / "configs" / "quickstart.yaml"), *_overrides(shards, out),
           f"loss.name={loss}"]
    _check_run(out, run_cmd(cmd, timeout=600))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(f"{loss}/image-text" in m for m in metrics)


@pytest.mark.slow
def test_accelerate_launch_two_ranks_zero2(shards, tmp_path):
    out = tmp_path / "run"
    cmd = [PYTHON, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"), f"--main_process_port={free_port()}",
           "-m", "pretrain.train", "--config", str(ROOT / "configs" / "quickstart.yaml"), *_overrides(shards, out)]
    _check_run(out, run_cmd(cmd, timeout=600))
