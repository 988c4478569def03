"""CLIP-Lite as its authors built it (issue 16): the official critic head (``head: milinear``)
against a hand-written reference, the prior-matching term against the official formula, the
cooperative and adversarial modes at the model, the configuration errors, and a 2-rank ZeRO-3 run
with the prior whose checkpoint the linear probe reads on backbone features through the CLI.
(The prior term's exactness on 2 and 4 gloo ranks in float64 is in test_loss_distributed.py.)"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.config import ConfigError, load_config
from pretrain.data import build_modalities
from pretrain.export import consolidated_state_dict
from pretrain.losses.clip_lite import ClipLiteLoss
from pretrain.losses import BatchContext
from pretrain.models import build_model
from pretrain.models.heads import build_head
from tests.helpers import ASSET_SHARDS, PYTHON, QUICKSTART, make_vector_shards, ok, run_cmd, torchrun, tiny_overrides, \
    vector_overrides

torch.set_default_dtype(torch.float32)


# ------------------------------------------------------------------------------ the official head


def reference_milinear(head, h: torch.Tensor, training: bool) -> torch.Tensor:
    """The block written out: Linear(no bias) -> BatchNorm1d -> ReLU -> Linear, plus the linear
    shortcut, then LayerNorm (biased variances, eps 1e-5, as torch's defaults)."""
    w1 = head.nonlinear[0].weight
    bn = head.nonlinear[1]
    w2, b2 = head.nonlinear[3].weight, head.nonlinear[3].bias
    z = h @ w1.T
    if training:
        mean, var = z.mean(0), z.var(0, unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    z = (z - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias
    out = torch.relu(z) @ w2.T + b2
    out = out + h @ head.shortcut.weight.T + head.shortcut.bias
    mu, sigma2 = out.mean(-1, keepdim=True), out.var(-1, unbiased=False, keepdim=True)
    return (out - mu) / torch.sqrt(sigma2 + head.norm.eps) * head.norm.weight + head.norm.bias


def test_milinear_equals_the_written_out_block():
    torch.manual_seed(0)
    head = build_head("milinear", {"width": 12}, width=10, embed_dim=6, key="model.towers.image").double()
    with torch.no_grad():  # non-trivial affine parameters, so that each one counts
        for p in (head.nonlinear[1].weight, head.nonlinear[1].bias, head.norm.weight, head.norm.bias):
            p.copy_(torch.randn_like(p))
    h = torch.randn(7, 10, dtype=torch.float64, requires_grad=True)

    head.train()
    expected = reference_milinear(head, h, training=True)
    got = head(h)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    g_got = torch.autograd.grad(got.square().sum(), [h, head.nonlinear[0].weight, head.shortcut.weight])
    g_exp = torch.autograd.grad(expected.square().sum(), [h, head.nonlinear[0].weight, head.shortcut.weight])
    for a, b in zip(g_got, g_exp):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)

    head.eval()
    torch.testing.assert_close(head(h), reference_milinear(head, h, training=False), rtol=1e-12, atol=1e-12)


def test_milinear_running_statistics_follow_batchnorm():
    torch.manual_seed(1)
    head = build_head("milinear", {}, width=5, embed_dim=4, key="model.towers.image").double()
    h = torch.randn(9, 5, dtype=torch.float64)
    head.train()
    head(h)
    z = h @ head.nonlinear[0].weight.detach().T
    bn = head.nonlinear[1]
    torch.testing.assert_close(bn.running_mean, 0.1 * z.mean(0))
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * z.var(0, unbiased=True))
    assert bn.num_features == 4  # width defaults to embed_dim, as the official block


def test_milinear_init_and_options():
    torch.manual_seed(2)
    head = build_head("milinear", {"width": 32}, width=24, embed_dim=16, key="model.towers.image")
    w = head.shortcut.weight.detach()
    assert w.shape == (16, 24)
    assert torch.equal(w.diagonal(), torch.ones(16))  # a noisy identity: ones on the diagonal
    off = w.clone()
    off.fill_diagonal_(0.0)
    assert float(off.abs().max()) <= 0.01 and float(off.abs().max()) > 0.001  # and small noise elsewhere
    assert head.nonlinear[0].bias is None and head.nonlinear[0].out_features == 32

    plain = build_head("milinear", {"shortcut": False, "batch_norm": False, "layer_norm": False}, 8, 4, "k")
    assert plain.shortcut is None
    assert isinstance(plain.nonlinear[1], torch.nn.Identity) and isinstance(plain.norm, torch.nn.Identity)
    x = torch.randn(3, 8)
    torch.testing.assert_close(plain(x), plain.nonlinear[3](torch.relu(plain.nonlinear[0](x))))

    default = build_head("milinear", {"shortcut_init": "default"}, 8, 8, "k")
    assert not torch.equal(default.shortcut.weight.diagonal(), torch.ones(8))


# --------------------------------------------------------------------------- the prior term's value


def test_prior_term_equals_the_official_formula():
    """total = 0.9 JSD + 0.1 PRIOR, PRIOR = sum over modalities of -(mean log D(u) + mean log(1 - D(f))),
    D = sigmoid of the discriminator's logit, written as the official code does (sigmoid, then log)."""
    torch.manual_seed(3)
    B, d = 6, 5
    feats = {m: F.normalize(torch.randn(B, d, dtype=torch.float64), dim=-1).requires_grad_() for m in ("image", "text")}
    scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    logits = {m: (torch.randn(B, dtype=torch.float64, requires_grad=True),
                  torch.randn(B, dtype=torch.float64, requires_grad=True)) for m in ("image", "text")}
    got = ClipLiteLoss(prior_weight=0.1)(feats, scale, params={"prior": logits})

    a, b = feats["image"], feats["text"]
    pos = scale * (a * b).sum(1)
    neg = scale * (a * b.roll(-1, 0)).sum(1)
    jsd = F.softplus(-pos).mean() + F.softplus(neg).mean()
    prior = sum(-(torch.log(torch.sigmoid(r)).mean() + torch.log(1 - torch.sigmoid(f)).mean())
                for r, f in logits.values())
    expected = 0.9 * jsd + 0.1 * prior

    torch.testing.assert_close(got["loss"], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got["clip_lite/jsd"], jsd.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got["clip_lite/prior"], prior.detach(), rtol=1e-12, atol=1e-12)
    leaves = [feats["image"], feats["text"], scale, *logits["image"], *logits["text"]]
    for g, e in zip(torch.autograd.grad(got["loss"], leaves), torch.autograd.grad(expected, leaves)):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    # and the term is really there: without it the loss is the JSD alone
    assert abs(float(ClipLiteLoss()(feats, scale)["loss"].detach()) - float(jsd.detach())) < 1e-12
    assert abs(float(got["loss"].detach()) - float(jsd.detach())) > 1e-3


def test_prior_weight_without_logits_is_refused():
    feats = {m: F.normalize(torch.randn(4, 3), dim=-1) for m in ("image", "text")}
    with pytest.raises(Exception, match="prior_weight"):
        ClipLiteLoss(prior_weight=0.1)(feats, torch.tensor(1.0))


# ------------------------------------------------------------- cooperative and adversarial modes


def vector_model(tmp_path, mode: str, prior_on: str = "[a, b]"):
    shards = make_vector_shards(tmp_path / "data", n=12, dim=6)
    cfg = load_config(None, vector_overrides(shards, tmp_path / "run", steps=1, micro_batch=4, dim=6) + [
        "loss.name=clip_lite", "loss.prior_weight=0.1", f"loss.prior_mode={mode}", f"loss.prior_on={prior_on}",
        "model.towers.a.head=milinear", "model.towers.a.head_options={width: 12}"])
    return cfg, build_model(cfg.model, build_modalities(cfg.data, train=True), objective=cfg.loss.build())


def test_adversarial_reverses_the_gradient_at_the_discriminator_input(tmp_path):
    cfg, coop = vector_model(tmp_path / "c", "cooperative")
    _, adv = vector_model(tmp_path / "a", "adversarial")
    adv.load_state_dict(coop.state_dict())
    assert sorted(coop.objective.prior) == ["a", "b"] and coop.objective.mode == "cooperative"
    assert adv.objective.mode == "adversarial"
    torch.manual_seed(4)
    inputs = {m: torch.randn(8, 6) for m in ("a", "b")}
    where = BatchContext(step=0, seed=5, offset=0, rows=8, total=8)
    loss = ClipLiteLoss(prior_weight=0.1)

    def grads(model, only_prior: bool):
        model.zero_grad()
        feats, scale, _, params = model(inputs, batch=where)
        if only_prior:
            term = sum(-(F.logsigmoid(r).mean() + F.logsigmoid(-f).mean()) for r, f in params["prior"].values())
        else:
            term = loss(feats, scale, params=params)["loss"]
        term.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    gc, ga = grads(coop, True), grads(adv, True)
    assert gc.keys() == ga.keys()
    encoder = [n for n in gc if n.startswith("towers.") and ".head." not in n]
    discriminator = [n for n in gc if n.startswith("objective.prior.")]
    assert encoder and discriminator
    for n in encoder:  # the encoder is pushed the other way ...
        assert float(gc[n].abs().max()) > 0
        torch.testing.assert_close(ga[n], -gc[n])
    for n in discriminator:  # ... the discriminator is trained the same
        torch.testing.assert_close(ga[n], gc[n])

    # with the contrastive term the encoders' gradients differ by twice the prior's share only
    fc, fa = grads(coop, False), grads(adv, False)
    for n in encoder:
        torch.testing.assert_close(fc[n] - fa[n], 0.1 * 2 * gc[n], rtol=1e-4, atol=1e-6)
    for n in discriminator:
        torch.testing.assert_close(fa[n], fc[n])

    # gradient_reversal is the mode's name now; adversarial, its earlier name, is the same mode
    _, rev = vector_model(tmp_path / "r", "gradient_reversal")
    rev.load_state_dict(coop.state_dict())
    gr = grads(rev, False)
    for n in gr:
        assert torch.equal(gr[n], fa[n]), n


def test_a_milinear_head_narrower_than_its_input_warns_naming_the_key(tmp_path):
    with pytest.warns(UserWarning, match=r"model\.towers\.a\.head: a milinear head 8 wide on 16 input"):
        vector_model(tmp_path / "n", "cooperative")  # tower a: MLP width 16 -> model.embed_dim 8


def test_prior_only_on_the_named_modalities(tmp_path):
    _, model = vector_model(tmp_path, "cooperative", prior_on="[b]")
    assert list(model.objective.prior) == ["b"]
    assert model.objective.widths() == {"b": model.towers["b"].backbone.width}
    assert not any(k.startswith("objective.") for k in model.inference_state_dict())
    assert any(k.startswith("objective.prior.b.") for k in model.state_dict())
    # a state dict written before the objective owned its parameters loads under the old names
    legacy = {k.replace("objective.prior.", "prior_discriminators."): v for k, v in model.state_dict().items()}
    assert any(k.startswith("prior_discriminators.") for k in legacy)
    _, again = vector_model(tmp_path / "again", "cooperative", prior_on="[b]")
    again.load_state_dict(legacy, strict=True)
    torch.testing.assert_close(again.objective.prior["b"][0].weight, model.objective.prior["b"][0].weight)


def test_prior_term_under_accumulation_equals_one_micro_batch(tmp_path):
    """The prior discriminators' logits are cached and replayed by the accumulation like the features:
    2 micro-batches of 4 give the loss and every gradient (discriminators, towers, temperature) of
    one micro-batch of 8, the prior samples included (drawn for the global batch, sliced per micro-batch)."""
    from pretrain.losses import accumulate_step

    _, model = vector_model(tmp_path, "adversarial")
    model.double().eval()  # BatchNorm (tower a's milinear head) on running statistics: a batch-size-free forward
    torch.manual_seed(6)
    inputs = {m: torch.randn(8, 6, dtype=torch.float64) for m in ("a", "b")}
    loss = ClipLiteLoss(prior_weight=0.1)

    def encode(micro, micros):
        rows = 8 // micros
        part = {m: x[micro * rows:(micro + 1) * rows] for m, x in inputs.items()}
        return model(part, batch=BatchContext(step=3, seed=1, offset=micro * rows, rows=rows, total=8))

    def grads():
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    feats, scale, bias, params = encode(0, 1)
    whole = loss(feats, scale, bias, params=params)
    whole["loss"].backward()
    want = grads()
    model.zero_grad()
    got = accumulate_step(lambda micro: encode(micro, 2), [0, 1], loss, per_sample=model.objective.per_sample)
    torch.testing.assert_close(got["loss"], whole["loss"].detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got["clip_lite/prior"], whole["clip_lite/prior"], rtol=1e-12, atol=1e-12)
    have = grads()
    assert have.keys() == want.keys() and any(n.startswith("objective.prior.") for n in have)
    for n in want:
        torch.testing.assert_close(have[n], want[n], rtol=1e-9, atol=1e-12, msg=n)


# ----------------------------------------------------------------------------- configuration errors


@pytest.mark.parametrize("override, key", [
    (["loss.prior_weight=0.1", "loss.prior_on=[image, sound]"], "loss.prior_on"),
    (["loss.prior_weight=1.0"], "loss.prior_weight"),
    (["loss.prior_weight=-0.1"], "loss.prior_weight"),
    (["loss.prior_mode=sideways"], "loss.prior_mode"),
    (["loss.prior_on=[]", "loss.prior_weight=0.1"], "loss.prior_on"),
    (["model.towers.image.head=milinearr"], "model.towers.image.head"),
    (["model.towers.image.head=milinear", "model.towers.image.head_options={widht: 3}"],
     "model.towers.image.head_options"),
    (["model.towers.image.head=milinear", "model.towers.image.head_options={width: 0}"],
     "model.towers.image.head_options.width"),
    (["model.towers.image.head=milinear", "model.towers.image.head_options={shortcut_init: eye}"],
     "model.towers.image.head_options.shortcut_init"),
    (["model.towers.image.head_options={width: 3}"], "model.towers.image.head_options"),
    (["eval.linear_probe.features=pooled"], "eval.linear_probe.features"),
])
def test_config_errors_name_the_key(tmp_path, override, key):
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, tiny_overrides(ASSET_SHARDS, tmp_path, steps=1) + ["loss.name=clip_lite", *override])
    assert key in str(err.value), str(err.value)


