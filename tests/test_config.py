import pytest

from pretrain.config import Config, ConfigError, load_config
from tests.helpers import PYTHON, ROOT, run_cmd

QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def test_quickstart_loads_with_overrides():
    cfg = load_config(QUICKSTART, ["train.steps=7", "data.train.urls=[a.tar, b.tar]", "train.lr=1e-4"])
    assert isinstance(cfg, Config)
    assert cfg.train.steps == 7
    assert cfg.data.train.urls == ["a.tar", "b.tar"]
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.loss.name == "clip"


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.stepz=5", "train.stepz"),
        ("bogus=1", "bogus"),
        ("model.towers.text.options.depth=3", "model.towers.text.options.depth"),
        ("model.towers.text.colour=red", "model.towers.text.colour"),
    ],
)
def test_unknown_key_is_named(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, [override])
    assert str(err.value).startswith(f"{key}: unknown key")


@pytest.mark.parametrize(
    "override, key, words",
    [
        ("train.steps=ten", "train.steps", "expected an integer"),
        ("train.steps=2.5", "train.steps", "expected an integer"),
        ("train.lr=fast", "train.lr", "expected a number"),
        ("train.checkpoint=maybe", "train.checkpoint", "expected true or false"),
        ("loss.name=triplet", "loss.name", "unknown loss 'triplet'"),
        ("train.steps=0", "train.steps", "must be > 0"),
        ("data.train.urls=5", "data.train.urls", "expected"),
        ("train.zero_stage=4", "train.zero_stage", "must be 0, 1, 2 or 3"),
    ],
)
def test_bad_value_is_named(override, key, words):
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, [override])
    msg = str(err.value)
    assert msg.startswith(f"{key}:"), msg
    assert words in msg, msg


def test_bad_yaml_file_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  micro_batch_size: 4\n  warmup: 3\n")
    with pytest.raises(ConfigError, match=r"^train\.warmup: unknown key"):
        load_config(bad, ["data.train.urls=x.tar"])


def test_cli_stops_with_clear_message():
    proc = run_cmd([PYTHON, "-m", "pretrain.train", "--config", str(QUICKSTART), "train.micro_batch=3"], timeout=120)
    assert proc.returncode == 2
    assert "config error: train.micro_batch: unknown key" in proc.stderr
    proc = run_cmd([PYTHON, "-m", "pretrain.train", "--config", str(QUICKSTART), "train.steps=many"], timeout=120)
    assert proc.returncode == 2
    assert "config error: train.steps: expected an integer, got 'many'" in proc.stderr


def test_a_tools_main_called_from_python_leaves_the_garbage_collector_alone():
    """The collector is frozen (for a prompt exit) only by the __main__ block's exit_process, never
    by main() itself, and start-up's pause gives it back."""
    import gc

    from pretrain.eval import main as eval_main
    from pretrain.train import main as train_main

    before = gc.get_freeze_count()
    assert train_main(["--config", str(QUICKSTART), "train.steps=many"]) == 2  # config error: exit code 2
    assert eval_main(["--checkpoint", "/no/such/run"]) == 2
    assert gc.get_freeze_count() == before and gc.isenabled()


def test_loss_options_validated_against_the_named_loss():
    cfg = load_config(QUICKSTART, ["loss.name=clip_lite", "loss.negative=local"])
    assert cfg.loss.name == "clip_lite" and cfg.loss.options.negative == "local"
    with pytest.raises(ConfigError, match=r"^loss\.negative: not an option of clip \(its options: anchor\)"):
        load_config(QUICKSTART, ["loss.negative=local"])
    with pytest.raises(ConfigError, match=r"^loss\.negative_sampling: must be one of 'n', 'n_squared'"):
        load_config(QUICKSTART, ["loss.name=symile", "loss.negative_sampling=all"])


@pytest.mark.parametrize("name, kind, procs", [("cpu_2proc", "MULTI_GPU", 2), ("gpu_1", "NO", 1), ("gpu_8", "MULTI_GPU", 8)])
def test_accelerate_configs_load_with_accelerate(name, kind, procs):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(QUICKSTART.parent / "accelerate" / f"{name}.yaml"))
    assert (cfg.distributed_type.value, cfg.num_processes) == (kind, procs)
    assert cfg.mixed_precision == "no"  # precision is the training config's (train.precision)


