"""Weights & Biases beside metrics.jsonl (``train.wandb.*``), offline and without a network: the
offline run's records, read back from its ``.wandb`` transaction log, hold exactly the scalars of
metrics.jsonl (keys, steps, values, NaN included) and the resolved config; a run stopped mid-way and
resumed with the same command continues the same wandb run id and its step numbers; the keys are
checked with errors naming them; wandb is imported only when enabled, and a missing package says
which key and which extra."""
import json
import math
import os
import struct
import sys
import zlib
from pathlib import Path

import pytest
import yaml

from pretrain.config import ConfigError, load_config
from pretrain.metrics import WANDB_RUN_ID, MetricsWriter, WandbConfig
from tests.helpers import ASSET_SHARDS, QUICKSTART, ok, single, tiny_overrides

# ------------------------------------------------------------------------------- config, import


def test_wandb_keys_default_off_and_parse():
    assert not load_config(QUICKSTART).train.wandb.enabled
    assert not load_config(QUICKSTART, ["train.wandb.project="]).train.wandb.enabled
    w = load_config(QUICKSTART, ["train.wandb.project=p", "train.wandb.entity=team", "train.wandb.name=n",
                                 "train.wandb.tags=[a, b]", "train.wandb.mode=offline", "train.steps=7"]).train
    assert (w.wandb.project, w.wandb.entity, w.wandb.name, w.wandb.tags, w.wandb.mode) == ("p", "team", "n", ["a", "b"],
                                                                                          "offline")
    assert w.wandb.enabled and w.steps == 7


@pytest.mark.parametrize("override, key, words", [
    ("train.wandb.mode=sometimes", "train.wandb.mode", "must be one of 'online', 'offline'"),
    ("train.wandb.project=team/p", "train.wandb.project", "cannot contain /"),
    ("train.wandb.tags=[ok, '']", "train.wandb.tags[1]", "1 to 64 characters"),
    ("train.wandb.tags=x", "train.wandb.tags", "expected a list"),
    ("train.wandb.colour=red", "train.wandb.colour", "unknown key"),
    ("train.wandb=5", "train.wandb", "expected a mapping"),
])
def test_bad_wandb_values_are_named(override, key, words):
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, [override])
    assert str(err.value).startswith(f"{key}:") and words in str(err.value), str(err.value)


