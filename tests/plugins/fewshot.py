"""A few-shot probe, as a plugin: list ``tests.plugins.fewshot`` in ``data.imports`` and ``fewshot`` in
``eval.tasks`` (nothing in ``pretrain/`` is edited).

k-shot classification of the held-out features by prototypes: per trial, k labelled samples of
each class are drawn (seeded), each class's prototype is the normalised mean of its k features,
and every other labelled sample of those classes is a query, classified by its most similar
prototype (cosine). Classes with fewer than k + 1 labelled samples sit the trial out; accuracy is
averaged over ``trials`` draws. Chance is 1 / (the classes that take part).

Options, ``eval.fewshot.*``: ``shots`` (the k, each > 0), ``trials``, ``seed``, ``modalities``
(default: every evaluated one), ``features`` (``head``: the normalised features the loss sees;
``backbone``: the pre-head features, the held-out split embedded once more).

Metrics: ``eval/fewshot/<m>/<k>shot`` (+ ``/chance``), ``.../classes``, ``.../queries``; printed as
``few-shot <m> <C>-way <k>-shot``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import torch

from pretrain.evaluation import Evaluator, Figure, register_evaluator
from pretrain.evaluation.embed import embed_split
from pretrain.options import require


def prototype_accuracy(x: torch.Tensor, y: torch.Tensor, shots: int, trials: int,
                       generator: torch.Generator) -> Optional[dict[str, float]]:
    """Mean accuracy of ``trials`` k-shot draws over (N, d) features and (N,) labels (>= 0), with
    the classes and queries of a draw; None when fewer than 2 classes have k + 1 samples."""
    x = torch.nn.functional.normalize(x.float(), dim=-1)
    classes = [c for c in y.unique().tolist() if int((y == c).sum()) > shots]
    if len(classes) < 2:
        return None
    members = [(y == c).nonzero().squeeze(1) for c in classes]
    correct, queries = 0, 0
    for _ in range(trials):
        prototypes, query_rows, query_class = [], [], []
        for i, rows in enumerate(members):
            order = rows[torch.randperm(len(rows), generator=generator)]
            prototypes.append(x[order[:shots]].mean(0))
            query_rows.append(order[shots:])
            query_class.append(torch.full((len(order) - shots,), i, dtype=torch.long))
        protos = torch.nn.functional.normalize(torch.stack(prototypes), dim=-1)
        q, target = x[torch.cat(query_rows)], torch.cat(query_class)
        correct += int(((q @ protos.T).argmax(1) == target).sum())
        queries += len(target)
    return {"accuracy": correct / queries, "classes": float(len(classes)), "queries": float(queries // trials)}


@register_evaluator("fewshot")
class FewShot(Evaluator):
    """k-shot prototype classification of the held-out split (only when listed in eval.tasks)."""

    default = False

    @dataclass
    class Options:
        shots: list[int] = field(default_factory=lambda: [1, 5, 10])  # labelled samples per class
        trials: int = 10  # draws averaged
        seed: int = 0
        modalities: Optional[list[str]] = None  # classified (None: every evaluated modality)
        features: Literal["head", "backbone"] = "head"

        def check(self, key):
            require(bool(self.shots), f"{key}.shots", "needs at least one k")
            for i, k in enumerate(self.shots):
                require(k > 0, f"{key}.shots[{i}]", f"must be > 0 (labelled samples per class), got {k}")
            require(self.trials > 0, f"{key}.trials", f"must be > 0, got {self.trials}")

    def check(self, cfg, planned, key="eval"):
        if planned:
            require(cfg.data.labels is not None, "data.labels", "few-shot probes need class labels (a class_label decoder)")
        for i, m in enumerate(self.options.modalities or []):
            self.require_modality(cfg, m, f"{self.key}.modalities[{i}]")

    def applies(self, cfg, names):
        return cfg.data.labels is not None

    def run(self, ctx):  # every rank holds the whole split and draws the same samples
        o, val, out = self.options, ctx.val, {}
        if o.features == "backbone":
            val = embed_split(ctx.model, ctx.cfg, ctx.modalities, ctx.cfg.data.val, ctx.device, lockstep=ctx.lockstep,
                              features="backbone")
        for m in o.modalities or ctx.names:
            rows = (val.labels >= 0) & val.masks[m]
            x, y = val.features[m][rows].cpu(), val.labels[rows].cpu()
            for k in o.shots:
                res = prototype_accuracy(x, y, k, o.trials, torch.Generator().manual_seed(o.seed * 1_000_003 + k))
                if res is None:
                    continue
                key = f"eval/fewshot/{m}/{k}shot"
                out[key], out[key + "/chance"] = res["accuracy"], 1.0 / res["classes"]
                out[key + "/classes"], out[key + "/queries"] = res["classes"], res["queries"]
        return out

    def figures(self, metrics, prefix="eval/"):
        rows = []
        for key, value in self.own(metrics, prefix).items():
            parts = key[len(prefix):].split("/")  # fewshot, <m>, <k>shot
            if len(parts) != 3 or not parts[2].endswith("shot"):
                continue
            m, k = parts[1], int(parts[2][:-4])
            ways = metrics.get(key + "/classes")
            way = f"{int(ways)}-way " if isinstance(ways, (int, float)) else ""
            rows.append((m, k, Figure(key, f"few-shot {m} {way}{k}-shot", value, metrics.get(key + "/chance"))))
        return [f for _, _, f in sorted(rows, key=lambda r: r[:2])]
