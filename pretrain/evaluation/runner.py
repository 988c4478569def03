"""The evaluation tasks on a whole split's features, and the entry points the trainer and the CLI
call. Metric keys are documented in ``pretrain/evaluation/__init__.py``."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from pretrain.checkpoint import rng_state, set_rng_state
from pretrain.config import Config
from pretrain.data import build_modalities
from pretrain.evaluation.embed import SplitFeatures, embed_split, encode
from pretrain.evaluation.probe import linear_probe_accuracy
from pretrain.evaluation.ranking import (
    first_relevant_rank,
    median_rank,
    mip_queries,
    pairwise_sum_queries,
    recall_at,
    recall_chance,
    sample_negatives,
    sampled_rank,
)
from pretrain.losses.gather import all_gather_nograd, batch_layout, is_distributed

TASKS = ("zeroshot", "retrieval", "symile", "linear_probe")


# ------------------------------------------------------------------------------------ helpers


def _row_range(n: int, block: int, rank: int, world: int) -> tuple[int, int]:
    """This rank's contiguous share of n query rows, in whole blocks (the ranks' shares in order)."""
    blocks = math.ceil(n / block) if n else 0
    b0, b1 = blocks * rank // world, blocks * (rank + 1) // world
    return min(n, b0 * block), min(n, b1 * block)


class _Shared:
    """Splits per-query work over the ranks and gathers the results (every rank calls each method
    the same number of times, in the same order)."""

    def __init__(self, rank: int, world: int, block: int, device: torch.device):
        self.rank, self.world, self.block, self.device = rank, world, block, device

    def rows(self, n: int) -> tuple[int, int]:
        return _row_range(n, self.block, self.rank, self.world) if is_distributed() else (0, n)

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        if not is_distributed():
            return local
        local = local.to(self.device)
        return all_gather_nograd(local, batch_layout(local.shape[0], self.device))


def _recall_metrics(prefix: str, ranks: torch.Tensor, num_relevant: torch.Tensor, num_candidates,
                    ks: list[int]) -> dict[str, float]:
    out = {}
    rec, chance = recall_at(ranks, ks), recall_chance(num_relevant, num_candidates, ks)
    for k in ks:
        out[f"{prefix}/r{k}"] = rec[k]
        out[f"{prefix}/r{k}/chance"] = chance[k]
    out[f"{prefix}/median_rank"] = median_rank(ranks)
    out[f"{prefix}/queries"] = float(int((ranks > 0).sum()))
    return out


def _modalities(model, cfg: Config) -> list[str]:
    """Evaluated modalities: the configured ones that have a tower, in config order."""
    return [m for m in cfg.data.modalities if m in model.towers]


def planned_tasks(model, cfg: Config) -> list[str]:
    """``eval.tasks``, or (unset) every task that applies to this model and config."""
    if cfg.eval.tasks is not None:
        return list(cfg.eval.tasks)
    mods = _modalities(model, cfg)
    tasks = []
    if cfg.eval.classnames and cfg.eval.zeroshot.text in mods and cfg.data.labels is not None:
        tasks.append("zeroshot")
    if len(mods) >= 2:
        tasks.append("retrieval")
    if len(mods) >= 3:
        tasks.append("symile")
    return tasks


# -------------------------------------------------------------------------------------- tasks


@torch.no_grad()
def class_embeddings(model, cfg: Config, device: torch.device) -> torch.Tensor:
    """(C, d): per class, the mean of its prompts' text features (class names x templates),
    renormalised. The prompts go through the text modality's own decoder tokenizer."""
    text = cfg.eval.zeroshot.text
    modalities, _ = build_modalities(cfg.data, train=False)
    decoder = next((m.decoder for m in modalities if m.name == text), None)
    tokenizer = getattr(decoder, "tokenizer", None)
    if tokenizer is None:
        raise RuntimeError(f"eval.zeroshot.text: modality {text!r} has no tokenizer (is its decoder 'text'?)")
    prompts = [t.format(name) for name in cfg.eval.classnames for t in cfg.eval.templates]
    ids = torch.stack([tokenizer.encode(p) for p in prompts])
    rows = []
    for start in range(0, len(prompts), cfg.eval.batch_size):
        rows.append(encode(model, text, ids[start:start + cfg.eval.batch_size].to(device)).float())
    emb = torch.cat(rows).reshape(len(cfg.eval.classnames), len(cfg.eval.templates), -1).mean(dim=1)
    return torch.nn.functional.normalize(emb, dim=-1)


