"""The evaluation tasks, registered by name (``eval.tasks``): each an ``Evaluator`` that owns its
options (``eval.<task>.*``), checks them against the data, turns the held-out split's features into
metrics and says which of its metrics the printout and the plots show, under what label. Metric
keys: ``pretrain/evaluation/__init__.py``.

A new task is a registered class (in a module listed in ``data.imports``)::

    from dataclasses import dataclass
    from typing import Optional

    from pretrain.evaluation import Evaluator, Figure, register_evaluator
    from pretrain.options import require

    @register_evaluator("alignment")
    class Alignment(Evaluator):
        @dataclass
        class Options:                           # eval.alignment.*: typed, errors name the key
            pairs: Optional[list[list[str]]] = None
            margin: float = 0.0
            def check(self, key):                # what the section alone decides
                require(self.margin >= 0, f"{key}.margin", f"must be >= 0, got {self.margin}")

        def check(self, cfg, planned, key="eval"):   # against cfg.data (after data.imports)
            for i, pair in enumerate(self.options.pairs or []):
                for j, m in enumerate(pair):
                    self.require_modality(cfg, m, f"{self.key}.pairs[{i}][{j}]")

        def applies(self, cfg, names):           # run when eval.tasks is unset?
            return len(names) >= 2

        def run(self, ctx):                      # ctx: EvalContext; collective (every rank calls it)
            out = {}
            for a, b in self.options.pairs or [ctx.names[:2]]:
                keep = ctx.val.masks[a] & ctx.val.masks[b]
                cos = (ctx.val.features[a][keep] * ctx.val.features[b][keep]).sum(1)
                out[f"eval/alignment/{a}_{b}/above"] = float((cos > self.options.margin).float().mean())
                out[f"eval/alignment/{a}_{b}/above/chance"] = 0.5
            return out

        def figures(self, metrics, prefix="eval/"):  # printed lines (default: each key with a /chance twin)
            return [Figure(k, f"{k.split('/')[-2]} aligned", v, metrics.get(k + "/chance"))
                    for k, v in sorted(self.own(metrics, prefix).items()) if k.endswith("/above")]

The contract, for the generic code (``EvalConfig``, ``evaluate``, ``format_metrics``, the plots),
which never names a task:

- ``Options``: the dataclass of ``eval.<task>.*`` (none: ``NoOptions``); the evaluator is built
  as ``cls(options)`` and reads ``self.options``; ``self.key`` is ``eval.<task>``;
- ``check(cfg, planned, key)``: the options against ``cfg.data`` and ``cfg.eval`` (``planned``: the
  task will run; ``key``: ``eval``, or ``eval.datasets.<name>`` for one of the datasets' views);
- ``applies(cfg, names)`` and ``default``: whether it runs when ``eval.tasks`` is unset;
- ``run(ctx)``: the metrics ``eval/<root>/...`` (``roots``: the first parts of its keys; default its name);
- ``figures(metrics, prefix)``: its printed lines (``Figure``: key, label, value, chance, extra,
  curve: also drawn against the step); read from the metrics alone;
- ``aliases(metrics)``: short metric names it keeps (``eval/i2t_r1``); ``example_pair(cfg, names)``:
  the modality pair whose similarity matrix is drawn.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch

from pretrain.data.config import SplitConfig
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
from pretrain.options import NoOptions, Registry, require


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


@dataclass(frozen=True)
class Figure:
    """One line of the printout: a fraction shown as a percentage, next to its chance."""

    key: str  # its metric key
    label: str  # how it reads in the printout and in the plots' legend
    value: Any  # a float (the JSON files hold non-finite values as strings)
    chance: Optional[float] = None
    extra: str = ""  # more on the line, e.g. "median rank 3.0"
    curve: bool = True  # also drawn against the step (eval/plots/recall_vs_step.png)


class Evaluator:
    """A registered evaluation task (see the module docstring for the contract)."""

    Options = NoOptions
    default = True  # runs, where it applies, when eval.tasks is unset
    roots: tuple[str, ...] = ()  # the first parts of its metric keys after eval/ (default: its name)

    def __init__(self, options: Any = None):
        self.options = options if options is not None else self.Options()

    @property
    def key(self) -> str:
        """Where its options are: ``eval.<task>``."""
        return f"eval.{self.registered_name}"

    @classmethod
    def metric_roots(cls) -> tuple[str, ...]:
        return tuple(cls.roots) or (cls.registered_name,)

    def check(self, cfg, planned: bool, key: str = "eval") -> None:
        """The options against the data (``cfg.data``: modalities, labels) and the general
        evaluation options (``cfg.eval``: class names, ...), after ``data.imports``; a
        ``ConfigError`` naming the key. ``planned``: the task will run (what only running needs is
        checked then); ``key``: the key of ``cfg.eval`` (``eval``, or ``eval.datasets.<name>`` for
        a dataset's view), while ``self.key`` (``eval.<task>``) names the task's own options."""

    @staticmethod
    def require_modality(cfg, name: str, key: str) -> None:
        names = list(cfg.data.modalities)
        require(name in names, key, f"no such modality in data.modalities ({', '.join(names)})")

    def applies(self, cfg, names: list[str]) -> bool:
        return True

    def content_of(self, cfg, names: list[str]) -> list[str]:
        """Modalities whose inputs the split's embedding should also hash (``SplitFeatures.content``)."""
        return []

    def run(self, ctx: EvalContext) -> dict[str, float]:
        raise NotImplementedError

    def own(self, metrics: dict[str, Any], prefix: str = "eval/") -> dict[str, Any]:
        """Its metrics among ``metrics`` (those of one dataset: ``prefix`` is ``eval/`` or ``eval/<name>/``)."""
        heads = tuple(f"{prefix}{root}/" for root in self.metric_roots())
        return {k: v for k, v in metrics.items() if k.startswith(heads)}

    def figures(self, metrics: dict[str, Any], prefix: str = "eval/") -> list[Figure]:
        """Its printed lines, from the metrics alone. Default: every metric with a ``/chance`` twin,
        labelled by its key's parts."""
        mine = self.own(metrics, prefix)
        return [Figure(k, " ".join(k[len(prefix):].split("/")), v, mine[k + "/chance"])
                for k, v in sorted(mine.items()) if k + "/chance" in mine]

    def aliases(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Short names kept for some of its metrics of ``data.val`` (each with ``/chance``)."""
        return {}

    def example_pair(self, cfg, names: list[str]) -> Optional[tuple[str, str]]:
        """(rows, columns): the modalities whose similarity matrix the plots draw, if it has a say."""
        return None


def _check_registered(name: str, cls: type) -> None:
    if not name.isidentifier():
        raise ValueError(f"evaluation task {name!r}: a name is an identifier (it names eval.<task>)")
    if not dataclasses.is_dataclass(cls.Options):
        raise TypeError(f"evaluation task {name!r}: {cls.__qualname__}.Options must be a dataclass")


EVALUATORS = Registry("evaluation task", base=Evaluator, hint="a module that registers more can be listed in data.imports")


def register_evaluator(name: str, cls: Optional[type] = None, *, replace: bool = False):
    return EVALUATORS.register(name, cls, replace=replace, check=_check_registered)


def evaluator(cfg, name: str, key: str = "eval.tasks") -> Evaluator:
    """The task ``name`` built with its options of ``cfg.eval`` (``ConfigError`` naming ``key`` if unknown)."""
    return EVALUATORS.get(name, key)(cfg.eval.section(name))


def metric_roots() -> set[str]:
    """Every registered task's metric roots (``eval/<root>/...``)."""
    return {root for _, cls in EVALUATORS.items() for root in cls.metric_roots()}


def figures(metrics: dict[str, float]) -> dict[str, list[Figure]]:
    """The printed figures per dataset (``""``: ``data.val``, then each of ``eval.datasets`` by
    name), each task asked in registration order; read from the metrics alone."""
    roots = metric_roots()
    names = []  # eval/<name>/<root>/...: one of eval.datasets
    for key in metrics:
        parts = key.split("/")
        if len(parts) > 3 and parts[0] == "eval" and parts[1] not in roots and parts[2] in roots and parts[1] not in names:
            names.append(parts[1])
    tasks = [cls() for _, cls in EVALUATORS.items()]
    return {name: [f for task in tasks for f in task.figures(metrics, f"eval/{name}/" if name else "eval/")]
            for name in ["", *sorted(names)]}


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
def class_embeddings(model, cfg, modalities, device: torch.device, text: str = "text") -> torch.Tensor:
    """(C, d): per class, the mean of its prompts' text features (class names x templates),
    renormalised. The prompts go through the ``text`` modality's tower and its decoder's tokenizer."""
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
    pairwise dot products; the whole candidate set or 1 positive + k sampled negatives
    (the options ``eval.symile.*``)."""
    s = cfg.eval.section("symile")
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


def linear_probe_metrics(ctx: "EvalContext", p: "LinearProbeTask.Options") -> dict[str, float]:
    cfg, val, modalities = ctx.cfg, ctx.val, ctx.names
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


def _percent_figures(ev: Evaluator, metrics: dict, prefix: str, label, keep) -> list[Figure]:
    """A figure for each of ``ev``'s metrics whose last part ``keep`` accepts (``label(parts)`` its
    label, ``parts`` the key's parts after the task's root), with its chance and median rank."""
    out = []
    for k, v in sorted(ev.own(metrics, prefix).items()):
        parts = k[len(prefix):].split("/")
        if not keep(parts[-1]):
            continue
        base = k.rsplit("/", 1)[0]
        rank = metrics.get(base + "/median_rank")
        extra = f"   median rank {rank:.1f}" if isinstance(rank, (int, float)) else ""
        out.append(Figure(k, label(parts), v, metrics.get(k + "/chance"), extra, curve=parts[-1] in ("r1", "top1")))
    return out


def _first(metrics: dict, keys: list[str]) -> dict:
    """``{"": metrics[key], "/chance": ...}`` of the first of ``keys`` present (else {})."""
    key = next((k for k in keys if k in metrics), None)
    return {} if key is None else {"": metrics[key], "/chance": metrics[key + "/chance"]}


@register_evaluator("zeroshot")
class ZeroShot(Evaluator):
    """Class names x templates through the ``eval.zeroshot.text`` tower; every other modality's
    labelled samples are classified by their nearest classes."""

    @dataclass
    class Options:
        text: str = "text"  # the modality whose tower (and decoder's tokenizer) encodes the prompts
        modalities: Optional[list[str]] = None  # modalities classified (None: every other one)

    def check(self, cfg, planned, key="eval"):
        if planned:
            require(len(cfg.eval.class_list(key)) >= 2, f"{key}.classnames", "needs at least 2 class names for zero-shot")
            self.require_modality(cfg, self.options.text, f"{self.key}.text")
            require(cfg.data.labels is not None, "data.labels", "zero-shot needs class labels (a class_label decoder)")
        for i, m in enumerate(self.options.modalities or []):
            self.require_modality(cfg, m, f"{self.key}.modalities[{i}]")

    def applies(self, cfg, names):  # with class names (check: the text tower and labels exist)
        return bool(cfg.eval.classnames)

    def run(self, ctx):
        text, out = self.options.text, {}
        classes = class_embeddings(ctx.model, ctx.cfg, ctx.modalities, ctx.device, text)
        for m in self.options.modalities or [x for x in ctx.names if x != text]:
            rows = ctx.val.masks[m]
            out.update(zeroshot_metrics(ctx.val.features[m][rows], ctx.val.labels[rows], classes,
                                        f"eval/zeroshot/{m}", ctx.cfg.eval.chunk_size))
        return out

    def figures(self, metrics, prefix="eval/"):  # top-1 and top-5 (with 5+ classes)
        return _percent_figures(self, metrics, prefix, lambda p: f"zero-shot {'/'.join(p[1:-1])} top-{p[-1][3:]}",
                                lambda last: last in ("top1", "top5"))

    def aliases(self, metrics):  # the first metric key of the README and the demo
        return {f"eval/zeroshot_top1{k}": v for k, v in _first(metrics, ["eval/zeroshot/image/top1"]).items()}


@register_evaluator("retrieval")
class Retrieval(Evaluator):
    """Each ordered pair (or ``eval.retrieval.pairs``): paired and class-aware R@k, median rank."""

    roots = ("retrieval", "retrieval_class")

    @dataclass
    class Options:
        pairs: Optional[list[list[str]]] = None  # [query, candidate] modality pairs (None: every ordered pair)
        class_aware: bool = True  # also count a hit by class where labels exist (eval/retrieval_class/...)

        def check(self, key):
            for i, pair in enumerate(self.pairs or []):
                require(len(pair) == 2 and pair[0] != pair[1], f"{key}.pairs[{i}]",
                        f"a pair is [query, candidate] of two different modalities, got {pair}")

    def check(self, cfg, planned, key="eval"):
        for i, pair in enumerate(self.options.pairs or []):
            for j, m in enumerate(pair):
                self.require_modality(cfg, m, f"{self.key}.pairs[{i}][{j}]")

    def applies(self, cfg, names):
        return len(names) >= 2

    def run(self, ctx):
        e, o, val, out = ctx.cfg.eval, self.options, ctx.val, {}
        has_labels = bool((val.labels >= 0).any())
        for a, b in o.pairs or [[a, b] for a in ctx.names for b in ctx.names if a != b]:
            if a in val.multi or b in val.multi:  # several captions per sample (COCO, Flickr30k)
                out.update(multi_caption_metrics(val, a, b, f"eval/retrieval/{a}_to_{b}", e.recall_at, e.chunk_size,
                                                 ctx.work))
                continue
            rows = val.masks[a] & val.masks[b]
            out.update(retrieval_metrics(
                val.features[a][rows], val.features[b][rows], val.labels[rows] if has_labels else None,
                f"eval/retrieval/{a}_to_{b}", f"eval/retrieval_class/{a}_to_{b}" if o.class_aware else None,
                e.recall_at, e.chunk_size, ctx.work))
        return out

    def figures(self, metrics, prefix="eval/"):  # R@1 with its median rank
        def label(parts):
            a, _, b = "/".join(parts[1:-1]).partition("_to_")
            return f"{a}->{b} R@1" + (" (class-aware)" if parts[0] == "retrieval_class" else "")

        return _percent_figures(self, metrics, prefix, label, lambda last: last == "r1")

    def aliases(self, metrics):  # the first metric keys: image<->text R@1, class-aware where labels exist
        out = {}
        for short, (a, b) in (("i2t_r1", ("image", "text")), ("t2i_r1", ("text", "image"))):
            found = _first(metrics, [f"eval/retrieval_class/{a}_to_{b}/r1", f"eval/retrieval/{a}_to_{b}/r1"])
            out.update({f"eval/{short}{k}": v for k, v in found.items()})
        return out

    def example_pair(self, cfg, names):  # image x text where both exist, else the first pair
        pairs = self.options.pairs or [[a, b] for a in names for b in names if a != b]
        if "image" in names and "text" in names and not self.options.pairs:
            pairs = [["image", "text"]]
        return tuple(pairs[0]) if pairs else None


@register_evaluator("symile")
class SymileRetrieval(Evaluator):
    """Each target retrieved given all the other modalities (3+ modalities by default)."""

    roots = ("symile", "symile_pairwise")

    @dataclass
    class Options:
        targets: Optional[list[str]] = None  # modalities retrieved given all the others (None: each)
        scoring: list[Literal["mip", "pairwise"]] = field(default_factory=lambda: ["mip"])  # multilinear / sum of dots
        candidates: int = 0  # 0: the whole split; k > 0: 1 positive + k negatives per query (seeded)
        distinct: bool = False  # candidates: the distinct inputs of the target (e.g. all 2^d XOR vectors)
        seed: int = 0  # negatives' seed

        def check(self, key):
            require(self.candidates >= 0, f"{key}.candidates", f"must be >= 0, got {self.candidates}")
            require(bool(self.scoring), f"{key}.scoring", "needs mip and/or pairwise")

    def check(self, cfg, planned, key="eval"):
        if planned:
            require(len(cfg.data.modalities) >= 2, "eval.tasks", "symile retrieval needs at least 2 modalities")
        for i, m in enumerate(self.options.targets or []):
            self.require_modality(cfg, m, f"{self.key}.targets[{i}]")

    def applies(self, cfg, names):
        return len(names) >= 3

    def content_of(self, cfg, names):
        return list(self.options.targets or names) if self.options.distinct else []

    def run(self, ctx):
        out = {}
        for target in self.options.targets or ctx.names:
            out.update(symile_metrics(ctx.val, ctx.model, target, [o for o in ctx.names if o != target], ctx.cfg,
                                      ctx.work))
        return out

    def figures(self, metrics, prefix="eval/"):  # R@1, by scoring
        def label(parts):
            scoring = "multilinear" if parts[0] == "symile" else "pairwise sum"
            return f"symile {'/'.join(parts[1:-1])} R@1 ({scoring})"

        return _percent_figures(self, metrics, prefix, label, lambda last: last == "r1")


@register_evaluator("linear_probe")
class LinearProbeTask(Evaluator):
    """Logistic regression on frozen features of ``eval.linear_probe.split`` (default data.train),
    accuracy on the held-out split; only when listed in ``eval.tasks``."""

    default = False

    @dataclass
    class Options:
        modalities: Optional[list[str]] = None  # features probed (None: every modality)
        # head: the normalised features the loss sees; backbone: the pre-head backbone features
        # (the transfer protocol of CLIP-Lite and most representation-learning papers)
        features: Literal["head", "backbone"] = "head"
        split: SplitConfig = field(default_factory=SplitConfig)  # training features (urls unset: data.train)
        max_train_samples: int = 0  # cap on the training samples embedded (0: the whole split, once)
        l2: float = 1e-3  # L2 penalty on the weights (standardised features)
        max_iter: int = 100  # L-BFGS iterations

        def check(self, key):
            require(self.max_train_samples >= 0, f"{key}.max_train_samples", f"must be >= 0, got {self.max_train_samples}")
            require(self.l2 >= 0, f"{key}.l2", f"must be >= 0, got {self.l2}")
            require(self.max_iter > 0, f"{key}.max_iter", f"must be > 0, got {self.max_iter}")
            require(not self.split.sources, f"{key}.split.sources", f"give {key}.split.urls")

    def check(self, cfg, planned, key="eval"):
        if planned:
            require(cfg.data.labels is not None, "data.labels", "the linear probe needs class labels (a class_label decoder)")
        for i, m in enumerate(self.options.modalities or []):
            self.require_modality(cfg, m, f"{self.key}.modalities[{i}]")

    def applies(self, cfg, names):
        return cfg.data.labels is not None

    def run(self, ctx):
        return linear_probe_metrics(ctx, self.options)

    def figures(self, metrics, prefix="eval/"):
        return _percent_figures(self, metrics, prefix, lambda p: f"linear probe {'/'.join(p[1:-1])} top-1",
                                lambda last: last == "top1")


# the tasks every process knows (registered with this module); a task of data.imports is only known
# where its module is imported, so a written config carries its section only when it is set
BUILT_IN = frozenset(EVALUATORS.names())


def planned_tasks(cfg, names: list[str]) -> list[str]:
    """``eval.tasks``, or (unset) every default task that applies, in registration order."""
    return cfg.eval.planned(cfg, names)
