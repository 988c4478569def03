"""CLIP: symmetric InfoNCE whose negatives span the global batch.

Local-loss form: each rank scores its B_local rows against all B_global columns (gathered with
gradient), never the full B_global x B_global matrix, and sums cross-entropies over its rows.
Dividing by the global count and multiplying by the world size makes the mean over ranks equal
the single-process loss on the global batch, in value and (after the usual rank-mean of
gradients) in gradient.

Modalities: with M > 2 the loss is the mean over all modality pairs, or over (anchor, other)
pairs with ``anchor`` set. Missing modalities: for the pair (a, b) only samples holding both take
part, as rows and as columns; the pair is averaged over them. A pair no sample takes part in is
left out of the mean. ``logit_bias`` has no effect (softmax is shift-invariant) and is ignored.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from pretrain.losses.base import LOSSES, Loss, LossInputs, modality_pairs, mean_of_terms, touch


def infonce_rows(
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: torch.Tensor,
    targets: torch.Tensor,
    col_valid: torch.Tensor | None,
) -> torch.Tensor:
    """Sum over rows of -log softmax(scale * rows @ cols.T)[target], columns restricted to col_valid."""
    logits = scale * rows @ cols.T
    if col_valid is not None:
        logits = logits.masked_fill(~col_valid[None, :], float("-inf"))
    return F.cross_entropy(logits, targets, reduction="sum")


@LOSSES.register("clip")
class ClipLoss(Loss):
    name = "clip"

    @dataclass
    class Options:
        anchor: Optional[str] = None  # pairs (anchor, other) instead of all pairs

    def pair_term(self, inp: LossInputs, a: str, b: str, gathered: dict, scale: torch.Tensor):
        lay = inp.layout
        if inp.has_masks:
            valid = inp.global_masks[a] & inp.global_masks[b]
            rows = valid[lay.offset : lay.offset + lay.local]
            col_valid = valid
        else:
            valid, rows, col_valid = None, None, None
        count = int(valid.sum()) if valid is not None else lay.total
        fa, fb = inp.features[a], inp.features[b]
        targets = torch.arange(lay.local, device=fa.device) + lay.offset
        if rows is not None:
            fa, fb, targets = fa[rows], fb[rows], targets[rows]
        total = infonce_rows(fa, gathered[b], scale, targets, col_valid) + infonce_rows(
            fb, gathered[a], scale, targets, col_valid
        )
        term = total * (lay.world / (2.0 * max(count, 1)))
        if rows is not None or lay.local == 0:  # this rank may hold no row: keep the gathers in its graph
            term = term + touch(gathered[a], gathered[b])
        return term, count

    def negatives(self, global_batch, modalities):
        pairs = len(modality_pairs(sorted(modalities), self.anchor, self.name))
        return f"{global_batch - 1:,} per positive, in each direction of each of {pairs} modality pair(s)"

    def compute(self, inp, logit_scale, logit_bias=None, step=None, params=None):
        pairs = modality_pairs(inp.names, self.anchor, self.name)
        gathered = {m: inp.gather(m) for m in sorted({m for p in pairs for m in p})}
        out, terms, counts = {}, [], []
        for a, b in pairs:
            term, count = self.pair_term(inp, a, b, gathered, logit_scale)
            out[f"clip/{a}-{b}"] = term.detach()
            terms.append(term)
            counts.append(count)
        out["loss"] = mean_of_terms(terms, counts)
        return out