def zeroshot_metrics(features: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor, prefix: str,
                     chunk_size: int = 4096) -> dict[str, float]:
    """Top-1 and top-5 (capped at the number of classes) of each sample's nearest classes;
    samples labelled -1 or beyond the class list are left out."""
    num_classes = classes.shape[0]
    keep = (labels >= 0) & (labels < num_classes)
    x, y = features[keep], labels[keep].to(features.device)
    ks = sorted({1, min(5, num_classes)})
    hits = {k: 0 for k in ks}
    for start in range(0, x.shape[0], chunk_size):
        top = (x[start:start + chunk_size] @ classes.to(x.device).T).topk(max(ks), dim=1).indices
        match = top == y[start:start + chunk_size, None]
        for k in ks:
            hits[k] += int(match[:, :k].any(dim=1).sum())
    n = x.shape[0]
    out = {f"{prefix}/samples": float(n)}
    for k in ks:
        out[f"{prefix}/top{k}"] = hits[k] / n if n else float("nan")
        out[f"{prefix}/top{k}/chance"] = k / num_classes
    return out


def retrieval_metrics(query: torch.Tensor, cand: torch.Tensor, labels: Optional[torch.Tensor], prefix: str,
                      class_prefix: Optional[str], ks: list[int], chunk_size: int, shared: _Shared) -> dict[str, float]:
    """Paired retrieval (query i's positive is candidate i) and, with labels, class-aware retrieval
    (a hit is any candidate of the query's class) over the labelled rows."""
    n = query.shape[0]
    q0, q1 = shared.rows(n)
    ranks = shared.gather(first_relevant_rank(query[q0:q1], cand, targets=torch.arange(q0, q1, device=query.device),
                                              chunk_size=chunk_size))
    out = _recall_metrics(prefix, ranks, torch.ones(n), n, ks)
    if class_prefix is not None and labels is not None:
        keep = labels >= 0
        if bool(keep.any()):
            lq, lc, y = query[keep], cand[keep], labels[keep].to(query.device)
            q0, q1 = shared.rows(lq.shape[0])
            ranks = shared.gather(first_relevant_rank(lq[q0:q1], lc, query_labels=y[q0:q1], candidate_labels=y,
                                                      chunk_size=chunk_size))
            relevant = torch.bincount(y.cpu())[y.cpu()]
            out.update(_recall_metrics(class_prefix, ranks, relevant, lq.shape[0], ks))
    return out


def symile_metrics(split: SplitFeatures, model, target: str, others: list[str], cfg: Config,
                   shared: _Shared) -> dict[str, float]:
    """Retrieval of ``target`` given all the ``others``: candidates are the split's ``target``
    features (or its distinct inputs), scored by the multilinear inner product and/or the sum of
    pairwise dot products; the whole candidate set or 1 positive + k sampled negatives."""
    s = cfg.eval.symile
    device = split.features[target].device
    present = split.masks[target].clone()
    for o in others:  # a context modality must be there, unless its tower encodes absence itself
        if not getattr(model.towers[o], "uses_indicator", False):
            present &= split.masks[o]
    cand_rows = split.masks[target].nonzero().squeeze(1)
    query_rows = present.nonzero().squeeze(1)
    if s.distinct:
        ids = split.content[target][cand_rows]
        uniq, inverse = torch.unique(ids, return_inverse=True)
        first = torch.full((uniq.shape[0],), len(ids), dtype=torch.long, device=ids.device)
        first.scatter_reduce_(0, inverse, torch.arange(len(ids), device=ids.device), reduce="amin")
        candidates = split.features[target][cand_rows[first]]
        position = torch.full((len(split),), -1, dtype=torch.long, device=device)
        position[cand_rows] = inverse.to(device)
        targets = position[query_rows]
    else:
        candidates = split.features[target][cand_rows]
        position = torch.full((len(split),), -1, dtype=torch.long, device=device)
        position[cand_rows] = torch.arange(len(cand_rows), device=device)
        targets = position[query_rows]
    m = candidates.shape[0]
    sampled = 0 < s.candidates < m - 1
    ks = cfg.eval.recall_at
    out: dict[str, float] = {}
    for scoring in s.scoring:
        context = [split.features[o][query_rows] for o in others]
        queries = mip_queries(context) if scoring == "mip" else pairwise_sum_queries(context)
        prefix = f"eval/symile/{target}" if scoring == "mip" else f"eval/symile_pairwise/{target}"
        n = queries.shape[0]
        q0, q1 = shared.rows(n)
        if sampled:
            block = cfg.eval.chunk_size
            parts = []
            for b0 in range(q0, q1, block):  # negatives seeded per global block: the same at any world size
                b1 = min(q1, b0 + block)
                gen = torch.Generator().manual_seed(s.seed * 1_000_003 + b0 // block)
                neg = sample_negatives(targets[b0:b1], m, s.candidates, gen)
                parts.append(sampled_rank(queries[b0:b1], candidates, targets[b0:b1], neg, cfg.eval.chunk_size))
            local = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)
            num_candidates = s.candidates + 1
        else:
            local = first_relevant_rank(queries[q0:q1], candidates, targets=targets[q0:q1], chunk_size=cfg.eval.chunk_size)
            num_candidates = m
        ranks = shared.gather(local)
        out.update(_recall_metrics(prefix, ranks, torch.ones(n), num_candidates, ks))
        out[f"{prefix}/candidates"] = float(num_candidates)
    return out