# ---------------------------------------------------------------------- through the command line


def test_prior_on_two_ranks_zero3_and_backbone_probe_in_the_cli(tmp_path):
    out = tmp_path / "run"
    ok(torchrun(tiny_overrides(ASSET_SHARDS, out, steps=3) + [
        "loss.name=clip_lite", "loss.prior_weight=0.1", "loss.prior_mode=adversarial",
        "model.towers.image.head=milinear", "model.towers.image.head_options={width: 24}",
        "train.zero_stage=3", "data.train.workers=0", "eval.enabled=false", "train.checkpoint_every=3"]))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "loss" in r]
    assert [r["step"] for r in trained] == [1, 2, 3]
    for r in trained:  # the prior is logged as its own key, and the total mixes it with the JSD
        assert {"clip_lite/prior", "clip_lite/jsd", "clip_lite/prior/image", "clip_lite/prior/text"} <= r.keys()
        assert math.isclose(r["loss"], 0.9 * r["clip_lite/jsd"] + 0.1 * r["clip_lite/prior"], rel_tol=1e-4)
        assert 0 < r["clip_lite/prior"] < 10

    # the consolidated checkpoint holds the discriminators (trained, sharded by ZeRO-3, gathered)
    state = consolidated_state_dict(sorted((out / "checkpoints").glob("step*"))[-1])
    for m in ("image", "text"):
        weight = state[f"objective.prior.{m}.0.weight"]
        assert weight.shape[0] == 1000 and bool(torch.isfinite(weight).all())

    ok(run_cmd([PYTHON, "-m", "pretrain.eval", "--checkpoint", str(out), "--output", str(tmp_path / "probe"),
                "eval.tasks=[linear_probe]", "eval.linear_probe.features=backbone",
                "eval.linear_probe.modalities=[image]"]))
    (metrics,) = [json.loads(p.read_text()) for p in (tmp_path / "probe" / "eval").glob("step*.json")]
    metrics = metrics.get("metrics", metrics)
    # backbone features: the image backbone's width, not the 16-wide embedding the loss sees
    assert metrics["eval/linear_probe/image/width"] != 16
    assert 0.0 <= metrics["eval/linear_probe/image/top1"] <= 1.0
    assert "eval/linear_probe/text/top1" not in metrics


