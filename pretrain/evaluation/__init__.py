"""Held-out evaluation: zero-shot classification, retrieval between any two modalities, Symile's
retrieval of one modality given all the others, and a linear probe on frozen features.

Entry points:

- ``evaluate(model, cfg, modalities, device, step=0, output_dir=None) -> dict`` (the trainer, every
  ``eval.every`` steps and at the end; ``python -m pretrain.eval``): the metrics on every rank,
  and with ``output_dir`` on rank 0 ``<output_dir>/eval/step{step:06d}.json``, the PNGs under
  ``<output_dir>/eval/plots/`` and ``<output_dir>/eval/index.html``;
- ``format_metrics(metrics) -> str``: the printout (each figure once, next to its chance): the
  figures each task declares (``Evaluator.figures`` -> ``Figure``), per dataset;
- ``register_evaluator(name)``: a new task (``pretrain.evaluation.tasks``), named in ``eval.tasks``,
  with its own options (the section ``eval.<name>.*``), checks and printed figures.

It is collective: every rank embeds its part of ``data.val`` and all parts are gathered (ranks
may hold uneven parts, or none); per-query ranking work is then split over the ranks and
gathered again. Scores are computed in blocks of ``eval.chunk_size`` squared, so 100,000
candidates never make an N x N matrix (``pretrain.evaluation.ranking``).

Tasks (``eval.tasks``; unset: zero-shot when class names are given, retrieval with 2+
modalities, Symile retrieval with 3+; the linear probe only when listed). Each task's options are
its section ``eval.<task>.*`` (``eval.zeroshot.*``, ``eval.retrieval.*``, ``eval.symile.*``,
``eval.linear_probe.*``); the general options (``eval.batch_size``, ``eval.recall_at``, ...) are
``EvalConfig``'s fields.

Metric keys (``metrics.jsonl``, TensorBoard, the JSON files); ``<m>`` is a modality, ``<k>`` each
of ``eval.recall_at`` (default 1, 5, 10); every recall/accuracy has a ``.../chance`` twin (its
value under a random order or guess):

- ``eval/samples``: held-out samples embedded; ``eval/seconds``: time taken.
- ``eval/zeroshot/<m>/top1``, ``.../top5`` (top-min(5, C)), ``.../samples``: class names x
  ``eval.templates`` through the ``eval.zeroshot.text`` tower, prompt features averaged per class;
  samples of modality ``<m>`` with a label are classified by their nearest classes.
- ``eval/retrieval/<a>_to_<b>/r<k>``, ``.../median_rank``, ``.../queries``: each sample's ``<a>``
  retrieves among all samples' ``<b>`` (samples with both); the hit is its own pair.
  With ``captions: all`` (``eval.datasets``), every caption of a sample takes part, as COCO and
  Flickr30k are reported: an image query hits when any of its captions is in the top k, a caption
  query when its own image is; ``.../queries`` counts images or captions.
- ``eval/retrieval_class/<a>_to_<b>/...``: the same over labelled samples, a hit being any
  candidate of the query's class (captions that repeat per class); ``eval.retrieval.class_aware``.
- ``eval/symile/<m>/r<k>``, ``.../median_rank``, ``.../candidates``: ``<m>`` retrieved given all the
  other modalities, scored by the multilinear inner product <a, b, c> = sum_j a_j b_j c_j;
  ``eval/symile_pairwise/<m>/...``: scored by the sum of pairwise dot products (the baseline for
  pairwise-trained models; ``eval.symile.scoring``). Candidates: the split's ``<m>`` features, its
  distinct inputs (``eval.symile.distinct``), or 1 positive + k seeded negatives per query
  (``eval.symile.candidates: k``).
- ``eval/linear_probe/<m>/top1``, ``.../top1/chance`` (the largest class share), ``.../train_top1``,
  ``.../train_samples``: multinomial logistic regression on frozen features of
  ``eval.linear_probe.split`` (default data.train), accuracy on data.val.
- ``eval/<name>/...``: the same keys for each of ``eval.datasets`` (``name`` its name).
- ``eval/zeroshot_top1``, ``eval/i2t_r1``, ``eval/t2i_r1`` (each with ``/chance``): short names
  kept from the first evaluation: image zero-shot top-1, image->text and text->image R@1
  (class-aware where labels exist).

Ranks are 1-based; equal scores are ordered by candidate index. The median rank of a random
order with one positive among M candidates is about (M + 1) / 2.
"""
from pretrain.evaluation.config import EvalConfig
from pretrain.evaluation.embed import SplitFeatures, embed_split
from pretrain.evaluation.probe import LinearProbe, fit_linear_probe, linear_probe_accuracy
from pretrain.evaluation.runner import evaluate, format_metrics, write_outputs
from pretrain.evaluation.tasks import EVALUATORS, EvalContext, Evaluator, Figure, planned_tasks, register_evaluator

__all__ = [
    "EVALUATORS", "EvalConfig", "EvalContext", "Evaluator", "Figure", "LinearProbe", "SplitFeatures", "embed_split",
    "evaluate", "fit_linear_probe", "format_metrics", "linear_probe_accuracy", "planned_tasks",
    "register_evaluator", "write_outputs",
]
