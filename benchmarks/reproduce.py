"""Paper reproductions at small scale (issue 8), end to end through the real tools.

    python benchmarks/reproduce.py xor         # Symile vs CLIP on Symile's binary XOR
    python benchmarks/reproduce.py clip-lite   # CLIP vs CLIP-Lite on the demo digits, global batch 16/64/256
    python benchmarks/reproduce.py missing     # XOR with 0/25/50% of c missing, Symile + missingness indicator
    python benchmarks/reproduce.py all

Every run builds its data with the shard CLI (``python -m data_tools.synthetic xor`` writes the
manifest, ``python -m data_tools build`` the shards; the demo digits come from
``python -m data_tools.demo`` when ``data/demo/shards`` is absent), trains through the real entry
point (``torchrun --nproc_per_node=N -m pretrain.train --config ...``; ``--nproc 1`` runs plain
``python -m pretrain.train``), evaluates at the end of training (``eval.json``) and prints a
table. Run folders go under ``--out`` (default ``runs/reproduce``); each is wiped first, so a
rerun never resumes an old checkpoint. ``--json FILE`` also writes every figure as JSON.

What each reports:

- ``xor``: the accuracy of picking b among all 2^d distinct candidate vectors given (a, c)
  (``eval/symile/b/r1``: multilinear inner product; ``eval/symile_pairwise/b/r1``: sum of pairwise
  dot products, the Symile paper's scoring for pairwise-trained models), for configs/xor_symile.yaml
  and configs/xor_clip.yaml (same data, towers, steps, seed; only the loss differs). Chance is 1/2^d.
- ``clip-lite``: configs/demo_small.yaml with loss clip and clip_lite at global batch 16, 64 and
  256 (micro-batch = global / nproc), same steps, learning rate and seeds: zero-shot top-1 and
  class-aware image->text / text->image R@1 on the 359 held-out digits.
- ``missing``: configs/xor_symile_missing.yaml (c optional, ``missing: indicator`` on c's tower)
  on training sets where 0%, 25% and 50% of the rows lack c; the held-out rows are complete.
  ``--with-mask`` adds the same runs with ``missing: mask`` (rows without c left out of the loss).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pretrain.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


# ------------------------------------------------------------------------------------ plumbing


def run(cmd: list[str], log: Path, quiet: bool = False) -> float:
    """Runs ``cmd`` in the repository root, output to ``log``; returns its wall time. A failure
    raises with the end of the log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print("$ " + shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log.read_text()[-4000:]
        raise SystemExit(f"command failed (exit {proc.returncode}): {' '.join(cmd)}\n--- {log} ---\n{tail}")
    return wall


def shard_pattern(folder: Path) -> str:
    """``folder/shard-{000000..N}.tar`` for the shards the CLI wrote there."""
    shards = sorted(folder.glob("shard-*.tar"))
    if not shards:
        raise SystemExit(f"no shards in {folder}")
    return f"{folder}/shard-{{000000..{len(shards) - 1:06d}}}.tar"


def train(config: str, out: Path, overrides: list[str], nproc: int) -> dict:
    """One training run through the real entry point; returns its final evaluation metrics."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if nproc > 1:
        launcher = [PY, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
    else:
        launcher = [PY]
    cmd = [*launcher, "-m", "pretrain.train", "--config", config, f"output_dir={out}", *overrides]
    wall = run(cmd, out / "train.log")
    metrics = json.loads((out / "eval.json").read_text())
    metrics["wall_s"] = wall
    return metrics


# ---------------------------------------------------------------------------------------- data


def build_xor(data_root: Path, dim: int, train_rows: int, val_rows: int, seed: int, missing_frac: float = 0.0,
              shard_size: int = 1000) -> Path:
    """Symile's XOR data as shards (``DIR/shards/{train,val}``), built with the CLIs; kept when a
    previous build with the same parameters finished."""
    name = f"d{dim}" + (f"-missing{round(100 * missing_frac)}" if missing_frac else "")
    folder = data_root / name
    wanted = {"dim": dim, "train": train_rows, "val": val_rows, "seed": seed, "missing_frac": missing_frac}
    stamp = folder / "synthetic.json"
    if (folder / "shards" / "index.json").is_file() and stamp.is_file():
        have = json.loads(stamp.read_text())
        if all(have.get(k) == v for k, v in wanted.items()):
            return folder / "shards"
    if folder.exists():
        shutil.rmtree(folder)
    run([PY, "-m", "data_tools.synthetic", "xor", "--dim", str(dim), "--samples", str(train_rows),
         "--val-samples", str(val_rows), "--seed", str(seed), "--missing-frac", str(missing_frac),
         "--missing-modality", "c", "--members", "json", "--output", str(folder)], folder / "synthetic.log")
    run([PY, "-m", "data_tools", "build", "--input", str(folder / "manifest.jsonl"), "--output", str(folder / "shards"),
         "--split-column", "split", "--optional", "c", "--shard-size", str(shard_size), "--no-progress"],
        folder / "build.log")
    return folder / "shards"


def xor_overrides(shards: Path, dim: int, steps: int | None, nproc: int, global_batch: int) -> list[str]:
    if global_batch % nproc:
        raise SystemExit(f"--global-batch {global_batch} is not a multiple of --nproc {nproc}")
    fields = {"fields": ["bits"], "size": dim}
    out = [f"data.train.urls={shard_pattern(shards / 'train')}", f"data.val.urls={shard_pattern(shards / 'val')}",
           f"train.micro_batch_size={global_batch // nproc}"]
    out += [f"data.modalities.{m}.options={json.dumps(fields)}" for m in "abc"]
    if steps:
        out.append(f"train.steps={steps}")
    return out


def ensure_demo() -> Path:
    shards = ROOT / "data" / "demo" / "shards"
    if (shards / "train" / "index.json").is_file() or (shards / "index.json").is_file() or \
            sorted((shards / "train").glob("shard-*.tar")):
        return shards
    demo = ROOT / "data" / "demo"
    run([PY, "-m", "data_tools.demo", "--output", str(demo)], demo / "demo.log")
    for split in ("train", "val"):
        run([PY, "-m", "data_tools", "build", "--input", str(demo / f"{split}.jsonl"), "--output", str(shards / split),
             "--shard-size", "200", "--map", "image=png", "--map", "caption=txt", "--map", "label=cls", "--no-progress"],
            demo / f"build_{split}.log")
    return shards


# ---------------------------------------------------------------------------------- experiments


def pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def exp_xor(args) -> dict:
    shards = build_xor(Path(args.data), args.dim, args.train, args.val, args.data_seed)
    over = xor_overrides(shards, args.dim, args.steps, args.nproc, args.global_batch) + [f"train.seed={args.seed}"]
    rows = {}
    for name, config in (("symile", "configs/xor_symile.yaml"), ("clip", "configs/xor_clip.yaml")):
        m = train(config, Path(args.out) / f"xor_{name}", over, args.nproc)
        rows[name] = {
            "mip_r1": m.get("eval/symile/b/r1"), "pairwise_r1": m.get("eval/symile_pairwise/b/r1"),
            "chance": m.get("eval/symile/b/r1/chance"), "candidates": m.get("eval/symile/b/candidates"),
            "queries": m.get("eval/symile/b/queries"), "wall_s": m["wall_s"],
        }
    chance = rows["symile"]["chance"]
    print(f"\nXOR, d={args.dim}: predict b given (a, c) among {int(rows['symile']['candidates'])} candidates "
          f"({int(rows['symile']['queries'])} held-out queries; chance {pct(chance)})")
    print(f"{'trained with':<14}{'MIP scoring':>14}{'pairwise-sum':>14}{'wall s':>9}")
    for name, r in rows.items():
        print(f"{name:<14}{pct(r['mip_r1']):>14}{pct(r['pairwise_r1']):>14}{r['wall_s']:>9.0f}")
    return {"dim": args.dim, "train": args.train, "val": args.val, "nproc": args.nproc, "global_batch": args.global_batch,
            "runs": rows}


def exp_clip_lite(args) -> dict:
    shards = ensure_demo()
    base = [f"data.train.urls={shard_pattern(shards / 'train')}", f"data.val.urls={shard_pattern(shards / 'val')}"]
    if args.steps:
        base.append(f"train.steps={args.steps}")
    rows = []
    for batch in args.batches:
        if batch % args.nproc:
            raise SystemExit(f"--batches: {batch} is not a multiple of --nproc {args.nproc}")
        for seed in args.seeds:
            for loss in ("clip", "clip_lite"):
                out = Path(args.out) / f"demo_{loss}_b{batch}_s{seed}"
                m = train("configs/demo_small.yaml", out,
                          base + [f"loss.name={loss}", f"train.micro_batch_size={batch // args.nproc}", f"train.seed={seed}"],
                          args.nproc)
                rows.append({"loss": loss, "batch": batch, "seed": seed, "zeroshot_top1": m.get("eval/zeroshot_top1"),
                             "i2t_r1": m.get("eval/i2t_r1"), "t2i_r1": m.get("eval/t2i_r1"),
                             "i2t_r1_instance": m.get("eval/retrieval/image_to_text/r1"),
                             "t2i_r1_instance": m.get("eval/retrieval/text_to_image/r1"),
                             "chance": m.get("eval/zeroshot_top1/chance"), "wall_s": m["wall_s"]})
    print("\nCLIP vs CLIP-Lite on the demo digits (359 held-out; chance 10%; R@1 class-aware)")
    print(f"{'batch':>6} {'seed':>4}  {'loss':<10}{'zero-shot':>10}{'i->t R@1':>10}{'t->i R@1':>10}{'wall s':>8}")
    for r in rows:
        print(f"{r['batch']:>6} {r['seed']:>4}  {r['loss']:<10}{pct(r['zeroshot_top1']):>10}{pct(r['i2t_r1']):>10}"
              f"{pct(r['t2i_r1']):>10}{r['wall_s']:>8.0f}")
    return {"nproc": args.nproc, "steps": args.steps, "runs": rows}


def exp_missing(args) -> dict:
    rows = []
    modes = ["indicator"] + (["mask"] if args.with_mask else [])
    for frac in args.fracs:
        shards = build_xor(Path(args.data), args.dim, args.train, args.val, args.data_seed, frac)
        over = xor_overrides(shards, args.dim, args.steps, args.nproc, args.global_batch) + [f"train.seed={args.seed}"]
        for mode in modes:
            if mode == "mask" and frac == 0:
                continue  # nothing is missing: the same as the indicator run but for a constant embedding
            out = Path(args.out) / f"missing{round(100 * frac)}_{mode}"
            m = train("configs/xor_symile_missing.yaml", out, over + [f"model.towers.c.missing={mode}"], args.nproc)
            rows.append({"missing_frac": frac, "mode": mode, "mip_r1": m.get("eval/symile/b/r1"),
                         "chance": m.get("eval/symile/b/r1/chance"), "wall_s": m["wall_s"]})
    print(f"\nXOR d={args.dim}, Symile, c missing from a fraction of the training rows (held-out rows complete)")
    print(f"{'c missing':>10}  {'recipe':<10}{'b | (a, c) R@1':>16}{'chance':>9}{'wall s':>8}")
    for r in rows:
        print(f"{pct(r['missing_frac']):>10}  {r['mode']:<10}{pct(r['mip_r1']):>16}{pct(r['chance']):>9}{r['wall_s']:>8.0f}")
    return {"dim": args.dim, "train": args.train, "val": args.val, "nproc": args.nproc, "runs": rows}


EXPERIMENTS = {"xor": exp_xor, "clip-lite": exp_clip_lite, "missing": exp_missing}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=[*EXPERIMENTS, "all"])
    p.add_argument("--out", default="runs/reproduce", help="run folders (default runs/reproduce)")
    p.add_argument("--data", default="data/xor", help="XOR data folders (default data/xor)")
    p.add_argument("--nproc", type=int, default=2, help="ranks per run (default 2; 1: plain python)")
    p.add_argument("--steps", type=int, default=0, help="training steps (default: the config's)")
    p.add_argument("--json", metavar="FILE", help="also write every figure here")
    x = p.add_argument_group("XOR (xor, missing)")
    x.add_argument("--dim", type=int, default=5, help="bits per vector (default 5: 32 candidates)")
    x.add_argument("--train", type=int, default=8000, help="training rows (default 8000)")
    x.add_argument("--val", type=int, default=2000, help="held-out rows (default 2000)")
    x.add_argument("--global-batch", type=int, default=256, help="global batch (default 256)")
    x.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    x.add_argument("--data-seed", type=int, default=0, help="seed of the generated data (default 0)")
    x.add_argument("--fracs", type=float, nargs="+", default=[0.0, 0.25, 0.5], help="missing fractions of c")
    x.add_argument("--with-mask", action="store_true", help="missing: also train with missing: mask")
    c = p.add_argument_group("CLIP vs CLIP-Lite (clip-lite)")
    c.add_argument("--batches", type=int, nargs="+", default=[16, 64, 256], help="global batch sizes")
    c.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (default 0)")
    args = p.parse_args(argv)
    os.chdir(ROOT)
    names = list(EXPERIMENTS) if args.experiment == "all" else [args.experiment]
    results = {}
    t0 = time.perf_counter()
    for name in names:
        results[name] = EXPERIMENTS[name](args)
    results["wall_s"] = time.perf_counter() - t0
    print(f"\ntotal wall time {results['wall_s']:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
