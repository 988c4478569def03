"""``python -m pretrain.plan`` (issue 28) against what really happens.

One 2-rank training run (the quickstart at the suite's tiny size, ``train.zero_stage: auto``, sample
keys logged) carries tests.faults' ``record_memory`` probe: after its first step, every rank builds
the engines of three recipes at every ZeRO stage (the quickstart in fp32, an OpenCLIP recipe with a
tiny open_clip architecture in bf16, as the recipe trains, the Symile recipe in fp32), steps each once and
records every tensor each engine holds, saves a checkpoint of each, and measures each objective's
own forward and backward with its real gathers. The plan's model states, checkpoint sizes, loss
buffers, epoch arithmetic and ZeRO choice are compared with that run; the rest runs in this process.
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pretrain.config import ConfigError, load_config
from pretrain.plan import (
    GIB, STAGES, ZeroSettings, choose, count_model, loss_buffers, make_plan, model_states, stage_refusal,
)
from tests.faults import measured_parts
from tests.helpers import ASSET_SHARDS, QUICKSTART, ROOT, TINY_MODEL, ok, tiny_overrides, torchrun

# test_interop_openclip's tiny architecture, the OpenCLIP recipes' towers at test size
TINY_OC = {"embed_dim": 16,
           "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
SMALL_BUCKET = "train.deepspeed={zero_optimization: {reduce_bucket_size: 200000}}"  # less than the model: several fills
QUICKSTART_TINY = ["data.train.urls=x.tar", *TINY_MODEL, "train.micro_batch_size=5", SMALL_BUCKET]


def _recipes(tmp: Path) -> list[dict]:
    arch = tmp / "tiny_oc.json"
    arch.write_text(json.dumps(TINY_OC))
    tower = f"{{model: tiny_oc, model_config: {arch}}}"
    return [
        {"name": "quickstart", "config": str(QUICKSTART), "overrides": QUICKSTART_TINY,
         "precisions": ["fp32"], "loss_rows": 256},
        {"name": "openclip", "config": str(ROOT / "configs" / "openclip_vit_b32.yaml"),
         "overrides": [f"model.towers.image.options={tower}", f"model.towers.text.options={tower}",
                       "data.modalities.image.options.size=16", "data.context_length=12", "model.embed_dim=16",
                       "train.micro_batch_size=4", SMALL_BUCKET],
         "precisions": ["bf16"], "loss_rows": 256, "zero3_init": True},
        {"name": "symile", "config": str(ROOT / "configs" / "xor_symile.yaml"),
         "overrides": ["train.micro_batch_size=16", SMALL_BUCKET], "precisions": ["fp32"], "loss_rows": 256},
    ]


@pytest.fixture(scope="module")
def census(tmp_path_factory):
    from pretrain.plan.__main__ import main as plan_main

    tmp = tmp_path_factory.mktemp("plan")
    recipes = _recipes(tmp)
    (tmp / "census.json").write_text(json.dumps(recipes))
    run, probe = tmp / "run", tmp / "probe"
    # micro-batch 5 on 2 ranks over 48 samples in 8 shards: 24 per rank, so epoch 0 ends inside step 5
    args = tiny_overrides(ASSET_SHARDS, run, steps=5, micro_batch=5) + [
        "eval.enabled=false", "data.train.workers=0", "train.log_keys=true", "train.zero_stage=auto", SMALL_BUCKET]
    out = ok(torchrun(args, module="tests.faults", timeout=280,
                      env={"PRETRAIN_FAULT": f"record_memory:{probe}", "PRETRAIN_CENSUS": str(tmp / "census.json")}))
    records = [torch.load(f"{probe}.{r}", weights_only=False) for r in range(2)]
    # the plan of the same command line for the same world, as a tool reads it (--json on stdout)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert plan_main(["--config", str(QUICKSTART), *args, "--nodes", "1", "--gpus-per-node", "2", "--json"]) == 0
    return SimpleNamespace(run=run, out=out, records=records, recipes=recipes, plan=json.loads(printed.getvalue()),
                           checkpoints=Path(f"{probe}.ckpt"))


@functools.cache
def _counted(config: str, overrides: tuple[str, ...]):
    cfg = load_config(config, list(overrides))
    return cfg, count_model(cfg)


def _planned(cfg, counted, stage: int, precision: str, world: int = 2):
    return model_states(counted.rows, stage, world, precision, cfg.train.optimizer, cfg.train.grad_accumulation_steps,
                        ZeroSettings.from_train(cfg.train, stage), counted.buffers)


@pytest.mark.slow
def test_model_states_per_stage_equal_the_engines_buffers(census):
    """Quickstart (fp32), an OpenCLIP recipe (bf16) and the Symile recipe (fp32) at every ZeRO
    stage on 2 ranks: the plan's weights, fp32 masters, gradients held after backward and copied to
    fp32 at the update, optimizer states and (ZeRO-3) reduction bucket equal, byte for byte, the
    storages the engines held, and the OpenCLIP recipe also built partitioned (``train.zero3_init``: open_clip
    makes a 0-dim temperature, which DeepSpeed cannot partition alone) (the larger rank where they differ: ZeRO-1/2's gradient buffer holds
    the whole parameters that touch each rank's partition)."""
    compared = 0
    for recipe in census.recipes:
        cfg, counted = _counted(recipe["config"], tuple(recipe["overrides"]))
        for precision in recipe["precisions"]:
            for stage in [*STAGES, *(["3i"] if recipe.get("zero3_init") else [])]:
                key = f"{recipe['name']}/{stage}/{precision}"
                ranks = [measured_parts(r["census"][key]) for r in census.records]
                measured = {part: max(m[part] for m in ranks) for part in ranks[0]}
                stage = 3 if stage == "3i" else stage  # built partitioned: the same states as ZeRO-3
                s = _planned(cfg, counted, stage, precision)
                planned = {"weights": s.weights, "masters": s.masters, "grads_held": s.grads_held,
                           "grads_update": s.grads_update, "optimizer": s.optimizer,
                           "bucket": s.bucket if stage == 3 else 0}  # ZeRO-1/2's bucket lives during backward only
                assert planned == measured, key
                assert measured["weights"] > 0 and measured["optimizer"] > 0, key
                compared += 1
    assert compared == 13
    # the run's own engine (train.zero_stage auto chose ZeRO-0 in fp32: pretrain.gradsync's buckets)
    cfg, counted = _counted(str(QUICKSTART), tuple(QUICKSTART_TINY))
    s = _planned(cfg, counted, 0, "fp32")
    run = measured_parts(census.records[0]["run"])
    assert (run["weights"], run["grads_held"], run["optimizer"]) == (s.weights, s.grads_held, s.optimizer)


@pytest.mark.slow
def test_checkpoint_size_on_disk(census):
    """The plan's checkpoint size is the tensors DeepSpeed writes (weights, masters, moments, buffers);
    the files hold that plus pickling (a few KiB per file and per tensor)."""
    for recipe in census.recipes:
        cfg, counted = _counted(recipe["config"], tuple(recipe["overrides"]))
        for precision in recipe["precisions"]:
            for stage in STAGES:
                files = list((census.checkpoints / recipe["name"] / f"{stage}-{precision}").iterdir())
                disk = sum(f.stat().st_size for f in files)
                planned = _planned(cfg, counted, stage, precision).checkpoint
                assert planned <= disk <= planned * 1.04 + 32 * 1024 * len(files), (recipe["name"], stage, precision)


@pytest.mark.slow
def test_loss_buffers_equal_a_real_distributed_loss(census):
    """The loss layer's buffers the plan simulates (meta device, gathers simulated) against the same
    objective run for real on 2 ranks over gloo, 256 rows per rank: CLIP's logits, Symile's three anchors."""
    for recipe in census.recipes:
        cfg, counted = _counted(recipe["config"], tuple(recipe["overrides"]))
        from pretrain.data import build_modalities

        planned, how = loss_buffers(cfg, counted, build_modalities(cfg.data, train=True), recipe["loss_rows"], 2)
        measured = max(r["census"][f"{recipe['name']}/loss"] for r in census.records)
        print(f"loss buffers of {recipe['name']}: planned {planned}, measured {measured} bytes")
        assert how == "meta" and planned == pytest.approx(measured, rel=0.02), recipe["name"]


@pytest.mark.slow
def test_epoch_arithmetic_equals_the_run(census):
    """Steps per epoch, samples per rank x worker and the steps where epoch 0 ends and epoch 1 begins, as
    the plan printed them, against the run's logged sample keys and the epoch each was read in."""
    epoch = census.plan["epoch"]
    assert epoch["samples"] == 48 and epoch["steps_per_epoch"] == 48 // 10
    steps = {}
    for rank in range(2):
        for line in (census.run / "keys" / f"rank{rank}.jsonl").read_text().splitlines():
            row = json.loads(line)
            steps.setdefault(row["step"], []).extend(zip(row["keys"], row["epochs"]))
    first_epoch1 = min(s for s, pairs in steps.items() if any(e == 1 for _, e in pairs))
    epoch0 = [k for s in sorted(steps) for k, e in steps[s] if e == 0]
    done = max(s for s, pairs in steps.items() if any(e == 0 for _, e in pairs))
    assert (epoch["epoch0_done_at"], epoch["epoch1_starts_at"]) == (done, first_epoch1) == (5, 5)
    assert len(epoch0) == len(set(epoch0)) == 48  # every sample of epoch 0 once
    per_rank = [sum(1 for line in (census.run / "keys" / f"rank{r}.jsonl").read_text().splitlines()
                    for e in json.loads(line)["epochs"] if e == 0) for r in range(2)]
    assert tuple(epoch["slot_samples"]) == (min(per_rank), max(per_rank)) == (24, 24)


@pytest.mark.slow
def test_zero_stage_auto_picks_the_plans_stage(census):
    """train.zero_stage=auto: the run's start line names the stage the plan printed and why; its
    config.yaml records the stage (a run resumed from it, or from its config.yaml, keeps it: the
    resume reads the checkpoint's stage when the world size is the same)."""
    import yaml

    from pretrain.checkpoint import previous_layout
    from pretrain.trainer import TrainConfig

    choice = census.plan["choice"]
    assert choice in STAGES
    line = next(x for x in census.out.splitlines() if "train.zero_stage auto" in x)
    assert f"auto -> ZeRO-{choice}: the fastest stage that fits" in line
    assert f"zero_stage={choice} " in census.out
    saved = yaml.safe_load((census.run / "config.yaml").read_text())
    assert saved["train"]["zero_stage"] == choice
    folder, layout = previous_layout(TrainConfig(), census.run / "checkpoints")
    assert layout.zero_stage == choice and layout.world_size == 2 and folder.name == "step000005"


def test_the_plan_chooses_the_fastest_stage_that_fits_and_respects_lamb():
    """At a memory between two stages' totals the plan picks the faster one that fits, names the
    faster ones that do not, and with LAMB only ZeRO-0 is allowed (the training config's own rule)."""
    cfg, counted = _counted(str(QUICKSTART), tuple(QUICKSTART_TINY))
    plan = make_plan(cfg, 4, 8, 80 * GIB, "80 GiB", counted=counted)
    totals = {s: plan.stages[s].total for s in STAGES}
    assert plan.choice == 0 and "ZeRO-0: the fastest stage that fits" in plan.reason
    # a memory where ZeRO-0 does not fit and a later stage, smaller, does
    target = min(s for s in STAGES if totals[s] < totals[0])
    choice, why = choose(plan.stages, int(totals[target] / 0.9) + 1, 0.1)
    assert choice == target and "faster stages do not fit: ZeRO-0" in why, (totals, why)
    choice, why = choose(plan.stages, int(min(totals.values()) / 0.9) - 1, 0.1)
    assert choice is None and "no allowed stage fits" in why
    lamb = load_config(QUICKSTART, QUICKSTART_TINY + ["train.optimizer=lamb", "train.zero_stage=auto"])
    assert [stage_refusal(lamb.train, s) == "" for s in STAGES] == [True, False, False, False]
    plan = make_plan(lamb, 1, 2, 80 * GIB, "80 GiB", counted=counted)
    assert plan.choice == 0 and "not allowed: ZeRO-1 (lamb needs ZeRO-0" in plan.reason
    with pytest.raises(ConfigError, match=r"^train\.optimizer: lamb"):
        load_config(QUICKSTART, QUICKSTART_TINY + ["train.optimizer=lamb", "train.zero_stage=2"])


def test_an_openclip_recipe_at_full_size_is_counted_on_the_meta_device_in_seconds():
    """configs/openclip_vit_b32.yaml as printed (ViT-B-32 both towers): built on the meta device in
    seconds, as many parameters as open_clip's own model; its LAION shards are not on this machine and
    are not opened: the epoch is not computed and the plan says so."""
    start = time.perf_counter()
    cfg = load_config(ROOT / "configs" / "openclip_vit_b32.yaml")
    plan = make_plan(cfg, 16, 8, 80 * GIB, "H100-80GB", config="configs/openclip_vit_b32.yaml")
    assert time.perf_counter() - start < 60
    c = plan.counted
    assert c.total == 151_277_313 and all(t.built == "meta" for t in c.towers)  # open_clip.create_model's count
    assert {t.modality: t.params for t in c.towers} == {"image": 87_849_216, "text": 63_428_096}
    assert plan.batch["global_batch"] == 32768 and plan.negatives.startswith("32,767 per positive")
    assert plan.epoch.steps_per_epoch is None and "not on this machine" in plan.epoch.note
    assert "give data.train.samples" in plan.epoch.note
    assert plan.choice in STAGES and plan.stages[plan.choice].fits
    for part in ("weights", "activations", "loss", "inputs"):
        assert plan.stages[0].parts[part] > 0
    # with a sample count the epoch follows: 400M samples / 32768 per step
    cfg = load_config(ROOT / "configs" / "openclip_vit_b32.yaml", ["data.train.samples=400000000"])
    from pretrain.plan import epoch_figures

    assert epoch_figures(cfg, 128).steps_per_epoch == 400_000_000 // 32768


def test_the_zero_settings_default_to_deepspeeds_own():
    """The ZeRO settings the plan reads default to DeepSpeed's own config class's values, and
    ``train.deepspeed.zero_optimization`` (DeepSpeed's aliases included) sets them."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from pretrain.plan import ZERO_KEYS

    cfg = load_config(QUICKSTART, ["data.train.urls=x.tar"])
    for stage in STAGES:
        ours, theirs = ZeroSettings.from_train(cfg.train, stage), DeepSpeedZeroConfig(stage=stage)
        for name in ZERO_KEYS:
            assert getattr(ours, name) == getattr(theirs, name), (stage, name)
    extra = {"stage3_param_persistence_threshold": 7, "reduce_bucket_size": 1000, "overlap_comm": True}
    cfg = load_config(QUICKSTART, ["data.train.urls=x.tar", f"train.deepspeed={json.dumps({'zero_optimization': extra})}"])
    ours = ZeroSettings.from_train(cfg.train, 2)
    assert (ours.param_persistence_threshold, ours.reduce_bucket_size, ours.overlap_comm) == (7, 1000, True)


def test_the_plans_model_states_against_deepspeeds_estimators():
    """DeepSpeed's own estimators (``estimate_zero2/3_model_states_mem_needs_all_live``: they print a
    table for a real model) against the plan, bf16, 8 ranks. Their assumptions differ from the engine's
    actual layout, so only comparable quantities are compared:

    - ZeRO-2: theirs is 2 bytes/param of 16-bit weights plus 18/ranks (2 16-bit gradients + 4 fp32
      gradients + 4 fp32 master weights + 8 fp32 Adam moments). The plan counts the 16-bit gradients
      held as the whole parameters touching a partition, and the fp32 copies one group at a time (the
      engine's step), so the comparable part is weights + masters + moments: 2 + 12/ranks per param.
    - ZeRO-3: theirs is 4 bytes x the largest layer (its 16-bit weights and gradients gathered) plus
      18/ranks (2 16-bit weight partition + 16: masters, moments, fp32 gradients). With DeepSpeed's
      persistence of small parameters switched off (they assume none), weights + masters + moments
      are 14/ranks in both.
    """
    from deepspeed.runtime.zero.stage3 import (
        estimate_zero3_model_states_mem_needs, estimate_zero3_model_states_mem_needs_all_live,
    )
    from deepspeed.runtime.zero.stage3 import model_to_params as layers
    from deepspeed.runtime.zero.stage_1_and_2 import (
        estimate_zero2_model_states_mem_needs, estimate_zero2_model_states_mem_needs_all_live,
    )

    from pretrain.data import build_modalities
    from pretrain.models import build_model

    cfg = load_config(QUICKSTART, QUICKSTART_TINY + [
        "train.precision=bf16", "train.deepspeed={zero_optimization: {stage3_param_persistence_threshold: 0}}"])
    real = build_model(cfg.model, build_modalities(cfg.data, train=True), objective=cfg.loss.build())
    estimate_zero2_model_states_mem_needs_all_live(real, num_gpus_per_node=8)  # prints their table
    estimate_zero3_model_states_mem_needs_all_live(real, num_gpus_per_node=8)
    total, largest = layers(real)
    counted = count_model(cfg)
    assert counted.total == total
    _, gpu2 = estimate_zero2_model_states_mem_needs(total, 8, 1, cpu_offload=False)
    _, gpu3, largest_mem = estimate_zero3_model_states_mem_needs(total, largest, 8, 1, cpu_offload=False,
                                                                 cpu_offload_params=False)
    z2 = model_states(counted.rows, 2, 8, "bf16", "adamw", 1, ZeroSettings.from_train(cfg.train, 2))
    theirs2 = gpu2 - int(6 * total / 8)  # less their gradients (2 + 4 bytes per param over the ranks)
    assert z2.weights + z2.masters + z2.optimizer == pytest.approx(theirs2, rel=2e-4)
    z3 = model_states(counted.rows, 3, 8, "bf16", "adamw", 1, ZeroSettings.from_train(cfg.train, 3))
    theirs3 = gpu3 - largest_mem - int(4 * total / 8)  # less the gathered layer and the fp32 gradients
    assert z3.weights + z3.masters + z3.optimizer == pytest.approx(theirs3, rel=2e-4)
    # their fp32 gradients (4/ranks) bound the plan's copies, made one group at a time
    assert 0 < z2.grads_update <= 4 * total / 8 * (1 + 1e-3)


def test_the_symile_recipe(tmp_path):
    """configs/xor_symile.yaml: three MLP towers and Symile's O(N) negatives; its shards are not built
    here, so the plan says the epoch is unknown; the loss buffers grow with the global batch."""
    cfg = load_config(ROOT / "configs" / "xor_symile.yaml")
    plan = make_plan(cfg, 1, 2, 8 * GIB, "8 GiB")
    assert [t.modality for t in plan.counted.towers] == ["a", "b", "c"]
    from pretrain.data import build_modalities
    from pretrain.models import build_model

    real = build_model(cfg.model, build_modalities(cfg.data, train=True), objective=cfg.loss.build())
    assert plan.counted.total == sum(p.numel() for p in real.parameters())
    assert plan.negatives.startswith("255 per anchor row")
    assert plan.epoch.samples is None and "not on this machine" in plan.epoch.note
    wider = make_plan(load_config(ROOT / "configs" / "xor_symile.yaml", ["train.micro_batch_size=512"]), 1, 2,
                      8 * GIB, "8 GiB", counted=plan.counted)
    assert wider.loss_bytes > 10 * plan.loss_bytes  # rows x global batch: 16x the elements
    squared = load_config(ROOT / "configs" / "xor_symile.yaml", ["loss.negative_sampling=n_squared"])
    assert make_plan(squared, 1, 2, 8 * GIB, "8 GiB", counted=plan.counted).negatives.startswith("65,535 per")


def test_bad_configs_and_flags_give_the_training_errors(capsys):
    """A bad key or value stops the plan as it stops training: the same message, exit code 2; bad flags too."""
    from pretrain.plan.__main__ import main as plan_main
    from pretrain.train import main as train_main

    for override in ("train.stepz=5", "train.zero_stage=4", "loss.name=triplet", "train.zero3_init=true"):
        assert train_main(["--config", str(QUICKSTART), override]) == 2
        trained = capsys.readouterr().err.strip().splitlines()[-1]
        assert plan_main(["--config", str(QUICKSTART), override, "--gpus-per-node", "2"]) == 2
        planned = capsys.readouterr().err.strip().splitlines()[-1]
        assert planned == trained and planned.startswith("config error: " + override.split("=")[0]), (planned, trained)
    assert plan_main(["--config", str(QUICKSTART), "--gpu", "Z80"]) == 2
    assert "--gpu Z80: is not in the table" in capsys.readouterr().err
    assert plan_main(["--config", str(ROOT / "nowhere.yaml")]) == 2
    assert "config error: --config: no such file" in capsys.readouterr().err


def test_a_tower_that_refuses_the_meta_device_is_built_for_real_and_said_so():
    """A tower whose library needs real tensors while it is built (here: one that reads a value) is
    built for real, alone; the rest of the model stays on the meta device; the plan says which."""
    from pretrain.models import TOWERS
    from pretrain.models.towers import MLP

    class ReadsAValue(MLP):
        def __init__(self, options, ctx):
            super().__init__(options, ctx)
            float(torch.ones(1).sum())  # a host read: impossible on the meta device

    TOWERS.register("plan_test_reads_a_value", ReadsAValue, replace=True)
    cfg = load_config(ROOT / "configs" / "xor_symile.yaml", ["model.towers.b.type=plan_test_reads_a_value"])
    counted = count_model(cfg)
    built = {t.modality: t.built for t in counted.towers}
    assert built == {"a": "meta", "b": "real (CPU)", "c": "meta"}
    assert any("model.towers.b: built for real" in n for n in counted.notes)
    assert counted.total == count_model(load_config(ROOT / "configs" / "xor_symile.yaml")).total
    plan = make_plan(cfg, 1, 2, 8 * GIB, "8 GiB", counted=counted)
    assert "real build" in next(a.how for a in plan.activations if a.modality == "b")
