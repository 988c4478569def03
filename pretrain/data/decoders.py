"""Decoders: the bytes of one tar member -> one tensor, registered by name.

The config names a decoder per modality (``data.modalities.<name>.decoder``) with its options
(``data.modalities.<name>.options``); a new one is a class registered under a new name, in any
module listed in ``data.imports`` (the pipeline is not touched)::

    from dataclasses import dataclass
    from pretrain.data import Decoder, DecodeError, register_decoder

    @register_decoder("points")
    class PointsDecoder(Decoder):
        members = (".xyz",)                    # the members it reads by default, by preference

        @dataclass
        class Options:                         # its options, type-checked like every config key
            n: int = 1024

        def __init__(self, options, ctx):
            super().__init__(options, ctx)
            self.output_shape = (options.n, 3)  # fixed: batches stack it; placeholders use it

        def decode(self, data: bytes, ext: str, rng) -> torch.Tensor:
            ...                                 # raise DecodeError("bad_points", "why") on bad data

``members`` entries are member names (``txt``) or, with a leading dot, suffixes (``.xyz``: the
member ``xyz`` or any member ending in ``.xyz``, so a default build's ``KEY.points.xyz`` is found).
The rule and its precedence (exact, then named after the modality, then the one suffix match) live
in ``pretrain.member_names``. ``decode`` gets the member's name as ``ext``.

The loader's workers call ``host_decode`` (by default ``decode``) and batch what it returns; where a
decoder sets ``device_transform`` (a callable: batch tensor on the device, presence mask or None ->
the model's input), the training step, the evaluation and ``Embedder`` apply it after the batch
reaches the device, so a worker can ship compact data (the image decoder: uint8 pixels, normalised
on the device). ``decode`` stays the whole path for one sample on the host. Whether a modality has a
device half is the decoder's decision, never inferred from a dtype (token ids and ``npy`` arrays may
be integers too); ``to_device`` is the one place it is applied.

A decoder raises ``DecodeError(reason, detail)`` for bad data: the sample is skipped (or, for an
optional modality, masked) and counted under ``reason``. ``rng`` is a ``random.Random`` seeded from
(seed, rank, worker, batch): use it, not the global generators, for per-sample randomness (a
decoder that must use the global ones, like timm's augmentations, sets ``uses_global_rng``).

Built in: ``image`` (PIL + timm transforms), ``text`` (byte tokenizer, caption choice), ``audio``
(soundfile WAV/FLAC, soxr resampling, optional log-mel), ``npy`` (arrays, never pickled), ``json``
(numeric fields of a JSON object), ``class_label`` (``.cls``).
"""
from __future__ import annotations

import io
import json
import logging
import math
import random
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Literal, Optional

import numpy as np
import torch

from pretrain.member_names import AUDIO_EXTS, IMAGE_EXTS, MemberRule, entry_problem
from pretrain.options import ConfigError, NoOptions, Registry, require
from pretrain.tokenizer import is_open_clip, make_tokenizer

log = logging.getLogger("pretrain.data")


class DecodeError(Exception):
    """Bad data in one member: the sample is skipped (or masked) and counted under ``reason``."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass
class DecoderContext:
    modality: str
    train: bool
    data: Any  # the DataConfig (image size, context length, ...)


class Decoder:
    """Base class; see the module docstring."""

    members: ClassVar[tuple[str, ...]] = ()
    Options: ClassVar[type] = NoOptions
    uses_global_rng: bool = False

    def __init__(self, options: Any, ctx: DecoderContext):
        self.options, self.ctx = options, ctx
        self.output_shape: Optional[tuple[int, ...]] = None
        self.dtype: torch.dtype = torch.float32  # of what ``host_decode`` (and ``placeholder``) give
        # None, or a callable (batch tensor on the device, presence mask (B,) bool or None) -> the
        # model's input: the part of decoding that runs on the device, after the batch is there (one
        # with ``host_batch = True`` is given the host batch instead: ``from_host(x, device, present)``)
        self.device_transform: Optional[Any] = None
        self.ragged = False  # host_decode gives 1-D uint8 tensors of varying length (batched by pack_ragged)

    def decode(self, data: bytes, ext: str, rng: random.Random) -> torch.Tensor:
        raise NotImplementedError

    def host_decode(self, data: bytes, ext: str, rng: random.Random) -> torch.Tensor:
        """What a loader worker batches (of ``output_shape`` and ``dtype``): ``decode`` unless the
        decoder has a ``device_transform`` that finishes it on the device."""
        return self.decode(data, ext, rng)

    def placeholder(self) -> torch.Tensor:
        """What an absent optional modality holds (its mask is False)."""
        if self.output_shape is None:
            raise ConfigError(
                f"data.modalities.{self.ctx.modality}: decoder has no fixed output shape, so the modality "
                f"cannot be optional (set required: true)"
            )
        return torch.zeros(self.output_shape, dtype=self.dtype)


def to_device(x: torch.Tensor, device: torch.device, dtype: torch.dtype, transform=None,
              present: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One modality's batch tensor as the model takes it: on ``device`` (``non_blocking``: the loader
    pins batches), finished by its decoder's ``device_transform`` where it has one (``present``: the
    batch's presence mask, for placeholders), floating values in the model's ``dtype`` (token ids
    stay integers). The step, the evaluation and ``Embedder`` all go through it."""
    if transform is not None and getattr(transform, "host_batch", False):
        x = transform.from_host(x, device, present)  # it moves the data itself (e.g. JPEG bytes to nvJPEG)
    else:
        x = x.to(device, non_blocking=True)
        if transform is not None:
            x = transform(x, None if present is None else present.to(device, non_blocking=True))
    return x.to(dtype) if x.is_floating_point() and x.dtype != dtype else x


