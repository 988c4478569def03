"""Symile: a lower bound on total correlation through the multilinear inner product (MIP).

MIP(x, y, z, ...) = sum_d x_d y_d z_d ...  Each modality in turn is the anchor; for anchor a and
sample i the positive is MIP of sample i's features across all M modalities, the negatives are
MIPs of a_i with other combinations of the non-anchor modalities; the loss is the cross-entropy of
the positive against them (scaled by logit_scale), averaged over samples and then over anchors.

Negative sampling:

- ``n_squared``: every combination of non-anchor rows of the global batch, B^(M-1) per anchor row.
  Computed in chunks with a streaming logsumexp; the backward pass recomputes each chunk, so peak
  memory stays O(B_local x chunk_size) and never B^(M-1) x d.
- ``n`` (O(N)): one random permutation of the global batch per non-anchor modality; candidate j is
  the product of the permuted rows j, and the anchor row's own column holds its positive (as the
  symile package does). The permutations come from a generator seeded by (seed, step, anchor,
  modality), so every rank draws the same ones and a distributed run equals a single-process run
  with the same seed and step. With M = 2 no permutation is needed: the candidates are the other
  modality's rows, and the loss equals ``clip`` exactly (so does ``n_squared``).

Missing modalities: every Symile term involves every modality, so only samples holding all M
take part (as anchors and as candidates). Symile's own recipe for missing data instead feeds the
encoders a placeholder plus a missing/present indicator and passes no masks here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from pretrain.losses.base import LOSSES, Loss, touch
from pretrain.options import require


def _prefix_products(prefixes: list[torch.Tensor], start: int, stop: int, like: torch.Tensor):
    """Products Y_1[j_1] * ... * Y_K[j_K] for flat combination indices start..stop-1, with the indices."""
    if not prefixes:
        return like.new_ones((1, like.shape[1])), []
    flat = torch.arange(start, stop, device=like.device)
    idx = []
    for y in reversed(prefixes):
        idx.append(flat % y.shape[0])
        flat = flat // y.shape[0]
    idx.reverse()
    prod = prefixes[0][idx[0]]
    for y, j in zip(prefixes[1:], idx[1:]):
        prod = prod * y[j]
    return prod, idx


def _chunks(prefixes: list[torch.Tensor], rows: int, last: int, dim: int, chunk_size: int):
    n_prefix = math.prod(y.shape[0] for y in prefixes) if prefixes else 1
    per = max(1, chunk_size // max(1, rows * max(last, dim)))
    for start in range(0, n_prefix, per):
        yield start, min(n_prefix, start + per)


class _CombinationLogSumExp(torch.autograd.Function):
    """lse_i = log sum over all (j_1..j_K) of exp <x_i, Y_1[j_1] * ... * Y_K[j_K]>."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, chunk_size: int, *ys: torch.Tensor) -> torch.Tensor:
        prefixes, last = list(ys[:-1]), ys[-1]
        rows = x.shape[0]
        run_max = x.new_full((rows,), float("-inf"))
        run_sum = x.new_zeros((rows,))
        d, n_last = x.shape[1], last.shape[0]
        for start, stop in _chunks(prefixes, rows, n_last, d, chunk_size):
            pp, _ = _prefix_products(prefixes, start, stop, x)
            # one GEMM for the whole chunk: (c * rows, d) @ (d, N_last)
            c = pp.shape[0]
            logits = ((x[None] * pp[:, None]).reshape(c * rows, d) @ last.T).view(c, rows, n_last)
            chunk_max = logits.amax(dim=(0, 2))
            new_max = torch.maximum(run_max, chunk_max)
            logits -= new_max[None, :, None]
            run_sum = run_sum * torch.exp(run_max - new_max) + logits.exp_().sum((0, 2))
            run_max = new_max
        lse = run_max + torch.log(run_sum)
        ctx.chunk_size = chunk_size
        ctx.save_for_backward(x, lse, *ys)
        return lse

    @staticmethod
    def backward(ctx, grad_lse: torch.Tensor):
        x, lse, *ys = ctx.saved_tensors
        prefixes, last = ys[:-1], ys[-1]
        gx, glast = torch.zeros_like(x), torch.zeros_like(last)
        gprefix = [torch.zeros_like(y) for y in prefixes]
        rows = x.shape[0]
        d, n_last = x.shape[1], last.shape[0]
        for start, stop in _chunks(list(prefixes), rows, n_last, d, ctx.chunk_size):
            pp, idx = _prefix_products(list(prefixes), start, stop, x)
            c = pp.shape[0]
            xpp = (x[None] * pp[:, None]).reshape(c * rows, d)
            weights = xpp @ last.T  # (c * rows, N_last): the chunk's logits again
            weights = weights.view(c, rows, n_last).sub_(lse[None, :, None]).exp_().mul_(grad_lse[None, :, None])
            weights = weights.view(c * rows, n_last)
            w_last = (weights @ last).view(c, rows, d)
            gx += (w_last * pp[:, None]).sum(0)
            glast += weights.T @ xpp  # sums over the chunk's combinations inside the GEMM
            if prefixes:
                gpp = (w_last * x[None]).sum(1)  # (c, d)
                for k, (y, j) in enumerate(zip(prefixes, idx)):
                    others = torch.ones_like(gpp)
                    for k2, (y2, j2) in enumerate(zip(prefixes, idx)):
                        if k2 != k:
                            others = others * y2[j2]
                    gprefix[k].index_add_(0, j, gpp * others)
        return (gx, None, *gprefix, glast)


