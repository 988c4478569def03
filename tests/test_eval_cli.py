"""`python -m pretrain.eval` end to end: the CLI under torchrun with 2 ranks (one of which embeds
no probe-training sample) on a tiny CLIP run's checkpoint (tests/assets/run_v1: 2 steps, written by
an earlier version): every task, the JSON file, the plots, the summary; bad input stops with a
message."""
import json
import shutil

import pytest
from PIL import Image

from tests.helpers import ASSETS, PYTHON, free_port, ok, run_cmd, run_cmds

pytestmark = pytest.mark.slow


def test_eval_cli_on_a_trained_checkpoint(tmp_path):
    run = tmp_path / "run"  # a copy: the CLI writes its results into the run folder
    shutil.copytree(ASSETS / "run_v1", run)
    ckpt = run / "checkpoints" / "step000002"
    out = ok(run_cmd([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                      "-m", "pretrain.eval", "--checkpoint", str(ckpt),
                      "eval.tasks=[zeroshot,retrieval,symile,linear_probe]", "eval.symile.candidates=3",
                      "eval.linear_probe.max_train_samples=1", "eval.chunk_size=5",
                      "eval.classnames=[a, b, c, d]", "eval.templates=['class number {}']"], timeout=300))
    result = json.loads((run / "eval" / "step000002.json").read_text())
    assert result["step"] == 2 and result["eval/samples"] == 12  # both ranks' parts gathered
    for key in ("eval/zeroshot/image/top1", "eval/zeroshot/image/top4", "eval/retrieval/image_to_text/r1",
                "eval/retrieval/text_to_image/r10", "eval/retrieval_class/image_to_text/r5", "eval/symile/text/r1",
                "eval/symile/image/r5", "eval/linear_probe/image/top1", "eval/zeroshot_top1", "eval/i2t_r1",
                "eval/t2i_r1"):
        assert 0.0 <= result[key] <= 1.0, key
    assert 1.0 <= result["eval/retrieval/image_to_text/median_rank"] <= 12.0
    assert result["eval/zeroshot/image/top1/chance"] == 0.25 and result["eval/symile/text/candidates"] == 4
    assert result["eval/retrieval/image_to_text/r1/chance"] == pytest.approx(1 / 12)
    assert result["eval/linear_probe/text/train_samples"] == 1  # rank 0's one sample; rank 1 had none
    assert out.count("[eval] held-out samples: 12") == 1  # rank 0 prints
    (line,) = [l for l in out.splitlines() if "zero-shot image top-1" in l]  # each figure printed once
    assert "(chance 25.00%)" in line and f"{run}/eval/step000002.json" in out
    for png in ("recall_vs_step.png", "similarity_step000002.png"):
        with Image.open(run / "eval" / "plots" / png) as img:
            assert img.width > 100
    # a run folder resolves to its newest checkpoint; bad input is named
    from pretrain.checkpoint import find_checkpoint
    from pretrain.eval import main

    found = find_checkpoint(run)
    assert (found.folder, found.step) == (ckpt, 2)
    assert main(["--checkpoint", str(tmp_path / "nope")]) == 2
    assert main(["--checkpoint", str(ckpt), "eval.symile.candidates=-1"]) == 2
    assert main(["--checkpoint", str(ckpt), "eval.retrieval.pairs=[[image,audio]]"]) == 2


