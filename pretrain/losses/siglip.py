"""SigLIP: pairwise sigmoid loss with a learnable bias.

For a modality pair (a, b): loss = -(1/N) sum_i sum_j log sigmoid(z_ij (logit_scale <a_i, b_j> +
logit_bias)), z_ij = +1 on matching pairs and -1 otherwise, N the global batch. Each rank sums
its rows against every column; the columns reach it either all at once (``exchange:
all_gather``) or one rank's block at a time around a ring (``exchange: ring``: W - 1 neighbour
exchanges, never more than two blocks in memory), both differentiable and both equal to the
single-process loss. With M > 2 the loss is the mean over pairs (or (anchor, other) pairs);
with masks only samples holding both modalities take part, as rows and columns.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from pretrain.losses.base import LOSSES, Loss, LossInputError, LossParameters, modality_pairs, mean_of_terms, touch
from pretrain.losses.gather import ring_shift


def _sigmoid_sum(rows, cols, scale, bias, pos_row, pos_col, row_valid, col_valid) -> torch.Tensor:
    """Sum of -log sigmoid(z * logits) over valid (row, col) pairs; positives at (pos_row, pos_col)."""
    logits = scale * rows @ cols.T + bias
    sign = -torch.ones_like(logits)
    if len(pos_row):
        sign[pos_row, pos_col] = 1.0
    losses = -F.logsigmoid(sign * logits)
    keep = row_valid[:, None] & col_valid[None, :]
    return torch.where(keep, losses, torch.zeros_like(losses)).sum()


@LOSSES.register("siglip")
class SigLipLoss(Loss):
    name = "siglip"

    @dataclass
    class Options:
        exchange: Literal["all_gather", "ring"] = "all_gather"  # how the columns reach each rank
        anchor: Optional[str] = None  # pairs (anchor, other) instead of all pairs

    class Parameters(LossParameters):
        scalar_bias = True  # the model's logit_bias (the field's formats hold it)

    def parameters(self, ctx):
        return self.Parameters()

    def negatives(self, global_batch, modalities):
        pairs = len(modality_pairs(sorted(modalities), self.anchor, self.name))
        return f"{global_batch - 1:,} per row (a sigmoid term against every other column), in each of {pairs} pair(s)"

    def pair_bias(self, a: str, b: str, logit_bias, params: dict) -> torch.Tensor:
        """The bias of the pair (a, b): the one learnable scalar bias (a subclass may learn one per pair)."""
        if logit_bias is None:
            raise LossInputError(f"{self.name}: needs logit_bias (a learnable bias of shape (1,))")
        return logit_bias

    def compute(self, inp, logit_scale, logit_bias=None, step=None, params=None):
        lay = inp.layout
        out, terms, counts = {}, [], []
        gathered: dict[str, torch.Tensor] = {}  # each column modality gathered once
        for a, b in modality_pairs(inp.names, self.anchor, self.name):
            valid = inp.global_masks[a] & inp.global_masks[b]
            count = lay.total if not inp.has_masks else int(valid.sum())
            row_valid = valid[lay.offset : lay.offset + lay.local]
            fa, fb = inp.features[a], inp.features[b]
            bias = self.pair_bias(a, b, logit_bias, params or {})
            local_idx = torch.arange(lay.local, device=fa.device)
            if self.exchange == "all_gather" or lay.world == 1:
                if b not in gathered:
                    gathered[b] = inp.gather(b)
                cols = gathered[b]
                total = _sigmoid_sum(fa, cols, logit_scale, bias, local_idx, local_idx + lay.offset,
                                     row_valid, valid) + touch(cols)
            else:
                longest = max(lay.sizes)
                block = fb.new_zeros((longest, fb.shape[1]))
                block = torch.cat([fb, block[lay.local :]])  # differentiable pad to the longest batch
                block_valid = torch.zeros(longest, dtype=torch.bool, device=fa.device)
                block_valid[: lay.local] = row_valid
                total = _sigmoid_sum(fa, block, logit_scale, bias, local_idx, local_idx,
                                     row_valid, block_valid)
                empty = local_idx[:0]
                for _ in range(lay.world - 1):
                    block = ring_shift(block)
                    block_valid = ring_shift(block_valid.to(torch.uint8), grad=False).bool()
                    total = total + _sigmoid_sum(fa, block, logit_scale, bias, empty, empty,
                                                 row_valid, block_valid)
            term = total * (lay.world / max(count, 1))
            out[f"siglip/{a}-{b}"] = term.detach()
            terms.append(term)
            counts.append(count)
        out["loss"] = mean_of_terms(terms, counts)
        return out
