"""Every objective on real gloo groups (2 and 4 processes, float64) equals the
single-process computation on the concatenated global batch: the rank-mean of the loss values and
of the gradients of features, temperature and bias, to 1e-9 relative; with and without masks and
with and without feature-caching gradient accumulation. CLIP-Lite's prior-matching term too
(cooperative and adversarial): its discriminators' gradients and the towers' through both terms.

A group of 8 processes runs a subset (``EIGHT_RANK_CASES``: CLIP, SigLIP with both exchanges,
Symile with M = 3 and masks) on uneven batches with an empty rank: on 2 ranks a ring's next and
previous rank are the same rank, and only 8 ranks take a ring past four blocks. Each group runs
all its cases in one start of its processes (start-up is most of a group's cost)."""

import multiprocessing

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from pretrain.losses import BatchContext, LossContext, accumulate_step, build_loss
from pretrain.distributed import close_distributed, free_port, init_distributed

DIM = 5
# rank 3 of 8 holds no row (rank 1 holds no sample with m0: see _data)
SIZES = {2: [4, 3], 4: [3, 1, 4, 2], 8: [2, 1, 3, 0, 2, 4, 1, 3]}


def _cases():
    cases = []
    for masks in (False, True):
        for m in (2, 3, 4):
            cases.append(({"name": "clip"}, m, masks, False))
            for sampling in ("n", "n_squared"):
                cases.append(({"name": "symile", "negative_sampling": sampling, "chunk_size": 7, "seed": 3}, m, masks, False))
        cases.append(({"name": "clip", "anchor": "m1"}, 3, masks, False))
        cases.append(({"name": "clip_lite", "anchor": "m1"}, 3, masks, False))
        cases.append(({"name": "siglip", "anchor": "m2", "exchange": "ring"}, 3, masks, False))
        for m in (2, 3):
            for neg in ("global", "local"):
                cases.append(({"name": "clip_lite", "negative": neg}, m, masks, False))
            for exchange in ("all_gather", "ring"):
                cases.append(({"name": "siglip", "exchange": exchange}, m, masks, False))
            for mode in ("cooperative", "adversarial"):
                prior = {"name": "clip_lite", "prior_weight": 0.3, "prior_mode": mode}
                cases.append(({**prior, "prior_on": ["m0", "m2"]} if m == 3 else prior, m, masks, False))
    for opts in ({"name": "clip"}, {"name": "clip_lite"}, {"name": "siglip", "exchange": "ring"},
                 {"name": "symile", "negative_sampling": "n_squared", "chunk_size": 11},
                 {"name": "symile", "negative_sampling": "n", "seed": 1}):
        cases.append((opts, 3, False, True))
    cases.append(({"name": "clip"}, 3, True, True))
    return cases


CASES = _cases()


def _eight_rank_cases() -> list[int]:
    """Indices into CASES run by the 8-rank group: CLIP, SigLIP (all_gather and ring) and Symile (both
    samplings) at M = 3 with masks; CLIP and the ring at M = 2 without (the unmasked path)."""
    symile = {"name": "symile", "chunk_size": 7, "seed": 3}
    wanted = [
        ({"name": "clip"}, 3, True), ({"name": "clip"}, 2, False),
        ({"name": "siglip", "exchange": "all_gather"}, 3, True), ({"name": "siglip", "exchange": "ring"}, 3, True),
        ({"name": "siglip", "exchange": "ring"}, 2, False),
        ({**symile, "negative_sampling": "n"}, 3, True), ({**symile, "negative_sampling": "n_squared"}, 3, True),
    ]
    found = [i for i, (opts, m, masks, acc) in enumerate(CASES) if not acc and (opts, m, masks) in wanted]
    assert len(found) == len(wanted), "an 8-rank case is no longer in CASES"
    return found


EIGHT_RANK_CASES = _eight_rank_cases()


def _case_id(case):
    opts, m, masks, acc = case
    extra = "-".join(f"{k}={'+'.join(v) if isinstance(v, list) else v}" for k, v in opts.items()
                     if k not in ("name", "chunk_size", "seed"))
    return f"{opts['name']}{'-' + extra if extra else ''}-M{m}{'-masks' if masks else ''}{'-accum' if acc else ''}"


