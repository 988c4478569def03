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
from pretrain.distributed import is_distributed, rank, rng_state, set_rng_state, world_size
from pretrain.evaluation.embed import SplitFeatures, embed_split
from pretrain.evaluation.plots import write_plots
from pretrain.evaluation.tasks import EVALUATORS, EvalContext, WorkSplit, planned_tasks


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
    tasks = {name: EVALUATORS.get(name, "eval.tasks")() for name in planned_tasks(cfg, names)}
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
    ev = cfg.eval
    ev = replace(ev, datasets=[], tasks=ev.tasks if ds.tasks is None else ds.tasks,
                 classnames=ev.classnames if ds.classnames is None else ds.classnames,
                 templates=ev.templates if ds.templates is None else ds.templates)
    view = replace(cfg, data=data, eval=ev)
    return view, (build_modalities(data, train=False) if ds.captions == "all" else modalities)


# the first metric keys (README, demo), kept: image zero-shot top-1 and image<->text R@1,
# class-aware where labels exist
SHORT_NAMES = {"eval/zeroshot_top1": ["eval/zeroshot/image/top1"],
               "eval/i2t_r1": ["eval/retrieval_class/image_to_text/r1", "eval/retrieval/image_to_text/r1"],
               "eval/t2i_r1": ["eval/retrieval_class/text_to_image/r1", "eval/retrieval/text_to_image/r1"]}


def short_names(metrics: dict[str, float]) -> dict[str, float]:
    out = {}
    for short, keys in SHORT_NAMES.items():
        key = next((k for k in keys if k in metrics), None)
        if key is not None:
            out[short] = metrics[key]
            out[short + "/chance"] = metrics[key + "/chance"]
    return out


def similarity_example(split: SplitFeatures, modalities: list[str], cfg, size: int = 24) -> Optional[dict]:
    """A small similarity matrix of the first retrieval pair (samples spread over the classes)."""
    pairs = cfg.eval.retrieval.pairs or [[a, b] for a in modalities for b in modalities if a != b]
    if "image" in modalities and "text" in modalities and not cfg.eval.retrieval.pairs:
        pairs = [["image", "text"]]
    if not pairs:
        return None
    a, b = pairs[0]
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


TASK_KEYS = frozenset({"zeroshot", "retrieval", "retrieval_class", "symile", "symile_pairwise", "linear_probe"})


def _parts(key: str) -> tuple[str, list[str]]:
    """(dataset name, the key's parts after it): ``eval/coco/retrieval/...`` -> ("coco", [...]);
    ``data.val``'s keys have no name."""
    parts = key.split("/")[1:]
    if len(parts) > 2 and parts[0] not in TASK_KEYS and parts[1] in TASK_KEYS:
        return parts[0], parts[1:]
    return "", parts


def _label(parts: list[str]) -> str:
    """``zeroshot/image/top1`` -> ``zero-shot image top-1``; ``retrieval_class/image_to_text/r1`` ->
    ``image->text R@1 (class-aware)``; other keys as they are."""
    task, metric = parts[0], parts[-1]
    what = "/".join(parts[1:-1])
    k = metric[1:] if metric[:1] == "r" and metric[1:].isdigit() else None
    if task == "zeroshot":
        return f"zero-shot {what} top-{metric[3:]}"
    if task in ("retrieval", "retrieval_class") and k is not None:
        a, _, b = what.partition("_to_")
        return f"{a}->{b} R@{k}" + (" (class-aware)" if task == "retrieval_class" else "")
    if task in ("symile", "symile_pairwise") and k is not None:
        scoring = "multilinear" if task == "symile" else "pairwise sum"
        return f"symile {what} R@{k} ({scoring})"
    if task == "linear_probe":
        return f"linear probe {what} top-1"
    return "/".join(parts)


def format_metrics(metrics: dict[str, float]) -> str:
    """The printout of an evaluation: per dataset (``data.val`` first, then ``eval.datasets``),
    each top-1 / top-5 / R@1 once (short-name duplicates left out), next to its chance and, for
    retrieval, its median rank."""
    groups: dict[str, list[str]] = {"": []}
    for key in sorted(metrics):
        if key in SHORT_NAMES or not key.startswith("eval/"):
            continue
        name, parts = _parts(key)
        if parts == ["samples"] or not (key.endswith("/r1") or key.endswith("/top1") or key.endswith("/top5")):
            continue
        chance = metrics.get(key + "/chance")
        extra = f"   (chance {100 * chance:.2f}%)" if chance is not None else ""
        base = key.rsplit("/", 1)[0]
        if f"{base}/median_rank" in metrics:
            extra += f"   median rank {metrics[f'{base}/median_rank']:.1f}"
        lead = f"{name}: " if name else ""
        groups.setdefault(name, []).append(f"[eval] {lead + _label(parts):<40} {100 * metrics[key]:6.2f}%{extra}")
    lines = [f"[eval] held-out samples: {int(metrics.get('eval/samples', 0))}"] + groups.pop("")
    for name, rows in groups.items():
        lines.append(f"[eval] {name}: samples: {int(metrics.get(f'eval/{name}/samples', 0))}")
        lines += rows
    return "\n".join(lines)
