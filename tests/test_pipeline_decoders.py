"""Each decoder on real encoded files made here (PNG, JPEG, WAV, FLAC, .npy, JSON, .cls), through
the whole pipeline; the registry (a new decoder by name, from data.imports); config errors."""
from __future__ import annotations

import io
import json
import random
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from pretrain.config import ConfigError
from pretrain.data import (
    AudioDecoder,
    Decoder,
    DecodeError,
    build_modalities,
    mel_filterbank,
    register_decoder,
)
from pretrain.tokenizer import ByteTokenizer
from tests.helpers import data_config, loader, write_index, write_shard


def _modality(d, name, train=False):
    mods = build_modalities(d, train)
    return (mods.label if name == "labels" else mods[name]).decoder


def _image_file(fmt: str, size=(24, 20)) -> tuple[bytes, np.ndarray]:
    yy, xx = np.mgrid[0:size[1], 0:size[0]]
    pixels = np.stack([xx * 10 % 256, yy * 12 % 256, (xx + yy) * 5 % 256], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue(), pixels


def _tone(freq: float, rate: int, seconds: float, channels: int = 1) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    x = 0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    return np.stack([x] * channels, -1) if channels > 1 else x


def _audio_file(x: np.ndarray, rate: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt, subtype="PCM_16")
    return buf.getvalue()


def _peak_hz(wave: torch.Tensor, rate: int) -> float:
    spec = np.abs(np.fft.rfft(wave.numpy()))
    return float(np.argmax(spec) * rate / len(wave))


# --------------------------------------------------------------------------------------- image


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_image_decoder_matches_timm_eval_transform(fmt):
    from timm.data import create_transform

    data, pixels = _image_file(fmt)
    d = data_config(modalities={"image": {"decoder": "image", "options": {"size": 12}}}, image_mean=[0.4, 0.5, 0.6])
    dec = _modality(d, "image")
    x = dec.decode(data, fmt.lower(), random.Random(0))
    ref = create_transform(input_size=(3, 12, 12), is_training=False, crop_pct=1.0, crop_mode="center",
                           interpolation="bilinear", mean=(0.4, 0.5, 0.6), std=(0.5, 0.5, 0.5))
    assert x.shape == (3, 12, 12) and x.dtype == torch.float32
    assert torch.equal(x, ref(Image.open(io.BytesIO(data)).convert("RGB")))
    # and the pixels are the file's: the centre crop of the resized original, un-normalised
    back = (x * 0.5 + torch.tensor([0.4, 0.5, 0.6]).view(3, 1, 1)).permute(1, 2, 0).numpy() * 255
    orig = np.asarray(Image.fromarray(pixels).resize((14, 12), Image.BILINEAR), dtype=np.float32)[:, 1:13]
    assert np.abs(back - orig).mean() < (4 if fmt == "PNG" else 8)


def test_image_train_augmentation_is_timm_and_seeded():
    data, _ = _image_file("PNG", size=(32, 32))
    d = data_config(modalities={"image": {"decoder": "image", "options": {
        "size": 16, "augment": {"scale": [0.3, 0.6], "hflip": 0.5, "color_jitter": 0.0}}}})
    train, evald = _modality(d, "image", train=True), _modality(d, "image", train=False)
    assert train.uses_global_rng and not evald.uses_global_rng
    assert "RandomResizedCrop" in repr(train.transform)
    torch.manual_seed(1), random.seed(1)
    a = train.decode(data, "png", random.Random(0))
    torch.manual_seed(1), random.seed(1)
    b = train.decode(data, "png", random.Random(0))
    c = train.decode(data, "png", random.Random(0))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, evald.decode(data, "png", random.Random(0)))
    with pytest.raises(ConfigError, match=r"^data\.modalities\.image\.options\.augment\.blur: not a timm training option"):
        data_config(modalities={"image": {"decoder": "image", "options": {"augment": {"blur": 1}}}})


