"""A depth modality as a plugin, loaded through ``data.imports`` with no edit of ``pretrain/``:

    data.imports: [tests.plugins.depth]
    data.modalities.depth: {decoder: depth, options: {size: 16}}
    model.towers.depth: {type: depth_cnn, options: {channels: [8, 16]}}

The ``depth`` decoder reads a ``.npy`` depth map (H x W, or 1 x H x W / H x W x 1; metres, or any unit
with ``scale``) by the npy decoder's default members: a default ``data_tools build`` of a ``depth``
field of ``.npy`` files writes ``KEY.depth.npy``, which ``.npy`` finds (``pretrain.member_names``).
It gives normalised log-depth, ``(1, size, size)`` float: log(depth) clamped to
[log min_depth, log max_depth] and mapped to [-1, 1]; pixels without a depth (0, negative, NaN:
sensors' holes) become 1 (as far as ``max_depth``). The ``depth_cnn`` tower is a small strided
convolution stack over it, mean-pooled.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from pretrain.data import DecodeError, Decoder, NpyDecoder, register_decoder
from pretrain.models import Backbone, register_tower
from pretrain.options import ConfigError, require


@register_decoder("depth")
class DepthDecoder(Decoder):
    """A ``.npy`` depth map -> normalised log-depth ``(1, size, size)`` (bilinear resize)."""

    members = NpyDecoder.members  # the npy rule: KEY.npy, KEY.<modality>.npy or the one KEY.*.npy

    @dataclass
    class Options:
        size: int = 32
        min_depth: float = 0.1  # in the map's unit times scale (metres by default)
        max_depth: float = 100.0
        scale: float = 1.0  # multiplies the stored values (0.001 for millimetre maps)

        def check(self, key: str) -> None:
            require(self.size >= 4, f"{key}.size", f"must be >= 4, got {self.size}")
            require(0 < self.min_depth < self.max_depth, f"{key}.min_depth",
                    f"need 0 < min_depth < max_depth, got {self.min_depth} and {self.max_depth}")
            require(self.scale > 0, f"{key}.scale", f"must be > 0, got {self.scale}")

    def __init__(self, options, ctx):
        super().__init__(options, ctx)
        self.output_shape = (1, options.size, options.size)
        self.lo, self.hi = math.log(options.min_depth), math.log(options.max_depth)

    def decode(self, data: bytes, ext: str, rng) -> torch.Tensor:
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)  # an object array raises: nothing unpickled
        except Exception as err:  # noqa: BLE001 - bad magic, header or pickled data
            raise DecodeError("bad_npy", f"{type(err).__name__}: {err}") from None
        if arr.ndim == 3 and 1 in (arr.shape[0], arr.shape[-1]):
            arr = arr.reshape(arr.shape[1:] if arr.shape[0] == 1 else arr.shape[:-1])
        if arr.ndim != 2 or min(arr.shape) < 1 or arr.dtype.kind not in "biuf":
            raise DecodeError("bad_depth", f"a depth map is a numeric H x W array, got {arr.dtype} {arr.shape}")
        d = torch.from_numpy(arr.astype(np.float32)) * self.options.scale
        valid = torch.isfinite(d) & (d > 0)
        x = torch.log(torch.where(valid, d, 1.0).clamp(self.options.min_depth, self.options.max_depth))
        x = torch.where(valid, 2 * (x - self.lo) / (self.hi - self.lo) - 1, 1.0)
        size = self.options.size
        return nn.functional.interpolate(x[None, None], size=(size, size), mode="bilinear", align_corners=False)[0]


@register_tower("depth_cnn")
class DepthCNN(Backbone):
    """(1, H, W) -> strided 3x3 conv blocks (conv, GroupNorm, GELU) -> mean over H x W."""

    @dataclass
    class Options:
        channels: list[int] = field(default_factory=lambda: [16, 32])

    def __init__(self, options, ctx):
        super().__init__(options, ctx)
        if not options.channels or any(c <= 0 for c in options.channels):
            raise ConfigError(f"{ctx.key}.options.channels: a non-empty list of positive sizes, got {options.channels}")
        shape = ctx.input_shape
        if shape is None or len(shape) != 3 or shape[0] != 1:
            raise ConfigError(f"{ctx.key}.type: depth_cnn takes (1, H, W) depth maps; data.modalities.{ctx.modality} "
                              f"gives {shape} (use decoder: depth)")
        layers, c_in = [], 1
        for c in options.channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(1, c), nn.GELU()]
            c_in = c
        self.blocks = nn.Sequential(*layers)
        self.width = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x).mean(dim=(2, 3))
