"""Evaluation metrics on constructed features: exact ranks and recalls on hand-made cases, the
chunked ranking equal to a dense sort (ties included) and bounded in memory at 100,000
candidates, Symile's multilinear retrieval on XOR data, the linear probe, zero-shot, outputs."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pretrain.config import Config
from pretrain.evaluation import ranking
from pretrain.evaluation.embed import SplitFeatures, content_ids
from pretrain.evaluation.probe import linear_probe_accuracy
from pretrain.evaluation.ranking import (
    dense_first_relevant_rank,
    first_relevant_rank,
    median_rank,
    mip_queries,
    pairwise_sum_queries,
    recall_at,
    recall_chance,
    sample_negatives,
    sampled_rank,
)
from pretrain.evaluation.runner import format_metrics, short_names, write_outputs
from pretrain.evaluation.tasks import WorkSplit, retrieval_metrics, symile_metrics, zeroshot_metrics

CPU = torch.device("cpu")


def test_hand_made_ranks_recalls_and_median():
    # query i's positive is candidate i; scores are plain dot products
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    c = torch.tensor([[1.0, 0.0], [0.5, 0.4], [0.0, 0.1]])
    # q0: 1, .5, 0 -> c0 first (rank 1); q1: 0, .4, .1 -> c1 first (rank 1); q2: 1, .9, .1 -> c2 last (rank 3)
    ranks = first_relevant_rank(q, c, chunk_size=2)
    assert ranks.tolist() == [1, 1, 3]
    assert recall_at(ranks, [1, 2, 3]) == {1: pytest.approx(2 / 3), 2: pytest.approx(2 / 3), 3: 1.0}
    assert median_rank(ranks) == 1.0
    assert median_rank(torch.tensor([1, 2, 4, 9])) == 3.0  # even count: the mean of the middle two
    # equal scores: the lower candidate index goes first
    dup = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert first_relevant_rank(dup[:1].repeat(2, 1), dup[:2], targets=torch.tensor([0, 1])).tolist() == [1, 2]


def test_class_aware_rank_is_the_first_candidate_of_the_class():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    c = torch.tensor([[0.9, 0.0], [0.8, 0.0], [0.7, 0.0], [0.0, 0.5]])
    labels_c = torch.tensor([0, 1, 1, 1])
    ranks = first_relevant_rank(q, c, query_labels=torch.tensor([1, 0]), candidate_labels=labels_c, chunk_size=3)
    # q0 orders c0 (.9, class 0), c1 (.8, class 1): rank 2. q1 orders c3 (.5, class 1), then zeros: ... c0 (class 0) at 2
    assert ranks.tolist() == [2, 2]
    # a query whose class no candidate has: rank 0, left out of the recalls
    ranks = first_relevant_rank(q, c, query_labels=torch.tensor([1, 5]), candidate_labels=labels_c)
    assert ranks.tolist() == [2, 0]
    assert recall_at(ranks, [1, 2]) == {1: 0.0, 2: 1.0}


def test_recall_chance():
    assert recall_chance(torch.ones(3), 10, [1, 5]) == {1: pytest.approx(0.1), 5: pytest.approx(0.5)}
    # 2 relevant of 4: R@1 1/2, R@2 1 - C(2,2)/C(4,2) = 5/6, R@3 and more: 1
    assert recall_chance(torch.tensor([2]), 4, [1, 2, 3, 10]) == {
        1: pytest.approx(0.5), 2: pytest.approx(5 / 6), 3: pytest.approx(1.0), 10: pytest.approx(1.0)}


@pytest.mark.parametrize("chunk", [8, 25, 1000])
def test_chunked_equals_dense_with_ties(chunk):
    g = torch.Generator().manual_seed(0)
    n, d = 70, 4
    # small integers: every score is exact, so duplicate candidates tie exactly
    q = torch.randint(-2, 3, (n, d), generator=g).double()
    c = torch.randint(-2, 3, (n, d), generator=g).double()
    c[10:20] = c[0]  # many exact duplicates of candidate 0
    labels = torch.randint(0, 5, (n,), generator=g)
    scores = q @ c.T
    paired = first_relevant_rank(q, c, chunk_size=chunk)
    assert torch.equal(paired, dense_first_relevant_rank(scores, torch.eye(n, dtype=torch.bool)))
    by_class = first_relevant_rank(q, c, query_labels=labels, candidate_labels=labels, chunk_size=chunk)
    assert torch.equal(by_class, dense_first_relevant_rank(scores, labels[:, None] == labels[None, :]))
    # float features without ties too, more candidates than queries
    qf, cf = torch.randn(40, 8, generator=g), torch.randn(97, 8, generator=g)
    targets = torch.randint(0, 97, (40,), generator=g)
    relevant = torch.zeros(40, 97, dtype=torch.bool)
    relevant[torch.arange(40), targets] = True
    assert torch.equal(first_relevant_rank(qf, cf, targets=targets, chunk_size=chunk),
                       dense_first_relevant_rank(qf @ cf.T, relevant))


def test_100k_candidates_never_make_the_full_matrix(monkeypatch):
    """100,000 candidates, chunk 4096: no score block exceeds 4096 x 4096 (64 MB of float32; the
    full 100,000^2 matrix would be 40 GB), and the ranks equal a dense sort of the same scores."""
    blocks = []
    real = ranking.block_scores

    def watched(a, b):
        blocks.append((a.shape[0], b.shape[0]))
        return real(a, b)

    monkeypatch.setattr(ranking, "block_scores", watched)
    g = torch.Generator().manual_seed(1)
    m, n, chunk = 100_000, 50, 4096
    c = F.normalize(torch.randn(m, 8, generator=g, dtype=torch.float64), dim=-1)
    q = F.normalize(c[:n] + 0.3 * torch.randn(n, 8, generator=g, dtype=torch.float64), dim=-1)
    ranks = first_relevant_rank(q, c, targets=torch.arange(n), chunk_size=chunk)
    assert max(b for _, b in blocks) == chunk and max(a * b for a, b in blocks) <= chunk * chunk
    assert len(blocks) == 1 + math.ceil(m / chunk)  # the positives' block, then every block once
    scores = q @ c.T  # (50 x 100,000) for the check only; float64 and no ties: a plain count
    assert torch.equal(ranks, (scores > scores.diagonal()[:, None]).sum(1) + 1)
    assert 1 < ranks.max() < m


def test_sample_negatives_distinct_and_seeded():
    targets = torch.tensor([0, 5, 9, 3])
    for k in (3, 7, 9, 20):  # with replacement + redraws, dense permutation, all the others
        neg = sample_negatives(targets, 10, k, torch.Generator().manual_seed(0))
        assert neg.shape == (4, min(k, 9))
        for row, t in zip(neg.tolist(), targets.tolist()):
            assert len(set(row)) == len(row) and t not in row and all(0 <= j < 10 for j in row)
        again = sample_negatives(targets, 10, k, torch.Generator().manual_seed(0))
        assert torch.equal(neg, again)
    q = torch.tensor([[1.0, 0.0]])
    c = torch.tensor([[0.5, 0], [0.9, 0], [0.2, 0], [0.5, 0]])
    # positive c0 (.5) against c1 (.9, ahead), c2 (.2, behind), c3 (.5, equal but later index)
    assert sampled_rank(q, c, torch.tensor([0]), torch.tensor([[1, 2, 3]])).tolist() == [2]
    assert sampled_rank(q, c, torch.tensor([3]), torch.tensor([[0, 2]])).tolist() == [2]  # c0 ties, earlier


def _xor_split(n: int, d: int, seed: int = 0) -> SplitFeatures:
    """a, b uniform in {-1, 1}^d and c = a * b (XOR in the +-1 encoding), as features that a perfect
    Symile model could give (each modality its own vector, scaled to unit norm)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 2, (n, d), generator=g).float() * 2 - 1
    b = torch.randint(0, 2, (n, d), generator=g).float() * 2 - 1
    feats = {"a": a / math.sqrt(d), "b": b / math.sqrt(d), "c": a * b / math.sqrt(d)}
    masks = {m: torch.ones(n, dtype=torch.bool) for m in feats}
    content = {m: content_ids(x) for m, x in feats.items()}
    return SplitFeatures(feats, masks, torch.full((n,), -1), content)


