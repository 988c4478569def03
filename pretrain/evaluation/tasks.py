"""The evaluation tasks, registered by name (``eval.tasks``): each an ``Evaluator`` whose ``run``
turns the held-out split's features into metrics. Metric keys: ``pretrain/evaluation/__init__.py``.

A new task is a registered class (in a module listed in ``data.imports``)::

    from pretrain.evaluation import Evaluator, register_evaluator

    @register_evaluator("alignment")
    class Alignment(Evaluator):
        def applies(self, cfg, modalities):      # run when eval.tasks is unset?
            return len(modalities) >= 2
        def run(self, ctx):                      # ctx: EvalContext; collective (every rank calls it)
            a, b = ctx.names[:2]
            keep = ctx.val.masks[a] & ctx.val.masks[b]
            cos = (ctx.val.features[a][keep] * ctx.val.features[b][keep]).sum(1)
            return {f"eval/alignment/{a}_{b}": float(cos.mean())}
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from pretrain.distributed import all_gather_nograd, batch_layout, is_distributed
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
from pretrain.options import Registry


@dataclass
class EvalContext:
    """What every task sees: the model, the whole config, the evaluation decoders, the embedded
    held-out split (the same on every rank) and the work split over the ranks."""

    model: Any
    cfg: Any  # the whole Config (data, eval, train.seed)
    modalities: Any  # the evaluation decoders (pretrain.data.Modalities)
    device: torch.device
    names: list[str]  # evaluated modalities: the configured ones with a tower, in config order
    val: SplitFeatures
    work: "WorkSplit"
    lockstep: bool  # ZeRO-3 over several ranks: every forward pass is a collective


class Evaluator:
    """A registered evaluation task."""

    default = True  # runs, where it applies, when eval.tasks is unset

    def applies(self, cfg, names: list[str]) -> bool:
        return True

    def content_of(self, cfg, names: list[str]) -> list[str]:
        """Modalities whose inputs the split's embedding should also hash (``SplitFeatures.content``)."""
        return []

    def run(self, ctx: EvalContext) -> dict[str, float]:
        raise NotImplementedError


EVALUATORS = Registry("evaluation task", base=Evaluator, hint="a module that registers more can be listed in data.imports")


def register_evaluator(name: str, cls: Optional[type] = None, *, replace: bool = False):
    return EVALUATORS.register(name, cls, replace=replace)


# ---------------------------------------------------------------------------------- helpers


def row_range(n: int, block: int, rank: int, world: int) -> tuple[int, int]:
    """This rank's contiguous share of n query rows, in whole blocks (the ranks' shares in order)."""
    blocks = math.ceil(n / block) if n else 0
    b0, b1 = blocks * rank // world, blocks * (rank + 1) // world
    return min(n, b0 * block), min(n, b1 * block)


class WorkSplit:
    """Splits per-query work over the ranks and gathers the results (every rank calls each method
    the same number of times, in the same order)."""

    def __init__(self, rank: int, world: int, block: int, device: torch.device):
        self.rank, self.world, self.block, self.device = rank, world, block, device

    def rows(self, n: int) -> tuple[int, int]:
        return row_range(n, self.block, self.rank, self.world) if is_distributed() else (0, n)

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        if not is_distributed():
            return local
        local = local.to(self.device)
        return all_gather_nograd(local, batch_layout(local.shape[0], self.device))


def recall_metrics(prefix: str, ranks: torch.Tensor, num_relevant: torch.Tensor, num_candidates,
                    ks: list[int]) -> dict[str, float]:
    out = {}
    rec, chance = recall_at(ranks, ks), recall_chance(num_relevant, num_candidates, ks)
    for k in ks:
        out[f"{prefix}/r{k}"] = rec[k]
        out[f"{prefix}/r{k}/chance"] = chance[k]
    out[f"{prefix}/median_rank"] = median_rank(ranks)
    out[f"{prefix}/queries"] = float(int((ranks > 0).sum()))
    return out



# -------------------------------------------------------------------------- metric functions


