"""What every objective is and shares: the ``Loss`` contract, the parameters an objective may own
(``LossParameters``), and the checks and global layout of its inputs (``prepare``).

An objective is a ``Loss`` subclass registered in ``LOSSES`` under its ``loss.name``::

    @LOSSES.register("my_loss")
    class MyLoss(Loss):
        @dataclass
        class Options:                       # its config keys, loss.<option> (defaults written once)
            margin: float = 0.1
        def compute(self, inp, logit_scale, logit_bias=None, step=None, params=None) -> dict:
            ...                              # {"loss": this rank's share, "my_loss/<term>": ...}

Called as ``loss(features, logit_scale, logit_bias=None, masks=None, step=None, sizes=None,
params=None)``; ``prepare`` has checked the inputs and learned the global layout before ``compute``
runs. An objective that needs parameters of its own declares them in ``parameters(ctx)``: a
``LossParameters`` module the model holds as ``model.objective`` (so checkpoints, ZeRO sharding,
weight decay and exports treat them as any other weights), whose ``forward`` runs inside the model's
forward and whose outputs reach ``compute`` as ``params``.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from pretrain.distributed import BatchLayout, all_gather_nograd, batch_layout
from pretrain.losses.gather import all_gather_with_grad
from pretrain.options import ConfigError, NoOptions, Registry


class LossInputError(ValueError):
    """Features, masks or options a loss cannot take; the message says which."""


@dataclass
class LossContext:
    """What an objective learns of the model when it declares its parameters (``Loss.parameters``)."""

    modalities: list[str]  # the towers' modalities, sorted
    embed_dim: int  # the size of the features the loss sees
    widths: dict[str, int]  # each tower's backbone width (its features before the head)


@dataclass
class BatchContext:
    """Where a training micro-batch sits in the step's global batch; ``LossParameters.forward`` gets
    it in training (None in evaluation and inference). Draws made from ``generator()`` for ``total``
    rows and sliced at ``offset`` are the same however the batch is split over ranks and micro-batches."""

    step: int  # the optimizer step (0-based)
    seed: int  # train.seed
    offset: int  # this micro-batch's first row in the global batch
    rows: int  # its rows
    total: int  # the rows of the global batch (every rank, every micro-batch)

    def generator(self, device: torch.device) -> torch.Generator:
        gen = torch.Generator(device=device)
        gen.manual_seed((self.seed * 1_000_003 + self.step) % 2**62)
        return gen


class LossParameters(nn.Module):
    """The parameters an objective owns (``Loss.parameters``), held by the model as ``model.objective``.

    - ``scalar_bias``: the objective also takes the model's one scalar ``logit_bias`` (SigLIP's),
      the bias the field's formats (OpenCLIP, transformers) hold beside the temperature.
    - ``forward(features, backbone, batch)`` runs inside the model's forward (so ZeRO-3 gathers the
      weights) with the L2-normalised features and the backbone features (before the heads) of each
      modality, and ``batch`` in training; what it returns reaches the loss as ``params``. Entries
      named in ``per_sample`` hold one row per sample (nested dicts and tuples of (rows, ...)
      tensors): gradient accumulation concatenates them over the micro-batches; any other entry is
      taken once per step, like the temperature.
    - ``training_only``: parts used only to train (CLIP-Lite's discriminators), left out of the
      exports to the field's formats; otherwise a format that has no place for them refuses the
      export and names them (the native export carries everything).
    """

    scalar_bias: bool = False
    per_sample: frozenset = frozenset()
    training_only: bool = False

    def forward(self, features: dict[str, torch.Tensor], backbone: dict[str, torch.Tensor],
                batch: Optional[BatchContext]) -> dict[str, Any]:
        return {}


class Loss:
    """An objective: registered in ``LOSSES`` with its ``Options`` (``loss.<option>``); see the
    module's docstring for the contract."""

    name = ""
    Options = NoOptions
    # prepare() reads the features back to refuse NaN (a trainer that guards finiteness turns it off)
    check_finite = True

    def __init__(self, **options):
        known = {f.name for f in dataclasses.fields(self.Options)}
        for k in options:
            if k not in known:
                raise LossInputError(f"{self.name}: {k!r} is not an option (its options: {', '.join(sorted(known))})")
        self.options = self.Options(**options)
        if hasattr(self.options, "check"):
            try:
                self.options.check("loss")
            except ConfigError as err:
                raise LossInputError(str(err)) from None
        for f in dataclasses.fields(self.options):  # loss.anchor -> self.anchor
            setattr(self, f.name, getattr(self.options, f.name))

    def check_against(self, modalities: list[str], train, key: str = "loss") -> None:
        """Checks of the options against the data's modalities and the ``train`` section (a
        ``TrainConfig``), before anything is built; ``ConfigError`` naming the key."""

    def parameters(self, ctx: LossContext) -> Optional[LossParameters]:
        """The parameters this objective needs for the model ``ctx`` describes (None: none)."""
        return None

    def negatives(self, global_batch: int, modalities: list[str]) -> str:
        """How many negatives each positive meets at this global batch, in words (``pretrain.plan``
        prints it; "" when the objective does not say)."""
        return ""

    def __call__(self, features, logit_scale, logit_bias=None, masks=None, step=None, sizes=None, params=None):
        """``features``: modality -> (B_local, d), L2-normalised; ``logit_scale`` (and ``logit_bias``)
        of shape (1,); ``masks``: modality -> bool (B_local,), False where a sample lacks it (on every
        rank or none); ``step`` seeds sampled negatives; ``sizes``: every rank's batch size when known
        (saves a collective); ``params``: what the objective's ``LossParameters.forward`` returned."""
        inp = prepare(self.name, features, masks, check_finite=self.check_finite, sizes=sizes)
        return self.compute(inp, logit_scale, logit_bias, step=step, params=params or {})

    def compute(self, inp: "LossInputs", logit_scale, logit_bias=None, step=None, params=None) -> dict:
        raise NotImplementedError


# objective name -> a Loss subclass
LOSSES = Registry("loss", base=Loss, hint="a module that registers more can be listed in data.imports")


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