def _data(case_index, sizes, m):
    """Global inputs of a case: raw inputs, tower weights, masks, temperature and bias."""
    g = torch.Generator().manual_seed(1000 + case_index)
    n = sum(sizes)
    names = [f"m{i}" for i in range(m)]
    raw = {k: torch.randn(n, DIM + 2, generator=g, dtype=torch.float64) for k in names}
    weights = {k: torch.randn(DIM, DIM + 2, generator=g, dtype=torch.float64) for k in names}
    masks = {k: torch.rand(n, generator=g) > 0.3 for k in names}
    # a rank with no sample holding m0 (rank 1's block), to exercise empty local rows
    masks["m0"][sizes[0] : sizes[0] + sizes[1]] = False
    masks["m1"][0] = True
    masks["m0"][0] = True
    return raw, weights, masks, torch.tensor([4.0], dtype=torch.float64), torch.tensor([-2.0], dtype=torch.float64)


def _encode(weights, raw):
    return {k: F.normalize(raw[k] @ weights[k].T, dim=-1) for k in raw}


def _run_prior_case(case_index, case, rows, sizes):
    """CLIP-Lite with the prior term: backbone features h = raw @ W^T, the loss's features their
    normalisation, each discriminator scoring the prior samples of its rows and h (reversed in
    adversarial mode)."""
    opts, m, use_masks, _ = case
    raw, weights, masks, scale, bias = _data(case_index, sizes, m)
    weights = {k: w.clone().requires_grad_(True) for k, w in weights.items()}
    scale, bias = scale.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    loss = build_loss(opts)
    with torch.random.fork_rng():  # the same discriminators on every rank (as DeepSpeed broadcasts them)
        torch.manual_seed(case_index)
        objective = loss.parameters(LossContext(sorted(raw), DIM, {k: DIM for k in raw})).double()
    h = {k: v[rows] @ weights[k].T for k, v in raw.items()}
    feats = {k: F.normalize(x, dim=-1) for k, x in h.items()}
    # the objective's own forward: prior samples of these rows of the global batch, reversed f in adversarial mode
    params = objective(feats, h, BatchContext(step=5, seed=11, offset=int(rows[0]), rows=len(rows), total=sum(sizes)))
    masks = {k: v[rows] for k, v in masks.items()} if use_masks else None
    out = loss(feats, scale, bias, masks=masks, step=5, params=params)
    out["loss"].backward()
    return {
        "loss": out["loss"].detach(),
        "feat_grads": None,
        "weight_grads": {k: w.grad for k, w in weights.items()},
        "scale_grad": scale.grad,
        "bias_grad": bias.grad,
        "disc_grads": {name: p.grad for name, p in objective.named_parameters()},
    }


def _run_case(case_index, case, rows, sizes_for_chunks=None):
    """Loss and gradients for the rows given (this rank's slice, or the whole batch)."""
    opts, m, use_masks, accumulate = case
    sizes = sizes_for_chunks
    if opts.get("prior_weight"):
        return _run_prior_case(case_index, case, rows, sizes)
    raw, weights, masks, scale, bias = _data(case_index, sizes, m)
    weights = {k: w.clone().requires_grad_(True) for k, w in weights.items()}
    scale, bias = scale.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    raw = {k: v[rows] for k, v in raw.items()}
    masks = {k: v[rows] for k, v in masks.items()} if use_masks else None
    loss_fn = build_loss(opts)
    use_bias = bias if opts["name"] in ("siglip", "clip_lite") else None
    if accumulate:
        n = len(rows)
        cuts = [0, n // 3, n // 3 + (n + 1) // 3, n]
        mbs = [{k: v[a:b] for k, v in raw.items()} for a, b in zip(cuts, cuts[1:])]
        mb_masks = None if masks is None else [{k: v[a:b] for k, v in masks.items()} for a, b in zip(cuts, cuts[1:])]
        out = accumulate_step(lambda mb: _encode(weights, mb), mbs, loss_fn, lambda: (scale, use_bias),
                              masks=mb_masks, step=5)
        feat_grads = None
    else:
        feats = {k: f.detach().requires_grad_(True) for k, f in _encode(weights, raw).items()}
        out = loss_fn(feats, scale, use_bias, masks=masks, step=5)
        out["loss"].backward()
        feat_grads = {k: f.grad for k, f in feats.items()}
        # parameters: chain through the encoder with the features' gradients
        enc = _encode(weights, raw)
        sum((enc[k] * feat_grads[k]).sum() for k in enc).backward()
    return {
        "loss": out["loss"].detach(),
        "feat_grads": feat_grads,
        "weight_grads": {k: w.grad for k, w in weights.items()},
        "scale_grad": scale.grad,
        "bias_grad": bias.grad if use_bias is not None else None,
    }


def _worker(rank, world, port, out_path, indices):
    init_distributed(rank, world, port, cpu=True)
    torch.manual_seed(rank)  # ranks' own RNG streams differ; the losses must not depend on them
    torch.set_num_threads(1)  # up to 8 processes share the machine's cores
    try:
        sizes = SIZES[world]
        start = sum(sizes[:rank])
        rows = torch.arange(start, start + sizes[rank])
        results = {i: _run_case(i, CASES[i], rows, sizes) for i in indices}
        torch.save(results, f"{out_path}.{rank}")
    finally:
        close_distributed()


def _reference(case_index, case, sizes):
    """One process on the whole batch; clip_lite's local negatives pair within the same blocks."""
    opts = case[0]
    if opts["name"] == "clip_lite" and opts.get("negative") == "local":
        return _clip_lite_blocks(case_index, case, sizes)
    return _run_case(case_index, case, torch.arange(sum(sizes)), sizes)


def _clip_lite_blocks(case_index, case, sizes):
    """Textbook CLIP-Lite with each sample's negative the next valid sample of its own block."""
    opts, m, use_masks, _ = case
    raw, weights, masks, scale, bias = _data(case_index, sizes, m)
    weights = {k: w.clone().requires_grad_(True) for k, w in weights.items()}
    scale, bias = scale.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    feats = _encode(weights, raw)
    names = sorted(feats)
    terms = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            valid = (masks[a] & masks[b]) if use_masks else torch.ones(sum(sizes), dtype=torch.bool)
            pos, neg = [], []
            start = 0
            for size in sizes:
                idx = [j for j in range(start, start + size) if valid[j]]
                for p, j in enumerate(idx):
                    pos.append(scale * (feats[a][j] * feats[b][j]).sum() + bias)
                    neg.append(scale * (feats[a][j] * feats[b][idx[(p + 1) % len(idx)]]).sum() + bias)
                start += size
            if pos:
                terms.append((F.softplus(-torch.cat(pos)).sum() + F.softplus(torch.cat(neg)).sum()) / len(pos))
    loss = torch.stack(terms).mean()
    loss.backward()
    return {"loss": loss.detach(), "feat_grads": None, "weight_grads": {k: w.grad for k, w in weights.items()},
            "scale_grad": scale.grad, "bias_grad": bias.grad}


def _close(got, want, what):
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=lambda m: f"{what}: {m}")