@torch.no_grad()
def class_embeddings(model, cfg, modalities, device: torch.device) -> torch.Tensor:
    """(C, d): per class, the mean of its prompts' text features (class names x templates),
    renormalised. The prompts go through the text modality's own decoder tokenizer."""
    text = cfg.eval.zeroshot.text
    decoder = modalities[text].decoder if text in modalities else None
    tokenizer = getattr(decoder, "tokenizer", None)
    if tokenizer is None:
        raise RuntimeError(f"eval.zeroshot.text: modality {text!r} has no tokenizer (is its decoder 'text'?)")
    classnames, templates = cfg.eval.class_list(), cfg.eval.template_list()
    prompts = [t.format(name) for name in classnames for t in templates]
    ids = torch.stack([tokenizer.encode(p) for p in prompts])
    rows = []
    for start in range(0, len(prompts), cfg.eval.batch_size):
        rows.append(encode(model, text, ids[start:start + cfg.eval.batch_size].to(device)).float())
    emb = torch.cat(rows).reshape(len(classnames), len(templates), -1).mean(dim=1)
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
                      class_prefix: Optional[str], ks: list[int], chunk_size: int, shared: WorkSplit) -> dict[str, float]:
    """Paired retrieval (query i's positive is candidate i) and, with labels, class-aware retrieval
    (a hit is any candidate of the query's class) over the labelled rows."""
    n = query.shape[0]
    q0, q1 = shared.rows(n)
    ranks = shared.gather(first_relevant_rank(query[q0:q1], cand, targets=torch.arange(q0, q1, device=query.device),
                                              chunk_size=chunk_size))
    out = recall_metrics(prefix, ranks, torch.ones(n), n, ks)
    if class_prefix is not None and labels is not None:
        keep = labels >= 0
        if bool(keep.any()):
            lq, lc, y = query[keep], cand[keep], labels[keep].to(query.device)
            q0, q1 = shared.rows(lq.shape[0])
            ranks = shared.gather(first_relevant_rank(lq[q0:q1], lc, query_labels=y[q0:q1], candidate_labels=y,
                                                      chunk_size=chunk_size))
            relevant = torch.bincount(y.cpu())[y.cpu()]
            out.update(recall_metrics(class_prefix, ranks, relevant, lq.shape[0], ks))
    return out


def multi_caption_metrics(split: SplitFeatures, a: str, b: str, prefix: str, ks: list[int], chunk_size: int,
                          shared: WorkSplit) -> dict[str, float]:
    """Retrieval with several captions per sample, as COCO and Flickr30k are reported: each sample
    of ``a`` (or each caption, when ``a`` is the multi-caption modality) queries the other side; a
    sample->captions query hits when any of its captions is in the top k, a caption->sample query
    when its own sample is. Ranks and chance are counted as for paired retrieval."""
    device = split.labels.device
    index = torch.arange(len(split), device=device)

    def side(m: str) -> tuple[torch.Tensor, torch.Tensor]:  # (features, the sample each row belongs to)
        if m in split.multi:
            feats, owner = split.multi[m]
            keep = split.masks[m][owner]
            return feats[keep], owner[keep]
        keep = split.masks[m]
        return split.features[m][keep], index[keep]

    (query, q_owner), (cand, c_owner) = side(a), side(b)
    present = torch.zeros(len(split), dtype=torch.bool, device=device)
    present[c_owner] = True
    q_keep = present[q_owner]  # a query whose sample has no candidate cannot hit
    query, q_owner = query[q_keep], q_owner[q_keep]
    q0, q1 = shared.rows(query.shape[0])
    ranks = shared.gather(first_relevant_rank(query[q0:q1], cand, query_labels=q_owner[q0:q1],
                                              candidate_labels=c_owner, chunk_size=chunk_size))
    relevant = torch.bincount(c_owner.cpu(), minlength=len(split))[q_owner.cpu()]
    return recall_metrics(prefix, ranks, relevant, cand.shape[0], ks)


def symile_metrics(split: SplitFeatures, model, target: str, others: list[str], cfg,
                   shared: WorkSplit) -> dict[str, float]:
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
        out.update(recall_metrics(prefix, ranks, torch.ones(n), num_candidates, ks))
        out[f"{prefix}/candidates"] = float(num_candidates)
    return out


