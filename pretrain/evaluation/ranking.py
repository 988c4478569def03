"""Ranking in chunks: where the first relevant candidate lands for each query, without ever holding
the full query x candidate score matrix.

Candidates are ordered by score (the inner product of a query vector and a candidate vector),
highest first; equal scores are ordered by candidate index, lowest first (the order a stable
descending sort gives). The rank of a query is the 1-based position of its best-placed relevant
candidate in that order. Relevance is either one target per query (``targets[i]`` is the index of
query i's positive) or a shared label (candidate j is relevant to query i when
``candidate_labels[j] == query_labels[i]``: class-aware retrieval, where captions repeat per class).

Memory: one (chunk x chunk) block of scores at a time. Every score is computed by the same block
product in both passes (the best relevant score first, over the blocks that hold a relevant
candidate; then the count of what beats it, over all blocks), so the comparisons are exact even
where candidates are duplicates of each other.

Scoring functions reduce to this inner product:

- pairwise retrieval: query = features of modality A, candidate = features of modality B;
- Symile's multilinear inner product <a, b, c> = sum_k a_k b_k c_k: retrieving b given (a, c),
  the query vector is a * c (elementwise), so the score is (a * c) . b (``mip_queries``);
- the sum of pairwise dot products (for pairwise-trained models): a . b + c . b (+ a . c, the same
  for every candidate) = (a + c) . b (``pairwise_sum_queries``).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch


def block_scores(queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """One block of scores (q, c). A module-level function so tests can watch the block sizes."""
    return queries @ candidates.T


def _blocks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(n, start + size)


def first_relevant_rank(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    *,
    targets: Optional[torch.Tensor] = None,
    query_labels: Optional[torch.Tensor] = None,
    candidate_labels: Optional[torch.Tensor] = None,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """(N,) long: the 1-based rank of the first relevant candidate of each query (module docstring).

    Give ``targets`` (N,) (the positive of query i is candidate ``targets[i]``; default, when no
    labels are given either: candidate i) or ``query_labels`` (N,) with ``candidate_labels`` (M,).
    A query with no relevant candidate gets rank 0. Scores are computed in blocks of at most
    ``chunk_size`` x ``chunk_size`` on the device of ``queries``."""
    n, m = queries.shape[0], candidates.shape[0]
    device = queries.device
    if query_labels is None:
        if targets is None:
            if n != m:
                raise ValueError(f"paired retrieval needs as many candidates as queries, got {n} and {m}")
            targets = torch.arange(n, device=device)
        query_labels = targets.to(device)
        candidate_labels = torch.arange(m, device=device)
    elif candidate_labels is None:
        raise ValueError("query_labels needs candidate_labels")
    query_labels, candidate_labels = query_labels.to(device), candidate_labels.to(device)
    candidates = candidates.to(device)
    ranks = torch.zeros(n, dtype=torch.long, device=device)
    if n == 0 or m == 0:
        return ranks
    cand_index = torch.arange(m, device=device)
    for q0, q1 in _blocks(n, chunk_size):
        q, ql = queries[q0:q1], query_labels[q0:q1]
        # pass 1: the best relevant score of each query and where it is (lowest index among equals)
        best = torch.full((q1 - q0,), -math.inf, dtype=queries.dtype, device=device)
        best_at = torch.full((q1 - q0,), -1, dtype=torch.long, device=device)
        for c0, c1 in _blocks(m, chunk_size):
            if not bool(torch.isin(candidate_labels[c0:c1], ql).any()):
                continue  # no relevant candidate here (paired retrieval: one block in all)
            s = block_scores(q, candidates[c0:c1])
            relevant = ql[:, None] == candidate_labels[None, c0:c1]
            s = s.masked_fill(~relevant, -math.inf)
            value, where = s.max(dim=1)  # first maximal index on ties
            better = (value > best) & relevant.any(dim=1)
            best = torch.where(better, value, best)
            best_at = torch.where(better, where + c0, best_at)
        # pass 2: irrelevant candidates placed before it (higher score, or equal and lower index)
        ahead = torch.zeros(q1 - q0, dtype=torch.long, device=device)
        for c0, c1 in _blocks(m, chunk_size):
            s = block_scores(q, candidates[c0:c1])
            irrelevant = ql[:, None] != candidate_labels[None, c0:c1]
            before = (s > best[:, None]) | ((s == best[:, None]) & (cand_index[None, c0:c1] < best_at[:, None]))
            ahead += (before & irrelevant).sum(dim=1)
        found = best_at >= 0
        ranks[q0:q1] = torch.where(found, ahead + 1, torch.zeros_like(ahead))
    return ranks


def dense_first_relevant_rank(scores: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """Reference (N, M) implementation: a stable descending sort of each row, then the position of
    the first relevant candidate (0 where none). Builds the whole matrix: for tests and small N."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    rel_sorted = torch.gather(relevant, 1, order)
    has = rel_sorted.any(dim=1)
    first = rel_sorted.float().argmax(dim=1) + 1
    return torch.where(has, first, torch.zeros_like(first))


