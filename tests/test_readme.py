"""Every fenced block of README.md and docker/README.md is run by a test: cheap ones as printed,
training ones with a tiny override, and those this CPU machine cannot run (docker, GPU nodes, a real
multi-node Slurm, pyxis) through ``--dry-run`` or the config validation they would meet first.
``CLAIMS`` names, for each block, the test that runs it and how; a block that no claim names fails
``test_every_readme_block_is_claimed``, so a README change brings its test with it.
"""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    ASSET_SHARDS, PYTHON, ROOT, free_port, ok, png_bytes, readme_block, readme_blocks, run_cmds,
    tiny_overrides, write, write_jsonl,
)

README = ROOT / "README.md"
DOCKER_README = ROOT / "docker" / "README.md"


@dataclass
class Claim:
    where: Path  # the README holding the block
    first_line: str  # a fragment of the block's first line
    test: str  # "test_name" here, or "tests/test_x.py::test_name"
    how: str  # as printed, tiny override, dry run, validation: and why not as printed


CLAIMS = [
    Claim(README, "make demo", "tests/test_demo.py::test_make_demo_learns",
          "`make demo` at 80 steps (DEMO_ARGS); `make test` is the command running this suite "
          "(test_make_targets_exist checks both targets with make -n)"),
    Claim(README, "accelerate launch --config_file", "test_workstation_launchers_train",
          "each of the three launchers as printed, with a tiny model, the committed shards and 2 steps"),
    Claim(README, "from pretrain.export import Embedder", "test_embedder_snippet",
          "as printed, in a folder holding exported/ (a tiny run's export) and digit.png"),
    Claim(README, "python -m launch.slurm --config configs/quickstart.yaml train.steps=20000",
          "test_slurm_commands_dry_run", "--dry-run: the GPU nodes and the cluster are not here"),
    Claim(README, "--nodes 1 --gpus-per-node 8 --partition gpu", "test_slurm_commands_dry_run",
          "--dry-run: the GPU partition is not here"),
    Claim(README, "docker run --gpus all", "test_docker_command_validates",
          "no docker and no GPU here: the torchrun command's config is validated as the container would"),
    Claim(README, "python -m launch.slurm --config configs/quickstart.yaml --nodes 2 --gpus-per-node 8 --partition gpu",
          "test_slurm_commands_dry_run", "--dry-run: pyxis, enroot and the GPU nodes are not here"),
    Claim(README, "python -m data_tools build", "test_shard_cli_commands", "as printed, on a small manifest"),
    Claim(README, "$ python -m pretrain.train", "test_config_error_example",
          "as printed: the exit code and the message shown"),
    Claim(README, "$ python -m pretrain.plan", "test_plan_example",
          "as printed: the output shown, line for line (the recipe's LAION shards are not here: the plan says so)"),
    Claim(README, "model:", "test_init_from_yaml_validates",
          "validated: the ViT-B-32 checkpoint at /ckpt is not here"),
    Claim(README, "# per-part optimizer groups", "test_optimizer_groups_yaml_validates",
          "validated: the ViT-B/16 and BERT weights are not here (tests/test_optim_groups.py trains with groups)"),
    Claim(README, "import open_clip", "tests/test_interop_openclip.py::test_fine_tune_on_two_ranks_then_open_clip_loads_the_export",
          "as printed, DIR the open_clip export of a tiny fine-tune, beside digit.png"),
    Claim(README, "from transformers import AutoModel, AutoProcessor",
          "tests/test_interop_hf.py::test_a_checkpoint_trained_on_two_ranks_exports_as_a_clip_model_folder",
          "as printed, DIR the hf export of a tiny fine-tune, beside digit.png"),
    Claim(README, "from transformers import pipeline",
          "tests/test_interop_hf.py::test_a_checkpoint_trained_on_two_ranks_exports_as_a_clip_model_folder",
          "as printed, DIR the hf export of a tiny fine-tune, beside digit.png"),
    Claim(README, "python -m pretrain.export --checkpoint runs/demo --output demo_open_clip",
          "tests/test_demo.py::test_make_demo_learns",
          "as printed, runs/demo the demo's own run (80 steps), then open_clip's and transformers' loaders on them"),
    Claim(README, "from pretrain.losses import build_loss", "test_loss_snippet",
          "as printed, with features of 3 modalities"),
    Claim(README, "python -m pretrain.eval --checkpoint runs/demo", "test_eval_commands",
          "as printed, runs/demo a tiny 2-rank run"),
    Claim(README, "eval:", "test_eval_yaml_validates",
          "validated: the COCO and CIFAR-10 shards are not here (cifar10.txt written for it)"),
    Claim(README, "configs/      recipes", "tests/test_structure.py::test_the_readme_layout_names_the_project_as_it_is",
          "the layout: every module it names exists and every module is named"),
    Claim(DOCKER_README, "python -m launch.slurm --config configs/quickstart.yaml train.steps=20000",
          "test_slurm_commands_dry_run", "--dry-run (as README.md's)"),
    Claim(DOCKER_README, "--nodes 1 --gpus-per-node 8 --partition gpu", "test_slurm_commands_dry_run", "--dry-run (as README.md's)"),
    Claim(DOCKER_README, "docker run --gpus all", "test_docker_command_validates", "validated (as README.md's)"),
    Claim(DOCKER_README, "python -m launch.slurm --config configs/quickstart.yaml --nodes 2 --gpus-per-node 8 --partition gpu",
          "test_slurm_commands_dry_run", "--dry-run (as README.md's)"),
]