def test_undecodable_and_truncated_images_raise_decode_errors():
    dec = _modality(data_config(modalities={"image": {"decoder": "image"}}), "image")
    data, _ = _image_file("PNG")
    for bad in (b"not an image at all", data[: len(data) // 2]):
        with pytest.raises(DecodeError) as err:
            dec.decode(bad, "png", random.Random(0))
        assert err.value.reason == "undecodable_image"
    small = _modality(data_config(modalities={"image": {"decoder": "image", "options": {"max_pixels": 100}}}), "image")
    with pytest.raises(DecodeError, match="image_too_large"):
        small.decode(data, "png", random.Random(0))


# ---------------------------------------------------------------------------------------- text


def test_text_truncation_padding_and_caption_choice():
    tok = ByteTokenizer(12)
    d = data_config(context_length=12)
    ev, tr = _modality(d, "text"), _modality(d, "text", train=True)
    ids = ev.decode("héllo".encode(), "txt", random.Random(0))
    assert ids.shape == (12,) and tok.decode(ids) == "héllo" and int(ids[-1]) == tok.pad_id
    long = ev.decode(b"a much longer caption than fits", "txt", random.Random(0))
    assert long.shape == (12,) and int(long[-1]) == 2 and tok.decode(long) == "a much lon"  # BOS + 10 + EOS
    many = json.dumps(["first one", "second one", "third one"]).encode()
    assert tok.decode(ev.decode(many, "json", random.Random(0))) == "first one"  # evaluation: the first
    rng = random.Random(5)
    picks = [tok.decode(tr.decode(many, "json", rng)) for _ in range(30)]
    assert set(picks) == {"first one", "second one", "third one"}  # training: a seeded random choice
    rng = random.Random(5)
    assert picks == [tok.decode(tr.decode(many, "json", rng)) for _ in range(30)]
    obj = json.dumps({"url": "x", "caption": "an object"}).encode()
    assert tok.decode(ev.decode(obj, "json", random.Random(0))) == "an object"
    lines = _modality(data_config(modalities={"text": {"decoder": "text", "options": {"split_lines": True,
                                                                                        "captions": "random"}}}),
                      "text")
    got = {tok.decode(lines.decode(b"one\n\ntwo\n", "txt", random.Random(i))) for i in range(20)}
    assert got == {"one", "two"}
    for bad, reason in ((b"\xff\xfe bad", "bad_utf8"), (b"   \n", "empty_text"), (b"{oops", "bad_json"),
                        (b'{"caption": 3}', "bad_json"), (b'{"other": "x"}', "missing_field")):
        with pytest.raises(DecodeError) as err:
            ev.decode(bad, "json" if bad.startswith(b"{") else "txt", random.Random(0))
        assert err.value.reason == reason, bad


# --------------------------------------------------------------------------------------- audio


@pytest.mark.parametrize("fmt", ["WAV", "FLAC"])
def test_audio_decoder_resamples_crops_and_pads(fmt):
    long = _audio_file(_tone(440, 22050, 1.5, channels=2), 22050, fmt)  # stereo, longer than 1 s
    short = _audio_file(_tone(1000, 8000, 0.5), 8000, fmt)  # mono, shorter
    d = data_config(modalities={"audio": {"decoder": "audio", "options": {"sample_rate": 16000, "seconds": 1.0}}})
    dec = _modality(d, "audio")
    x = dec.decode(long, fmt.lower(), random.Random(0))
    assert x.shape == (16000,) and x.dtype == torch.float32
    assert abs(_peak_hz(x, 16000) - 440) <= 2
    assert 0.45 < float(x.abs().max()) < 0.55
    y = dec.decode(short, fmt.lower(), random.Random(0))
    assert y.shape == (16000,)
    assert abs(_peak_hz(y[:8000], 16000) - 1000) <= 3
    assert float(y[8100:].abs().max()) == 0.0 and float(y[100:7900].abs().max()) > 0.4  # padded after 0.5 s
    # training crops at a seeded random place; evaluation at the start
    tr = _modality(d, "audio", train=True)
    a = tr.decode(long, fmt.lower(), random.Random(1))
    assert torch.equal(a, tr.decode(long, fmt.lower(), random.Random(1)))
    assert not torch.equal(a[:4000], x[:4000])


def test_audio_log_mel_from_stft():
    d = data_config(modalities={"audio": {"decoder": "audio", "options": {
        "sample_rate": 16000, "seconds": 1.0, "features": "log_mel", "n_fft": 512, "hop_length": 160, "n_mels": 40}}})
    dec = _modality(d, "audio")
    assert isinstance(dec, AudioDecoder)
    m = dec.decode(_audio_file(_tone(1000, 16000, 1.0), 16000, "FLAC"), "flac", random.Random(0))
    assert m.shape == (40, 101) == dec.output_shape
    # the loudest band is the one whose triangle covers 1 kHz best
    fb = mel_filterbank(257, 16000, 40, 0.0, 8000.0)
    bin_1k = round(1000 / (8000 / 256))
    assert int(m[:, 50].argmax()) == int(fb[:, bin_1k].argmax())
    # power spectrum by hand (numpy FFT of one centred Hann frame) through the same filters
    wave = dec.waveform(_audio_file(_tone(1000, 16000, 1.0), 16000, "FLAC"), random.Random(0)).numpy()
    frame = wave[50 * 160 - 256: 50 * 160 + 256] * np.hanning(513)[:512]
    power = np.abs(np.fft.rfft(frame)) ** 2
    np.testing.assert_allclose(m[:, 50].numpy(), np.log(fb.numpy() @ power + 1e-6), rtol=0.05, atol=0.3)
    # the filters: triangles of height 1 covering the band
    assert fb.shape == (40, 257) and float(fb.max()) <= 1.0 and bool((fb.sum(0)[8:250] > 0).all())
    with pytest.raises(DecodeError) as err:
        dec.decode(b"RIFF....WAVEfmt broken", "wav", random.Random(0))
    assert err.value.reason == "undecodable_audio"


# ------------------------------------------------------------------------------ vectors, tables


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def test_npy_json_and_label_decoders():
    d = data_config(modalities={"vec": {"decoder": "npy", "options": {"shape": [2, 3]}},
                                "tab": {"decoder": "json", "options": {"fields": ["a", "b"], "size": 3}}})
    vec, tab, lab = _modality(d, "vec"), _modality(d, "tab"), _modality(d, "labels")
    arr = np.arange(6, dtype=np.float64).reshape(2, 3)
    got = vec.decode(_npy(arr), "npy", random.Random(0))
    assert got.dtype == torch.float32 and torch.equal(got, torch.arange(6.0).view(2, 3))
    for bad, reason in ((_npy(np.zeros(6)), "wrong_shape"), (_npy(np.array([{"x": 1}] * 6, dtype=object).reshape(2, 3)),
                                                              "pickled_npy"), (b"\x93NUMPY garbage", "bad_npy"),
                        (_npy(arr)[:-8], "bad_npy")):
        with pytest.raises(DecodeError) as err:
            vec.decode(bad, "npy", random.Random(0))
        assert err.value.reason == reason
    assert torch.equal(tab.decode(b'{"a": 1.5, "b": [2, 3], "c": "x"}', "json", random.Random(0)),
                       torch.tensor([1.5, 2.0, 3.0]))
    for bad, reason in ((b'{"a": 1}', "missing_field"), (b'{"a": "x", "b": [1, 2]}', "bad_value"),
                        (b'{"a": 1, "b": [1]}', "wrong_shape"), (b"[1, 2]", "bad_json"), (b"\xff", "bad_utf8")):
        with pytest.raises(DecodeError) as err:
            tab.decode(bad, "json", random.Random(0))
        assert err.value.reason == reason, bad
    assert int(lab.decode(b"7\n", "cls", random.Random(0))) == 7
    for bad in (b"seven", b"-1", b"\xff"):
        with pytest.raises(DecodeError, match="bad_label"):
            lab.decode(bad, "cls", random.Random(0))
    with pytest.raises(ConfigError, match=r"^data\.modalities\.vec\.options\.shape: the array shape is required"):
        data_config(modalities={"vec": {"decoder": "npy"}})


# -------------------------------------------------------------------------- the whole pipeline


def test_every_modality_through_the_pipeline(tmp_path):
    samples = []
    for i in range(6):
        members = {
            "jpg" if i % 2 else "png": _image_file("JPEG" if i % 2 else "PNG", size=(10 + i, 10))[0],
            "txt": f"sample {i}".encode(),
            "flac" if i % 2 else "wav": _audio_file(_tone(300 + 100 * i, 8000, 0.3), 8000, "FLAC" if i % 2 else "WAV"),
            "npy": _npy(np.full(4, i, dtype=np.float32)),
            "json": json.dumps({"x": i, "y": [i, -i]}).encode(),
            "cls": str(i % 3).encode(),
        }
        if i == 4:
            del members["npy"], members["flac" if i % 2 else "wav"]  # optional modalities absent
        samples.append((f"k{i}", members))
    url = str(write_shard(tmp_path / "m-000000.tar", samples))
    write_index(tmp_path, {"m-000000.tar": 6})
    d = data_config({"urls": url}, modalities={
        "image": {"decoder": "image", "options": {"size": 8}},
        "text": {"decoder": "text", "members": ["txt"]},
        "audio": {"decoder": "audio", "required": False, "options": {"sample_rate": 8000, "seconds": 0.25,
                                                                     "features": "log_mel", "n_fft": 128,
                                                                     "hop_length": 64, "n_mels": 16}},
        "vec": {"decoder": "npy", "required": False, "options": {"shape": [4]}},
        "table": {"decoder": "json", "options": {"fields": ["x", "y"], "size": 3}},
    })
    batch = next(iter(loader(d, batch=6, epochs=1)))
    assert batch.keys == [f"k{i}" for i in range(6)]
    shapes = {m: tuple(x.shape) for m, x in batch.modalities.items()}
    assert shapes == {"image": (6, 3, 8, 8), "text": (6, 24), "audio": (6, 16, 32), "vec": (6, 4), "table": (6, 3)}
    assert batch.masks["vec"].tolist() == [True, True, True, True, False, True]
    assert batch.masks["audio"].tolist() == [True, True, True, True, False, True]
    assert batch.masks["image"].all() and batch.masks["text"].all()
    assert torch.equal(batch.modalities["vec"][4], torch.zeros(4))  # placeholder
    assert torch.equal(batch.modalities["vec"][5], torch.full((4,), 5.0))
    assert torch.equal(batch.modalities["table"][3], torch.tensor([3.0, 3.0, -3.0]))
    assert batch.labels.tolist() == [0, 1, 2, 0, 1, 2]


# ---------------------------------------------------------------------------------- the registry


@register_decoder("test_reversed_text")
class ReversedText(Decoder):
    """A decoder the pipeline has never heard of: byte values of the reversed text, fixed length."""

    members = ("txt",)

    @dataclass
    class Options:
        length: int = 6

    def __init__(self, options, ctx):
        super().__init__(options, ctx)
        self.output_shape = (options.length,)
        self.dtype = torch.long

    def decode(self, data, ext, rng):
        raw = data[::-1][: self.options.length].ljust(self.options.length, b"\0")
        return torch.tensor(list(raw), dtype=torch.long)


def test_a_new_decoder_registered_by_name(tmp_path, monkeypatch):
    url = str(write_shard(tmp_path / "r-000000.tar", [("a", {"txt": b"abc"}), ("b", {"txt": b"hello!!"})]))
    write_index(tmp_path, {"r-000000.tar": 2})
    d = data_config({"urls": url}, modalities={"rev": {"decoder": "test_reversed_text", "options": {"length": 4}}},
                    labels=None)
    batch = next(iter(loader(d, batch=2, epochs=1)))
    assert batch.modalities["rev"].tolist() == [[99, 98, 97, 0], [33, 33, 111, 108]]
    # from a module named in data.imports (how a CLI run gets it), with its options checked
    (tmp_path / "my_decoders.py").write_text(
        "from dataclasses import dataclass\n"
        "import torch\n"
        "from pretrain.data import Decoder, register_decoder\n"
        "@register_decoder('test_length')\n"
        "class Length(Decoder):\n"
        "    members = ('txt',)\n"
        "    def __init__(self, options, ctx):\n"
        "        super().__init__(options, ctx)\n"
        "        self.output_shape = (1,)\n"
        "    def decode(self, data, ext, rng):\n"
        "        return torch.tensor([float(len(data))])\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    d = data_config({"urls": url}, modalities={"n": {"decoder": "test_length"}}, imports=["my_decoders"], labels=None)
    assert next(iter(loader(d, batch=2, epochs=1))).modalities["n"].tolist() == [[3.0], [7.0]]
    sys.modules.pop("my_decoders", None)
    with pytest.raises(ConfigError, match=r"^data\.imports\[0\]: cannot import 'no_such_module'"):
        data_config(imports=["no_such_module"])
    with pytest.raises(ValueError, match="already registered"):
        register_decoder("test_reversed_text", type("Other", (Decoder,), {}))


@pytest.mark.parametrize("modalities, key, words", [
    ({"x": {"decoder": "nope"}}, "data.modalities.x.decoder", "unknown decoder 'nope'"),
    ({"image": {"decoder": "image", "options": {"sise": 3}}}, "data.modalities.image.options.sise", "unknown key"),
    ({"image": {"decoder": "image", "options": {"size": "big"}}}, "data.modalities.image.options.size", "expected"),
    ({"text": {"decoder": "text", "members": ["pyd"]}}, "data.modalities.text.members[0]", "always refused"),
    ({"audio": {"decoder": "audio", "options": {"features": "mfcc"}}}, "data.modalities.audio.options.features",
     "must be one of"),
    ({"r": {"decoder": "test_length_free", "required": False}}, "data.modalities.r", "cannot be optional"),
])
def test_modality_config_errors_name_the_key(modalities, key, words):
    @register_decoder("test_length_free", replace=True)
    class Free(Decoder):  # no fixed output shape
        members = ("txt",)

    with pytest.raises(ConfigError) as err:  # checking the config, or (a missing shape) building the decoders
        build_modalities(data_config(modalities=modalities), train=True)
    assert str(err.value).startswith(f"{key}:") and words in str(err.value), str(err.value)