def _spawn(world, indices, tmp_path_factory):
    """One group of ``world`` ranks running the cases ``indices``. Forked from a forkserver that has
    imported this module once: a spawned rank would import torch itself and shut its interpreter
    down at exit, which on 2 cores made the 8-rank group ~35 s instead of ~4 s. (Where another test
    has started the forkserver already the preload is ignored: slower, same result.)"""
    path = tmp_path_factory.mktemp(f"w{world}") / "r"
    multiprocessing.set_forkserver_preload([__name__])
    mp.start_processes(_worker, args=(world, free_port(), str(path), list(indices)), nprocs=world,
                       start_method="forkserver")
    return world, [torch.load(f"{path}.{r}") for r in range(world)]


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def distributed_results(request, tmp_path_factory):
    return _spawn(request.param, range(len(CASES)), tmp_path_factory)


@pytest.fixture(scope="module")
def eight_rank_results(tmp_path_factory):
    return _spawn(8, EIGHT_RANK_CASES, tmp_path_factory)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(CASES)), ids=[_case_id(c) for c in CASES])
def test_distributed_equals_single_process(distributed_results, index):
    _check_case(*distributed_results, index)


@pytest.mark.slow
@pytest.mark.parametrize("index", EIGHT_RANK_CASES, ids=[_case_id(CASES[i]) for i in EIGHT_RANK_CASES])
def test_eight_ranks_equal_single_process(eight_rank_results, index):
    _check_case(*eight_rank_results, index)


def _check_case(world, per_rank, index):
    case, sizes = CASES[index], SIZES[world]
    got = [r[index] for r in per_rank]
    ref = _reference(index, case, sizes)
    _close(sum(g["loss"] for g in got) / world, ref["loss"], "loss (rank mean)")
    _close(sum(g["scale_grad"] for g in got) / world, ref["scale_grad"], "temperature gradient (rank mean)")
    if ref["bias_grad"] is not None:
        _close(sum(g["bias_grad"] for g in got) / world, ref["bias_grad"], "bias gradient (rank mean)")
    for k in ref["weight_grads"]:
        _close(sum(g["weight_grads"][k] for g in got) / world, ref["weight_grads"][k], f"tower {k} gradient (rank mean)")
    for k in ref.get("disc_grads", {}):
        _close(sum(g["disc_grads"][k] for g in got) / world, ref["disc_grads"][k], f"prior discriminator {k} gradient")
    if ref["feat_grads"] is not None:
        for k in ref["feat_grads"]:
            _close(torch.cat([g["feat_grads"][k] for g in got]) / world, ref["feat_grads"][k], f"features {k} gradient")