def sample_negatives(targets: torch.Tensor, num_candidates: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """(N, k) candidate indices: for each query, k distinct indices in [0, num_candidates) other
    than its target, drawn uniformly without replacement (all the others, in order, when
    k >= num_candidates - 1). Runs on the CPU with ``generator``."""
    targets = targets.cpu()
    n, pool = targets.shape[0], num_candidates - 1
    if k >= pool:
        others = torch.arange(pool).expand(n, pool)
        return others + (others >= targets[:, None]).long()
    if 2 * k > pool:  # a dense random permutation of the pool per row
        keys = torch.rand(n, pool, generator=generator)
        draw = keys.argsort(dim=1)[:, :k]
    else:  # draw with replacement, redraw the repeats until none are left
        draw = torch.randint(pool, (n, k), generator=generator)
        while True:
            sorted_draw, order = draw.sort(dim=1)
            repeat_sorted = torch.zeros_like(sorted_draw, dtype=torch.bool)
            repeat_sorted[:, 1:] = sorted_draw[:, 1:] == sorted_draw[:, :-1]
            if not bool(repeat_sorted.any()):
                break
            repeat = torch.zeros_like(repeat_sorted)
            repeat.scatter_(1, order, repeat_sorted)
            draw[repeat] = torch.randint(pool, (int(repeat.sum()),), generator=generator)
    return draw + (draw >= targets[:, None]).long()


def sampled_rank(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    targets: torch.Tensor,
    negatives: torch.Tensor,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """(N,) long: the rank of each query's target among itself and its own negatives
    (``negatives`` (N, k) candidate indices, none equal to the target). Ties as in
    ``first_relevant_rank`` (by candidate index). Blocks of at most chunk_size^2 vector entries."""
    n, k = negatives.shape
    device = queries.device
    ranks = torch.zeros(n, dtype=torch.long, device=device)
    if n == 0:
        return ranks
    d = max(1, queries.shape[1])
    rows = max(1, min(chunk_size, chunk_size * chunk_size // ((k + 1) * d)))
    candidates, targets, negatives = candidates.to(device), targets.to(device), negatives.to(device)
    for q0, q1 in _blocks(n, rows):
        idx = torch.cat([targets[q0:q1, None], negatives[q0:q1]], dim=1)  # (q, k + 1), the positive first
        s = torch.einsum("qd,qkd->qk", queries[q0:q1], candidates[idx])
        pos, neg = s[:, :1], s[:, 1:]
        before = (neg > pos) | ((neg == pos) & (negatives[q0:q1] < targets[q0:q1, None]))
        ranks[q0:q1] = before.sum(dim=1) + 1
    return ranks


def mip_queries(context: Sequence[torch.Tensor]) -> torch.Tensor:
    """Query vectors for Symile's multilinear inner product: the elementwise product of the given
    modalities' features (the score of candidate b is then sum_k a_k b_k c_k)."""
    out = context[0].clone()
    for x in context[1:]:
        out = out * x
    return out


def pairwise_sum_queries(context: Sequence[torch.Tensor]) -> torch.Tensor:
    """Query vectors for the sum of pairwise dot products with the candidate: sum of the features."""
    out = context[0].clone()
    for x in context[1:]:
        out = out + x
    return out


def recall_at(ranks: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Share of queries whose first relevant candidate is within the top k (ranks > 0 only)."""
    valid = ranks[ranks > 0]
    if valid.numel() == 0:
        return {k: float("nan") for k in ks}
    return {k: (valid <= k).float().mean().item() for k in ks}


def median_rank(ranks: torch.Tensor) -> float:
    """Median rank (the mean of the two middle ones for an even count), queries with ranks > 0."""
    valid = ranks[ranks > 0].double()
    if valid.numel() == 0:
        return float("nan")
    return float(valid.quantile(0.5))


def recall_chance(num_relevant: torch.Tensor, num_candidates: int | torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Expected recall@k of a random order: 1 - C(M - r, k) / C(M, k) per query (r relevant of M
    candidates), averaged over the queries."""
    r = num_relevant.double().cpu()
    m = torch.as_tensor(num_candidates, dtype=torch.float64).cpu().expand_as(r)
    out = {}
    for k in ks:
        miss = torch.ones_like(r)
        for j in range(k):
            left = m - j
            ratio = torch.where(left > 0, (m - r - j) / left.clamp(min=1.0), torch.zeros_like(left))
            miss = miss * ratio.clamp(min=0.0)
        out[k] = float((1.0 - miss).mean()) if r.numel() else float("nan")
    return out
