"""CLIP-Lite: the Jensen-Shannon mutual-information lower bound with exactly one negative.

For a modality pair (a, b) with critic T(x, y) = logit_scale * <x, y> (+ logit_bias when given),

    loss = mean_i softplus(-T(a_i, b_i)) + mean_i softplus(T(a_i, b_n(i)))

where n(i) is the one negative partner of sample i:

- ``negative: global`` (default): the next sample of the global batch, wrapping around at its end
  and crossing rank boundaries, so a distributed run equals a single-process run on the same
  global batch. Only one feature row per rank travels (the first row each rank holds).
- ``negative: local``: the next sample of the same rank's batch, wrapping within it, as in the
  paper's code. Both means still run over the global batch, so a distributed run equals a
  single-process run that pairs samples within the same per-rank blocks.

With M > 2 modalities the loss is the mean over pairs (or over (anchor, other) pairs). Missing
modalities: for the pair (a, b) only samples holding both take part, as positives and as
negatives; n(i) is then the next such sample.

Left out: the paper also adds Deep InfoMax's prior-matching term, an adversarial discriminator
that pushes the image features towards a uniform prior. It needs a second network and its own
optimiser step, so it is not offered here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from pretrain.losses.base import LOSSES, LossInputs, modality_pairs, mean_of_terms, prepare
from pretrain.distributed import BatchLayout
from pretrain.losses.gather import all_gather_with_grad


@LOSSES.register("clip_lite")
class ClipLiteLoss:
    name = "clip_lite"
    uses_bias = False
    check_finite = True  # prepare() reads the features back to refuse NaN (a guarded trainer turns it off)

    @dataclass
    class Options:
        negative: Literal["global", "local"] = "global"  # the next sample of the global batch, or of the rank's
        anchor: Optional[str] = None  # pairs (anchor, other) instead of all pairs

    def __init__(self, negative: str = "global", anchor: str | None = None):
        self.negative, self.anchor = negative, anchor

    def _partners(self, inp: LossInputs, fb: torch.Tensor, valid_local: torch.Tensor, valid_global: torch.Tensor):
        """b features of each local valid row's negative partner, in row order."""
        lay = inp.layout
        # without masks every row is valid: indices and counts are known on the host (no device read)
        idx = valid_local.nonzero().squeeze(1) if inp.has_masks else torch.arange(lay.local, device=fb.device)
        if self.negative == "local" or lay.world == 1:
            return fb[idx.roll(-1)] if len(idx) else fb[:0]
        # Every rank shares the b row of its first valid sample (zeros when it has none).
        # (zeros that still depend on fb, so the gather's backward runs on this rank too)
        first = fb[idx[:1]] if len(idx) else fb.sum(0, keepdim=True) * 0.0
        heads = all_gather_with_grad(first, BatchLayout(lay.rank, (1,) * lay.world))
        if not len(idx):
            return fb[:0] + heads.sum() * 0.0
        counts = ([int(valid_global[sum(lay.sizes[:r]) : sum(lay.sizes[: r + 1])].sum()) for r in range(lay.world)]
                  if inp.has_masks else list(lay.sizes))
        nxt = next(r % lay.world for r in range(lay.rank + 1, lay.rank + 1 + lay.world) if counts[r % lay.world])
        return torch.cat([fb[idx[1:]], heads[nxt : nxt + 1]])

    def __call__(self, features, logit_scale, logit_bias=None, masks=None, step=None, sizes=None):
        inp = prepare(self.name, features, masks, check_finite=self.check_finite, sizes=sizes)
        lay = inp.layout
        out, terms, counts = {}, [], []
        for a, b in modality_pairs(inp.names, self.anchor, self.name):
            valid_global = inp.global_masks[a] & inp.global_masks[b]
            valid_local = valid_global[lay.offset : lay.offset + lay.local]
            count = lay.total if not inp.has_masks else int(valid_global.sum())
            fa, fb = ((inp.features[a][valid_local], inp.features[b][valid_local]) if inp.has_masks
                      else (inp.features[a], inp.features[b]))  # (a boolean index would read the device)
            partner = self._partners(inp, inp.features[b], valid_local, valid_global)
            t_pos = logit_scale * (fa * fb).sum(1)
            t_neg = logit_scale * (fa * partner).sum(1)
            if logit_bias is not None:
                t_pos, t_neg = t_pos + logit_bias, t_neg + logit_bias
            total = F.softplus(-t_pos).sum() + F.softplus(t_neg).sum()
            term = total * (lay.world / max(count, 1))
            out[f"clip_lite/{a}-{b}"] = term.detach()
            terms.append(term)
            counts.append(count)
        out["loss"] = mean_of_terms(terms, counts)
        return out