def pack_ragged(rows: list[torch.Tensor], out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """1-D uint8 tensors of varying length as one: (n + 2) int64 (n, then n + 1 offsets into the
    payload) as bytes, then the rows back to back. For decoders whose ``host_decode`` gives such rows
    (``ragged``); ``out``: a tensor of ``packed_size(rows)`` bytes to write into (shared memory)."""
    offsets = [0]
    for r in rows:
        offsets.append(offsets[-1] + r.numel())
    head = torch.tensor([len(rows), *offsets], dtype=torch.int64).view(torch.uint8)
    return torch.cat([head, *rows], out=out)


def packed_size(rows: list[torch.Tensor]) -> int:
    return 8 * (len(rows) + 2) + sum(r.numel() for r in rows)


def unpack_ragged(x: torch.Tensor) -> list[torch.Tensor]:
    """``pack_ragged``'s rows (views of ``x``)."""
    n = int(x[:8].view(torch.int64)[0])
    offsets = x[8: 8 * (n + 2)].view(torch.int64).tolist()
    base = 8 * (n + 2)
    return [x[base + a: base + b] for a, b in zip(offsets[:-1], offsets[1:])]


DECODERS = Registry("decoder", base=Decoder, hint="a module that registers more can be listed in data.imports")


def _check_members(name: str, cls: type[Decoder]) -> None:
    for entry in cls.members:
        problem = entry_problem(entry.lower())
        if problem:
            raise ValueError(f"decoder {name!r}: member {problem}")


def register_decoder(name: str, cls: Optional[type[Decoder]] = None, *, replace: bool = False):
    """Registers a ``Decoder`` subclass under ``name``; usable as a decorator."""
    return DECODERS.register(name, cls, replace=replace, check=_check_members)


def decoder_names() -> list[str]:
    return DECODERS.names()


@dataclass
class Modality:
    """A configured modality: its decoder, the members it reads and whether it is required."""

    name: str
    decoder: Decoder
    members: tuple[str, ...]
    required: bool
    decoder_name: str
    rule: MemberRule = field(init=False)  # how ``members`` are found in a sample

    def __post_init__(self):
        self.rule = MemberRule(self.name, self.members)


def build_modality(name: str, cfg: Any, data: Any, train: bool, key: str) -> Modality:
    """One ``ModalityConfig`` built: its decoder constructed (errors name ``key``)."""
    dname = cfg.decoder_name(name)
    options = DECODERS.options(dname, cfg.options, f"{key}.decoder", f"{key}.options")
    members = cfg.member_list(name, key)
    decoder = DECODERS.get(dname, f"{key}.decoder")(options, DecoderContext(name, train, data))
    if not cfg.required:
        decoder.placeholder()  # raises a clear error when it cannot have one
    return Modality(name, decoder, members, cfg.required, dname)


@dataclass
class Modalities:
    """The built decoders of ``data.modalities`` (in config order) and of ``data.labels``, for
    training (augmentation, random caption choice) or for evaluation."""

    items: list[Modality]
    label: Optional[Modality]
    train: bool

    def __iter__(self) -> Iterator[Modality]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, name: str) -> Modality:
        for m in self.items:
            if m.name == name:
                return m
        raise KeyError(f"no modality {name!r} (have {self.names})")

    def __contains__(self, name: str) -> bool:
        return any(m.name == name for m in self.items)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.items]

    def device_transforms(self) -> dict[str, Any]:
        """Modality -> its decoder's ``device_transform``, for the modalities that have one."""
        return {m.name: m.decoder.device_transform for m in self.items if m.decoder.device_transform is not None}


def build_modalities(data: Any, train: bool) -> Modalities:
    """Every modality's decoder (and the labels'), built once from a checked ``DataConfig``."""
    data.import_plugins()
    items = [build_modality(name, m, data, train, f"data.modalities.{name}") for name, m in data.modalities.items()]
    label = build_modality("labels", data.labels, data, train, "data.labels") if data.labels is not None else None
    return Modalities(items, label, train)


# ---------------------------------------------------------------------------------------- image


@dataclass(frozen=True)
class ImageSettings:
    """What the image decoder does to an image outside training (timm's eval transform): decode to
    RGB, resize (``crop_mode``: ``center`` the short side to ``size / crop_pct`` then the centre
    cropped, ``squash`` both sides, ``border`` the long side then padded with the mean colour), scale
    to [0, 1], normalise. Another library's preprocessing of an export is made from these
    (``pretrain.models.openclip.preprocess_cfg``, ``pretrain.models.hf_clip.image_processor``)."""

    key: str  # data.modalities.<m>.options: what errors about these settings name
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    crop_pct: float
    crop_mode: str


_AUGMENT_KEYS = {
    "scale", "ratio", "hflip", "vflip", "color_jitter", "color_jitter_prob", "grayscale_prob",
    "gaussian_blur_prob", "auto_augment", "re_prob", "re_mode", "re_count", "train_crop_mode",
}