def test_several_evaluation_datasets_in_one_run(tmp_path):
    """eval.datasets beside data.val: each reports its own metrics (eval/<name>/...) in the JSON and
    the printout; class names from a file, templates by name, every caption of a sample retrieved."""
    import json as _json

    from tests.helpers import ASSETS, png_bytes, write_shard

    caps = [(f"c{i}", {"png": png_bytes(i), "json": _json.dumps({"captions": [f"class number {i % 4}", f"number {i}",
                                                                               "a picture"][: 1 + i % 3]}).encode()})
            for i in range(10)]
    write_shard(tmp_path / "caps" / "caps-000000.tar", caps)
    (tmp_path / "names.txt").write_text("zero\none\ntwo\nthree\n")
    datasets = _json.dumps([
        {"name": "digits", "urls": str(ASSETS / "shards" / "val" / "shard-{000000..000001}.tar"),
         "tasks": ["zeroshot"], "classnames": str(tmp_path / "names.txt"), "templates": "simple_imagenet"},
        {"name": "caps", "urls": str(tmp_path / "caps" / "caps-000000.tar"), "tasks": ["retrieval"],
         "captions": "all", "max_captions": 3},
    ])
    out = ok(run_cmd([PYTHON, "-m", "pretrain.eval", "--checkpoint", str(ASSETS / "run_v1"), "--output",
                      str(tmp_path / "ev"), "eval.plots=false", f"eval.datasets={datasets}"], timeout=300))
    result = _json.loads((tmp_path / "ev" / "eval" / "step000002.json").read_text())
    assert result["eval/samples"] == 12 and result["eval/digits/samples"] == 12 and result["eval/caps/samples"] == 10
    assert result["eval/digits/zeroshot/image/top1/chance"] == 0.25 and "eval/digits/retrieval/image_to_text/r1" not in result
    assert result["eval/caps/retrieval/text_to_image/queries"] == sum(1 + i % 3 for i in range(10))  # every caption
    assert result["eval/caps/retrieval/image_to_text/queries"] == 10
    assert result["eval/caps/retrieval/text_to_image/r1/chance"] == pytest.approx(1 / 10)
    (line,) = [l for l in out.splitlines() if "digits: zero-shot image top-1" in l]
    assert "(chance 25.00%)" in line and "[eval] caps: samples: 10" in out and "caps: text->image R@1" in out


def _metrics(path) -> dict:
    (found,) = list(path.glob("eval/step*.json")) if path.is_dir() else [path]
    return {k: v for k, v in json.loads(found.read_text()).items() if k.startswith("eval/") and k != "eval/seconds"}


def test_every_rank_holds_one_model_so_every_evaluation_agrees(uninterrupted_run, tmp_path):
    """2 ranks with BatchNorm towers: every rank's buffers are rank 0's at each save, so the in-training
    evaluation equals, metric for metric, pretrain.eval of the checkpoint on 1 and on 2 ranks and of
    the native export."""
    import torch

    from pretrain.export import main as export

    probe = uninterrupted_run.parent / "buffers"
    for step in (2, 4, 6):
        ranks = [torch.load(probe / f"step{step}.rank{r}.pt") for r in range(2)]
        assert any("running_mean" in k for k in ranks[0]), sorted(ranks[0])
        for name, value in ranks[0].items():
            assert torch.equal(ranks[1][name], value), (step, name)
    first, last = (torch.load(probe / f"step{s}.rank0.pt") for s in (2, 6))
    assert any(not torch.equal(first[k], last[k]) for k in first if "running_mean" in k)  # the statistics moved

    assert export(["--checkpoint", str(uninterrupted_run), "--output", str(tmp_path / "exported")]) == 0
    one, two, exported = tmp_path / "one", tmp_path / "two", tmp_path / "from_export"
    procs = run_cmds([
        [PYTHON, "-m", "pretrain.eval", "--checkpoint", str(uninterrupted_run), "--output", str(one), "eval.plots=false"],
        [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", "-m",
         "pretrain.eval", "--checkpoint", str(uninterrupted_run), "--output", str(two), "eval.plots=false"],
        [PYTHON, "-m", "pretrain.eval", "--checkpoint", str(tmp_path / "exported"), "--output", str(exported),
         "eval.plots=false"]], timeout=300)
    for proc in procs:
        ok(proc)
    during = _metrics(uninterrupted_run / "eval.json")
    assert len(during) > 20 and "eval/zeroshot/image/top1" in during
    for after in (one, two, exported):
        got = _metrics(after)
        assert got.keys() == during.keys(), (after.name, sorted(got.keys() ^ during.keys()))
        differ = {k: (during[k], got[k]) for k in during if got[k] != during[k]}
        assert not differ, (after.name, differ)
