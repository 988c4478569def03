"""What every objective checks and shares: inputs, masks, global layout."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pretrain.distributed import BatchLayout, all_gather_nograd, batch_layout
from pretrain.losses.gather import all_gather_with_grad
from pretrain.options import Registry


class LossInputError(ValueError):
    """Features, masks or options a loss cannot take; the message says which."""


# objective name -> class with an ``Options`` dataclass (its config keys ``loss.<option>``),
# ``uses_bias`` and ``__call__(features, logit_scale, logit_bias=None, masks=None, step=None)``
LOSSES = Registry("loss")


@dataclass
class LossInputs:
    names: list[str]  # modality names, sorted
    features: dict[str, torch.Tensor]  # local (B_local, d)
    # Masks are given on every rank or on none (the collectives must match across ranks).
    global_masks: dict[str, torch.Tensor]  # bool (B_global,)
    layout: BatchLayout
    has_masks: bool  # False when every sample has every modality

    def gather(self, name: str) -> torch.Tensor:
        return all_gather_with_grad(self.features[name], self.layout)


def prepare(
    loss_name: str,
    features: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor] | None,
    min_modalities: int = 2,
    check_finite: bool = True,
    sizes: tuple[int, ...] | None = None,
) -> LossInputs:
    """Checks the inputs and learns the global layout. ``check_finite`` reads the features on the
    host (a trainer that guards finiteness itself turns it off); ``sizes``, every rank's batch size
    when the caller knows them, saves the collective that gathers them. Without masks nothing is
    read back from the device."""
    if not isinstance(features, dict):
        raise LossInputError(f"{loss_name}: features must be a dict modality -> (B, d) tensor")
    if len(features) < min_modalities:
        raise LossInputError(
            f"{loss_name}: needs at least {min_modalities} modalities, got {len(features)} ({sorted(features)})"
        )
    names = sorted(features)
    shapes = {m: tuple(features[m].shape) for m in names}
    if any(len(s) != 2 for s in shapes.values()):
        raise LossInputError(f"{loss_name}: each feature tensor must be (B, d), got {shapes}")
    if len({s[0] for s in shapes.values()}) != 1:
        raise LossInputError(f"{loss_name}: modalities have different batch sizes: {shapes}")
    if len({s[1] for s in shapes.values()}) != 1:
        raise LossInputError(f"{loss_name}: modalities have different feature sizes: {shapes}")
    if check_finite:
        finite = torch.stack([torch.isfinite(features[m]).all() for m in names])
        if not bool(finite.all()):  # one host sync for all modalities
            bad = [m for m, ok in zip(names, finite.tolist()) if not ok]
            raise LossInputError(f"{loss_name}: features of {bad[0]!r} contain NaN or Inf")
    n = shapes[names[0]][0]
    device = features[names[0]].device
    masks = dict(masks or {})
    unknown = set(masks) - set(names)
    if unknown:
        raise LossInputError(f"{loss_name}: masks for modalities without features: {sorted(unknown)}")
    full = {}
    for m in names:
        mask = masks.get(m)
        if mask is None:
            mask = torch.ones(n, dtype=torch.bool, device=device)
        elif tuple(mask.shape) != (n,) or mask.dtype != torch.bool:
            raise LossInputError(f"{loss_name}: mask of {m!r} must be bool ({n},), got {mask.dtype} {tuple(mask.shape)}")
        full[m] = mask.to(device)
    if sizes is not None:
        layout = BatchLayout(dist.get_rank() if dist.is_initialized() else 0, tuple(sizes))
        if layout.local != n:
            raise LossInputError(f"{loss_name}: sizes says {layout.local} rows on this rank, the features have {n}")
    else:
        layout = batch_layout(n, device)
    if masks:
        # every modality's mask in one collective
        packed = all_gather_nograd(torch.stack([full[m] for m in names], 1).to(torch.uint8), layout).bool()
        global_masks = {m: packed[:, i] for i, m in enumerate(names)}
    else:
        global_masks = {m: torch.ones(layout.total, dtype=torch.bool, device=device) for m in names}
    has_masks = bool(masks) and not all(bool(g.all()) for g in global_masks.values())
    return LossInputs(names, dict(features), global_masks, layout, has_masks)


def modality_pairs(names: list[str], anchor: str | None, loss_name: str) -> list[tuple[str, str]]:
    """All unordered pairs, or (anchor, other) for every other modality."""
    if anchor is None:
        return list(itertools.combinations(names, 2))
    if anchor not in names:
        raise LossInputError(f"{loss_name}: anchor {anchor!r} is not among the modalities {names}")
    return [(anchor, m) for m in names if m != anchor]


def touch(*tensors: torch.Tensor) -> torch.Tensor:
    """A zero that depends on every tensor: keeps each gather in the graph on every rank, so that
    all ranks run the same collectives in backward even when a rank has no rows taking part."""
    return sum((t.sum() * 0.0 for t in tensors), torch.zeros((), dtype=tensors[0].dtype, device=tensors[0].device))


def mean_of_terms(terms: list[torch.Tensor], counts: list[int]) -> torch.Tensor:
    """Mean over the terms with at least one sample taking part (counts are global, so every rank
    agrees); terms without one stay in the graph with weight 0."""
    live = sum(1 for c in counts if c > 0)
    total = sum((t if c > 0 else t * 0.0) for t, c in zip(terms, counts))
    return total / max(1, live)