class NormalizeOnDevice:
    """The image decoder's ``device_transform``: uint8 (B, 3, H, W) -> float32 scaled to [0, 1] and
    normalised, by the operations of torchvision's ``ToTensor`` and ``Normalize`` in their order
    (so on the CPU the values are those of the float path, bit for bit); rows whose presence mask is
    False become 0, the float path's placeholder."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        self.mean, self.std = tuple(mean), tuple(std)
        self._consts: dict = {}

    def _on(self, device: torch.device):
        if device not in self._consts:  # made once per device: no copy to the device per batch
            self._consts[device] = (torch.tensor(self.mean, dtype=torch.float32, device=device).view(-1, 1, 1),
                                    torch.tensor(self.std, dtype=torch.float32, device=device).view(-1, 1, 1))
        return self._consts[device]

    def __call__(self, x: torch.Tensor, present: Optional[torch.Tensor] = None) -> torch.Tensor:
        mean, std = self._on(x.device)
        y = x.to(torch.float32).div_(255).sub_(mean).div_(std)
        if present is not None:
            y = torch.where(present.view(-1, *([1] * (y.dim() - 1))), y, torch.zeros((), device=y.device))
        return y

    def __getstate__(self):  # travels to loader workers without the device constants
        return {"mean": self.mean, "std": self.std, "_consts": {}}


DRAFT_SCALES = (8, 4, 2, 1)  # libjpeg's DCT scaling: 1/8, 1/4, 1/2 or full size


def draft_scale(region_w: float, region_h: float, out_w: float, out_h: float) -> int:
    """The largest DCT reduction s (8, 4, 2 or 1) that keeps a region of ``region_w x region_h``
    source pixels at least ``out_w x out_h`` pixels once reduced (region / s >= out)."""
    return next((s for s in DRAFT_SCALES if region_w / s >= out_w and region_h / s >= out_h), 1)


def _load_rgb(img):
    """Decodes a lazily opened PIL image in full and as RGB (a truncated file fails here)."""
    try:
        img.load()
        return img if img.mode == "RGB" else img.convert("RGB")
    except Exception as err:  # noqa: BLE001 - PIL raises many kinds
        raise DecodeError("undecodable_image", f"{type(err).__name__}: {err}") from None


def _draft(img, scale: int) -> int:
    """Asks libjpeg for a 1/``scale`` decode of a lazily opened JPEG (PIL's ``Image.draft``); returns
    the reduction it will decode at (1: none; other formats have no draft)."""
    if scale <= 1 or img.format != "JPEG":
        return 1
    width = img.width
    got = img.draft("RGB", (width // scale, img.height // scale))
    return 1 if not got else max(1, int(round(width / got[1][2])))  # got: (mode, (0, 0, width / s, height / s))


def _pil_mode(interp):
    import torchvision.transforms.functional as F

    return F.pil_modes_mapping[interp] if interp in F.pil_modes_mapping else interp


class DraftRandomResizedCrop:
    """timm's ``RandomResizedCropAndInterpolation`` (the same random draws, in the same order) on a
    lazily opened image: the crop is sampled on the full size, then a JPEG is decoded at the largest
    DCT reduction that keeps the crop at least the output size in both directions (``draft_scale``),
    and the crop, in the reduced image's coordinates (fractional), is resized to the output in one
    step. Other formats, and crops too small to reduce, take timm's own path, exactly. ``last``:
    (reduction, crop width and height in decoded pixels) of the last call, for checks."""

    def __init__(self, rrc):
        self.rrc = rrc
        self.last: tuple[int, float, float] = (1, 0.0, 0.0)

    def __call__(self, img):
        import torchvision.transforms.functional as F

        rrc = self.rrc
        i, j, h, w = rrc.get_params(img, rrc.scale, rrc.ratio)
        interp = random.choice(rrc.interpolation) if isinstance(rrc.interpolation, (tuple, list)) else rrc.interpolation
        out_h, out_w = rrc.size
        scale = _draft(img, draft_scale(w, h, out_w, out_h))
        img = _load_rgb(img)
        self.last = (scale, w / scale, h / scale)
        if scale == 1:
            return F.resized_crop(img, i, j, h, w, [out_h, out_w], interp)
        # libjpeg's reduced grid: source coordinate u is u / scale there (8x8 blocks -> 8/scale)
        box = (j / scale, i / scale, (j + w) / scale, (i + h) / scale)
        return img.resize((out_w, out_h), _pil_mode(interp), box=box)

    def __repr__(self) -> str:
        return f"DraftRandomResizedCrop({self.rrc!r})"


class DraftResize:
    """For the resize-then-crop transforms (training without ``augment``): decodes a lazily opened
    JPEG at the largest DCT reduction that keeps the whole image at least the size it is resized to
    (``need(width, height)``: that size), then the transforms after it run as always."""

    def __init__(self, need):
        self.need = need
        self.last: tuple[int, float, float] = (1, 0.0, 0.0)

    def __call__(self, img):
        width, height = img.size
        out_w, out_h = self.need(width, height)
        scale = _draft(img, draft_scale(width, height, out_w, out_h))
        self.last = (scale, width / scale, height / scale)
        return _load_rgb(img)

    def __repr__(self) -> str:
        return "DraftResize()"


# ------------------------------------------------------------------- JPEG decode on the device

_EMPTY, _JPEG, _PIXELS = 0, 1, 2  # what a record holds after its header
_HEAD = 8  # int32 fields: kind, height, width, top, left, crop height, crop width, flags (1 hflip, 2 vflip)


def _head(fields: list[int]) -> torch.Tensor:
    return torch.tensor(fields, dtype=torch.int32).view(torch.uint8)


def device_jpeg_unavailable(device: str = "cuda") -> Optional[str]:
    """Why JPEGs cannot be decoded on ``device`` by torchvision here (None: they can)."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    try:
        import warnings

        from PIL import Image
        from torchvision.io import ImageReadMode, decode_jpeg

        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (10, 200, 30)).save(buf, format="JPEG")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision 0.29 marks its image decoding deprecated
            decode_jpeg([torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)], mode=ImageReadMode.RGB,
                        device=device)
    except Exception as err:  # noqa: BLE001 - a torchvision without nvJPEG, a driver problem
        return f"torchvision cannot decode JPEGs on {device}: {type(err).__name__}: {err}"
    return None