def linear_probe_metrics(model, cfg: Config, val: SplitFeatures, modalities: list[str], rank: int, world: int,
                         device: torch.device, lockstep: bool) -> dict[str, float]:
    p = cfg.eval.linear_probe
    split = p.split if (p.split.urls or p.split.sources) else cfg.data.train
    train = embed_split(model, cfg, split, rank, world, device, max_samples=p.max_train_samples, lockstep=lockstep)
    out: dict[str, float] = {}
    for m in p.modalities or modalities:
        tr = (train.labels >= 0) & train.masks[m]
        va = (val.labels >= 0) & val.masks[m]
        if not bool(tr.any()) or not bool(va.any()):
            continue
        num_classes = max(int(train.labels.max()), int(val.labels.max()), len(cfg.eval.classnames) - 1) + 1
        res = linear_probe_accuracy(train.features[m][tr], train.labels[tr], val.features[m][va], val.labels[va],
                                    num_classes, p.l2, p.max_iter)
        for k, v in res.items():
            out[f"eval/linear_probe/{m}/{'top1/chance' if k == 'chance' else k}"] = v
        out[f"eval/linear_probe/{m}/train_samples"] = float(int(tr.sum()))
    return out


def _legacy_aliases(metrics: dict[str, float]) -> dict[str, float]:
    """The first keys (README, demo): image zero-shot top-1 and image<->text R@1, class-aware
    where labels exist."""
    out = {}
    pairs = {"eval/zeroshot_top1": "eval/zeroshot/image/top1"}
    for short, a, b in (("i2t", "image", "text"), ("t2i", "text", "image")):
        key = f"eval/retrieval_class/{a}_to_{b}/r1"
        pairs[f"eval/{short}_r1"] = key if key in metrics else f"eval/retrieval/{a}_to_{b}/r1"
    for alias, key in pairs.items():
        if key in metrics:
            out[alias] = metrics[key]
            out[alias + "/chance"] = metrics[key + "/chance"]
    return out


# -------------------------------------------------------------------------------- entry points


def _similarity_example(split: SplitFeatures, modalities: list[str], cfg: Config, size: int = 24) -> Optional[dict]:
    """A small similarity matrix of the first retrieval pair (samples sorted by class)."""
    pairs = cfg.eval.retrieval.pairs or [[a, b] for a in modalities for b in modalities if a != b]
    if "image" in modalities and "text" in modalities and not cfg.eval.retrieval.pairs:
        pairs = [["image", "text"]]
    if not pairs:
        return None
    a, b = pairs[0]
    rows = (split.masks[a] & split.masks[b]).nonzero().squeeze(1)
    if rows.numel() == 0:
        return None
    labels = split.labels[rows]
    if bool((labels >= 0).any()):  # spread over the classes: round-robin by class, then sorted
        order = torch.argsort(labels.cpu(), stable=True)
        classes = labels.cpu()[order].unique()
        picked = []
        per_class = [order[labels.cpu()[order] == c].tolist() for c in classes]
        i = 0
        while len(picked) < min(size, rows.numel()):
            for lst in per_class:
                if i < len(lst) and len(picked) < size:
                    picked.append(lst[i])
            i += 1
        picked = sorted(picked, key=lambda j: (int(labels[j]), j))
        rows = rows[torch.tensor(picked, dtype=torch.long, device=rows.device)]
    else:
        rows = rows[:size]
    sim = (split.features[a][rows] @ split.features[b][rows].T).cpu()
    return {"matrix": sim, "rows": a, "cols": b, "labels": split.labels[rows].cpu().tolist()}