def test_wandb_is_imported_only_when_enabled(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # any `import wandb` now raises ImportError
    writer = MetricsWriter(tmp_path / "off", enabled=True, wandb=WandbConfig())
    writer.log(1, {"loss": 1.0})
    writer.close()
    assert (tmp_path / "off" / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'
    with pytest.raises(ConfigError) as err:
        MetricsWriter(tmp_path / "on", enabled=True, wandb=WandbConfig(project="p"))
    assert str(err.value).startswith("train.wandb.project:") and "pip install -e '.[wandb]'" in str(err.value)
    MetricsWriter(tmp_path / "rank1", enabled=False, wandb=WandbConfig(project="p")).close()  # other ranks: nothing


# ----------------------------------------------------------------- the .wandb transaction log


def wandb_records(path: Path):
    """The protobuf ``Record``s of one ``.wandb`` file: wandb's LevelDB-style log (a 7-byte header
    ``:W&B``, magic 0xBEE1, version 0; 32 KiB blocks of chunks with a CRC-32, a length and a
    full/first/middle/last type), parsed with wandb's own ``wandb_internal_pb2.Record`` (this
    wandb has no Python reader of its own any more)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0), path
    pos, parts = 7, []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding up to the end of a block
            pos += left
            continue
        body = data[pos + 7:pos + 7 + length]
        assert len(body) == length and zlib.crc32(body, zlib.crc32(bytes([kind]))) == crc, (path, pos)
        pos += 7 + length
        parts.append(body)
        if kind in (1, 4):  # full, last
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record
    assert not parts, f"{path}: ends inside a record"


def _history(records) -> dict[int, dict[str, float]]:
    """step -> the scalars logged at it (wandb's own ``_step``, ``_runtime``, ... left out)."""
    rows: dict[int, dict[str, float]] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            rows.setdefault(r.history.step.num, {}).update({k: v for k, v in items.items() if not k.startswith("_")})
    return rows


def _metrics_jsonl(out: Path) -> dict[int, dict[str, float]]:
    """step -> the scalars of metrics.jsonl (its lines of one step together; "nan"/"inf" as floats)."""
    rows: dict[int, dict[str, float]] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row.pop("step"), {}).update({k: float(v) for k, v in row.items()})
    return rows


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


# -------------------------------------------------------------------- a run stopped and resumed


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """4 steps, stopped after step 2 (whose loss is NaN, injected) and resumed with the same command;
    the final evaluation at step 4. Offline wandb, no API key, any server call fails at once."""
    base = tmp_path_factory.mktemp("wandb")
    out = base / "run"
    with pytest.MonkeyPatch.context() as mp:
        for name in [n for n in os.environ if n.startswith("WANDB_")]:
            mp.delenv(name)
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
        mp.setenv("WANDB_ERROR_REPORTING", "false")
        for name in ("CONFIG", "CACHE", "DATA"):
            mp.setenv(f"WANDB_{name}_DIR", str(base / name.lower()))
        args = tiny_overrides(ASSET_SHARDS, out, steps=4) + ["train.wandb.project=test", "train.wandb.tags=[ci, offline]"]
        first = ok(single(args + ["train.stop_at_step=2"], env={"PRETRAIN_FAULT": "nan_loss:2"}, module="tests.faults",
                          timeout=300))
        run_id = (out / WANDB_RUN_ID).read_text().strip()
        second = ok(single(args, timeout=300))
    return out, run_id, first, second


def _files(out: Path) -> list[Path]:
    """The offline runs' transaction logs, in the order they were written."""
    return sorted(out.glob("wandb/offline-run-*/run-*.wandb"), key=lambda p: p.parent.name)


@pytest.mark.slow
def test_offline_wandb_holds_the_scalars_of_metrics_jsonl(resumed_run):
    out, run_id, _, _ = resumed_run
    want = _metrics_jsonl(out)
    got = _history(r for f in _files(out) for r in wandb_records(f))
    assert sorted(want) == sorted(got) == [1, 2, 3, 4]
    for step in want:
        assert sorted(got[step]) == sorted(want[step]), step
        for key, value in want[step].items():
            assert _same(got[step][key], value), (step, key, got[step][key], value)
    assert math.isnan(got[2]["loss"])  # a non-finite value is logged as such
    assert {"loss", "lr", "grad_norm", "temperature", "samples_per_s", "clip/image-text"} <= set(got[1])
    assert {"eval/zeroshot_top1", "eval/i2t_r1", "eval/t2i_r1", "loss"} <= set(got[4])  # the final evaluation
    # the run: its id, project, name (the run folder's), tags; its config is the resolved recipe
    runs = [r.run for f in _files(out) for r in wandb_records(f) if r.WhichOneof("record_type") == "run"]
    assert runs and all((r.run_id, r.project, r.display_name, list(r.tags)) == (run_id, "test", "run", ["ci", "offline"])
                        for r in runs)
    config = {i.key: json.loads(i.value_json) for i in runs[-1].config.update if i.key != "_wandb"}
    assert config == yaml.safe_load((out / "config.yaml").read_text())
    assert config["train"]["wandb"]["project"] == "test"


@pytest.mark.slow
def test_a_resumed_run_continues_the_same_wandb_run(resumed_run):
    out, run_id, first, second = resumed_run
    assert "step 2/4" in first and "at step 2" in second
    files = _files(out)
    assert [f.name for f in files] == [f"run-{run_id}.wandb"] * 2  # one piece per process, one run id
    assert (out / WANDB_RUN_ID).read_text().strip() == run_id
    before, after = (_history(wandb_records(f)) for f in files)
    assert sorted(before) == [1, 2] and sorted(after) == [3, 4]  # the steps continue, none repeated
    ids = [r.run.run_id for f in files for r in wandb_records(f) if r.WhichOneof("record_type") == "run"]
    assert ids == [run_id, run_id]