class DeviceJpegDecode:
    """The image decoder's device half with ``gpu_decode``: the loader workers read the tar, sample
    the crop and flips (timm's draws, in its order) and ship each JPEG's bytes with them (a record:
    header, then the file); here the batch's JPEGs are decoded together by
    ``torchvision.io.decode_jpeg(device=...)`` (nvJPEG on CUDA), each crop is resized to the output
    (``interpolate``, antialiased: PIL's filters), rounded to integers as PIL's are, flipped, and
    normalised (``NormalizeOnDevice``). Records a worker had to decode itself (other formats, CMYK,
    JPEGs without their end marker) arrive as uint8 pixels. A JPEG that fails here is decoded by PIL
    on the host; one that fails there too becomes the placeholder (zeros) and is counted in
    ``failed`` (logged)."""

    host_batch = True

    def __init__(self, size: int, interpolation: str, mean, std):
        self.size, self.interpolation = size, interpolation
        self.normalize = NormalizeOnDevice(mean, std)
        self.failed = 0

    def _decode(self, datas: list[torch.Tensor], device: torch.device) -> list:
        import warnings

        from torchvision.io import ImageReadMode, decode_jpeg

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision 0.29 marks its image decoding deprecated
            try:
                return decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
            except RuntimeError:  # one bad file fails the whole batch: one at a time, then PIL
                out = []
                for d in datas:
                    try:
                        out.append(decode_jpeg([d], mode=ImageReadMode.RGB, device=device)[0])
                    except RuntimeError:
                        out.append(self._host_fallback(d, device))
                return out

    def _host_fallback(self, data: torch.Tensor, device: torch.device) -> Optional[torch.Tensor]:
        from PIL import Image

        try:
            img = Image.open(io.BytesIO(data.numpy().tobytes()))
            return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).to(device)
        except Exception as err:  # noqa: BLE001 - PIL raises many kinds
            self.failed += 1
            log.warning("[data] image: a JPEG decoded neither on %s nor by PIL (%s: %s); its sample gets the "
                        "placeholder (%d so far)", device, type(err).__name__, err, self.failed)
            return None

    def _crop_resize(self, img: torch.Tensor, head: list[int]) -> torch.Tensor:
        _, _, _, top, left, h, w, flags = head
        x = img[:, top:top + h, left:left + w].unsqueeze(0).float()
        x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode=self.interpolation,
                                            align_corners=False, antialias=True)[0]
        x = x.round_().clamp_(0, 255)  # PIL's resize gives integers
        if flags & 1:
            x = x.flip(-1)
        if flags & 2:
            x = x.flip(-2)
        return x

    def from_host(self, packed: torch.Tensor, device: torch.device, present: Optional[torch.Tensor] = None):
        device = torch.device(device)
        records = unpack_ragged(packed)
        heads = [r[: 4 * _HEAD].clone().view(torch.int32).tolist() for r in records]  # host memory: no device read
        s = self.size
        out = torch.zeros(len(records), 3, s, s, device=device)
        jpegs = [k for k, h in enumerate(heads) if h[0] == _JPEG]
        if jpegs:
            images = self._decode([records[k][4 * _HEAD:] for k in jpegs], device)
            for k, img in zip(jpegs, images):
                if img is not None:
                    out[k] = self._crop_resize(img, heads[k])
                else:
                    heads[k][0] = _EMPTY
        pixels = [k for k, h in enumerate(heads) if h[0] == _PIXELS]
        if pixels:
            rows = torch.stack([records[k][4 * _HEAD:].view(3, s, s) for k in pixels])
            out[pixels] = rows.to(device, non_blocking=True).float()
        keep = torch.tensor([h[0] != _EMPTY for h in heads])  # placeholders and failures: zeros
        mask = None if bool(keep.all()) else keep.to(device, non_blocking=True)
        if present is not None:  # the batch's presence mask, wherever it is: combined on the device
            present = present.to(device, non_blocking=True)
            mask = present if mask is None else mask & present
        return self.normalize(out, mask)

    def __getstate__(self):
        return {**self.__dict__, "normalize": self.normalize}