class _Tower(torch.nn.Module):
    uses_indicator = False


class _Model(torch.nn.Module):
    def __init__(self, names):
        super().__init__()
        self.towers = torch.nn.ModuleDict({m: _Tower() for m in names})


def test_mip_retrieval_solves_xor_and_pairwise_cannot():
    """b given (a, c = a XOR b): the multilinear score (a * c) . b' = b . b' picks b among all 2^d
    distinct candidates; the pairwise sum (a + c) . b' carries no information about b."""
    d = 4
    split = _xor_split(400, d)
    cfg = Config()
    cfg.eval.symile.distinct = True
    cfg.eval.symile.scoring = ["mip", "pairwise"]
    out = symile_metrics(split, _Model("abc"), "b", ["a", "c"], cfg, WorkSplit(0, 1, 64, CPU))
    assert out["eval/symile/b/candidates"] == 2 ** d
    assert out["eval/symile/b/r1"] == 1.0 and out["eval/symile/b/median_rank"] == 1.0
    assert out["eval/symile/b/r1/chance"] == pytest.approx(1 / 2 ** d)
    assert out["eval/symile_pairwise/b/r1"] < 0.3
    # 1 positive + 5 seeded negatives among the distinct candidates
    cfg.eval.symile.distinct, cfg.eval.symile.candidates = True, 5
    out = symile_metrics(split, _Model("abc"), "b", ["a", "c"], cfg, WorkSplit(0, 1, 64, CPU))
    assert out["eval/symile/b/candidates"] == 6 and out["eval/symile/b/r1"] == 1.0
    assert out["eval/symile/b/r1/chance"] == pytest.approx(1 / 6)
    # the query vectors are what the docstring says
    a, c = split.features["a"][:3], split.features["c"][:3]
    assert torch.equal(mip_queries([a, c]), a * c) and torch.equal(pairwise_sum_queries([a, c]), a + c)


