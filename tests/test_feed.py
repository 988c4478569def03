"""Issue 29, feeding a GPU from a few cores: the web-like benchmark shards, decode-time downscaling
(``draft``), uint8 image batches normalised on the device, GPU JPEG decode, and the benchmark in a
tiny mode."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest


def test_webimages_shards(tmp_path):
    from data_tools.synthetic import main
    from pretrain.data.tarstream import count_samples

    out = tmp_path / "web"
    assert main(["webimages", "--samples", "10", "--shard-size", "4", "--output", str(out), "--seed", "3"]) == 0
    summary = json.loads((out / "synthetic.json").read_text())
    index = json.loads((out / "index.json").read_text())
    assert [s["samples"] for s in index["shards"]] == [4, 4, 2] and index["total_samples"] == 10
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 4, "00001.tar": 4, "00002.tar": 2}
    assert index["required_members"] == ["jpg", "json", "txt"]
    assert count_samples(str(out / "00000.tar")) == 4
    assert 256 <= summary["short_side"]["min"] <= summary["short_side"]["max"] <= 512
    assert 0.05 < summary["bytes_per_pixel"] < 1.0 and summary["decode_ms_per_mpix"] > 0
    # each shard depends on (seed, shard) only: the same whatever process writes it (so whatever --workers)
    from data_tools.synthetic import _web_shard

    again = tmp_path / "again"
    again.mkdir()
    _web_shard((str(again), 1, 4, 3, 512, 256, 90, None))
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(again / "00001.tar") == digest(out / "00001.tar") == index["shards"][1]["sha256"]
    assert main(["webimages", "--samples", "0", "--output", str(tmp_path / "bad")]) == 2


# --------------------------------------------------------------------------- helpers

OPENAI = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}


def _photo(width: int, height: int, seed: int = 0, fmt: str = "JPEG") -> bytes:
    """A smooth, photograph-like picture (low-frequency colour fields) of width x height."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    chans = []
    for _ in range(3):
        fx, fy, ph = rng.uniform(1, 6, 2).tolist() + [rng.uniform(0, 6)]
        chans.append(128 + 90 * np.sin(xx / width * fx + ph) * np.cos(yy / height * fy))
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.stack(chans, -1), 0, 255).astype(np.uint8)).save(
        buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _image(train: bool, size: int = 32, **options):
    from pretrain.data import build_modalities
    from tests.helpers import data_config

    d = data_config(modalities={"image": {"decoder": "image", "options": {"size": size, **options}}})
    return build_modalities(d, train)["image"].decoder


def _seeded(dec, data: bytes, seed: int, ext: str = "jpg", host: bool = False):
    import random

    random.seed(seed)
    np.random.seed(seed)
    import torch

    torch.manual_seed(seed)
    fn = dec.host_decode if host else dec.decode
    return fn(data, ext, random.Random(seed))


TRAIN_AUG = {"interpolation": "bicubic", "augment": {"scale": [0.9, 1.0], "hflip": 0.0, "color_jitter": None}, **OPENAI}


# ------------------------------------------------------------------- uint8 batches, device normalisation


def test_uint8_and_device_normalisation_give_the_float_paths_inputs():
    import torch

    from pretrain.data.decoders import to_device

    cpu = torch.device("cpu")
    files = [(_photo(300, 200, 1), "jpg"), (_photo(40, 64, 2, "PNG"), "png"), (_photo(700, 513, 3), "jpg")]
    for train, options in [(False, {"interpolation": "bicubic", **OPENAI}), (False, {"crop_mode": "border"}),
                           (True, {**TRAIN_AUG, "draft": False}), (True, {**TRAIN_AUG, "augment": {}, "draft": False})]:
        u8, f32 = _image(train, **options), _image(train, output="float", **options)
        assert u8.dtype == torch.uint8 and u8.device_transform is not None
        assert f32.dtype == torch.float32 and f32.device_transform is None
        std = torch.tensor(u8.device_transform.std).view(3, 1, 1)
        for i, (data, ext) in enumerate(files):
            host = _seeded(u8, data, i, ext, host=True)
            assert host.dtype == torch.uint8 and host.shape == (3, 32, 32)
            want = _seeded(f32, data, i, ext)
            got = to_device(host.unsqueeze(0), cpu, torch.float32, u8.device_transform)[0]
            lsb = ((got - want).abs() * std * 255).max()
            assert lsb <= 1.0, (train, options, i, float(lsb))  # within 1 LSB of uint8 (on the CPU: equal)
            assert torch.equal(got, want) and torch.equal(_seeded(u8, data, i, ext), want)
            half = to_device(host.unsqueeze(0), cpu, torch.bfloat16, u8.device_transform)[0]
            assert torch.equal(half, want.to(torch.bfloat16))
    # an absent optional image: the float path's placeholder (zeros) after the device transform
    u8 = _image(False)
    x = torch.stack([u8.placeholder(), _seeded(u8, files[0][0], 0, host=True)])
    out = to_device(x, cpu, torch.float32, u8.device_transform, torch.tensor([False, True]))
    assert torch.equal(out[0], torch.zeros(3, 32, 32)) and torch.equal(out[1], _seeded(u8, files[0][0], 0))
    # random erasing works on normalised values: auto keeps float, uint8 is refused
    from pretrain.config import ConfigError

    assert _image(True, augment={"re_prob": 0.5}).device_transform is None
    with pytest.raises(ConfigError, match=r"options\.output: uint8 cannot hold random erasing"):
        _image(True, augment={"re_prob": 0.5}, output="uint8")


def _asset_cfg(tmp_path, *overrides):
    from pretrain.config import load_config
    from tests.helpers import ASSET_SHARDS, QUICKSTART, tiny_overrides

    return load_config(QUICKSTART, tiny_overrides(ASSET_SHARDS, tmp_path / "run", steps=1) + list(overrides))


def test_uint8_loader_batches_then_equal_eval_and_embedder_features(tmp_path):
    import torch

    from pretrain.data import build_modalities, make_loader
    from pretrain.data.decoders import to_device
    from pretrain.evaluation import embed_split
    from pretrain.export import Embedder
    from pretrain.models import build_model
    from tests.helpers import png_bytes

    cpu = torch.device("cpu")
    aug = "data.modalities.image.options.augment={scale: [0.5, 1.0], hflip: 0.5}"
    cfgs = {out: _asset_cfg(tmp_path, aug, f"data.modalities.image.options.output={out}") for out in ("uint8", "float")}
    # training batches (augmentation on the global generators, seeded per batch): the same model inputs
    batches = {}
    for out, cfg in cfgs.items():
        mods = build_modalities(cfg.data, train=True)
        loader = make_loader(cfg.data.train, mods, cfg.data, 6, 0, 1, 0, train=True)
        it = iter(loader)
        batches[out] = ([next(it) for _ in range(3)], mods.device_transforms())
        loader.close()
    (u8, transforms), (f32, none) = batches["uint8"], batches["float"]
    assert set(transforms) == {"image"} and none == {}
    for a, b in zip(u8, f32):
        assert a.keys == b.keys and a.modalities["image"].dtype == torch.uint8
        got = to_device(a.modalities["image"], cpu, torch.float32, transforms["image"], a.masks["image"])
        assert torch.equal(got, b.modalities["image"]) and torch.equal(a.modalities["text"], b.modalities["text"])
    # evaluation and the Embedder: the same features as the float path
    torch.manual_seed(0)
    cfg = cfgs["uint8"]
    model = build_model(cfg.model, build_modalities(cfg.data, train=False)).eval()
    feats, embedded = {}, {}
    images = [png_bytes(i, size=(20 + i, 17)) for i in range(4)]
    for out, cfg in cfgs.items():
        mods = build_modalities(cfg.data, train=False)
        feats[out] = embed_split(model, cfg, mods, cfg.data.val, cpu, content_of=["image"])
        embedded[out] = Embedder(model, cfg, mods).embed_images(images)
    for m in ("image", "text"):
        torch.testing.assert_close(feats["uint8"].features[m], feats["float"].features[m], atol=0, rtol=0)
    assert torch.equal(feats["uint8"].labels, feats["float"].labels) and len(feats["uint8"]) > 0
    torch.testing.assert_close(embedded["uint8"], embedded["float"], atol=0, rtol=0)


# --------------------------------------------------------------------------------- draft decoding


def test_draft_follows_the_sampled_crop_and_never_decodes_below_the_output():
    import random

    import torch

    from pretrain.data.decoders import DRAFT_SCALES, DraftRandomResizedCrop

    size = 32
    wide = {**TRAIN_AUG, "augment": {"scale": [0.05, 1.0], "hflip": 0.0, "color_jitter": None}}
    drafted = _image(True, size, **wide)
    full = _image(True, size, draft=False, **wide)
    assert isinstance(drafted.drafter, DraftRandomResizedCrop) and full.drafter is None
    assert "DraftRandomResizedCrop" in repr(drafted.transform)
    scales = set()
    for k, (w, h) in enumerate([(48, 40), (300, 200), (257, 513), (1024, 700), (2000, 260)]):
        data = _photo(w, h, k)
        for seed in range(12):
            a = _seeded(drafted, data, seed, host=True)
            scale, crop_w, crop_h = drafted.drafter.last
            scales.add(scale)
            # reduced only where the crop stays at least the output size (a smaller crop: decoded in full)
            assert scale == 1 or (crop_w >= size and crop_h >= size), (w, h, seed, drafted.drafter.last)
            bigger = [s for s in DRAFT_SCALES if s > scale]
            # and the largest reduction that keeps it: the next one would fall below
            assert not bigger or crop_w * scale / min(bigger) < size or crop_h * scale / min(bigger) < size
            b = _seeded(full, data, seed, host=True)  # the same crop (same draws), decoded in full
            diff = (a.float() - b.float()).abs()
            assert a.shape == b.shape == (3, size, size) and float(diff.mean()) < 3.0, (w, h, seed, float(diff.mean()))
            if scale == 1:
                assert torch.equal(a, b)  # no reduction: timm's own path, exactly
    assert {1, 2, 4, 8} <= scales  # small crops are decoded in full, large ones reduced by each step
    # bad files still fail as undecodable (the decode is deferred to the draft-aware crop)
    from pretrain.data import DecodeError

    big = _photo(1024, 700, 3)
    for bad in (big[: len(big) // 2], b"not an image"):
        with pytest.raises(DecodeError) as err:
            _seeded(drafted, bad, 0, host=True)
        assert err.value.reason == "undecodable_image"
    # a PNG (no DCT scaling): timm's path, exactly
    png = _photo(600, 400, 9, "PNG")
    assert torch.equal(_seeded(drafted, png, 1, "png", host=True), _seeded(full, png, 1, "png", host=True))
    # training without augmentation: the resize-then-crop transform, the image kept at least its resized size
    plain, plain_full = _image(True, size, crop_pct=0.875), _image(True, size, crop_pct=0.875, draft=False)
    big = _photo(900, 600, 4)
    a, b = plain.host_decode(big, "jpg", random.Random(0)), plain_full.host_decode(big, "jpg", random.Random(0))
    scale, w, h = plain.drafter.last
    assert scale == 8 and min(w, h) >= size / 0.875 and float((a.float() - b.float()).abs().mean()) < 3.0


def test_evaluation_and_export_never_draft():
    import random

    import torch

    ev = _image(False, 32, **TRAIN_AUG)
    assert ev.drafter is None and not ev.augmenting
    from timm.data import create_transform
    from PIL import Image
    import io

    data = _photo(1024, 700, 5)
    ref = create_transform(input_size=(3, 32, 32), is_training=False, crop_pct=1.0, crop_mode="center",
                           interpolation="bicubic", mean=OPENAI["mean"], std=OPENAI["std"])
    assert torch.equal(ev.decode(data, "jpg", random.Random(0)), ref(Image.open(io.BytesIO(data)).convert("RGB")))


# --------------------------------------------------------------------------- JPEG decode on the device


def _shards_of(tmp_path, files: list[bytes]) -> str:
    from tests.helpers import write_index, write_shard

    folder = tmp_path / "shards"
    write_shard(folder / "s-000000.tar", [(f"k{i:03d}", {"jpg": f, "txt": f"caption {i}".encode()})
                                          for i, f in enumerate(files)])
    write_index(folder, {"s-000000.tar": len(files)})
    return str(folder / "s-000000.tar")


def _device_decode_batches(tmp_path, device: str, switch: bool):
    """Batches of the same seeded stream: the CPU path, and JPEGs decoded on ``device``."""
    import torch

    from pretrain.data import build_modalities, make_loader
    from pretrain.data.decoders import to_device
    from tests.helpers import data_config

    files = [_photo(300 + 37 * i, 200 + 23 * i, i) for i in range(9)] + [_photo(64, 80, 9, "PNG")]
    url = _shards_of(tmp_path, files)
    aug = {"scale": [0.3, 1.0], "hflip": 0.5, "vflip": 0.5, "color_jitter": None}
    out = {}
    for name in ("cpu", "device"):
        opts = {"size": 32, "interpolation": "bicubic", "augment": aug, "draft": False,
                "gpu_decode": name == "device" and not switch}
        d = data_config(train={"urls": url, "shuffle_buffer": 0, "workers": 1},
                        modalities={"image": {"decoder": "image", "options": opts}, "text": {"decoder": "text"}})
        mods = build_modalities(d, train=True)
        dec = mods["image"].decoder
        if name == "device" and switch:
            dec.use_device_decode()  # the GPU path's code, with the batch's device: here the CPU
        loader = make_loader(d.train, mods, d, 5, 0, 1, 0, train=True, epochs=1)
        out[name] = [(b, to_device(b.modalities["image"], torch.device(device), torch.float32,
                                   mods.device_transforms()["image"], b.masks["image"])) for b in loader]
        out[name + "_decoder"] = dec
    return out


def _compare_device_decode(out) -> None:
    import torch

    assert out["device_decoder"].ragged and out["device_decoder"].device_decode is not None
    std = torch.tensor(out["cpu_decoder"].settings.std).view(1, 3, 1, 1)
    for (a, xa), (b, xb) in zip(out["cpu"], out["device"]):
        assert a.keys == b.keys and b.modalities["image"].dim() == 1  # JPEG records, packed
        assert xa.shape == xb.shape == (5, 3, 32, 32)
        levels = (xa - xb.to(xa.device)).abs() * std * 255  # the same crops and flips; resampling differs a little
        assert float(levels.mean()) < 1.5 and float(levels.max()) <= 40, (float(levels.mean()), float(levels.max()))


def test_device_jpeg_decode_path_on_the_cpu(tmp_path):
    """The GPU path's code (records, packing in shared memory, batch decode, crop, resize, flips)
    run with the CPU as the device: the same samples, crops and flips as the CPU path."""
    out = _device_decode_batches(tmp_path, "cpu", switch=True)
    _compare_device_decode(out)


def test_gpu_decode_option_falls_back_to_the_cpu_and_says_so(caplog):
    import torch

    if torch.cuda.is_available():
        pytest.skip("has a GPU: the fallback is for machines without one")
    with caplog.at_level("WARNING", logger="pretrain.data"):
        dec = _image(True, gpu_decode=True, **TRAIN_AUG)
    assert dec.device_decode is None and not dec.ragged and dec.dtype == torch.uint8
    assert "gpu_decode is set but no CUDA device" in caplog.text
    from pretrain.config import ConfigError

    with pytest.raises(ConfigError, match=r"options\.gpu_decode: needs augment with a random resized crop"):
        _image(True, gpu_decode=True, augment={"scale": [0.5, 1.0]})  # timm's default colour jitter
    assert _image(False, gpu_decode=True, **TRAIN_AUG).device_decode is None  # evaluation: never


def test_gpu_decode_on_cuda(tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no GPU: JPEG decode on the GPU (nvJPEG) needs CUDA")
    out = _device_decode_batches(tmp_path, "cuda", switch=False)
    _compare_device_decode(out)


# ------------------------------------------------------------------------------------- the benchmark


def test_pipeline_benchmark_runs_in_its_tiny_mode(tmp_path):
    """benchmarks/bench_pipeline.py --web224 --tiny: OpenCLIP's pipeline and ours on web-like shards,
    one round, the figures written (so the benchmark never rots)."""
    import sys

    from tests.helpers import ROOT, ok, run_cmd

    out = tmp_path / "web224.json"
    ok(run_cmd([sys.executable, str(ROOT / "benchmarks" / "bench_pipeline.py"), "--web224", "--tiny", "--shards",
                str(tmp_path / "shards"), "--json", str(out)], timeout=300))
    result = json.loads(out.read_text())
    rows = {(r["variant"], r["transform"]): r for r in result["rows"]}
    assert set(rows) == {("openclip", "train"), ("ours", "train")}
    assert all(r["samples_per_s"] > 0 and r["per_cpu_s"] > 0 for r in rows.values())
    assert rows[("ours", "train")]["image_dtype"] == "torch.uint8" and rows[("openclip", "train")]["image_dtype"] == \
        "torch.float32"
    assert all(r["samples"] == 32 and r["worker_processes"] == 1 for r in result["runs"])