@register_decoder("image")
class ImageDecoder(Decoder):
    """PNG/JPEG/WebP -> (3, size, size). Evaluation (and training without ``augment``): timm's eval
    transform (resize the short side, crop ``crop_pct``, ``crop_mode``). Training with ``augment`` (a
    dict of timm ``create_transform`` training options such as ``scale``, ``ratio``, ``hflip``,
    ``color_jitter``, ``auto_augment``; ``{}`` = timm's defaults): timm's training transform.

    ``output``: ``uint8`` pixels from the loader workers, scaled and normalised on the device
    (``device_transform``: 4x fewer bytes through shared memory and host-to-device copies; timm's
    own prefetcher split, ``use_prefetcher``), or ``float``, normalised in the workers; ``auto``
    (default) is uint8 unless the augmentation erases patches (``re_prob``, which works on
    normalised values). Both give the model the same values.

    ``draft`` (training only; default true): a JPEG is decoded at libjpeg's reduced DCT scale (1/2,
    1/4, 1/8: PIL's ``Image.draft``) when the region the transform keeps stays at least the output
    size: with ``augment`` the crop is sampled first (timm's draws) and the scale follows it. The
    result differs from a full decode by resampling only. Evaluation and export always decode in
    full (their values are what open_clip's and transformers' preprocessing of an export give).

    ``gpu_decode`` (training only; default false): where CUDA and torchvision's GPU JPEG decoder are
    there, the workers ship JPEG bytes with the sampled crop and flips and the batch is decoded,
    cropped and resized on the GPU (``DeviceJpegDecode``); elsewhere the CPU path runs. Which one
    runs is logged. Needs ``augment`` with a random resized crop and flips only (no colour
    operations), ``bilinear`` or ``bicubic``."""

    members = IMAGE_EXTS  # png, jpg, jpeg, webp, then gif, bmp, tif, tiff: what the builder names bare

    @dataclass
    class Options:
        size: Optional[int] = None  # default: data.image_size
        mean: Optional[list[float]] = None  # default: data.image_mean
        std: Optional[list[float]] = None  # default: data.image_std
        interpolation: Literal["bilinear", "bicubic", "nearest", "lanczos"] = "bilinear"
        crop_pct: float = 1.0
        crop_mode: Literal["center", "squash", "border"] = "center"
        augment: Optional[dict[str, Any]] = None
        max_pixels: int = 89_478_485  # PIL's decompression-bomb limit
        output: Literal["auto", "uint8", "float"] = "auto"
        draft: bool = True
        gpu_decode: bool = False

        def check(self, key: str) -> None:
            require(self.size is None or self.size >= 1, f"{key}.size", f"must be >= 1, got {self.size}")
            for name in ("mean", "std"):
                value = getattr(self, name)
                require(value is None or len(value) == 3, f"{key}.{name}", "need 3 values (RGB)")
            require(0 < self.crop_pct <= 1, f"{key}.crop_pct", f"must be in (0, 1], got {self.crop_pct}")
            for k in self.augment or {}:
                require(k in _AUGMENT_KEYS, f"{key}.augment.{k}",
                        f"not a timm training option (options: {', '.join(sorted(_AUGMENT_KEYS))})")
            erasing = bool((self.augment or {}).get("re_prob"))
            require(not (self.output == "uint8" and erasing), f"{key}.output",
                    "uint8 cannot hold random erasing (augment.re_prob works on normalised values): use float or auto")
            require(not self.gpu_decode or self.interpolation in ("bilinear", "bicubic"), f"{key}.gpu_decode",
                    f"resizes on the GPU with bilinear or bicubic filters, not {self.interpolation}")

    def __init__(self, options, ctx):
        super().__init__(options, ctx)
        from timm.data import create_transform

        key = f"data.modalities.{ctx.modality}.options"
        self.size = options.size or ctx.data.image_size
        mean = tuple(options.mean or ctx.data.image_mean)
        std = tuple(options.std or ctx.data.image_std)
        self.settings = ImageSettings(key, self.size, mean, std, options.interpolation, options.crop_pct,
                                      options.crop_mode)
        common = dict(input_size=(3, self.size, self.size), interpolation=options.interpolation, mean=mean, std=std)
        self.augmenting = ctx.train and options.augment is not None
        erasing = self.augmenting and bool(options.augment.get("re_prob"))
        self.uint8 = options.output == "uint8" or (options.output == "auto" and not erasing)
        # timm's prefetcher split: the transform ends in uint8 pixels; normalising is left to the device
        common["use_prefetcher"] = self.uint8
        if self.augmenting:
            aug = dict(options.augment)
            for k in ("scale", "ratio"):
                if k in aug:
                    aug[k] = tuple(aug[k])
            try:
                self.transform = create_transform(is_training=True, **common, **aug)
            except Exception as err:  # noqa: BLE001 - timm's own message names the problem
                raise ConfigError(f"{key}.augment: {err}") from None
        else:
            self.transform = create_transform(
                is_training=False, crop_pct=options.crop_pct, crop_mode=options.crop_mode, **common
            )
        self.drafter = self._drafter() if ctx.train and options.draft else None
        self.uses_global_rng = self.augmenting
        self.max_pixels = options.max_pixels
        self.output_shape = (3, self.size, self.size)
        if self.uint8:
            self.dtype = torch.uint8
            self.device_transform = NormalizeOnDevice(mean, std)
        self.device_decode: Optional[DeviceJpegDecode] = None
        if options.gpu_decode and ctx.train:
            self._check_device_decode(key)
            reason = device_jpeg_unavailable("cuda")
            if reason:
                log.warning("[data] %s: gpu_decode is set but %s: JPEGs are decoded on the CPU in the loader workers",
                            ctx.modality, reason)
            else:
                self.use_device_decode()
                log.info("[data] %s: JPEGs decoded on the GPU (torchvision.io.decode_jpeg, nvJPEG), cropped and "
                         "resized there; the loader workers read the tar and sample the crops", ctx.modality)

    def _check_device_decode(self, key: str) -> None:
        """The training transform must be timm's random resized crop, flips and the uint8 hand-over."""
        from timm.data.transforms import MaybePILToTensor, RandomResizedCropAndInterpolation
        from torchvision import transforms as T

        steps = list(getattr(self.transform, "transforms", []))
        first = steps[0].rrc if steps and isinstance(steps[0], DraftRandomResizedCrop) else (steps[0] if steps else None)
        rest = [type(t).__name__ for t in steps[1:]
                if not isinstance(t, (T.RandomHorizontalFlip, T.RandomVerticalFlip, MaybePILToTensor))]
        require(self.augmenting and isinstance(first, RandomResizedCropAndInterpolation) and not rest and self.uint8
                and not isinstance(first.interpolation, (tuple, list)), f"{key}.gpu_decode",
                "needs augment with a random resized crop and flips only (set color_jitter: null; no auto_augment, "
                f"grayscale, blur or erasing) and output uint8/auto; this transform also has {', '.join(rest) or 'none'}")

    def use_device_decode(self) -> None:
        """Switches to shipping JPEG records for ``DeviceJpegDecode`` (the device is the batch's)."""
        from torchvision import transforms as T

        steps = self.transform.transforms
        self._rrc = steps[0].rrc if isinstance(steps[0], DraftRandomResizedCrop) else steps[0]
        self._flips = [(t.p, bit) for t in steps[1:] for cls, bit in ((T.RandomHorizontalFlip, 1),
                                                                      (T.RandomVerticalFlip, 2)) if isinstance(t, cls)]
        self.device_decode = DeviceJpegDecode(self.size, self.options.interpolation, self.settings.mean,
                                              self.settings.std)
        self.device_transform = self.device_decode
        self.ragged = True

    def _record(self, data: bytes) -> torch.Tensor:
        """A JPEG's bytes behind its header (crop and flips drawn as timm's transform would draw them);
        another image (or a JPEG the device decoder should not get) decoded here, as uint8 pixels."""
        import torchvision.transforms.functional as F

        img = self.open(data, lazy=True)
        rrc = self._rrc
        i, j, h, w = rrc.get_params(img, rrc.scale, rrc.ratio)
        flags = 0
        for p, bit in self._flips:  # torchvision's RandomHorizontalFlip / RandomVerticalFlip draw
            if torch.rand(1) < p:
                flags |= bit
        head = [_JPEG, img.height, img.width, i, j, h, w, flags]
        if img.format == "JPEG" and img.mode in ("RGB", "L") and b"\xff\xd9" in data[-64:]:
            return torch.cat([_head(head), torch.frombuffer(bytearray(data), dtype=torch.uint8)])
        out = F.resized_crop(_load_rgb(img), i, j, h, w, [self.size, self.size], rrc.interpolation)
        if flags & 1:
            out = F.hflip(out)
        if flags & 2:
            out = F.vflip(out)
        head[0] = _PIXELS
        return torch.cat([_head(head), torch.from_numpy(np.array(out)).permute(2, 0, 1).reshape(-1)])

    def _drafter(self):
        """Puts the draft-aware first step in place, where the transform starts with one it knows
        (timm's random resized crop, or the resize of the eval transform); None otherwise."""
        from timm.data.transforms import RandomResizedCropAndInterpolation

        steps = getattr(self.transform, "transforms", None)
        if not steps:
            return None
        if isinstance(steps[0], RandomResizedCropAndInterpolation):
            steps[0] = DraftRandomResizedCrop(steps[0])
            return steps[0]
        if self.augmenting:
            return None  # another crop mode (timm's rkrc/rkrr): decoded in full
        size, mode = self.size, self.options.crop_mode
        resized = math.floor(size / self.options.crop_pct)  # timm's scale_size

        def need(width: int, height: int) -> tuple[float, float]:
            if mode == "squash":
                return resized, resized
            f = resized / (min(width, height) if mode == "center" else max(width, height))
            return width * f, height * f

        steps.insert(0, DraftResize(need))
        return steps[0]

    def open(self, data: bytes, lazy: bool = False):
        """The image, decoded in full as RGB (a truncated file fails here); ``lazy``: only its header
        read (the draft-aware transform decodes it)."""
        from PIL import Image

        try:
            img = Image.open(io.BytesIO(data))
        except Exception as err:  # noqa: BLE001 - PIL raises many kinds
            raise DecodeError("undecodable_image", f"{type(err).__name__}: {err}") from None
        if img.width * img.height > self.max_pixels:
            raise DecodeError("image_too_large", f"{img.width}x{img.height} pixels")
        return img if lazy else _load_rgb(img)

    def host_decode(self, data: bytes, ext: str, rng: random.Random) -> torch.Tensor:
        if self.device_decode is not None:
            return self._record(data)
        return self.transform(self.open(data, lazy=self.drafter is not None))  # uint8: a (3, H, W) view of HWC

    def decode(self, data: bytes, ext: str, rng: random.Random) -> torch.Tensor:
        """The model's input for one image (float, normalised), on the host."""
        x = self.host_decode(data, ext, rng)
        if self.device_decode is not None:
            return to_device(pack_ragged([x]), torch.device("cpu"), torch.float32, self.device_decode)[0]
        return self.device_transform(x.unsqueeze(0))[0].contiguous() if self.device_transform is not None else x

    def placeholder(self) -> torch.Tensor:
        if self.device_decode is not None:
            return _head([_EMPTY] + [0] * (_HEAD - 1))
        return torch.zeros(self.output_shape, dtype=self.dtype)  # the device transform makes it 0 (float's)