def test_linear_probe_separable_and_shuffled():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 3

    def draw(n):
        y = torch.randint(0, 4, (n,), generator=g)
        return centers[y] + torch.randn(n, 16, generator=g), y

    xt, yt = draw(300)
    xv, yv = draw(300)
    res = linear_probe_accuracy(xt, yt, xv, yv, 4, l2=1e-3, max_iter=50)
    assert res["top1"] >= 0.97 and res["train_top1"] >= 0.97
    # labels shuffled (train and held-out alike) carry nothing about the features: chance
    yt, yv = yt[torch.randperm(300, generator=g)], yv[torch.randperm(300, generator=g)]
    res = linear_probe_accuracy(xt, yt, xv, yv, 4, l2=1e-3, max_iter=50)
    assert res["top1"] <= res["chance"] + 0.08, res


def test_zeroshot_and_retrieval_metrics_by_hand():
    classes = torch.eye(3)
    x = torch.tensor([[1.0, 0.1, 0.0], [0.0, 1.0, 0.9], [0.2, 0.0, 1.0], [1.0, 0.0, 0.0]])
    labels = torch.tensor([0, 2, 2, -1])  # the last is unlabelled: left out
    out = zeroshot_metrics(x, labels, classes, "eval/zeroshot/image", chunk_size=2)
    assert out["eval/zeroshot/image/samples"] == 3
    assert out["eval/zeroshot/image/top1"] == pytest.approx(2 / 3)  # sample 1 prefers class 1
    assert out["eval/zeroshot/image/top3"] == 1.0 and out["eval/zeroshot/image/top1/chance"] == pytest.approx(1 / 3)
    # paired and class-aware retrieval, with the short names derived from them
    img = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    txt = torch.tensor([[0.9, 0.0], [1.0, 0.0], [0.0, 1.0]])
    lab = torch.tensor([0, 0, 1])
    out = retrieval_metrics(img, txt, lab, "eval/retrieval/image_to_text", "eval/retrieval_class/image_to_text",
                            [1, 2], 2, WorkSplit(0, 1, 2, CPU))
    # paired: img0 -> txt1 (1.0) before txt0 (.9): rank 2; img1 -> txt1 rank 1; img2 -> txt2 rank 1
    assert out["eval/retrieval/image_to_text/r1"] == pytest.approx(2 / 3)
    assert out["eval/retrieval/image_to_text/median_rank"] == 1.0
    assert out["eval/retrieval_class/image_to_text/r1"] == 1.0
    assert out["eval/retrieval_class/image_to_text/r1/chance"] == pytest.approx((2 / 3 * 2 + 1 / 3) / 3)
    aliases = short_names(out)
    assert aliases["eval/i2t_r1"] == 1.0 and "eval/t2i_r1" not in aliases
    # the printout shows each figure once: the short names are not printed again
    text = format_metrics({"eval/samples": 3.0, **out, **aliases})
    assert text.count("100.00%") == 1 and "image->text R@1 (class-aware)" in text and "i2t" not in text
    assert text.count("66.67%") == 1 and "image->text R@1 " in text