def test_deepspeed_extras_merge_and_owned_keys_are_refused():
    from pretrain.engine import deepspeed_config

    cfg = load_config(QUICKSTART, ["train.deepspeed={zero_optimization: {overlap_comm: true}, steps_per_print: 7}",
                                   "train.zero_stage=1", "train.grad_accumulation_steps=3"])
    ds = deepspeed_config(cfg.train, world_size=2)
    assert ds["zero_optimization"] == {"stage": 1, "overlap_comm": True} and ds["steps_per_print"] == 7
    assert ds["train_batch_size"] == cfg.train.micro_batch_size * 3 * 2 and ds["gradient_accumulation_steps"] == 3
    for extra, key in [("{train_batch_size: 4}", "train.deepspeed.train_batch_size: set by train.micro_batch_size"),
                       ("{zero_optimization: {stage: 3}}", "train.deepspeed.zero_optimization.stage: set by train.zero_stage")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(QUICKSTART, [f"train.deepspeed={extra}"])


def test_a_module_in_data_imports_registers_a_loss_and_an_evaluation_task(tmp_path, monkeypatch):
    """Every registry works the same way: a plugin module named in data.imports registers a loss (with
    its own options) and an evaluation task; sections that name them may come before data."""
    (tmp_path / "my_plugin.py").write_text(
        "from dataclasses import dataclass\n"
        "from pretrain.evaluation import Evaluator, register_evaluator\n"
        "from pretrain.losses import LOSSES, ClipLoss\n"
        "from pretrain.options import require\n\n"
        "@LOSSES.register('scaled_clip')\n"
        "class ScaledClip(ClipLoss):\n"
        "    @dataclass\n"
        "    class Options:\n"
        "        factor: float = 1.0\n"
        "        def check(self, key):\n"
        "            require(self.factor > 0, f'{key}.factor', 'must be > 0')\n"
        "\n"
        "@register_evaluator('count')\n"
        "class Count(Evaluator):\n"
        "    def run(self, ctx):\n"
        "        return {'eval/count': float(len(ctx.val))}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from pretrain.config import config_from_dict

    tree = {"loss": {"name": "scaled_clip", "factor": 2.0}, "eval": {"tasks": ["count"]},
            "data": {"train": {"urls": "x.tar"}, "imports": ["my_plugin"]}}
    cfg = config_from_dict(tree)
    assert cfg.loss.build().factor == 2.0 and cfg.loss.options.factor == 2.0
    from pretrain.evaluation import planned_tasks

    assert planned_tasks(cfg, ["image", "text"]) == ["count"]
    with pytest.raises(ConfigError, match=r"^loss\.factor: must be > 0"):
        config_from_dict({**tree, "loss": {"name": "scaled_clip", "factor": -1}})
    with pytest.raises(ConfigError, match=r"^loss\.scale: not an option of scaled_clip \(its options: factor\)"):
        config_from_dict({**tree, "loss": {"name": "scaled_clip", "scale": 1}})


def test_zero_stage_auto_is_accepted_for_that_key_only():
    """train.zero_stage takes 0-3 or auto (the plan's choice at start); anything else, and auto for
    another key or beside train.zero3_init (which needs ZeRO-3 named), is refused naming the key."""
    assert load_config(QUICKSTART, ["train.zero_stage=auto"]).train.zero_stage == "auto"
    assert load_config(QUICKSTART, ["train.zero_stage=auto", "train.optimizer=lamb"]).train.zero_stage == "auto"
    for override, key in [("train.zero_stage=automatic", "train.zero_stage"), ("train.zero_stage=true", "train.zero_stage"),
                          ("train.steps=auto", "train.steps"), ("train.precision=auto", "train.precision")]:
        with pytest.raises(ConfigError, match=rf"^{key}:"):
            load_config(QUICKSTART, [override])
    with pytest.raises(ConfigError, match=r"^train\.zero3_init: goes with train\.zero_stage=3 \(auto"):
        load_config(QUICKSTART, ["train.zero_stage=auto", "train.zero3_init=true"])