# ----------------------------------------------------------------------------------------- text


@register_decoder("text")
class TextDecoder(Decoder):
    """UTF-8 caption(s) -> token ids (data.context_length,), truncated and padded: the byte tokenizer,
    or (``tokenizer: FOLDER``) a transformers tokenizer saved in a local folder.

    ``txt``: one caption (with ``split_lines``, one per non-empty line); ``json``: a string, a list
    of strings, or an object whose first present ``fields`` entry holds one of those. With several
    captions, ``captions: auto`` picks one at random in training (seeded) and the first in
    evaluation; ``random`` / ``first`` force either; ``all`` keeps every caption (up to
    ``max_captions``): ``(max_captions, context_length)``, rows of padding after the last caption
    (retrieval as COCO and Flickr30k are reported: each image with all its captions)."""

    members = ("txt", "json")  # names, not suffixes: KEY.url.txt and KEY.meta.json are never a caption

    @dataclass
    class Options:
        captions: Literal["auto", "random", "first", "all"] = "auto"
        max_captions: int = 5  # with captions: all
        split_lines: bool = False
        fields: list[str] = field(default_factory=lambda: ["captions", "caption", "text"])
        tokenizer: str = "byte"  # byte, open_clip (OpenCLIP's BPE), or a local transformers tokenizer folder

        def check(self, key: str) -> None:
            require(self.max_captions >= 1, f"{key}.max_captions", f"must be >= 1, got {self.max_captions}")
            require(self.tokenizer == "byte" or is_open_clip(self.tokenizer) or Path(self.tokenizer).is_dir(),
                    f"{key}.tokenizer", f"'byte', 'open_clip' or a local tokenizer folder; no such folder: "
                    f"{self.tokenizer}")

    def __init__(self, options, ctx):
        super().__init__(options, ctx)
        try:
            self.tokenizer = make_tokenizer(options.tokenizer, ctx.data.context_length)
        except (OSError, ValueError) as err:
            raise ConfigError(f"data.modalities.{ctx.modality}.options.tokenizer: cannot load {options.tokenizer}: "
                              f"{err}") from None
        self.random_choice = options.captions == "random" or (options.captions == "auto" and ctx.train)
        self.output_shape = ((options.max_captions, ctx.data.context_length) if options.captions == "all"
                             else (ctx.data.context_length,))
        self.dtype = torch.long

    def captions(self, data: bytes, ext: str) -> list[str]:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DecodeError("bad_utf8", str(err)) from None
        if ext.rsplit(".", 1)[-1] == "json":
            try:
                doc = json.loads(text)
            except ValueError as err:
                raise DecodeError("bad_json", str(err)) from None
            if isinstance(doc, dict):
                doc = next((doc[f] for f in self.options.fields if f in doc), None)
                if doc is None:
                    raise DecodeError("missing_field", f"none of {self.options.fields} in the JSON object")
            items = [doc] if isinstance(doc, str) else doc
            if not isinstance(items, list) or not all(isinstance(c, str) for c in items):
                raise DecodeError("bad_json", "captions must be a string or a list of strings")
            caps = items
        elif self.options.split_lines:
            caps = text.splitlines()
        else:
            caps = [text]
        caps = [c.strip() for c in caps if c.strip()]
        if not caps:
            raise DecodeError("empty_text", "no caption")
        return caps

    def decode(self, data: bytes, ext: str, rng: random.Random) -> torch.Tensor:
        caps = self.captions(data, ext)
        if self.options.captions == "all":
            rows = [self.tokenizer.encode(c) for c in caps[: self.options.max_captions]]
            rows += [torch.full((self.ctx.data.context_length,), self.tokenizer.pad_id, dtype=torch.long)] * (
                self.options.max_captions - len(rows))
            return torch.stack(rows)
        caption = caps[rng.randrange(len(caps))] if self.random_choice and len(caps) > 1 else caps[0]
        return self.tokenizer.encode(caption)

    @property
    def captions_per_sample(self) -> int:
        """Rows per sample: ``max_captions`` with ``captions: all``, else 1 (a flat (context,) row)."""
        return self.options.max_captions if self.options.captions == "all" else 1

    def placeholder(self) -> torch.Tensor:
        return torch.full(self.output_shape, self.tokenizer.pad_id, dtype=torch.long)


