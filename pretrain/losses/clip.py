"""CLIP: symmetric InfoNCE whose negatives span the global batch.

Local-loss form: each rank scores its B_local rows against all B_global columns (gathered with
gradient) and sums cross-entropies over its rows; dividing by B_global and multiplying by the
world size makes the mean over ranks equal the single-process loss on the global batch, in value
and (after the usual rank-mean of gradients) in gradient. With M > 2 modalities the loss is the
mean over all modality pairs.
"""
from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pretrain.losses.gather import all_gather_with_grad, gather_sizes, is_distributed


class ClipLoss:
    name = "clip"

    def __call__(
        self,
        features: dict[str, torch.Tensor],
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        masks: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        if len(features) < 2:
            raise ValueError(f"clip needs at least 2 modalities, got {sorted(features)}")
        if masks is not None and not all(bool(m.all()) for m in masks.values()):
            raise NotImplementedError("clip: missing modalities (masks with False) are not supported yet")
        names = sorted(features)
        first = features[names[0]]
        sizes = gather_sizes(first.shape[0], first.device)
        rank = dist.get_rank() if is_distributed() else 0
        world = len(sizes)
        offset, total = sum(sizes[:rank]), sum(sizes)
        labels = torch.arange(first.shape[0], device=first.device) + offset
        gathered = {m: all_gather_with_grad(features[m], sizes) for m in names}
        out: dict[str, torch.Tensor] = {}
        pair_losses = []
        for a, b in itertools.combinations(names, 2):
            logits_ab = logit_scale * features[a] @ gathered[b].T
            logits_ba = logit_scale * features[b] @ gathered[a].T
            local_sum = F.cross_entropy(logits_ab, labels, reduction="sum") + F.cross_entropy(
                logits_ba, labels, reduction="sum"
            )
            pair = local_sum * (world / (2.0 * total))
            out[f"clip/{a}-{b}"] = pair.detach()
            pair_losses.append(pair)
        out["loss"] = torch.stack(pair_losses).mean()
        return out
