"""The CLIP loss on real gloo groups equals the single-process loss on the global batch (float64)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pretrain.losses import build_loss
from tests.conftest import free_port


def _global_inputs(sizes, modalities, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    feats = {m: torch.nn.functional.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=-1)
             for m in modalities}
    return feats, torch.tensor([7.5], dtype=torch.float64)


def _worker(rank, world, port, sizes, modalities, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        feats, scale = _global_inputs(sizes, modalities)
        start = sum(sizes[:rank])
        local = {m: f[start:start + sizes[rank]].clone().requires_grad_(True) for m, f in feats.items()}
        scale = scale.clone().requires_grad_(True)
        out = build_loss({"name": "clip"})(local, scale)
        out["loss"].backward()
        torch.save({"loss": out["loss"].detach(), "scale_grad": scale.grad,
                    "feat_grads": {m: x.grad for m, x in local.items()}}, f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "sizes, modalities",
    [([3, 3], ["image", "text"]), ([4, 2], ["image", "text"]), ([2, 3, 1, 4], ["a", "b", "c"])],
)
def test_clip_distributed_equals_single_process(tmp_path, sizes, modalities):
    world = len(sizes)
    mp.spawn(_worker, args=(world, free_port(), sizes, modalities, str(tmp_path / "r")), nprocs=world)
    results = [torch.load(tmp_path / f"r.{r}") for r in range(world)]

    feats, scale = _global_inputs(sizes, modalities)
    feats = {m: f.clone().requires_grad_(True) for m, f in feats.items()}
    scale = scale.clone().requires_grad_(True)
    ref = build_loss({"name": "clip"})(feats, scale)
    ref["loss"].backward()

    # value: the rank mean of the local losses (what is logged) is the global loss
    mean_loss = sum(r["loss"] for r in results) / world
    torch.testing.assert_close(mean_loss, ref["loss"].detach(), rtol=1e-12, atol=0)
    # temperature: the rank mean of gradients (what DeepSpeed/DDP apply) is the global gradient
    mean_scale_grad = sum(r["scale_grad"] for r in results) / world
    torch.testing.assert_close(mean_scale_grad, scale.grad, rtol=1e-10, atol=1e-14)
    # features: each rank's gradient of its slice, averaged over ranks like a parameter's
    for m in modalities:
        got = torch.cat([r["feat_grads"][m] for r in results]) / world
        torch.testing.assert_close(got, feats[m].grad, rtol=1e-10, atol=1e-14)


def test_single_process_matches_textbook_infonce():
    feats, scale = _global_inputs([5], ["image", "text"])
    out = build_loss({"name": "clip"})(feats, scale)
    logits = scale * feats["image"] @ feats["text"].T
    labels = torch.arange(5)
    expected = (torch.nn.functional.cross_entropy(logits, labels)
                + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(out["loss"], expected, rtol=1e-12, atol=0)


def test_unknown_loss_named():
    with pytest.raises(ValueError, match="loss.name: unknown loss 'nope'"):
        build_loss({"name": "nope"})
