"""``train.optimizer: sgd`` and ``train.lookahead`` (issue 30): the updates equal torch's own SGD
and a hand-computed Lookahead; a step skipped on the device (``found_inf``) changes neither fast
nor slow weights nor the momentum, the first update included; and a 2-rank ZeRO-2 run with both
resumed mid-run continues its uninterrupted losses exactly (the slow weights come back)."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import ASSET_SHARDS, losses, ok, tiny_overrides, torchrun


def _optimizer(params, **train):
    from pretrain.optim import OptimConfig, build_optimizer

    model = torch.nn.Module()
    for i, p in enumerate(params):
        model.register_parameter(f"p{i}", p)
    return build_optimizer(model, OptimConfig(**{"lr": 0.1, "weight_decay": 0.0, **train}))


def test_sgd_equals_torch_and_a_skipped_step_changes_nothing():
    grads = [torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.3, 0.1, -1.0]), torch.tensor([2.0, 2.0, 2.0])]
    ours = torch.nn.Parameter(torch.ones(3))
    opt = _optimizer([ours], optimizer="sgd", momentum=0.9, nesterov=True)
    ref = torch.nn.Parameter(torch.ones(3))
    ref_opt = torch.optim.SGD([ref], lr=0.1, momentum=0.9, nesterov=True)
    # the very first update skipped on the device: nothing changes (torch alone leaves the buffer unset)
    ours.grad = torch.full((3,), float("nan"))
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    assert torch.equal(ours.data, torch.ones(3)) and torch.equal(opt.state[ours]["momentum_buffer"], torch.zeros(3))
    for g in grads:
        ours.grad, ref.grad = g.clone(), g.clone()
        opt.found_inf = torch.tensor(0.0)
        opt.step()
        ref_opt.step()
        assert torch.allclose(ours.data, ref.data, atol=1e-7, rtol=0)
    before = (ours.data.clone(), opt.state[ours]["momentum_buffer"].clone())
    ours.grad = torch.full((3,), float("inf"))
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    assert torch.equal(ours.data, before[0]) and torch.equal(opt.state[ours]["momentum_buffer"], before[1])


def test_lookahead_equals_a_hand_computation_and_skips_on_the_device():
    from pretrain.optim import Lookahead

    k, alpha, lr = 3, 0.5, 0.1
    p = torch.nn.Parameter(torch.zeros(2))
    from pretrain.optim import LookaheadConfig, OptimConfig, build_optimizer

    model = torch.nn.Module()
    model.register_parameter("w", p)
    opt = build_optimizer(model, OptimConfig(optimizer="sgd", momentum=0.0, lr=lr, weight_decay=0.0,
                                             lookahead=LookaheadConfig(k=k, alpha=alpha)))
    assert isinstance(opt, Lookahead)
    fast, slow = torch.zeros(2), torch.zeros(2)  # by hand: slow starts at the weights before the first update
    grads = [torch.tensor([1.0, 2.0]) * (i + 1) for i in range(7)]
    skipped = {4, 5}  # the 5th and 6th updates are skipped on the device (they still count toward k); the 6th was due to synchronise
    for i, g in enumerate(grads):
        p.grad = g.clone()
        opt.found_inf = torch.tensor(1.0 if i in skipped else 0.0)
        before = (p.data.clone(), opt.state[p]["lookahead_slow"].clone() if "lookahead_slow" in opt.state[p] else None)
        opt.step()
        if i in skipped:
            assert torch.equal(p.data, before[0]) and torch.equal(opt.state[p]["lookahead_slow"], before[1])
            continue
        fast = fast - lr * g
        if (i + 1) % k == 0:
            slow = slow + alpha * (fast - slow)
            fast = slow.clone()
        assert torch.allclose(p.data, fast, atol=1e-6), (i, p.data, fast)
        assert torch.allclose(opt.state[p]["lookahead_slow"], slow, atol=1e-6), i
    # a skipped step that was due to synchronise (the 6th: 6 % 3 == 0) left fast and slow alone
    p2 = torch.nn.Parameter(torch.ones(2))
    model2 = torch.nn.Module()
    model2.register_parameter("w", p2)
    opt2 = build_optimizer(model2, OptimConfig(optimizer="adamw", lr=lr, weight_decay=0.0,
                                               lookahead=LookaheadConfig(k=1, alpha=alpha)))
    p2.grad = torch.ones(2)
    opt2.found_inf = torch.tensor(1.0)
    opt2.step()
    assert torch.equal(p2.data, torch.ones(2)) and torch.equal(opt2.state[p2]["lookahead_slow"], torch.ones(2))


@pytest.mark.slow
def test_sgd_with_lookahead_under_zero2_resumes_exactly(tmp_path):
    common = ["train.optimizer=sgd", "train.momentum=0.9", "train.nesterov=true", "train.lookahead={k: 3, alpha: 0.5}",
              "train.lr=0.05", "train.checkpoint_every=2", "eval.enabled=false"]
    whole = tmp_path / "whole"
    ok(torchrun(tiny_overrides(ASSET_SHARDS, whole, steps=6) + common))
    part = tmp_path / "part"
    ok(torchrun(tiny_overrides(ASSET_SHARDS, part, steps=6) + common + ["train.stop_at_step=4"]))
    out = ok(torchrun(tiny_overrides(ASSET_SHARDS, part, steps=6) + common))
    assert "at step 4" in out, out[-2000:]
    a, b = losses(whole), losses(part)
    assert sorted(b) == [1, 2, 3, 4, 5, 6] and all(a[s] == b[s] for s in (5, 6)), (a, b)
    assert len({round(v, 6) for v in a.values()}) > 3  # it trains
    # another layout is refused with a message naming the state that would be lost
    from tests.helpers import run_cmd, torchrun_cmd

    proc = run_cmd(torchrun_cmd(tiny_overrides(ASSET_SHARDS, part, steps=8) + common, nproc=1))
    assert proc.returncode != 0 and "train.lookahead's slow weights" in proc.stderr, proc.stderr[-2000:]