def combination_logsumexp(x: torch.Tensor, ys: list[torch.Tensor], chunk_size: int) -> torch.Tensor:
    return _CombinationLogSumExp.apply(x, chunk_size, *ys)


@LOSSES.register("symile")
class SymileLoss(Loss):
    name = "symile"

    @dataclass
    class Options:
        negative_sampling: Literal["n", "n_squared"] = "n"  # one shared permutation, or all combinations
        chunk_size: int = 1 << 22  # n_squared: logits per chunk (memory bound)
        seed: int = 0  # n: permutation seed

        def check(self, key: str) -> None:
            require(self.chunk_size > 0, f"{key}.chunk_size", f"must be > 0, got {self.chunk_size}")

    def __init__(self, **options):
        super().__init__(**options)
        self._calls = 0  # the step, when the caller gives none

    def negatives(self, global_batch, modalities):
        if self.negative_sampling == "n_squared":
            return (f"{global_batch ** (len(modalities) - 1) - 1:,} per anchor row (every combination of the other "
                    f"{len(modalities) - 1} modalities' rows)")
        return f"{global_batch - 1:,} per anchor row (one shared permutation per other modality)"

    def _permutation(self, n: int, step: int, anchor: int, k: int, device) -> torch.Tensor:
        key = ((self.seed * 1_000_003 + step) * 1_009 + anchor) * 1_013 + k
        g = torch.Generator().manual_seed(key % (1 << 63))
        return torch.randperm(n, generator=g).to(device)

    def compute(self, inp, logit_scale, logit_bias=None, step=None, params=None):
        if step is None:
            step = self._calls
        self._calls += 1
        lay = inp.layout
        names = inp.names
        valid = inp.global_masks[names[0]].clone()
        for m in names[1:]:
            valid &= inp.global_masks[m]
        count = lay.total if not inp.has_masks else int(valid.sum())
        local_valid = valid[lay.offset : lay.offset + lay.local]
        gathered = {m: inp.gather(m) for m in names}
        cand = {m: gathered[m][valid] if inp.has_masks else gathered[m] for m in names}
        local = {m: inp.features[m][local_valid] if inp.has_masks else inp.features[m] for m in names}
        # position of each local valid row among the global valid rows (without masks every row is valid:
        # no boolean indexing, which reads the device on the host)
        own = (valid.cumsum(0) - 1)[lay.offset : lay.offset + lay.local]
        if inp.has_masks:
            own = own[local_valid]
        mip_pos = logit_scale * torch.stack([local[m] for m in names]).prod(0).sum(1)
        out, terms = {}, []
        for ai, anchor in enumerate(names):
            others = [m for m in names if m != anchor]
            x = logit_scale * local[anchor]
            if self.negative_sampling == "n_squared":
                lse = combination_logsumexp(x, [cand[m] for m in others], self.chunk_size)
                total = (lse - mip_pos).sum()
            else:
                if len(others) == 1:
                    prod = cand[others[0]]
                else:
                    prod = None
                    for k, m in enumerate(others):
                        rows = cand[m][self._permutation(count, step, ai, k, x.device)]
                        prod = rows if prod is None else prod * rows
                logits = x @ prod.T
                logits = logits.scatter(1, own[:, None], mip_pos[:, None])
                total = F.cross_entropy(logits, own, reduction="sum")
            term = total * (lay.world / max(count, 1)) + touch(*gathered.values())
            out[f"symile/{anchor}"] = term.detach()
            terms.append(term)
        loss = torch.stack(terms).mean()
        out["loss"] = loss if count > 0 else loss * 0.0
        return out
