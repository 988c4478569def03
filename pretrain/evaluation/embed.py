"""Embedding a split on every rank and gathering it, so that each rank holds the whole split.

Each rank reads its own part of the shards (``make_loader`` with ``train=False``: one pass, shard
order, evaluation transforms), embeds it, and every rank then enters the same gathers, whatever
its number of samples (zero included): ranks may hold uneven parts.

With ``lockstep`` (ZeRO stage 3, where every forward pass is itself a collective over the
partitioned parameters) the ranks also take the same number of forward passes: a rank whose part
is done repeats a pass on its last batch (or a placeholder batch) while the others finish.
"""
from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
import torch.distributed as dist

from pretrain.data import Batch, make_loader
from pretrain.data.decoders import to_device
from pretrain.distributed import all_gather_nograd, batch_layout, collective, is_distributed, rank, world_size


@dataclass
class SplitFeatures:
    """A whole split's features, identical on every rank (on the evaluation device)."""

    features: dict[str, torch.Tensor]  # modality -> (N, d) float32, L2-normalised
    masks: dict[str, torch.Tensor]  # modality -> (N,) bool, True where the sample has it
    labels: torch.Tensor  # (N,) long, -1 where a sample has no label
    content: dict[str, torch.Tensor] = field(default_factory=dict)  # modality -> (N,) int64 hash of the input
    # modality -> (every caption's features (C, d), the sample each belongs to (C,)), for text decoders
    # with captions: all (``features`` then holds each sample's first caption)
    multi: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def model_features(model, inputs: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                   features: str = "head") -> dict[str, torch.Tensor]:
    """Features of every modality the model has a tower for (masks passed where it takes them):
    the normalised head outputs, or (``features="backbone"``) the pre-head backbone features."""
    inputs = {m: x for m, x in inputs.items() if m in model.towers}
    if features == "backbone":
        return model.backbone_features(inputs, {m: masks[m] for m in inputs if m in masks})
    if _accepts(model.forward, "masks"):
        features, *_ = model(inputs, {m: masks[m] for m in inputs if m in masks})
    else:
        features, *_ = model(inputs)
    return features


def encode(model, modality: str, x: torch.Tensor) -> torch.Tensor:
    """One modality's L2-normalised features of inputs that are all present."""
    if _accepts(model.encode, "present"):
        return model.encode(modality, x, torch.ones(x.shape[0], dtype=torch.bool, device=x.device))
    return model.encode(modality, x)


def parameter_dtype(model) -> torch.dtype:
    p = next(iter(model.parameters()), None)
    return p.dtype if p is not None else torch.float32


def to_model(x: torch.Tensor, device: torch.device, dtype: torch.dtype, transform=None,
             present: Optional[torch.Tensor] = None) -> torch.Tensor:
    """On the device, finished by the decoder's ``device_transform`` (``transform``) where it has one;
    floating inputs follow the parameters' dtype; token ids stay integers (``decoders.to_device``)."""
    return to_device(x, device, dtype, transform, present)


def content_ids(x: torch.Tensor) -> torch.Tensor:
    """(B,) int64: a 64-bit hash of each row's bytes (equal inputs, equal ids)."""
    rows = x.detach().cpu().contiguous().reshape(x.shape[0], -1)
    raw = rows.view(torch.uint8).numpy() if rows.numel() else rows.numpy()
    ids = [int.from_bytes(hashlib.blake2b(r.tobytes(), digest_size=8).digest(), "little", signed=True) for r in raw]
    return torch.tensor(ids, dtype=torch.long)


def _placeholder_batch(modalities) -> Batch:
    """One sample of placeholders (mask False): a forward pass for a rank that has no data at all."""
    mods = {m.name: m.decoder.placeholder().unsqueeze(0) for m in modalities}
    masks = {m: torch.zeros(1, dtype=torch.bool) for m in mods}
    return Batch(mods, masks, ["placeholder"], torch.full((1,), -1, dtype=torch.long))


def _lockstep(batches: Iterable[Batch], device: torch.device, enabled: bool):
    """Yields (batch, real): every rank the same number of times when enabled."""
    it = iter(batches)
    while True:
        batch = next(it, None)
        if enabled and is_distributed():
            more = torch.tensor([float(batch is not None)], device=device)
            with collective("evaluation: lockstep batches (all_reduce)"):
                dist.all_reduce(more, op=dist.ReduceOp.MAX)
            if more.item() == 0:
                return
            yield batch, batch is not None
            if batch is None:
                it = iter(())
        elif batch is None:
            return
        else:
            yield batch, True


def _capped(loader, limit: int):
    """The loader's batches, cut after ``limit`` samples (0: no cap)."""
    taken = 0
    for batch in loader:
        if limit and taken >= limit:
            return
        if limit and taken + len(batch) > limit:
            keep = limit - taken
            batch = Batch({m: x[:keep] for m, x in batch.modalities.items()},
                          {m: k[:keep] for m, k in batch.masks.items()}, batch.keys[:keep],
                          None if batch.labels is None else batch.labels[:keep])
        taken += len(batch)
        yield batch