def test_outputs_json_and_pngs(tmp_path):
    for step, r1 in ((10, 0.2), (20, 0.5)):
        metrics = {"eval/samples": 12.0, "eval/retrieval/image_to_text/r1": r1, "eval/zeroshot/image/top1": r1 / 2,
                   "eval/retrieval/image_to_text/median_rank": float("nan")}
        example = {"matrix": torch.rand(6, 6) * 2 - 1, "rows": "image", "cols": "text", "labels": [0, 0, 1, 1, 2, -1]}
        path = write_outputs(metrics, example, tmp_path, step)
    assert path == tmp_path / "eval" / "step000020.json"
    record = json.loads(path.read_text())
    assert record["step"] == 20 and record["eval/retrieval/image_to_text/r1"] == 0.5
    assert record["eval/retrieval/image_to_text/median_rank"] == "nan"
    for name in ("recall_vs_step.png", "similarity_step000010.png", "similarity_step000020.png"):
        with Image.open(tmp_path / "eval" / "plots" / name) as img:
            assert img.size[0] > 100 and img.size[1] > 100
    assert "recall_vs_step.png" in (tmp_path / "eval" / "index.html").read_text()


def test_multi_caption_retrieval_equals_a_brute_force_count():
    """COCO-style retrieval: every image with all its captions. image->text hits when any of the
    image's captions is in the top k; text->image when the caption's own image is."""
    from pretrain.evaluation.tasks import multi_caption_metrics

    g = torch.Generator().manual_seed(3)
    n, d = 9, 6
    images = F.normalize(torch.randn(n, d, generator=g), dim=1)
    counts = [1 + i % 3 for i in range(n)]  # 1, 2 or 3 captions per image
    owner = torch.tensor([i for i, c in enumerate(counts) for _ in range(c)])
    captions = F.normalize(images[owner] + 0.9 * torch.randn(len(owner), d, generator=g), dim=1)
    split = SplitFeatures({"image": images, "text": captions[:n]},  # per-sample text: not used here
                          {"image": torch.ones(n, dtype=torch.bool), "text": torch.ones(n, dtype=torch.bool)},
                          torch.full((n,), -1), multi={"text": (captions, owner)})
    ks = [1, 2, 5]
    i2t = multi_caption_metrics(split, "image", "text", "eval/retrieval/image_to_text", ks, 4, WorkSplit(0, 1, 4, CPU))
    t2i = multi_caption_metrics(split, "text", "image", "eval/retrieval/text_to_image", ks, 4, WorkSplit(0, 1, 4, CPU))
    sim = images @ captions.T  # brute force: full matrices, stable descending order
    i2t_rank = [1 + int((sim[i] > sim[i][owner == i].max()).sum()) for i in range(n)]
    t2i_rank = [1 + int((sim[:, j] > sim[owner[j], j]).sum() + (sim[: owner[j], j] == sim[owner[j], j]).sum())
                for j in range(len(owner))]
    for k in ks:
        assert i2t[f"eval/retrieval/image_to_text/r{k}"] == pytest.approx(sum(r <= k for r in i2t_rank) / n)
        assert t2i[f"eval/retrieval/text_to_image/r{k}"] == pytest.approx(sum(r <= k for r in t2i_rank) / len(owner))
    assert i2t["eval/retrieval/image_to_text/queries"] == n and t2i["eval/retrieval/text_to_image/queries"] == len(owner)
    # chance: one image of n for a caption; for an image, any of its c captions among all of them
    assert t2i["eval/retrieval/text_to_image/r1/chance"] == pytest.approx(1 / n)
    assert i2t["eval/retrieval/image_to_text/r1/chance"] == pytest.approx(sum(c / len(owner) for c in counts) / n)