@pytest.mark.parametrize("name", ["clip_lite", "siglip"])
def test_anchor_pairs_each_other_modality_with_the_anchor_only(name):
    """``loss.anchor``: with M = 3 the loss is the mean over (anchor, other) pairs, each pair the
    two-modality loss of those features (the README's options table)."""
    from pretrain.losses import build_loss

    torch.manual_seed(6)
    feats = {m: F.normalize(torch.randn(6, 4, dtype=torch.float64), dim=-1) for m in ("a", "b", "c")}
    scale, bias = torch.tensor([3.0], dtype=torch.float64), torch.tensor([-1.0], dtype=torch.float64)
    extra = (bias,) if name == "siglip" else (None,)
    out = build_loss({"name": name, "anchor": "b"})(feats, scale, *extra)
    assert sorted(k for k in out if k != "loss") == [f"{name}/b-a", f"{name}/b-c"]
    pair = build_loss({"name": name, "anchor": "b"})  # two modalities: the one pair (b, other), b first
    ba = pair({"b": feats["b"], "a": feats["a"]}, scale, *extra)["loss"]
    bc = pair({"b": feats["b"], "c": feats["c"]}, scale, *extra)["loss"]
    torch.testing.assert_close(out["loss"], (ba + bc) / 2, rtol=1e-12, atol=1e-12)
    every_pair = build_loss({"name": name})(feats, scale, *extra)["loss"]
    assert abs(float(every_pair) - float(out["loss"])) > 1e-6  # the anchor changes the loss
