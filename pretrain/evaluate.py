"""Held-out evaluation: zero-shot classification and image<->text retrieval.

Every rank embeds its own part of the validation shards; features are gathered so that each rank
holds the whole split, and the metrics are computed from there (identically on every rank).

- ``eval/zeroshot_top1``: class names x prompt templates through the text tower, prompt embeddings
  averaged per class; an image is right when its nearest class is its label.
- ``eval/i2t_r1``, ``eval/t2i_r1``: the nearest caption of each image (nearest image of each
  caption) is a hit when it has the query's class, since captions repeat per class. Without
  labels, a hit is the paired item itself.
Each metric comes with its chance level (``.../chance``).
"""
from __future__ import annotations

import torch

from pretrain.config import Config
from pretrain.data import make_loader
from pretrain.losses.gather import all_gather_with_grad
from pretrain.tokenizer import ByteTokenizer


@torch.no_grad()
def embed_split(model, cfg: Config, rank: int, world_size: int, device: torch.device):
    feats: dict[str, list[torch.Tensor]] = {"image": [], "text": []}
    labels: list[torch.Tensor] = []
    loader = make_loader(cfg.data.val, cfg.data, cfg.eval.batch_size, rank, world_size, cfg.train.seed, train=False)
    for batch in loader:
        inputs = {m: x.to(device) for m, x in batch.modalities.items()}
        features, *_ = model(inputs)
        for m in feats:
            feats[m].append(features[m].float())
        # -1 marks a batch without class labels; every rank gathers the same tensors (no deadlock)
        labels.append(batch.labels if batch.labels is not None else torch.full((len(batch),), -1))
    # gathered on the device (NCCL needs it), then brought to the CPU
    dim = model.embed_dim
    local = {m: torch.cat(v) if v else torch.zeros(0, dim, device=device) for m, v in feats.items()}
    local_labels = (torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)).to(device)
    gathered = {m: all_gather_with_grad(x).cpu() for m, x in local.items()}
    gathered_labels = all_gather_with_grad(local_labels).cpu()
    if bool((gathered_labels < 0).any()):
        gathered_labels = None
    return gathered, gathered_labels


@torch.no_grad()
def class_embeddings(model, classnames: list[str], templates: list[str], context_length: int, device) -> torch.Tensor:
    tok = ByteTokenizer(context_length)
    rows = []
    for name in classnames:
        ids = tok([t.format(name) for t in templates]).to(device)
        emb = model.encode("text", ids).float().mean(0)
        rows.append(torch.nn.functional.normalize(emb, dim=-1).cpu())
    return torch.stack(rows)


def retrieval_metrics(image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor | None) -> dict[str, float]:
    n = image.shape[0]
    sim = image @ text.T
    i2t, t2i = sim.argmax(1), sim.argmax(0)
    if labels is None:
        target = torch.arange(n)
        return {
            "eval/i2t_r1": (i2t == target).float().mean().item(),
            "eval/t2i_r1": (t2i == target).float().mean().item(),
            "eval/i2t_r1/chance": 1.0 / n,
            "eval/t2i_r1/chance": 1.0 / n,
        }
    counts = torch.bincount(labels).float()
    chance = float(((counts / n) ** 2).sum())
    return {
        "eval/i2t_r1": (labels[i2t] == labels).float().mean().item(),
        "eval/t2i_r1": (labels[t2i] == labels).float().mean().item(),
        "eval/i2t_r1/chance": chance,
        "eval/t2i_r1/chance": chance,
    }


def evaluate(model, cfg: Config, rank: int, world_size: int, device: torch.device) -> dict[str, float]:
    was_training = model.training
    model.eval()
    try:
        feats, labels = embed_split(model, cfg, rank, world_size, device)
        results = {"eval/samples": float(feats["image"].shape[0])}
        if feats["image"].shape[0] == 0:
            raise RuntimeError(f"data.val.urls: no validation samples found in {cfg.data.val.urls!r}")
        results.update(retrieval_metrics(feats["image"], feats["text"], labels))
        if labels is not None and cfg.eval.classnames:
            classes = class_embeddings(model, cfg.eval.classnames, cfg.eval.templates, cfg.data.context_length, device)
            pred = (feats["image"] @ classes.T).argmax(1)
            results["eval/zeroshot_top1"] = (pred == labels).float().mean().item()
            results["eval/zeroshot_top1/chance"] = 1.0 / len(cfg.eval.classnames)
        return results
    finally:
        model.train(was_training)