def _evaluate(model, cfg: Config, rank: int, world_size: int, device: torch.device,
              keep_example: bool = False) -> tuple[dict[str, float], Optional[dict]]:
    was_training = model.training
    rng = rng_state()  # evaluation leaves the training run's random streams as they were
    model.eval()
    try:
        lockstep = cfg.train.zero_stage == 3 and world_size > 1
        mods = _modalities(model, cfg)
        tasks = planned_tasks(model, cfg)
        content_of = (cfg.eval.symile.targets or mods) if ("symile" in tasks and cfg.eval.symile.distinct) else []
        val = embed_split(model, cfg, cfg.data.val, rank, world_size, device, content_of=content_of, lockstep=lockstep)
        if len(val) == 0:
            raise RuntimeError(f"data.val.urls: no validation samples found in {cfg.data.val.urls!r}")
        metrics: dict[str, float] = {"eval/samples": float(len(val))}
        shared = _Shared(rank, world_size, cfg.eval.chunk_size, device)
        ks = cfg.eval.recall_at
        has_labels = bool((val.labels >= 0).any())
        if "zeroshot" in tasks:
            classes = class_embeddings(model, cfg, device)
            text = cfg.eval.zeroshot.text
            for m in cfg.eval.zeroshot.modalities or [x for x in mods if x != text]:
                rows = val.masks[m]
                metrics.update(zeroshot_metrics(val.features[m][rows], val.labels[rows], classes,
                                                f"eval/zeroshot/{m}", cfg.eval.chunk_size))
        if "retrieval" in tasks:
            pairs = cfg.eval.retrieval.pairs or [[a, b] for a in mods for b in mods if a != b]
            for a, b in pairs:
                rows = val.masks[a] & val.masks[b]
                name = f"{a}_to_{b}"
                metrics.update(retrieval_metrics(
                    val.features[a][rows], val.features[b][rows], val.labels[rows] if has_labels else None,
                    f"eval/retrieval/{name}", f"eval/retrieval_class/{name}" if cfg.eval.retrieval.class_aware else None,
                    ks, cfg.eval.chunk_size, shared))
        if "symile" in tasks:
            for target in cfg.eval.symile.targets or mods:
                others = [o for o in mods if o != target]
                metrics.update(symile_metrics(val, model, target, others, cfg, shared))
        if "linear_probe" in tasks:
            metrics.update(linear_probe_metrics(model, cfg, val, mods, rank, world_size, device, lockstep))
        metrics.update(_legacy_aliases(metrics))
        if is_distributed():  # rank 0's numbers everywhere (a GPU may differ in the last bits)
            box = [metrics]
            dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
            metrics = box[0]
        example = _similarity_example(val, mods, cfg) if keep_example and rank == 0 else None
        return metrics, example
    finally:
        model.train(was_training)
        set_rng_state(rng)


def evaluate(model, cfg: Config, rank: int, world_size: int, device: torch.device) -> dict[str, float]:
    """Every planned task on ``data.val``: the metrics, the same on every rank. Collective: every
    rank calls it. Writes nothing (see ``run_evaluation``)."""
    metrics, _ = _evaluate(model, cfg, rank, world_size, device)
    return metrics


def run_evaluation(model, cfg: Config, rank: int, world_size: int, device: torch.device, step: int,
                   output_dir: str | Path | None = None) -> dict[str, float]:
    """``evaluate`` plus, on rank 0, ``<output_dir>/eval/step{step:06d}.json`` and (``eval.plots``)
    ``<output_dir>/eval/plots/recall_vs_step.png`` (every JSON so far), ``similarity_step{step:06d}.png``
    and ``<output_dir>/eval/index.html`` linking them. ``output_dir`` defaults to ``cfg.output_dir``.
    Collective: every rank calls it; returns the metrics on every rank."""
    t0 = time.perf_counter()
    metrics, example = _evaluate(model, cfg, rank, world_size, device, keep_example=cfg.eval.plots)
    metrics["eval/seconds"] = time.perf_counter() - t0
    if rank == 0:
        write_outputs(metrics, example, Path(output_dir if output_dir is not None else cfg.output_dir), step,
                      plots=cfg.eval.plots)
    return metrics


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
        from pretrain.evaluation.plots import write_plots

        write_plots(folder, step, example)
    return path


def format_metrics(metrics: dict[str, float]) -> str:
    """A human summary: each R@1 / top-1 next to its chance, and median ranks."""
    lines = [f"[eval] held-out samples: {int(metrics.get('eval/samples', 0))}"]
    for key in sorted(metrics):
        if key.startswith("eval/") and (key.endswith("/r1") or key.endswith("/top1") or key.endswith("/top5")):
            chance = metrics.get(key + "/chance")
            extra = f"   (chance {100 * chance:.2f}%)" if chance is not None else ""
            base = key.rsplit("/", 1)[0]
            if f"{base}/median_rank" in metrics:
                extra += f"   median rank {metrics[f'{base}/median_rank']:.1f}"
            lines.append(f"[eval] {key[5:]:<40} {100 * metrics[key]:6.2f}%{extra}")
    return "\n".join(lines)
