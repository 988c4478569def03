"""Shard URLs -> decoded samples -> ``Batch`` for one rank (and its loader workers).

Shards are split across ranks x loader workers, so every sample of an epoch goes to exactly one
(rank, worker). Training streams epoch after epoch, reshuffling shard order and samples with
generators seeded from (seed, epoch, rank, worker); evaluation reads one pass in shard order.
Only members named by the decoders are read from a tar: nothing is ever unpickled.
"""
from __future__ import annotations

import io
import itertools
import random
from dataclasses import dataclass, field
from typing import Iterator, Optional

import braceexpand
import torch
import webdataset
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pretrain.config import DataConfig, SplitConfig
from pretrain.tokenizer import ByteTokenizer

IMAGE_MEMBERS = ("png", "jpg", "jpeg", "webp")
TEXT_MEMBERS = ("txt",)
LABEL_MEMBERS = ("cls",)


@dataclass
class Batch:
    """One micro-batch: a tensor per modality, a presence mask per modality, the sample keys."""

    modalities: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    keys: list[str]
    labels: Optional[torch.Tensor] = None  # class labels where samples carry a .cls member

    def __len__(self) -> int:
        return len(self.keys)


def expand_urls(urls: str | list[str]) -> list[str]:
    """Brace-expands a pattern, or each entry of a list, into shard URLs."""
    patterns = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for pattern in patterns:
        out.extend(braceexpand.braceexpand(pattern))
    return out


@dataclass
class SampleDecoder:
    """Raw tar members -> tensors. Image: RGB, resized, normalised. Text: byte tokens."""

    image_size: int
    mean: list[float]
    std: list[float]
    tokenizer: ByteTokenizer
    wanted: tuple[str, ...] = field(default=IMAGE_MEMBERS + TEXT_MEMBERS + LABEL_MEMBERS)

    def image(self, data: bytes) -> torch.Tensor:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("RGB").resize((self.image_size, self.image_size), Image.BILINEAR)
            pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
        x = pixels.view(self.image_size, self.image_size, 3).permute(2, 0, 1).float().div_(255.0)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std

    def __call__(self, sample: dict) -> dict:
        image = next((sample[m] for m in IMAGE_MEMBERS if m in sample), None)
        text = next((sample[m] for m in TEXT_MEMBERS if m in sample), None)
        if image is None or text is None:
            missing = "image" if image is None else "text"
            raise KeyError(f"sample {sample.get('__key__')!r} has no {missing} member")
        out = {
            "__key__": sample["__key__"],
            "image": self.image(image),
            "text": self.tokenizer.encode(text.decode("utf-8")),
        }
        label = next((sample[m] for m in LABEL_MEMBERS if m in sample), None)
        if label is not None:
            out["label"] = int(label.decode("utf-8").strip())
        return out

    def keep_member(self, fname: str) -> bool:
        return fname.rsplit("/", 1)[-1].split(".", 1)[-1].lower() in self.wanted


def collate(samples: list[dict]) -> Batch:
    mods = {m: torch.stack([s[m] for s in samples]) for m in ("image", "text")}
    masks = {m: torch.ones(len(samples), dtype=torch.bool) for m in mods}
    labels = None
    if all("label" in s for s in samples):
        labels = torch.tensor([s["label"] for s in samples], dtype=torch.long)
    return Batch(mods, masks, [s["__key__"] for s in samples], labels)


class ShardStream(IterableDataset):
    """Decoded samples of the shards that belong to this rank and loader worker."""

    def __init__(
        self,
        urls: list[str],
        decoder: SampleDecoder,
        rank: int,
        world_size: int,
        seed: int = 0,
        shuffle_buffer: int = 0,
        repeat: bool = True,
    ):
        if not urls:
            raise ValueError("no shard URLs given")
        self.urls = urls
        self.decoder = decoder
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle_buffer, self.repeat = seed, shuffle_buffer, repeat

    def _my_shards(self, epoch: int, worker: int, num_workers: int) -> list[str]:
        shards = list(self.urls)
        if self.repeat:
            random.Random(f"{self.seed}-shards-{epoch}").shuffle(shards)
        slot, slots = self.rank * num_workers + worker, self.world_size * num_workers
        return shards[slot::slots]

    def _samples(self, shards: list[str]) -> Iterator[dict]:
        for url in shards:
            raw = webdataset.tarfile_samples([{"url": url}], select_files=self.decoder.keep_member)
            for sample in raw:
                yield self.decoder(sample)

    def _shuffled(self, samples: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        if self.shuffle_buffer <= 1:
            yield from samples
            return
        buf: list[dict] = []
        for s in samples:
            buf.append(s)
            if len(buf) >= self.shuffle_buffer:
                i = rng.randrange(len(buf))
                buf[i], buf[-1] = buf[-1], buf[i]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        slots = self.world_size * num_workers
        if self.repeat and len(self.urls) < slots:
            raise ValueError(
                f"{len(self.urls)} shards cannot feed {self.world_size} ranks x {num_workers} loader "
                f"workers = {slots} streams: build more, smaller shards or lower data.*.workers"
            )
        epochs = itertools.count() if self.repeat else [0]
        for epoch in epochs:
            rng = random.Random(f"{self.seed}-samples-{epoch}-{self.rank}-{worker}")
            yield from self._shuffled(self._samples(self._my_shards(epoch, worker, num_workers)), rng)


def make_loader(
    split: SplitConfig,
    data: DataConfig,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    train: bool,
) -> DataLoader:
    decoder = SampleDecoder(data.image_size, data.image_mean, data.image_std, ByteTokenizer(data.context_length))
    stream = ShardStream(
        expand_urls(split.urls), decoder, rank, world_size, seed=seed,
        shuffle_buffer=split.shuffle_buffer if train else 0, repeat=train,
    )
    return DataLoader(
        stream, batch_size=batch_size, collate_fn=collate, num_workers=split.workers,
        drop_last=train, persistent_workers=split.workers > 0 and train,
    )