@torch.no_grad()
def embed_split(
    model,
    cfg,
    modalities,
    split,
    device: torch.device,
    *,
    max_samples: int = 0,
    content_of: Iterable[str] = (),
    lockstep: bool = False,
    features: str = "head",
) -> SplitFeatures:
    """Features of a whole split (all ranks' parts, in rank order). Collective: every rank calls it.
    ``modalities``: the evaluation decoders; ``split``: a ``SplitConfig`` (its shards);
    ``max_samples``: at most this many in all (split evenly over ranks; 0: everything);
    ``content_of``: modalities whose inputs get content ids (``SplitFeatures.content``);
    ``features``: ``head`` (normalised, what the loss sees) or ``backbone`` (pre-head, each tower's
    own width; no per-caption rows)."""
    content_of = [m for m in content_of if m in model.towers]
    r, world = rank(), world_size()
    loader = make_loader(split, modalities, cfg.data, cfg.eval.batch_size, r, world, cfg.train.seed, train=False)
    quota = 0
    if max_samples:
        quota = max_samples // world + (1 if r < max_samples % world else 0)
        if quota == 0:
            loader = []
    dtype = parameter_dtype(model)
    names = [m for m in model.towers]
    multi = [m for m in names if m in modalities and getattr(modalities[m].decoder, "captions_per_sample", 1) > 1]
    feats: dict[str, list[torch.Tensor]] = {m: [] for m in names}
    masks: dict[str, list[torch.Tensor]] = {m: [] for m in names}
    content: dict[str, list[torch.Tensor]] = {m: [] for m in content_of}
    rows: dict[str, list[torch.Tensor]] = {m: [] for m in multi}
    owners: dict[str, list[torch.Tensor]] = {m: [] for m in multi}
    labels: list[torch.Tensor] = []
    last: Optional[Batch] = None
    seen = 0
    for batch, real in _lockstep(_capped(loader, quota), device, lockstep):
        if not real:  # keep the other ranks' collective forward passes company
            _forward(model, last if last is not None else _placeholder_batch(modalities), multi, modalities, device, dtype,
                     features)
            continue
        last = batch
        out, batch_masks, captions = _forward(model, batch, multi, modalities, device, dtype, features)
        for m, (f, owner) in captions.items():
            rows[m].append(f.float())
            owners[m].append(owner + seen)
        seen += len(batch)
        for m in names:
            if m not in out:
                raise RuntimeError(f"evaluation: the batch has no modality {m!r} (it has {sorted(batch.modalities)})")
            feats[m].append(out[m].float())
            masks[m].append(batch_masks[m].bool())
        for m in content_of:
            content[m].append(content_ids(batch.modalities[m]))
        labels.append(batch.labels if batch.labels is not None else torch.full((len(batch),), -1, dtype=torch.long))
    dim = getattr(model, "embed_dim", None)
    widths = {m: (model.towers[m].backbone.width if features == "backbone" else dim) for m in names}
    n_local = sum(len(x) for x in labels)
    layout = batch_layout(n_local, device)

    def gather(parts: list[torch.Tensor], empty: torch.Tensor) -> torch.Tensor:
        local = torch.cat(parts).to(device) if parts else empty.to(device)
        return all_gather_nograd(local, layout)

    out_feats, out_masks = {}, {}
    for m in names:
        d = widths[m] if widths[m] is not None else (feats[m][0].shape[1] if feats[m] else 0)
        out_feats[m] = gather(feats[m], torch.zeros(0, d))
        out_masks[m] = gather(masks[m], torch.zeros(0, dtype=torch.bool))
    out_content = {m: gather(content[m], torch.zeros(0, dtype=torch.long)) for m in content_of}
    out_labels = gather(labels, torch.zeros(0, dtype=torch.long))
    out_multi = {}
    for m in (multi if features == "head" else []):  # captions: their own layout (ranks hold different numbers); owners made global
        local_f = torch.cat(rows[m]).to(device) if rows[m] else torch.zeros(0, dim or 0, device=device)
        local_o = (torch.cat(owners[m]) if owners[m] else torch.zeros(0, dtype=torch.long)).to(device) + layout.offset
        caption_layout = batch_layout(local_f.shape[0], device)
        out_multi[m] = (all_gather_nograd(local_f, caption_layout), all_gather_nograd(local_o, caption_layout))
    return SplitFeatures(out_feats, out_masks, out_labels, out_content, out_multi)


def _forward(model, batch: Batch, multi: list[str], modalities, device: torch.device, dtype: torch.dtype,
             features: str = "head"):
    """(per-sample features, masks, {modality: (every caption's features, its sample in the batch)}).
    A multi-caption modality gives the model its first caption per sample, and all its non-empty
    caption rows are encoded on their own (not for ``features="backbone"``: the first caption only)."""
    inputs, masks = _inputs(batch, device, dtype, modalities)
    captions = {}
    for m in multi:
        x = inputs[m]  # (B, K, context)
        inputs[m] = x[:, 0]
        if features != "head":
            continue
        keep = (x != modalities[m].decoder.tokenizer.pad_id).any(-1).reshape(-1)
        flat = x.reshape(-1, x.shape[-1])
        owner = torch.arange(x.shape[0], device=device).repeat_interleave(x.shape[1])
        if bool(keep.any()):
            captions[m] = (encode(model, m, flat[keep]), owner[keep].cpu())
        else:  # one forward all the same: under ZeRO-3 every rank takes as many as the others
            captions[m] = (encode(model, m, flat[:1])[:0], owner[:0].cpu())
    return model_features(model, inputs, masks, features), masks, captions


def _inputs(batch: Batch, device: torch.device, dtype: torch.dtype, modalities=None):
    """The batch as the model takes it (each modality finished by its decoder's device transform)."""
    masks = {m: batch.masks[m].to(device) if m in batch.masks else torch.ones(len(batch), dtype=torch.bool, device=device)
             for m in batch.modalities}
    transforms = modalities.device_transforms() if modalities is not None else {}
    inputs = {m: to_model(x, device, dtype, transforms.get(m), masks[m]) for m, x in batch.modalities.items()}
    return inputs, masks
