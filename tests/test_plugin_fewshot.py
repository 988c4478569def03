"""An evaluation task as a plugin (issue 25.2): ``tests/plugins/fewshot.py``, loaded through
``data.imports`` without editing ``pretrain/``, brings its own options (``eval.fewshot.*``, typed,
checked, errors naming the key), its checks and its printed figures; a tiny training run prints them
under the plugin's labels and writes them to metrics.jsonl and TensorBoard, and
``python -m pretrain.eval`` of the run's checkpoint gives the same figures."""
import json

import pytest
import torch

from tests.helpers import ASSET_SHARDS, PYTHON, QUICKSTART, ok, run_cmd, run_cmds, single_cmd, tiny_overrides

PLUGIN = ["data.imports=[tests.plugins.fewshot]"]


def test_prototype_accuracy_separable_and_shuffled():
    from tests.plugins.fewshot import prototype_accuracy

    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 32, generator=g) * 4
    y = torch.arange(5).repeat_interleave(12)
    x = centers[y] + torch.randn(60, 32, generator=g)
    res = prototype_accuracy(x, y, shots=1, trials=4, generator=torch.Generator().manual_seed(1))
    assert res["accuracy"] > 0.95 and res["classes"] == 5 and res["queries"] == 55
    # labels that carry nothing about the features: near chance (1/5)
    noise = prototype_accuracy(x, y[torch.randperm(60, generator=g)], 5, 20, torch.Generator().manual_seed(1))
    assert noise["accuracy"] < 0.4 and noise["queries"] == 5 * 7
    # noise in 256 dimensions: a query never sees itself in a prototype (it would pick its own class)
    noise = prototype_accuracy(torch.randn(40, 256, generator=g), torch.arange(10).repeat_interleave(4), 1, 10,
                               torch.Generator().manual_seed(2))
    assert noise["accuracy"] < 0.3 and noise["queries"] == 30 and noise["classes"] == 10
    # a class with k samples or fewer sits the trial out; one class left: nothing to measure
    assert prototype_accuracy(x[:13], y[:13], 1, 2, torch.Generator().manual_seed(0)) is None


@pytest.mark.parametrize("overrides, message", [
    (["eval.fewshot.shots=[1, x]"], "eval.fewshot.shots[1]: expected an integer, got 'x'"),
    (["eval.fewshot.shots=[]"], "eval.fewshot.shots: needs at least one k"),
    (["eval.fewshot.features=pooled"], "eval.fewshot.features: must be one of 'head', 'backbone'"),
    (["eval.fewshot=3"], "eval.fewshot: expected a mapping of fields"),
    (["eval.fewshot.modalities=[audio]"], "eval.fewshot.modalities[0]: no such modality in data.modalities (image, text)"),
    (["eval.tasks=[fewshot]", "data.labels=null"], "data.labels: few-shot probes need class labels"),
    (["eval.fewshots.shots=[1]"], "eval.fewshots: unknown key (did you mean fewshot? general options: "),
    (["eval.datasets=[{name: fewshot, urls: x.tar}]"], "eval.datasets[0].name: 'fewshot' is the name of evaluation metrics"),
])
def test_the_plugin_options_are_typed_and_checked_naming_the_key(tmp_path, overrides, message):
    from pretrain.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, tiny_overrides(ASSET_SHARDS, tmp_path, steps=1) + PLUGIN + overrides)
    assert str(err.value).startswith(message), str(err.value)