# ---------------------------------------------------------------------------------------- audio


def mel_filterbank(n_freqs: int, sample_rate: int, n_mels: int, f_min: float, f_max: float) -> torch.Tensor:
    """(n_mels, n_freqs) triangular filters on the HTK mel scale (no area normalisation)."""

    def hz_to_mel(f):
        return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)

    def mel_to_hz(m):
        return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)

    freqs = np.linspace(0, sample_rate / 2, n_freqs)
    edges = mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2))
    lower, center, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs[None, :] - lower) / np.maximum(center - lower, 1e-12)
    down = (upper - freqs[None, :]) / np.maximum(upper - center, 1e-12)
    return torch.from_numpy(np.maximum(0.0, np.minimum(up, down))).float()


@register_decoder("audio")
class AudioDecoder(Decoder):
    """WAV/FLAC, also OGG/MP3/Opus (soundfile) -> mono float waveform at ``sample_rate`` (soxr),
    cropped or zero-padded to ``seconds``: (samples,). With ``features: log_mel``: log(mel power + floor)
    from ``torch.stft`` (Hann window, centred frames): (n_mels, 1 + samples // hop_length).
    Crop: ``auto`` is random in training (seeded) and the start in evaluation."""

    members = AUDIO_EXTS  # flac, wav, then ogg, mp3, opus (soundfile reads them; the builder checks with it)

    @dataclass
    class Options:
        sample_rate: int = 16000
        seconds: float = 1.0
        crop: Literal["auto", "random", "start", "center"] = "auto"
        features: Literal["waveform", "log_mel"] = "waveform"
        n_fft: int = 400
        hop_length: int = 160
        win_length: Optional[int] = None
        n_mels: int = 64
        f_min: float = 0.0
        f_max: Optional[float] = None
        log_floor: float = 1e-6
        max_seconds: float = 3600.0  # longer files are refused (audio_too_long)

        def check(self, key: str) -> None:
            require(self.sample_rate > 0, f"{key}.sample_rate", f"must be > 0, got {self.sample_rate}")
            require(self.seconds > 0, f"{key}.seconds", f"must be > 0, got {self.seconds}")
            if self.features == "log_mel":
                win = self.win_length or self.n_fft
                require(0 < win <= self.n_fft and self.hop_length > 0 and self.n_mels > 0, key,
                        "need 0 < win_length <= n_fft, hop_length > 0, n_mels > 0")
                f_max = self.f_max if self.f_max is not None else self.sample_rate / 2
                require(0 <= self.f_min < f_max <= self.sample_rate / 2, f"{key}.f_min/f_max",
                        "need 0 <= f_min < f_max <= sample_rate / 2")

    def __init__(self, options, ctx):
        super().__init__(options, ctx)
        o = options
        self.length = int(round(o.seconds * o.sample_rate))
        self.crop = o.crop if o.crop != "auto" else ("random" if ctx.train else "start")
        if o.features == "log_mel":
            win = o.win_length or o.n_fft
            f_max = o.f_max if o.f_max is not None else o.sample_rate / 2
            self.window = torch.hann_window(win)
            self.fbank = mel_filterbank(o.n_fft // 2 + 1, o.sample_rate, o.n_mels, o.f_min, f_max)
            self.output_shape = (o.n_mels, 1 + self.length // o.hop_length)
        else:
            self.output_shape = (self.length,)

    def waveform(self, data: bytes, rng: random.Random) -> torch.Tensor:
        import soundfile as sf

        o = self.options
        try:
            with sf.SoundFile(io.BytesIO(data)) as f:
                sr, frames = f.samplerate, f.frames
                if frames <= 0 or sr <= 0:
                    raise DecodeError("undecodable_audio", "no audio frames")
                if frames / sr > o.max_seconds:
                    raise DecodeError("audio_too_long", f"{frames / sr:.0f} s > max_seconds {o.max_seconds:g}")
                # crop in the file's own rate first (a little margin for the resampler), then exactly
                need = int(math.ceil(o.seconds * sr)) + (32 if sr != o.sample_rate else 0)
                start = 0
                if frames > need:
                    if self.crop == "random":
                        start = rng.randrange(frames - need + 1)
                    elif self.crop == "center":
                        start = (frames - need) // 2
                f.seek(start)
                x = f.read(min(need, frames - start), dtype="float32", always_2d=True)
        except DecodeError:
            raise
        except Exception as err:  # noqa: BLE001 - libsndfile errors, bad headers
            raise DecodeError("undecodable_audio", f"{type(err).__name__}: {err}") from None
        if x.shape[0] == 0:
            raise DecodeError("undecodable_audio", "no audio frames")
        x = x.mean(axis=1)
        if not np.isfinite(x).all():
            raise DecodeError("undecodable_audio", "non-finite samples")
        if sr != o.sample_rate:
            import soxr

            x = soxr.resample(x, sr, o.sample_rate)
        wave = torch.from_numpy(np.ascontiguousarray(x[: self.length], dtype=np.float32))
        if wave.shape[0] < self.length:
            wave = torch.nn.functional.pad(wave, (0, self.length - wave.shape[0]))
        return wave

    def log_mel(self, wave: torch.Tensor) -> torch.Tensor:
        o = self.options
        spec = torch.stft(wave, n_fft=o.n_fft, hop_length=o.hop_length, win_length=self.window.shape[0],
                          window=self.window, center=True, pad_mode="reflect" if wave.shape[0] > o.n_fft // 2 else "constant",
                          return_complex=True)
        power = spec.real.square() + spec.imag.square()
        return torch.log(self.fbank @ power + o.log_floor)

    def decode(self, data: bytes, ext: str, rng: random.Random) -> torch.Tensor:
        wave = self.waveform(data, rng)
        return self.log_mel(wave) if self.options.features == "log_mel" else wave

    def placeholder(self) -> torch.Tensor:
        if self.options.features == "log_mel":
            return torch.full(self.output_shape, math.log(self.options.log_floor))
        return torch.zeros(self.output_shape)


# ------------------------------------------------------------------------------- vectors, tables


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "int64": torch.long, "int32": torch.int32, "uint8": torch.uint8, "bool": torch.bool}


@register_decoder("npy")
class NpyDecoder(Decoder):
    """``.npy`` -> a tensor of exactly ``shape`` and ``dtype``. Loaded with ``allow_pickle=False``;
    an object array (which would need unpickling) is refused (``pickled_npy``); another shape is
    ``wrong_shape``. Reads ``KEY.npy``, ``KEY.<modality>.npy`` or a sample's one ``KEY.*.npy``."""

    members = (".npy",)

    @dataclass
    class Options:
        shape: list[int] = field(default_factory=list)
        dtype: Literal["float32", "float16", "bfloat16", "int64", "int32", "uint8", "bool"] = "float32"

        def check(self, key: str) -> None:
            require(bool(self.shape) and all(d > 0 for d in self.shape), f"{key}.shape",
                    "the array shape is required (positive sizes, e.g. [512]); batches stack it")

    def __init__(self, options, ctx):
        super().__init__(options, ctx)
        self.output_shape = tuple(options.shape)
        self.dtype = _DTYPES[options.dtype]

    def decode(self, data: bytes, ext: str, rng: random.Random) -> torch.Tensor:
        buf = io.BytesIO(data)
        try:
            version = np.lib.format.read_magic(buf)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(buf)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(buf)
        except Exception as err:  # noqa: BLE001 - bad magic or header
            raise DecodeError("bad_npy", f"{type(err).__name__}: {err}") from None
        if dtype.hasobject:
            raise DecodeError("pickled_npy", "object arrays would need unpickling; refused")
        if tuple(shape) != self.output_shape:
            raise DecodeError("wrong_shape", f"shape {tuple(shape)}, expected {self.output_shape}")
        if dtype.kind not in "biuf":
            raise DecodeError("bad_npy", f"dtype {dtype} is not numeric")
        count = int(np.prod(shape)) if shape else 1
        offset = buf.tell()  # the header is parsed once; the data follows it
        if len(data) - offset < count * dtype.itemsize:
            raise DecodeError("bad_npy", f"truncated: {len(data) - offset} data bytes for {count} x {dtype}")
        arr = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
        arr = arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)
        return torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="), copy=True)).to(self.dtype)  # native order


