"""ZeRO-0's overlapped gradient averaging (``pretrain.gradsync``) on 2 real gloo ranks with real
DeepSpeed engines built by ``pretrain.engine.build_engine``: its gradients and weights are
DeepSpeed's own reduction's, bit for bit, step after step, also where the ranks' graphs differ (a
layer one rank leaves out, one nobody uses) and with accumulation; the buckets go out while backward
runs, in a group of their own: backward runs collectives of the model's too (the gather's gradient,
one in the middle of the model), which ranks with different graphs reach at different points of
their bucket sends."""
from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from pretrain.distributed import close_distributed, free_port, init_distributed

pytestmark = pytest.mark.slow

STEPS = 3


class _MeanGradOverRanks(torch.autograd.Function):
    """Identity forward; backward averages the gradient over the ranks, a collective on the default
    group in the middle of backward (as SyncBatchNorm's backward runs)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad)
        return grad / torch.distributed.get_world_size()


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.extra = (torch.nn.Linear(6, 32), torch.nn.Linear(32, 32),
                                              torch.nn.Linear(32, 4), torch.nn.Linear(32, 4))
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, x, use_extra: bool):
        from pretrain.losses.gather import all_gather_with_grad

        h = torch.tanh(self.b(_MeanGradOverRanks.apply(torch.tanh(self.a(x)))))
        out = self.c(h) + (self.extra(h) if use_extra else 0)
        full = all_gather_with_grad(out)  # its backward is a collective too, on the default group
        return (full * self.scale).pow(2).mean() + (full[:, :2] @ full[:, 2:].T).logsumexp(1).mean()


def _train(rank, world, overlap, accumulation) -> dict:
    """STEPS steps of a fresh model under a DeepSpeed ZeRO-0 engine, through the step's backward."""
    from types import SimpleNamespace

    from pretrain.engine import build_engine
    from pretrain.step import ContrastiveStep
    from pretrain.trainer import TrainConfig

    torch.manual_seed(0)
    model = Net()
    cfg = TrainConfig(zero_stage=0, precision="fp32", grad_clip=1.0, lr=0.05, warmup_steps=0, steps=STEPS,
                      micro_batch_size=4, grad_accumulation_steps=accumulation, overlap_grad_reduce=overlap)
    engine = build_engine(model, cfg, world)
    sync = engine.grad_sync
    assert (sync is not None) == overlap
    step = SimpleNamespace(engine=engine, _norm_wanted=False)  # what ContrastiveStep._backward uses
    record = {"sent_before_finish": [], "grads": [], "buckets": len(sync.buckets) if sync else 0}
    if sync:
        finish = sync.finish
        sync.finish = lambda: (record["sent_before_finish"].append(sync.next) if sync.armed else None, finish())
    for s in range(STEPS):
        # step 2: rank 1 leaves `extra` out (the ranks' graphs differ); step 3: nobody uses it
        use_extra = s == 0 or (s == 1 and rank == 0)
        for k in range(accumulation):
            g = torch.Generator().manual_seed(1000 * s + 10 * k + rank)
            loss = model(torch.randn(4, 6, generator=g), use_extra)
            ContrastiveStep._backward(step, loss)
            if k == accumulation - 1:
                record["grads"].append({n: p.grad.clone() for n, p in model.named_parameters()})
            engine.step()
    record["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    if sync:  # the gradients stayed views of the buckets through DeepSpeed's steps and zero_grad
        record["views_kept"] = all(p.grad.data_ptr() == sync.where[p][1].data_ptr() for p in model.parameters())
        record["zero_after_step"] = all(float(p.grad.abs().max()) == 0 for p in model.parameters())
    record["names"] = [n for n, _ in model.named_parameters()]
    return record


def _worker(rank, world, port, out_path):
    import pretrain.gradsync as gradsync

    init_distributed(rank, world, port, cpu=True)
    gradsync.BUCKET_MB = 4 * 1024 / 2**20  # 4 KB: several buckets in this small model
    try:  # every case in one pair of processes (start-up is most of the time)
        records = {(overlap, k): _train(rank, world, overlap, k) for k in (1, 2) for overlap in (False, True)}
        torch.save(records, f"{out_path}.{rank}")
    finally:
        close_distributed()


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    path = tmp_path_factory.mktemp("gradsync") / "records"
    mp.spawn(_worker, args=(2, free_port(), str(path)), nprocs=2)
    return [torch.load(f"{path}.{r}") for r in range(2)]


@pytest.mark.parametrize("accumulation", [1, 2])
def test_overlapped_averaging_is_deepspeeds_bit_for_bit(records, accumulation):
    ours, theirs = [r[True, accumulation] for r in records], [r[False, accumulation] for r in records]
    for rank in range(2):
        got, want = ours[rank], theirs[rank]
        for s in range(STEPS):
            for name in got["names"]:
                assert torch.equal(got["grads"][s][name], want["grads"][s][name]), (rank, s, name)
        for name in got["names"]:
            assert torch.equal(got["params"][name], want["params"][name]), (rank, name)
        assert got["views_kept"] and got["zero_after_step"]
    # the averages are means over the ranks: where rank 1 left `extra` out, its gradient is rank 0's half
    assert torch.equal(ours[0]["grads"][1]["extra.weight"], ours[1]["grads"][1]["extra.weight"])
    assert float(ours[0]["grads"][1]["extra.weight"].abs().max()) > 0
    assert float(ours[0]["grads"][2]["extra.weight"].abs().max()) == 0  # nobody used it
    # the buckets went out while backward ran: at step 1 (every parameter used) all of them had been
    # sent when backward returned; only the step's last micro-batch sends
    assert ours[0]["buckets"] >= 3
    sent = ours[0]["sent_before_finish"]
    assert len(sent) == STEPS and sent[0] == ours[0]["buckets"], sent
