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

The prior-matching term of the official code (after Deep InfoMax), with ``prior_weight`` w > 0:

    total = (1 - w) * JSD + w * PRIOR,   PRIOR = sum over prior_on of -(mean log D(u) + mean log(1 - D(f)))

where f are a tower's pre-head backbone features, u ~ U[0, 1) samples of the same shape and D a
small discriminator (1000-200-1, sigmoid) per modality: the objective's own parameters
(``pretrain.losses.prior``, held by the model as ``model.objective.prior``), trained in the same
backward and optimizer step as everything else. Their logits reach the loss as
``params={"prior": {modality: (logits of u, logits of f)}}``. ``prior_mode: cooperative`` (the official
code) lets the encoder descend PRIOR with the discriminator; ``gradient_reversal`` (earlier
``adversarial``, still accepted; not Deep InfoMax's own scheme: ``pretrain.losses.prior``) reverses
the gradient reaching f, so the encoder ascends it. The means run over the global batch
(f: the samples holding the modality), so the term is exact under data parallelism. It is logged
as ``clip_lite/prior`` (and ``clip_lite/prior/<modality>``); ``loss`` is the weighted total.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from pretrain.distributed import BatchLayout
from pretrain.losses.base import LOSSES, Loss, LossInputError, LossInputs, modality_pairs, mean_of_terms
from pretrain.losses.gather import all_gather_with_grad
from pretrain.losses.prior import PriorParameters
from pretrain.options import require


@LOSSES.register("clip_lite")
class ClipLiteLoss(Loss):
    name = "clip_lite"

    @dataclass
    class Options:
        negative: Literal["global", "local"] = "global"  # the next sample of the global batch, or of the rank's
        anchor: Optional[str] = None  # pairs (anchor, other) instead of all pairs
        prior_weight: float = 0.0  # w of the prior-matching term (0: off; the official code uses 0.1)
        # the official code's, or a gradient-reversal game (adversarial: its earlier name)
        prior_mode: Literal["cooperative", "gradient_reversal", "adversarial"] = "cooperative"
        prior_on: Optional[list[str]] = None  # modalities whose backbone features are matched (None: all)

        def check(self, key: str) -> None:
            require(0.0 <= self.prior_weight < 1.0, f"{key}.prior_weight", f"must be in [0, 1), got {self.prior_weight}")
            require(self.prior_on is None or len(self.prior_on) > 0, f"{key}.prior_on",
                    "give at least one modality, or leave it unset for all")

    def check_against(self, modalities, train, key="loss"):
        if self.prior_weight > 0:
            for i, m in enumerate(self.prior_on or []):
                require(m in modalities, f"{key}.prior_on[{i}]",
                        f"no such modality in data.modalities ({', '.join(modalities)})")

    def negatives(self, global_batch, modalities):
        where = "the next sample of the global batch" if self.negative == "global" else "the next sample of its rank"
        return f"1 per positive ({where}), whatever the batch"

    def parameters(self, ctx):
        """The prior discriminators (with ``prior_weight`` > 0), over the backbone features of
        ``prior_on`` (default: every modality)."""
        if not self.prior_weight > 0:
            return None
        on = list(self.prior_on or ctx.modalities)
        for i, m in enumerate(on):
            if m not in ctx.widths:
                raise LossInputError(f"loss.prior_on[{i}]: no such modality among the towers ({', '.join(ctx.widths)})")
        return PriorParameters({m: ctx.widths[m] for m in on}, self.prior_mode)

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

    def _prior(self, inp: LossInputs, prior: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This rank's share of PRIOR (summed over modalities) and each modality's."""
        lay, terms = inp.layout, {}
        for m in sorted(prior):
            if m not in inp.features:
                raise LossInputError(f"{self.name}: prior logits for {m!r}, which has no features ({inp.names})")
            real, fake = prior[m]
            if tuple(real.shape) != (lay.local,) or tuple(fake.shape) != (lay.local,):
                raise LossInputError(f"{self.name}: prior logits of {m!r} must be ({lay.local},) each, got "
                                     f"{tuple(real.shape)} and {tuple(fake.shape)}")
            present = inp.global_masks[m]
            count = lay.total if not inp.has_masks else int(present.sum())
            if inp.has_masks:
                fake = fake[present[lay.offset : lay.offset + lay.local]]
            # log D = logsigmoid(logit), log(1 - D) = logsigmoid(-logit): the official values, stably
            real_mean = F.logsigmoid(real).sum() * (lay.world / lay.total)
            fake_mean = F.logsigmoid(-fake).sum() * (lay.world / max(count, 1))
            terms[m] = -(real_mean + fake_mean)
        return sum(terms.values()), terms

    def compute(self, inp, logit_scale, logit_bias=None, step=None, params=None):
        prior = (params or {}).get("prior")
        if self.prior_weight > 0 and not prior:
            raise LossInputError(f"{self.name}: prior_weight is {self.prior_weight} but no prior logits were given "
                                 "(params={'prior': ...}: the model's objective gives them in a training forward)")
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
        if self.prior_weight > 0:
            total, per_modality = self._prior(inp, prior)
            out["clip_lite/jsd"] = out["loss"].detach()
            out["clip_lite/prior"] = total.detach()
            out.update({f"clip_lite/prior/{m}": t.detach() for m, t in per_modality.items()})
            out["loss"] = (1.0 - self.prior_weight) * out["loss"] + self.prior_weight * total
        return out