@register_decoder("json")
class JsonFieldsDecoder(Decoder):
    """Numeric ``fields`` of a JSON object -> a float vector: each field a number or a (nested)
    list of numbers, flattened and concatenated; the total length must be ``size`` (default: one
    per field). Missing field: ``missing_field``; not numeric: ``bad_value``; other length:
    ``wrong_shape``. Reads ``KEY.json``, ``KEY.<modality>.json`` or a sample's one ``KEY.*.json``."""

    members = (".json",)

    @dataclass
    class Options:
        fields: list[str] = field(default_factory=list)
        size: Optional[int] = None
        dtype: Literal["float32", "float16", "bfloat16", "int64"] = "float32"

        def check(self, key: str) -> None:
            require(bool(self.fields), f"{key}.fields", "list the JSON fields to read")

    def __init__(self, options, ctx):
        super().__init__(options, ctx)
        self.output_shape = (options.size or len(options.fields),)
        self.dtype = _DTYPES[options.dtype]

    def decode(self, data: bytes, ext: str, rng: random.Random) -> torch.Tensor:
        try:
            doc = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise DecodeError("bad_utf8", str(err)) from None
        except ValueError as err:
            raise DecodeError("bad_json", str(err)) from None
        if not isinstance(doc, dict):
            raise DecodeError("bad_json", "not a JSON object")
        values: list[float] = []
        for name in self.options.fields:
            if name not in doc:
                raise DecodeError("missing_field", f"no field {name!r}")
            _flatten(doc[name], values, name)
        if len(values) != self.output_shape[0]:
            raise DecodeError("wrong_shape", f"{len(values)} values, expected {self.output_shape[0]}")
        return torch.tensor(values, dtype=torch.float64).to(self.dtype)


def _flatten(v: Any, out: list[float], name: str) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float, list)):
        raise DecodeError("bad_value", f"field {name!r} holds {type(v).__name__}, not numbers")
    if isinstance(v, list):
        for item in v:
            _flatten(item, out, name)
    elif not math.isfinite(v):
        raise DecodeError("bad_value", f"field {name!r} is not finite")
    else:
        out.append(float(v))


# --------------------------------------------------------------------------------------- labels


@register_decoder("class_label")
class ClassLabelDecoder(Decoder):
    """``.cls``: a non-negative integer in ASCII -> long scalar; below ``num_classes`` if given."""

    members = ("cls",)

    @dataclass
    class Options:
        num_classes: Optional[int] = None

    def __init__(self, options, ctx):
        super().__init__(options, ctx)
        self.output_shape = ()
        self.dtype = torch.long

    def decode(self, data: bytes, ext: str, rng: random.Random) -> torch.Tensor:
        try:
            text = data.decode("ascii").strip()
            value = int(text)
        except (UnicodeDecodeError, ValueError):
            raise DecodeError("bad_label", f"{data[:20]!r} is not an integer") from None
        n = self.options.num_classes
        if value < 0 or (n is not None and value >= n):
            raise DecodeError("bad_label", f"label {value} outside [0, {n if n is not None else 'inf'})")
        return torch.tensor(value, dtype=torch.long)

    def placeholder(self) -> torch.Tensor:
        return torch.tensor(-1, dtype=torch.long)
