"""Paper reproductions at small scale (issue 8), end to end through the real tools.

    python benchmarks/reproduce.py xor         # Symile vs CLIP on Symile's binary XOR
    python benchmarks/reproduce.py clip-lite   # CLIP vs CLIP-Lite, a fair test (issue 16): see below
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
- ``clip-lite`` (issue 16): CLIP and CLIP-Lite on the demo digits (configs/demo_small.yaml: an MLP
  image tower, a one-layer text transformer), each run one process with one thread, ``--parallel``
  (2) at a time. Six cells: ``clip-linear``, ``clip-milinear`` (CLIP with either head, so heads
  match across objectives), ``lite-linear``, ``lite-milinear`` (the official critic head),
  ``lite-milinear-coop`` / ``lite-milinear-adv`` (+ the prior term, weight 0.1, cooperative or
  gradient reversal); heads on both towers. ``--recipe official`` trains every cell with CLIP-Lite's
  own optimisation (``OFFICIAL``: SGD in Lookahead, 0.2 for the image backbone and 1e-3 for the rest,
  weight decay 1e-4 on all, clipping at 10, critics as wide as their input) instead of AdamW at a
  swept learning rate. The primary metric is the linear probe (L-BFGS logistic
  regression) on the image backbone's frozen pre-head features, fitted on the training split and
  scored on val; zero-shot top-1 and class-aware R@1 are secondary. Beside them, the probe on the
  untrained backbone (the floor). Stages:

  1. learning-rate sweep: each cell at each of ``--lrs`` (5e-4 2e-3 8e-3), batch ``--tune-batch``
     (64), seed ``--tune-seed`` (0), trained on the training split minus a class-stratified
     ``--tune-fraction`` (20%) slice and scored on that slice (the probe fitted on the rest); the
     best probe wins, LRs within half a point of it are told apart by zero-shot top-1. val is never
     used for tuning. One value in ``--lrs``: no sweep.
  2. main grid: every cell (``--cells``) x ``--batches`` (16 64 256) x ``--seeds`` (0 1 2) at the
     tuned LR, budgets matched by samples seen (``--budget-samples``, default ``--steps`` (50) x the
     largest batch: 12,800 samples, ~9 epochs) with ``--curve-points`` (3) evaluations along each run
     (``eval.every``: learning curves); step-matched: ``--steps`` steps at every batch (own runs for
     ``--step-batches``, default 16; the largest batch's sample-matched run is step-matched too).
  3. side grids at ``--side-batch`` (64) for ``--side-cells`` (clip-linear clip-milinear
     lite-milinear-coop) and ``--side-seeds`` (default the first two seeds): the rich-caption
     variant (``python -m data_tools.demo --variant rich``: each digit coloured and placed on a 16x16
     RGB canvas, captions naming digit, colour and position; configs/demo_rich.yaml; ``--no-rich``
     leaves it out), and ``--fractions`` (0.1 0.25 0.5 1.0; 1.0 is read off the main grid) of the
     digits' training split, class-stratified, seeded and nested, at the same sample budget (more
     epochs on less data). Only the pretraining data shrinks: the probe still fits on the whole
     labelled training split.

  Figures are mean and sample standard deviation over seeds (min and max in the JSON, with every
  run's learning curve). Subsets are built under ``data/demo/subsets`` with the shard CLI.
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


def run(cmd: list[str], log: Path, quiet: bool = False, env: dict | None = None) -> float:
    """Runs ``cmd`` in the repository root, output to ``log`` (``env`` added to the environment);
    returns its wall time. A failure raises with the end of the log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print("$ " + shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
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


def train(config: str, out: Path, overrides: list[str], nproc: int, env: dict | None = None) -> dict:
    """One training run through the real entry point; returns its final evaluation metrics."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if nproc > 1:
        launcher = [PY, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
    else:
        launcher = [PY]
    cmd = [*launcher, "-m", "pretrain.train", "--config", config, f"output_dir={out}", *overrides]
    wall = run(cmd, out / "train.log", quiet=env is not None, env=env)
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


# ------------------------------------------------------------------------- CLIP vs CLIP-Lite (issue 16)

# cell -> (loss, head, prior mode or None); heads on both towers, priors on both (loss.prior_on unset)
CELLS = {
    "clip-linear": ("clip", "linear", None),
    "clip-milinear": ("clip", "milinear", None),
    "lite-linear": ("clip_lite", "linear", None),
    "lite-milinear": ("clip_lite", "milinear", None),
    "lite-milinear-coop": ("clip_lite", "milinear", "cooperative"),
    "lite-milinear-adv": ("clip_lite", "milinear", "gradient_reversal"),
}
# --recipe official: CLIP-Lite's own optimisation (configs/clip_lite_official.yaml) on demo_small's
# towers, for every cell: SGD momentum 0.9 in Lookahead (k 5, alpha 0.5), 0.2 for the image backbone,
# 1e-3 for the rest (text tower, critics, discriminators, temperature), weight decay 1e-4 on every
# parameter, clipping at 10, critics as wide as their input (the MLP image tower's 256 features)
OFFICIAL_LR = 1e-3
OFFICIAL = ["train.optimizer=sgd", "train.momentum=0.9", "train.lookahead={k: 5, alpha: 0.5}",
            "model.towers.image.optim={lr: 0.2}", f"model.towers.image.head_optim={{lr: {OFFICIAL_LR}}}",
            "train.weight_decay=1.0e-4", "train.weight_decay_on=all", "train.grad_clip=10.0", "model.embed_dim=256"]
SIDE_CELLS = ["clip-linear", "clip-milinear", "lite-milinear-coop"]
DEMO_CONFIG = {"digits": "configs/demo_small.yaml", "rich": "configs/demo_rich.yaml"}
PRIOR_WEIGHT = 0.1  # the official recipe: 0.9 JSD + 0.1 PRIOR


def build_shards(manifest: Path, out: Path) -> Path:
    """``manifest`` (rows with image, caption, label) as shards in ``out`` (kept when built)."""
    if not (out / "index.json").is_file():
        if out.exists():
            shutil.rmtree(out)
        run([PY, "-m", "data_tools", "build", "--input", str(manifest), "--output", str(out), "--shard-size", "200",
             "--map", "image=png", "--map", "caption=txt", "--map", "label=cls", "--no-progress"],
            out.parent / f"build_{out.name}.log", quiet=True)
    return out


def ensure_demo_variant(variant: str) -> Path:
    """The demo's folder for ``variant`` (digits: data/demo, rich: data/demo_rich) with
    ``shards/{train,val}``, built with the CLIs when absent."""
    if variant == "digits":
        ensure_demo()
        return ROOT / "data" / "demo"
    demo = ROOT / "data" / f"demo_{variant}"
    if not (demo / "val.jsonl").is_file():
        run([PY, "-m", "data_tools.demo", "--output", str(demo), "--variant", variant], demo / "demo.log", quiet=True)
    for split in ("train", "val"):
        build_shards(demo / f"{split}.jsonl", demo / "shards" / split)
    return demo


def stratified(rows: list[dict], fraction: float, seed: str) -> tuple[list[dict], list[dict]]:
    """(a class-stratified, seeded ``fraction`` of ``rows``, the rest), each in the rows' order."""
    import random
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        by_class.setdefault(r["label"], []).append(i)
    take = set()
    for label in sorted(by_class):
        ids = by_class[label][:]
        rng.shuffle(ids)
        take.update(ids[: max(1, round(len(ids) * fraction))])
    return [r for i, r in enumerate(rows) if i in take], [r for i, r in enumerate(rows) if i not in take]


def demo_subsets(demo: Path, fractions: list[float], tune_fraction: float) -> dict:
    """Shards of the demo's train split cut up, under ``demo/subsets``: ``tune_fit`` / ``tune_held``
    (a class-stratified ``tune_fraction`` slice held out of the training split for the
    learning-rate sweep) and ``frac<p>`` (a class-stratified ``p`` of the training split, nested:
    each cut from the next larger one), seeded and deterministic. A folder is named by what it
    holds and rebuilt only when its manifest changes, so concurrent runs never remove each other's."""
    rows = [json.loads(line) for line in (demo / "train.jsonl").read_text().splitlines()]
    out = {"train": demo / "shards" / "train", "val": demo / "shards" / "val"}
    held, fit = stratified(rows, tune_fraction, "tune-0")
    t = f"tune{round(100 * tune_fraction)}"
    plan = {"tune_fit": (f"{t}_fit", fit), "tune_held": (f"{t}_held", held)}
    base, prev, chain = rows, 1.0, ""
    for p in sorted((f for f in fractions if f < 1.0), reverse=True):
        # nested: each fraction is cut from the next larger one's rows, at its share of the whole
        base, _ = stratified(base, p / prev, f"frac-{round(100 * p)}")
        chain = f"frac{round(100 * p)}" + (f"-of-{chain}" if chain else "")
        plan[f"frac{round(100 * p)}"], prev = (chain, base), p
    sub = demo / "subsets"
    sub.mkdir(parents=True, exist_ok=True)
    for name, (folder, part) in plan.items():
        text = "".join(json.dumps({**r, "image": str(demo / r["image"])}) + "\n" for r in part)
        manifest = sub / f"{folder}.jsonl"
        if not manifest.is_file() or manifest.read_text() != text:
            if (sub / folder).exists():
                shutil.rmtree(sub / folder)
            manifest.write_text(text)
        out[name] = build_shards(manifest, sub / folder)
    return out


def cell_overrides(cell: str, lr: float, recipe: str = "ours") -> list[str]:
    loss, head, prior = CELLS[cell]
    out = [f"loss.name={loss}", f"train.lr={lr}"] + (OFFICIAL if recipe == "official" else [])
    if head != "linear":
        out += [f"model.towers.image.head={head}", f"model.towers.text.head={head}"]
    if prior:
        out += [f"loss.prior_weight={PRIOR_WEIGHT}", f"loss.prior_mode={prior}"]
    return out


def eval_curve(folder: Path) -> list[dict]:
    """The evaluations ``eval.every`` logged into metrics.jsonl: step, probe, zero-shot, R@1."""
    curve = []
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "eval/samples" in row:
            curve.append({"step": row["step"], **pick(row)})
    return curve


def pick(m: dict) -> dict:
    return {"probe": m.get("eval/linear_probe/image/top1"), "zeroshot": m.get("eval/zeroshot_top1"),
            "i2t_r1": m.get("eval/i2t_r1"), "t2i_r1": m.get("eval/t2i_r1")}


class Job:
    """One training run of the CLIP / CLIP-Lite grid: what it is (``tags``) and how to run it."""

    def __init__(self, out: Path, config: str, overrides: list[str], nproc: int, **tags):
        self.out, self.config, self.overrides, self.nproc, self.tags = out, config, overrides, nproc, tags
        self.result: dict | None = None

    def cost(self) -> float:  # longest first keeps both slots busy to the end
        return self.tags.get("samples", 0) / max(self.tags.get("batch", 1), 1) ** 0.5

    def __call__(self) -> dict:
        m = train(self.config, self.out, self.overrides, self.nproc,
                  env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
        self.result = {**self.tags, **pick(m), "probe_train_samples": m.get("eval/linear_probe/image/train_samples"),
                       "probe_width": m.get("eval/linear_probe/image/width"), "curve": eval_curve(self.out),
                       "wall_s": m["wall_s"]}
        if self.tags.get("prior"):
            rows = [json.loads(line) for line in (self.out / "metrics.jsonl").read_text().splitlines()]
            prior = [r["clip_lite/prior"] for r in rows if "clip_lite/prior" in r]
            self.result["prior_last"] = prior[-1] if prior else None
        return self.result


def run_jobs(jobs: list[Job], parallel: int, label: str) -> None:
    from concurrent.futures import ThreadPoolExecutor, as_completed
    t0 = time.perf_counter()
    todo = sorted(jobs, key=lambda j: -j.cost())
    print(f"[{label}] {len(todo)} runs, {parallel} at a time", flush=True)
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = {pool.submit(j): j for j in todo}
        for i, fut in enumerate(as_completed(futures), 1):
            j = futures[fut]
            r = fut.result()
            print(f"[{label}] {i}/{len(todo)} {j.out.name}: probe {pct(r['probe'])} zero-shot {pct(r['zeroshot'])} "
                  f"({r['wall_s']:.0f} s, {time.perf_counter() - t0:.0f} s in)", flush=True)


def stats(values: list) -> dict:
    v = [x for x in values if x is not None]
    if not v:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    mean = sum(v) / len(v)
    std = (sum((x - mean) ** 2 for x in v) / (len(v) - 1)) ** 0.5 if len(v) > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(v), "max": max(v), "n": len(v)}


def ms(s: dict) -> str:
    """mean ± std in points (percent)."""
    if s["mean"] is None:
        return "n/a"
    return f"{100 * s['mean']:.1f}±{100 * s['std']:.1f}"


def summarise(rows: list[dict], keys: tuple[str, ...], metrics=("probe", "zeroshot", "i2t_r1", "t2i_r1")) -> list[dict]:
    """Runs grouped by ``keys`` (seeds pooled): per metric mean, std (n-1), min, max."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = []
    for key, rs in groups.items():
        entry = dict(zip(keys, key))
        entry["seeds"] = sorted(r["seed"] for r in rs)
        for m in metrics:
            entry[m] = stats([r[m] for r in rs])
        steps = sorted({c["step"] for r in rs for c in r["curve"]})
        entry["curve"] = [{"step": s, **{m: stats([c[m] for r in rs for c in r["curve"] if c["step"] == s])
                                         for m in ("probe", "zeroshot")}} for s in steps]
        out.append(entry)
    return out


def table(title: str, entries: list[dict], row_key: str, col_key: str, metric: str, cols: list) -> None:
    print(f"\n{title}")
    print(f"{'':<22}" + "".join(f"{str(c):>14}" for c in cols))
    for name in dict.fromkeys(e[row_key] for e in entries):
        cells = {e[col_key]: e for e in entries if e[row_key] == name}
        print(f"{name:<22}" + "".join(f"{ms(cells[c][metric]) if c in cells else '':>14}" for c in cols))


def exp_clip_lite(args) -> dict:
    nproc = args.nproc or 1
    if args.recipe == "official":
        args.lrs = [OFFICIAL_LR]  # the recipe's own rates (0.2 for the image backbone, in OFFICIAL)
    cells = args.cells or list(CELLS)
    side = [c for c in (args.side_cells or SIDE_CELLS) if c in CELLS]
    batches, seeds = args.batches, args.seeds
    side_seeds = args.side_seeds if args.side_seeds is not None else seeds[:2]
    for b in batches + [args.side_batch]:
        if b % nproc:
            raise SystemExit(f"--batches/--side-batch: {b} is not a multiple of --nproc {nproc}")
    match_steps = args.steps or 50
    budget = args.budget_samples or match_steps * max(batches)
    root = Path(args.out)
    digits = ensure_demo_variant("digits")
    parts = demo_subsets(digits, [f for f in args.fractions if f < 1.0], args.tune_fraction)
    rich = None if args.no_rich else ensure_demo_variant("rich")

    def urls(p: Path) -> str:
        return shard_pattern(p)

    def data_over(train_dir: Path, val_dir: Path, probe_dir: Path | None = None) -> list[str]:
        out = [f"data.train.urls={urls(train_dir)}", f"data.val.urls={urls(val_dir)}", "data.train.workers=0",
               "eval.tasks=[zeroshot,retrieval,linear_probe]", "eval.linear_probe.features=backbone",
               "eval.linear_probe.modalities=[image]", "train.log_every=50"]
        if probe_dir is not None:
            out.append(f"eval.linear_probe.split.urls={urls(probe_dir)}")
        return out

    def schedule(batch: int, steps: int, every_points: int) -> list[str]:
        out = [f"train.micro_batch_size={batch // nproc}", f"train.steps={steps}",
               f"train.warmup_steps={max(1, round(0.1 * steps))}"]
        if every_points > 1 and steps >= every_points:
            out.append(f"eval.every={steps // every_points}")
        return out

    result: dict = {"recipe": args.recipe, "official_overrides": OFFICIAL if args.recipe == "official" else None,
                    "nproc": nproc, "parallel": args.parallel, "budget_samples": budget, "match_steps": match_steps,
                    "batches": batches, "seeds": seeds, "side_seeds": side_seeds, "prior_weight": PRIOR_WEIGHT,
                    "tune_fraction": args.tune_fraction,
                    "stats": "mean and sample std (n-1) over seeds; min and max beside them in the JSON"}

    # 1. learning-rate sweep on the held-out slice of the training split (never on val)
    lrs: dict[str, float] = {}
    sweep_rows = []
    if len(args.lrs) > 1:
        jobs = []
        for cell in cells:
            for lr in args.lrs:
                steps = budget // args.tune_batch
                jobs.append(Job(root / f"sweep_{cell}_lr{lr:g}", DEMO_CONFIG["digits"],
                                data_over(parts["tune_fit"], parts["tune_held"], parts["tune_fit"])
                                + schedule(args.tune_batch, steps, 0) + cell_overrides(cell, lr, args.recipe)
                                + [f"train.seed={args.tune_seed}"], nproc,
                                grid="sweep", cell=cell, lr=lr, batch=args.tune_batch, samples=budget,
                                seed=args.tune_seed, prior=CELLS[cell][2]))
        run_jobs(jobs, args.parallel, "lr sweep")
        sweep_rows = [j.result for j in jobs]
        for cell in cells:
            rs = [r for r in sweep_rows if r["cell"] == cell]
            best = max(r["probe"] for r in rs)
            # the probe decides; LRs within half a point of the best are told apart by zero-shot top-1
            near = [r for r in rs if r["probe"] >= best - 0.005]
            lrs[cell] = max(near, key=lambda r: (r["zeroshot"] or 0.0, r["probe"]))["lr"]
        print(f"\nLearning-rate sweep (digits, the training split minus a "
              f"{round(100 * args.tune_fraction)}% held-out slice; batch {args.tune_batch}, {budget} samples, "
              f"seed {args.tune_seed}): probe top-1 / zero-shot on the slice")
        print(f"{'cell':<22}" + "".join(f"{f'lr {lr:g}':>18}" for lr in args.lrs) + f"{'chosen':>10}")
        for cell in cells:
            rs = {r["lr"]: r for r in sweep_rows if r["cell"] == cell}
            print(f"{cell:<22}" + "".join(f"{pct(rs[lr]['probe']) + ' / ' + pct(rs[lr]['zeroshot']):>18}"
                                           for lr in args.lrs) + f"{lrs[cell]:>10g}")
    else:
        lrs = {cell: args.lrs[0] for cell in cells + side}
    for cell in side:
        lrs.setdefault(cell, args.lrs[len(args.lrs) // 2])
    result["lr_sweep"] = {"lrs": args.lrs, "batch": args.tune_batch, "seed": args.tune_seed, "runs": sweep_rows,
                          "chosen": lrs}

    # 2. the main grid (digits, all the training split): sample-matched with learning curves, step-matched
    jobs = []
    for cell in cells:
        for batch in batches:
            for seed in seeds:
                common = data_over(parts["train"], parts["val"]) + cell_overrides(cell, lrs[cell], args.recipe) + [f"train.seed={seed}"]
                steps = budget // batch
                jobs.append(Job(root / f"main_{cell}_b{batch}_samples_s{seed}", DEMO_CONFIG["digits"],
                                common + schedule(batch, steps, args.curve_points), nproc, grid="main", budget="samples",
                                cell=cell, batch=batch, seed=seed, steps=steps, samples=steps * batch,
                                prior=CELLS[cell][2]))
                if steps != match_steps and batch in args.step_batches:
                    jobs.append(Job(root / f"main_{cell}_b{batch}_steps_s{seed}", DEMO_CONFIG["digits"],
                                    common + schedule(batch, match_steps, 0), nproc, grid="main", budget="steps",
                                    cell=cell, batch=batch, seed=seed, steps=match_steps, samples=match_steps * batch,
                                    prior=CELLS[cell][2]))
    # the floor: the probe on the untrained backbone (one step at a vanishing learning rate)
    floors = []
    for variant in ["digits"] + (["rich"] if rich else []):
        base = digits if variant == "digits" else rich
        for seed in seeds:
            floors.append(Job(root / f"floor_{variant}_s{seed}", DEMO_CONFIG[variant],
                              data_over(base / "shards" / "train", base / "shards" / "val")
                              + ["train.steps=1", "train.lr=1e-12", "train.warmup_steps=0", f"train.seed={seed}"],
                              nproc,
                              grid="floor", variant=variant, seed=seed, batch=32, samples=0))
    run_jobs(jobs + floors, args.parallel, "main grid")
    main_rows = [j.result for j in jobs]
    # step-matched at the largest batch is the sample-matched run itself
    for r in list(main_rows):
        if r["budget"] == "samples" and r["steps"] == match_steps:
            main_rows.append({**r, "budget": "steps"})
    floor_rows = [j.result for j in floors]
    result["floor"] = {"runs": floor_rows, "summary": summarise(floor_rows, ("variant",))}
    sample_summary = summarise([r for r in main_rows if r["budget"] == "samples"], ("cell", "batch"))
    step_summary = summarise([r for r in main_rows if r["budget"] == "steps"], ("cell", "batch"))
    result["main"] = {"runs": main_rows, "samples_matched": sample_summary, "steps_matched": step_summary}
    for e in result["floor"]["summary"]:
        print(f"\nuntrained backbone ({e['variant']}): probe top-1 {ms(e['probe'])} (seeds {e['seeds']})")
    what = f"mean±std over seeds {seeds}, points"
    table(f"Main grid, digits, sample-matched ({budget} samples): linear probe top-1 on backbone features ({what})",
          sample_summary, "cell", "batch", "probe", batches)
    table(f"Main grid, digits, sample-matched: zero-shot top-1 ({what})", sample_summary, "cell", "batch", "zeroshot",
          batches)
    table("Main grid, digits, sample-matched: image->text R@1, class-aware", sample_summary, "cell", "batch", "i2t_r1",
          batches)
    table("Main grid, digits, sample-matched: text->image R@1, class-aware", sample_summary, "cell", "batch", "t2i_r1",
          batches)
    table(f"Main grid, digits, step-matched ({match_steps} steps): linear probe top-1", step_summary, "cell", "batch",
          "probe", batches)
    table(f"Main grid, digits, step-matched ({match_steps} steps): zero-shot top-1", step_summary, "cell", "batch",
          "zeroshot", batches)

    # 3. side grids at one batch: the rich-caption variant, and fractions of the training split
    jobs = []
    sb = args.side_batch
    steps = budget // sb
    if rich:
        for cell in side:
            for seed in side_seeds:
                jobs.append(Job(root / f"rich_{cell}_b{sb}_s{seed}", DEMO_CONFIG["rich"],
                                data_over(rich / "shards" / "train", rich / "shards" / "val")
                                + schedule(sb, steps, args.curve_points) + cell_overrides(cell, lrs[cell], args.recipe)
                                + [f"train.seed={seed}"], nproc, grid="rich", cell=cell, batch=sb, seed=seed,
                                steps=steps, samples=budget, prior=CELLS[cell][2]))
    for frac in args.fractions:
        if frac >= 1.0:
            continue
        name = f"frac{round(100 * frac)}"
        for cell in side:
            for seed in side_seeds:
                # the pretraining data shrinks; the probe still fits on the whole labelled training split
                jobs.append(Job(root / f"{name}_{cell}_b{sb}_s{seed}", DEMO_CONFIG["digits"],
                                data_over(parts[name], parts["val"], parts["train"])
                                + schedule(sb, steps, 0) + cell_overrides(cell, lrs[cell], args.recipe) + [f"train.seed={seed}"],
                                nproc, grid="fraction", fraction=frac, cell=cell, batch=sb, seed=seed, steps=steps,
                                samples=budget, prior=CELLS[cell][2]))
    if jobs:
        run_jobs(jobs, args.parallel, "side grids")
    side_rows = [j.result for j in jobs]
    rich_rows = [r for r in side_rows if r["grid"] == "rich"]
    frac_rows = [r for r in side_rows if r["grid"] == "fraction"]
    if 1.0 in args.fractions or any(f >= 1.0 for f in args.fractions):
        frac_rows += [{**r, "grid": "fraction", "fraction": 1.0} for r in main_rows
                      if r["budget"] == "samples" and r["batch"] == sb and r["cell"] in side and r["seed"] in side_seeds]
    if rich_rows:
        rs = summarise(rich_rows, ("cell", "batch"))
        result["rich"] = {"runs": rich_rows, "summary": rs}
        for metric in ("probe", "zeroshot", "i2t_r1", "t2i_r1"):
            table(f"Rich captions (digit x colour x position), batch {sb}, {budget} samples: {metric} "
                  f"(mean±std over seeds {side_seeds})", rs, "cell", "batch", metric, [sb])
    if frac_rows:
        fs = summarise(frac_rows, ("cell", "fraction"))
        result["fractions"] = {"runs": frac_rows, "summary": fs,
                               "probe_split": "the whole training split (only the pretraining data shrinks)"}
        fr = sorted({r["fraction"] for r in frac_rows})
        for metric in ("probe", "zeroshot"):
            table(f"Fractions of the digits' training split, batch {sb}, {budget} samples: {metric} "
                  f"(mean±std over seeds {side_seeds})", fs, "cell", "fraction", metric, fr)
    result["lr_chosen"] = lrs
    return result


EXPERIMENTS = {"xor": exp_xor, "clip-lite": exp_clip_lite, "missing": exp_missing}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=[*EXPERIMENTS, "all"])
    p.add_argument("--out", default="runs/reproduce", help="run folders (default runs/reproduce)")
    p.add_argument("--data", default="data/xor", help="XOR data folders (default data/xor)")
    p.add_argument("--nproc", type=int, default=0,
                   help="ranks per run (default 2, clip-lite 1; 1: plain python)")
    p.add_argument("--steps", type=int, default=0,
                   help="training steps (default: the config's; clip-lite: the step-matched budget, default 50)")
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
    c.add_argument("--batches", type=int, nargs="+", default=[16, 64, 256], help="global batch sizes of the main grid")
    c.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds of the main grid (0 1 2)")
    c.add_argument("--cells", nargs="+", choices=list(CELLS), help="main-grid cells (default all six)")
    c.add_argument("--budget-samples", type=int, default=0,
                   help="samples seen per sample-matched run (default --steps x the largest batch: 12800)")
    c.add_argument("--step-batches", type=int, nargs="*", default=[16],
                   help="batches that also get a step-matched run of --steps steps (default 16; the largest batch's "
                        "sample-matched run is step-matched too)")
    c.add_argument("--curve-points", type=int, default=3, help="evaluations along a sample-matched run (eval.every)")
    c.add_argument("--lrs", type=float, nargs="+", default=[5e-4, 2e-3, 8e-3],
                   help="learning rates swept per cell on the held-out slice (one value: no sweep)")
    c.add_argument("--tune-fraction", type=float, default=0.2, help="held-out slice of the training split (0.2)")
    c.add_argument("--tune-batch", type=int, default=64, help="global batch of the sweep (64)")
    c.add_argument("--tune-seed", type=int, default=0, help="seed of the sweep (0)")
    c.add_argument("--side-cells", nargs="+", choices=list(CELLS), help=f"cells of the side grids ({' '.join(SIDE_CELLS)})")
    c.add_argument("--side-seeds", type=int, nargs="*", help="seeds of the side grids (default: the first two of --seeds)")
    c.add_argument("--side-batch", type=int, default=64, help="global batch of the side grids (64)")
    c.add_argument("--fractions", type=float, nargs="*", default=[0.1, 0.25, 0.5, 1.0],
                   help="fractions of the digits' training split pretrained on (1.0 read off the main grid)")
    c.add_argument("--no-rich", action="store_true", help="leave out the rich-caption side grid")
    c.add_argument("--parallel", type=int, default=2, help="runs at a time (default 2, one thread each)")
    c.add_argument("--recipe", choices=["ours", "official"], default="ours",
                   help="official: every cell with CLIP-Lite's own optimisation (OFFICIAL; its learning rates, no sweep)")
    args = p.parse_args(argv)
    os.chdir(ROOT)
    names = list(EXPERIMENTS) if args.experiment == "all" else [args.experiment]
    results = {}
    t0 = time.perf_counter()
    for name in names:
        nproc = args.nproc or (1 if name == "clip-lite" else 2)
        results[name] = EXPERIMENTS[name](argparse.Namespace(**{**vars(args), "nproc": nproc}))
    results["wall_s"] = time.perf_counter() - t0
    print(f"\ntotal wall time {results['wall_s']:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