def _blocks():
    return readme_blocks(README) + readme_blocks(DOCKER_README)


def _claimed(block) -> list[Claim]:
    return [c for c in CLAIMS if c.where == block.path and c.first_line in block.first]


def test_every_readme_block_is_claimed():
    """Each block has exactly one claim, each claim a block, and each claimed test exists and reads
    its block from the README (``readme_block``) rather than a copy of it."""
    unclaimed = [b for b in _blocks() if len(_claimed(b)) != 1]
    assert not unclaimed, f"README blocks with no (or more than one) test in tests/test_readme.py CLAIMS: {unclaimed}"
    stale = [c for c in CLAIMS if not any(c in _claimed(b) for b in _blocks())]
    assert not stale, f"claims naming no README block: {stale}"
    for claim in CLAIMS:
        module, _, name = claim.test.rpartition("::")
        path = ROOT / module if module else Path(__file__)
        tree = ast.parse(path.read_text())
        funcs = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert name in funcs, f"{claim.test} (claimed for {claim.first_line!r}) does not exist"
        body = ast.get_source_segment(path.read_text(), funcs[name])
        if "make demo" in claim.first_line or "configs/      recipes" in claim.first_line:
            continue  # the Makefile target and the layout block are read in their own way
        assert "readme_block(" in body or "_slurm_blocks(" in body, f"{claim.test} does not read its README block"


def _argv(command: list[str]) -> list[str]:
    """A README command as this machine runs it: this interpreter, a free rendezvous port."""
    head, *rest = command
    if head == "python":
        return [PYTHON, *rest]
    if head == "torchrun":
        return [PYTHON, "-m", "torch.distributed.run", f"--master_port={free_port()}", *rest]
    if head == "accelerate":
        assert rest[0] == "launch", command
        return [PYTHON, "-m", "accelerate.commands.launch", f"--main_process_port={free_port()}", *rest[1:]]
    raise AssertionError(f"a README command this test cannot run: {command}")