def test_figures_and_curves_come_from_the_task(tmp_path):
    """The printout and the plots' curves of a plugin task, per dataset, under its labels; its
    section is written only when set, so a process without the plugin reads a config without it."""
    from pretrain.config import load_config
    from pretrain.evaluation import format_metrics
    from pretrain.evaluation.plots import curves
    from pretrain.options import to_dict

    cfg = load_config(QUICKSTART, tiny_overrides(ASSET_SHARDS, tmp_path, steps=1) + PLUGIN)
    assert "fewshot" not in to_dict(cfg)["eval"] and cfg.eval.fewshot.shots == [1, 5, 10]
    cfg = load_config(QUICKSTART, tiny_overrides(ASSET_SHARDS, tmp_path, steps=1) + PLUGIN + ["eval.fewshot.trials=2"])
    assert to_dict(cfg)["eval"]["fewshot"]["trials"] == 2
    one = {"eval/fewshot/image/5shot": 0.5, "eval/fewshot/image/5shot/chance": 0.25,
           "eval/fewshot/image/5shot/classes": 4.0, "eval/fewshot/image/5shot/queries": 9.0}
    record = {"step": 3, "eval/samples": 12.0, **one, "eval/cifar/samples": 20.0,
              **{k.replace("eval/", "eval/cifar/"): v for k, v in one.items()}}
    assert curves([record]) == {"eval/cifar/fewshot/image/5shot": "cifar: few-shot image 4-way 5-shot",
                                "eval/fewshot/image/5shot": "few-shot image 4-way 5-shot"}
    assert [" ".join(line.split()) for line in format_metrics(record).splitlines()] == [
        "[eval] held-out samples: 12",
        "[eval] few-shot image 4-way 5-shot 50.00% (chance 25.00%)",
        "[eval] cifar: samples: 20",
        "[eval] cifar: few-shot image 4-way 5-shot 50.00% (chance 25.00%)"]


def _tb_scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_fewshot_plugin_trains_prints_logs_and_evaluates(tmp_path):
    run = tmp_path / "run"
    good = tiny_overrides(ASSET_SHARDS, run, steps=2) + PLUGIN + [
        "eval.tasks=[fewshot, zeroshot]", "eval.fewshot.shots=[1, 2]", "eval.fewshot.trials=3", "eval.plots=false"]
    bad = tiny_overrides(ASSET_SHARDS, tmp_path / "bad", steps=2) + PLUGIN + [
        "eval.tasks=[fewshot]", "eval.fewshot.shots=[0]"]
    trained, refused = run_cmds([single_cmd(good), single_cmd(bad)], timeout=300)
    out = ok(trained)

    # a bad option of the plugin stops at once, naming its key
    assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
    assert "eval.fewshot.shots[0]: must be > 0" in refused.stdout + refused.stderr
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()

    # the held-out split: 12 samples, 4 classes of 3: 1-shot leaves 8 queries, 2-shot 4
    keys = {1: 8, 2: 4}
    lines = [line for line in out.splitlines() if line.startswith("[eval] few-shot")]
    assert [line.split()[2:5] for line in lines] == [["image", "4-way", "1-shot"], ["image", "4-way", "2-shot"],
                                                    ["text", "4-way", "1-shot"], ["text", "4-way", "2-shot"]], out
    assert all("(chance 25.00%)" in line for line in lines) and "fewshot/" not in out.split("[eval] held-out")[-1]
    assert "zero-shot image top-1" in out  # the built-in task beside it prints as before

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (final,) = [r for r in rows if "eval/samples" in r]
    tb = _tb_scalars(run / "tensorboard")
    for m in ("image", "text"):
        for k, queries in keys.items():
            key = f"eval/fewshot/{m}/{k}shot"
            assert 0.0 <= final[key] <= 1.0 and final[key + "/chance"] == 0.25
            assert final[key + "/queries"] == queries and final[key + "/classes"] == 4
            printed = next(line for line in lines if f" {m} 4-way {k}-shot" in line)
            assert f"{100 * final[key]:6.2f}%" in printed
            assert tb[key] == [(final["step"], pytest.approx(final[key]))]

    # the written config carries the plugin's section and reloads; the CLI gives the same figures
    ev = ok(run_cmd([PYTHON, "-m", "pretrain.eval", "--checkpoint", str(run), "--output", str(tmp_path / "ev")],
                    timeout=300))
    (again,) = [json.loads(p.read_text()) for p in (tmp_path / "ev" / "eval").glob("step*.json")]
    for m in ("image", "text"):
        for k in keys:
            key = f"eval/fewshot/{m}/{k}shot"
            assert again[key] == pytest.approx(final[key], abs=1e-6), key
    assert [line for line in ev.splitlines() if line.startswith("[eval] few-shot")] == lines
