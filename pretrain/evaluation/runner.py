"""``evaluate()``: the one entry point of evaluation (the trainer, ``python -m pretrain.eval``),
and ``format_metrics``, the one printout of its results."""
from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from pretrain.data import build_modalities
from pretrain.distributed import collective, is_distributed, rank, rng_state, set_rng_state, world_size
from pretrain.evaluation.embed import SplitFeatures, embed_split
from pretrain.evaluation.plots import write_plots
from pretrain.evaluation.tasks import EVALUATORS, EvalContext, WorkSplit, evaluator, figures, planned_tasks


def evaluate(model, cfg, modalities, device: torch.device, step: int = 0,
             output_dir: Optional[str | Path] = None) -> dict[str, float]:
    """Every planned task (``eval.tasks``) on ``data.val``, then on each of ``eval.datasets``
    (metrics ``eval/<name>/...``): the metrics, the same on every rank. ``modalities``: the
    evaluation decoders (``build_modalities(cfg.data, train=False)``). With ``output_dir``, rank 0
    also writes ``<output_dir>/eval/step{step:06d}.json`` and (``eval.plots``) the PNGs under
    ``eval/plots/`` and ``eval/index.html``. Collective: every rank calls it. The model is left in
    its mode and the random streams as they were."""
    t0 = time.perf_counter()
    was_training, streams = model.training, rng_state()
    model.eval()
    try:
        metrics, val, names = evaluate_split(model, cfg, modalities, device)
        metrics.update(short_names(metrics))
        for ds in cfg.eval.datasets:
            view, ds_modalities = dataset_view(cfg, ds, modalities)
            more, _, _ = evaluate_split(model, view, ds_modalities, device, key=f"eval.datasets.{ds.name}")
            metrics.update({f"eval/{ds.name}/{k[len('eval/'):]}": v for k, v in more.items()})
        if is_distributed():  # rank 0's numbers everywhere (a GPU may differ in the last bits)
            box = [metrics]
            with collective("evaluation: rank 0's metrics (broadcast_object_list)"):
                dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
            metrics = box[0]
        metrics["eval/seconds"] = time.perf_counter() - t0
        if output_dir is not None and rank() == 0:
            example = similarity_example(val, names, cfg) if cfg.eval.plots else None
            write_outputs(metrics, example, Path(output_dir), step, plots=cfg.eval.plots)
        return metrics
    finally:
        model.train(was_training)
        set_rng_state(streams)


def evaluate_split(model, cfg, modalities, device: torch.device, key: str = "data.val"):
    """(metrics ``eval/...``, the split's features, the evaluated modalities) of ``cfg.data.val``."""
    names = [m for m in cfg.data.modalities if m in model.towers]
    tasks = {name: evaluator(cfg, name) for name in planned_tasks(cfg, names)}
    lockstep = cfg.train.zero_stage == 3 and world_size() > 1
    content_of = sorted({m for task in tasks.values() for m in task.content_of(cfg, names)})
    val = embed_split(model, cfg, modalities, cfg.data.val, device, content_of=content_of, lockstep=lockstep)
    if len(val) == 0:
        raise RuntimeError(f"{key}.urls: no samples found in {cfg.data.val.urls!r}")
    ctx = EvalContext(model, cfg, modalities, device, names, val,
                      WorkSplit(rank(), world_size(), cfg.eval.chunk_size, device), lockstep)
    metrics: dict[str, float] = {"eval/samples": float(len(val))}
    for task in tasks.values():
        metrics.update(task.run(ctx))
    return metrics, val, names


def dataset_view(cfg, ds, modalities):
    """(the config as one of ``eval.datasets`` sees it, its decoders): its shards as ``data.val``,
    its tasks, class names and templates where given; with ``captions: all`` its text decoders keep
    every caption (built anew), otherwise the run's evaluation decoders serve."""
    data = cfg.data
    if ds.captions == "all":
        mods = {m: replace(mc, options={**mc.options, "captions": "all", "max_captions": ds.max_captions})
                if mc.decoder_name(m) == "text" else mc for m, mc in data.modalities.items()}
        data = replace(data, modalities=mods)
    data = replace(data, val=ds.split())
    view = replace(cfg, data=data, eval=cfg.eval.for_dataset(ds))
    return view, (build_modalities(data, train=False) if ds.captions == "all" else modalities)


def short_names(metrics: dict[str, float]) -> dict[str, float]:
    """The short metric names the tasks keep (``eval/zeroshot_top1``, ``eval/i2t_r1``, ...)."""
    out: dict[str, float] = {}
    for _, cls in EVALUATORS.items():
        out.update(cls().aliases(metrics))
    return out


def similarity_example(split: SplitFeatures, modalities: list[str], cfg, size: int = 24) -> Optional[dict]:
    """A small similarity matrix of the pair the first task that has a say names (retrieval: its
    first pair), samples spread over the classes."""
    pair = next((p for p in (evaluator(cfg, name).example_pair(cfg, modalities) for name, _ in EVALUATORS.items())
                 if p is not None), None)
    if pair is None:
        return None
    a, b = pair
    rows = (split.masks[a] & split.masks[b]).nonzero().squeeze(1)
    if rows.numel() == 0:
        return None
    labels = split.labels[rows].cpu()
    if bool((labels >= 0).any()):  # round-robin over the classes, then sorted by class
        per_class = [(labels == c).nonzero().squeeze(1).tolist() for c in labels.unique()]
        picked, i = [], 0
        while len(picked) < min(size, rows.numel()):
            picked += [lst[i] for lst in per_class if i < len(lst)][: size - len(picked)]
            i += 1
        picked = sorted(picked, key=lambda j: (int(labels[j]), j))
        rows = rows[torch.tensor(picked, dtype=torch.long, device=rows.device)]
    else:
        rows = rows[:size]
    sim = (split.features[a][rows] @ split.features[b][rows].T).cpu()
    return {"matrix": sim, "rows": a, "cols": b, "labels": split.labels[rows].cpu().tolist()}


def _json_value(v: float):
    return v if math.isfinite(v) else str(v)


def write_outputs(metrics: dict[str, float], example: Optional[dict], output_dir: Path, step: int,
                  plots: bool = True) -> Path:
    """The per-evaluation JSON and the plots; returns the JSON's path."""
    folder = output_dir / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step{step:06d}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"step": step, **{k: _json_value(v) for k, v in metrics.items()}}, indent=1) + "\n")
    tmp.replace(path)
    if plots:
        write_plots(folder, step, example)
    return path


def format_metrics(metrics: dict[str, float]) -> str:
    """The printout of an evaluation: per dataset (``data.val`` first, then ``eval.datasets``), the
    figures each task declares (``Evaluator.figures``), next to their chance."""
    lines = []
    for name, rows in figures(metrics).items():
        if name:
            lines.append(f"[eval] {name}: samples: {int(metrics.get(f'eval/{name}/samples', 0))}")
        else:
            lines.append(f"[eval] held-out samples: {int(metrics.get('eval/samples', 0))}")
        lead = f"{name}: " if name else ""
        for f in rows:
            chance = f"   (chance {100 * f.chance:.2f}%)" if isinstance(f.chance, (int, float)) else ""
            lines.append(f"[eval] {lead + f.label:<40} {_percent(f.value)}{chance}{f.extra}")
    return "\n".join(lines)


def _percent(value) -> str:
    return f"{100 * value:6.2f}%" if isinstance(value, (int, float)) else f"{value!s:>7}"