def test_make_targets_exist():
    if shutil.which("make") is None:
        pytest.skip("GNU make is not installed: the README's set-up commands are Makefile targets")
    for command in readme_block("make demo").commands():
        assert command[0] == "make"
        proc = subprocess.run(["make", "-n", *command[1:]], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_workstation_launchers_train(tmp_path):
    """`accelerate launch`, `torchrun` and plain `python`, each as printed plus a tiny override: every
    launcher trains, with the world size it was asked for."""
    commands = readme_block("accelerate launch --config_file").commands()
    assert [c[0] for c in commands] == ["accelerate", "torchrun", "python"]
    runs = [tmp_path / f"run{i}" for i in range(len(commands))]
    tiny = lambda out: tiny_overrides(ASSET_SHARDS, out, steps=2) + ["eval.enabled=false"]  # noqa: E731
    procs = run_cmds([_argv(c) + tiny(out) for c, out in zip(commands, runs)], timeout=300)
    for proc, out, world in zip(procs, runs, (2, 2, 1)):
        ok(proc)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert max(r["step"] for r in rows if "loss" in r) == 2
        assert json.loads((out / "ranks" / "rank0.json").read_text())["world_size"] == world
        assert (out / "checkpoints" / "step000002" / "COMPLETE").is_file()


def _slurm_blocks():
    return [b for b in _blocks() if b.first.startswith("python -m launch.slurm")]


def test_slurm_commands_dry_run(tmp_path, capsys):
    """Every `python -m launch.slurm` command of both READMEs, with --dry-run: the config and every
    flag are validated and the batch script is printed (run folders under a temporary root)."""
    from launch.slurm import main

    commands = [c for b in _slurm_blocks() for c in b.commands()]
    assert len(commands) == 6, commands
    for command in commands:
        assert command[:3] == ["python", "-m", "launch.slurm"], command
        args = [a for a in command[3:] if a != "--wait"] + ["--dry-run", "--output-root", str(tmp_path)]
        assert main(args) == 0, command
        out = capsys.readouterr().out
        assert "#SBATCH" in out and str(tmp_path) in out, out[-2000:]
        for flag in ("--nodes", "--partition"):
            assert flag in command
        assert "#SBATCH --nodes=" + command[command.index("--nodes") + 1] in out
        for arg in (a for a in command if a.startswith("--srun-arg=")):
            assert arg.removeprefix("--srun-arg=") in out  # pyxis's flags reach srun
        if "--sweep" in command:
            assert "#SBATCH --array=0-3" in out
    assert not (ROOT / "runs").exists() or not any((ROOT / "runs").glob("quickstart*")), "dry runs wrote into runs/"


def test_docker_command_validates():
    """The container's torchrun command: its config and overrides load as they would inside it (no
    docker, no GPU here); the image it names is built from docker/Dockerfile."""
    from pretrain.config import load_config

    for path in (README, DOCKER_README):
        (command,) = readme_block("docker run --gpus all", path).commands()
        assert command[:2] == ["docker", "run"] and "multimodal-pretrain" in command
        inner = command[command.index("torchrun"):]
        config = inner[inner.index("--config") + 1]
        overrides = [a for a in inner[inner.index("--config") + 2:]]
        cfg = load_config(ROOT / config, overrides)
        assert str(cfg.output_dir) == "/data/runs/clip"
    assert "pip install" in (ROOT / "docker" / "Dockerfile").read_text()


def test_shard_cli_commands(tmp_path, monkeypatch):
    """The three shard-CLI commands as printed, in a folder holding manifest.jsonl: build with two
    splits, then verify and stats of the train split succeed."""
    from data_tools.__main__ import main

    rows = []
    for i in range(20):
        write(tmp_path / "img" / f"{i:03d}.png", png_bytes(i))
        rows.append({"image": f"img/{i:03d}.png", "caption": f"a picture number {i}", "label": i % 2})
    write_jsonl(tmp_path / "manifest.jsonl", rows)
    monkeypatch.chdir(tmp_path)
    commands = readme_block("python -m data_tools build").commands()
    assert [c[:4] for c in commands] == [["python", "-m", "data_tools", verb] for verb in ("build", "verify", "stats")]
    for command in commands:
        assert main(command[3:]) == 0, command
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    assert index["total_samples"] == 20, index


def test_config_error_example(capsys):
    """The config error shown in the README is what the command prints, with exit code 2."""
    from pretrain.train import main

    block = readme_block("$ python -m pretrain.train")
    (command,) = block.commands()
    shown = block.text.strip().splitlines()[1]
    assert main(command[3:]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(shown.removesuffix("...)")), (err, shown)


def test_plan_example(capsys):
    """The plan shown in "Before you launch" is what the command prints (the GPU memory is given, so
    this machine's memory plays no part; the model is built on the meta device)."""
    from pretrain.plan.__main__ import main

    block = readme_block("$ python -m pretrain.plan")
    (command,) = block.commands()
    shown = block.text.strip().splitlines()[1:]
    assert command[:3] == ["python", "-m", "pretrain.plan"]
    assert main(command[3:]) == 0
    assert capsys.readouterr().out.strip().splitlines() == shown


def test_init_from_yaml_validates():
    """The init_from YAML: accepted as a `model` section by the config (the checkpoint is not here)."""
    import yaml

    from pretrain.config import load_config

    section = yaml.safe_load(readme_block("model:").text)
    assert section["model"]["init_from"]["format"] == "open_clip"
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [f"model={json.dumps(section['model'])}"])
    assert cfg.model.init_from.model == "ViT-B-32"


def test_eval_yaml_validates(tmp_path, monkeypatch):
    """The eval YAML with its named class set and templates, and two extra datasets: accepted by the
    config (cifar10.txt written here; the shards are not opened before training)."""
    import yaml

    from pretrain.config import load_config

    section = yaml.safe_load(readme_block("eval:").text)
    write(tmp_path / "cifar10.txt", "".join(f"class {i}\n" for i in range(10)))
    monkeypatch.chdir(tmp_path)
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [f"eval={json.dumps(section['eval'])}"])
    assert len(cfg.eval.class_list()) == 1000 and len(cfg.eval.template_list()) == 80
    assert [d.name for d in cfg.eval.datasets] == ["coco", "cifar10"]