def linear_probe_metrics(ctx: "EvalContext") -> dict[str, float]:
    cfg, val, modalities = ctx.cfg, ctx.val, ctx.names
    p = cfg.eval.linear_probe
    split = p.split if (p.split.urls or p.split.sources) else cfg.data.train
    train = embed_split(ctx.model, cfg, ctx.modalities, split, ctx.device, max_samples=p.max_train_samples,
                        lockstep=ctx.lockstep, features=p.features)
    if p.features == "backbone":  # the held-out split once more, before the heads
        val = embed_split(ctx.model, cfg, ctx.modalities, cfg.data.val, ctx.device, lockstep=ctx.lockstep,
                          features="backbone")
    out: dict[str, float] = {}
    for m in p.modalities or modalities:
        tr = (train.labels >= 0) & train.masks[m]
        va = (val.labels >= 0) & val.masks[m]
        if not bool(tr.any()) or not bool(va.any()):
            continue
        num_classes = max(int(train.labels.max()), int(val.labels.max()), len(cfg.eval.class_list()) - 1) + 1
        res = linear_probe_accuracy(train.features[m][tr], train.labels[tr], val.features[m][va], val.labels[va],
                                    num_classes, p.l2, p.max_iter)
        for k, v in res.items():
            out[f"eval/linear_probe/{m}/{'top1/chance' if k == 'chance' else k}"] = v
        out[f"eval/linear_probe/{m}/train_samples"] = float(int(tr.sum()))
        out[f"eval/linear_probe/{m}/width"] = float(train.features[m].shape[1])  # head: embed_dim; backbone: its width
    return out


# ------------------------------------------------------------------------------------ the tasks


@register_evaluator("zeroshot")
class ZeroShot(Evaluator):
    """Class names x templates through the ``eval.zeroshot.text`` tower; every other modality's
    labelled samples are classified by their nearest classes."""

    def applies(self, cfg, names):
        return bool(cfg.eval.classnames) and cfg.eval.zeroshot.text in names and cfg.data.labels is not None

    def run(self, ctx):
        classes = class_embeddings(ctx.model, ctx.cfg, ctx.modalities, ctx.device)
        text, out = ctx.cfg.eval.zeroshot.text, {}
        for m in ctx.cfg.eval.zeroshot.modalities or [x for x in ctx.names if x != text]:
            rows = ctx.val.masks[m]
            out.update(zeroshot_metrics(ctx.val.features[m][rows], ctx.val.labels[rows], classes,
                                        f"eval/zeroshot/{m}", ctx.cfg.eval.chunk_size))
        return out


@register_evaluator("retrieval")
class Retrieval(Evaluator):
    """Each ordered pair (or ``eval.retrieval.pairs``): paired and class-aware R@k, median rank."""

    def applies(self, cfg, names):
        return len(names) >= 2

    def run(self, ctx):
        e, val, out = ctx.cfg.eval, ctx.val, {}
        has_labels = bool((val.labels >= 0).any())
        for a, b in e.retrieval.pairs or [[a, b] for a in ctx.names for b in ctx.names if a != b]:
            if a in val.multi or b in val.multi:  # several captions per sample (COCO, Flickr30k)
                out.update(multi_caption_metrics(val, a, b, f"eval/retrieval/{a}_to_{b}", e.recall_at, e.chunk_size,
                                                 ctx.work))
                continue
            rows = val.masks[a] & val.masks[b]
            out.update(retrieval_metrics(
                val.features[a][rows], val.features[b][rows], val.labels[rows] if has_labels else None,
                f"eval/retrieval/{a}_to_{b}", f"eval/retrieval_class/{a}_to_{b}" if e.retrieval.class_aware else None,
                e.recall_at, e.chunk_size, ctx.work))
        return out


@register_evaluator("symile")
class SymileRetrieval(Evaluator):
    """Each target retrieved given all the other modalities (3+ modalities by default)."""

    def applies(self, cfg, names):
        return len(names) >= 3

    def content_of(self, cfg, names):
        return list(cfg.eval.symile.targets or names) if cfg.eval.symile.distinct else []

    def run(self, ctx):
        out = {}
        for target in ctx.cfg.eval.symile.targets or ctx.names:
            out.update(symile_metrics(ctx.val, ctx.model, target, [o for o in ctx.names if o != target], ctx.cfg,
                                      ctx.work))
        return out


@register_evaluator("linear_probe")
class LinearProbeTask(Evaluator):
    """Logistic regression on frozen features of ``eval.linear_probe.split`` (default data.train),
    accuracy on the held-out split; only when listed in ``eval.tasks``."""

    default = False

    def applies(self, cfg, names):
        return cfg.data.labels is not None

    def run(self, ctx):
        return linear_probe_metrics(ctx)


def planned_tasks(cfg, names: list[str]) -> list[str]:
    """``eval.tasks``, or (unset) every default task that applies, in registration order."""
    if cfg.eval.tasks is not None:
        return list(cfg.eval.tasks)
    return [name for name, cls in EVALUATORS.items() if cls.default and cls().applies(cfg, names)]