def test_loss_snippet():
    block = readme_block("from pretrain.losses import build_loss")
    gen = torch.Generator().manual_seed(0)
    features = {m: torch.nn.functional.normalize(torch.randn(6, 8, generator=gen), dim=-1) for m in ("a", "b", "c")}
    scope = {"features": features, "logit_scale": torch.full((1,), 10.0)}
    exec(compile(block.text, "README.md", "exec"), scope)
    assert torch.isfinite(scope["out"]["loss"]) and scope["out"]["loss"].shape == ()


def test_embedder_snippet(uninterrupted_run, tmp_path, monkeypatch):
    """The Embedder lines as printed, beside the export of a tiny run and an image file."""
    from pretrain.export import main

    assert main(["--checkpoint", str(uninterrupted_run), "--output", str(tmp_path / "exported")]) == 0
    write(tmp_path / "digit.png", png_bytes(3))
    monkeypatch.chdir(tmp_path)
    *lines, last = readme_block("from pretrain.export import Embedder").text.strip().splitlines()
    scope: dict = {}
    exec(compile("\n".join(lines), "README.md", "exec"), scope)
    similarity = eval(compile(last, "README.md", "eval"), scope)
    assert similarity.shape == (1, 1) and -1.0 - 1e-5 <= float(similarity) <= 1.0 + 1e-5


@pytest.mark.slow
def test_eval_commands(uninterrupted_run, tmp_path):
    """Both evaluation commands as printed, runs/demo being (a copy of) a tiny 2-rank run."""
    shutil.copytree(uninterrupted_run, tmp_path / "runs" / "demo")
    commands = readme_block("python -m pretrain.eval --checkpoint runs/demo").commands()
    procs = []
    for command in commands:
        argv = _argv(command)
        procs.append(subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                                    env={**os.environ, "PYTHONPATH": str(ROOT)}))
    first, second = (ok(p) for p in procs)
    assert "zero-shot image top-1" in first and "[eval] held-out samples: 12" in first
    result = json.loads((tmp_path / "runs" / "demo" / "eval" / "step000006.json").read_text())
    assert "eval/linear_probe/image/top1" in result and "eval/retrieval/image_to_text/r1" in result
    assert "linear probe" in second.lower() or "linear_probe" in second, second[-3000:]


def test_the_config_table_names_every_tower_and_loss():
    """The README's config table lists every built-in tower type and objective (plugins that tests
    of this session registered aside)."""
    from pretrain.losses import LOSSES
    from pretrain.models import TOWERS

    def built_in(registry):
        return [n for n, cls in registry.items() if cls.__module__.startswith("pretrain.")]

    table = README.read_text().split("| key | meaning |", 1)[1].split("\n\n", 1)[0]
    towers = next(line for line in table.splitlines() if line.startswith("| `model.embed_dim`"))
    assert len(built_in(TOWERS)) >= 10 and [t for t in built_in(TOWERS) if t not in towers] == []
    objectives = next(line for line in table.splitlines() if line.startswith("| `loss.name`"))
    assert [n for n in built_in(LOSSES) if f"`{n}`" not in objectives] == []


def test_optimizer_groups_yaml_validates():
    """The per-part optimizer groups YAML: accepted by the config as written (the weights it names
    are not here: nothing is built)."""
    import yaml

    from pretrain.config import load_config

    section = yaml.safe_load(readme_block("# per-part optimizer groups").text)
    cfg = load_config(ROOT / "configs" / "quickstart.yaml",
                      [f"model.towers={json.dumps(section['model']['towers'])}", f"loss={json.dumps(section['loss'])}"])
    assert cfg.model.towers["image"].optim.layer_decay == 0.75 and cfg.model.towers["text"].head_optim.lr == 1e-3
    assert cfg.loss.optim.weight_decay == 0.0
