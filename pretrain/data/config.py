"""The data section of a recipe (``data.*``): splits, sources and modalities, each checked here.

Checks are cheap and build nothing: a decoder's name is looked up in the registry and its options
are type-checked against its ``Options``; the decoders themselves are built once, by
``pretrain.data.build_modalities``, where checks that need the data (a tokenizer folder's contents,
an image transform) run.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from pretrain.data.decoders import DECODERS
from pretrain.member_names import entry_problem
from pretrain.options import ConfigError, require


@dataclass
class SourceConfig:
    """One weighted source of shards (``data.train.sources[i]``)."""

    urls: Union[str, list[str]] = ""  # brace pattern(s), a list of shard paths/URLs (pipe:, http(s), s3 via fsspec)
    weight: float = 1.0  # resampled mode: share of the samples drawn from this source
    samples: Optional[int] = None  # explicit sample count of these shards (else from index.json / sizes.json)
    index: Optional[str] = None  # an index.json (data_tools) or sizes.json (OpenCLIP) listing the shards' counts


@dataclass
class SplitConfig:
    urls: Union[str, list[str]] = ""  # brace pattern(s) or list of shard paths/URLs (one source)
    samples: Optional[int] = None  # with urls: explicit sample count (else from index.json / sizes.json)
    index: Optional[str] = None  # with urls: where the counts are (default: beside local shards)
    sources: list[SourceConfig] = field(default_factory=list)  # several sources instead of urls
    mode: Literal["epoch", "resampled"] = "epoch"  # training: each sample once per epoch, or shards drawn by weight
    shuffle_buffer: int = 0  # samples permuted together (a window; 0 or 1: keep shard order)
    workers: int = 0  # DataLoader worker processes per rank

    def check_split(self, key: str, training: bool) -> None:
        require(self.workers >= 0, f"{key}.workers", f"must be >= 0, got {self.workers}")
        require(self.shuffle_buffer >= 0, f"{key}.shuffle_buffer", f"must be >= 0, got {self.shuffle_buffer}")
        require(training or self.mode == "epoch", f"{key}.mode", "evaluation reads each sample once (mode: epoch)")
        if self.sources:
            require(not self.urls, f"{key}.urls", f"give either {key}.urls or {key}.sources, not both")
            for name in ("samples", "index"):
                require(getattr(self, name) is None, f"{key}.{name}",
                        f"goes with {key}.urls; set it per source in {key}.sources")
            require(training, f"{key}.sources",
                    f"evaluation reads one list of shards: give {key}.urls (a list joins several)")
        for i, src in enumerate(self.sources):
            require(bool(src.urls), f"{key}.sources[{i}].urls", "is required (shard paths or brace pattern)")
            require(src.weight > 0, f"{key}.sources[{i}].weight", f"must be > 0, got {src.weight}")
            require(self.mode == "resampled" or src.weight == 1.0, f"{key}.sources[{i}].weight",
                    "weights apply in mode: resampled (epoch mode reads every sample once per epoch)")
        for i, src in enumerate([self, *self.sources]):
            where = key if i == 0 else f"{key}.sources[{i - 1}]"
            require(src.samples is None or src.samples > 0, f"{where}.samples", f"must be > 0, got {src.samples}")


@dataclass
class ModalityConfig:
    """One modality of a sample (``data.modalities.<name>``): the decoder that makes its tensor."""

    decoder: Optional[str] = None  # a registered decoder name; default: the modality's name
    members: list[str] = field(default_factory=list)  # names or .suffixes, by preference (default: the decoder's)
    required: bool = True  # absent: drop the sample (required) or a placeholder with mask False
    options: dict[str, Any] = field(default_factory=dict)  # the decoder's options

    def decoder_name(self, name: str) -> str:
        return self.decoder or name

    def member_list(self, name: str, key: str) -> tuple[str, ...]:
        """The member entries read, by preference (the decoder's own unless listed), matched by
        ``pretrain.member_names.MemberRule``: exact, then ``<name>.<entry>``, then a .suffix."""
        cls = DECODERS.get(self.decoder_name(name), f"{key}.decoder")
        members = tuple(m.lower() for m in (self.members or cls.members))
        if not members:
            raise ConfigError(f"{key}.members: decoder {self.decoder_name(name)!r} has no default members; "
                              f"list the tar members it reads (names such as emb.npy, or suffixes such as .npy)")
        for i, m in enumerate(members):
            problem = entry_problem(m)
            if problem:
                raise ConfigError(f"{key}.members[{i}]: {problem}")
        return members

    def check_modality(self, name: str, key: str) -> None:
        DECODERS.options(self.decoder_name(name), self.options, f"{key}.decoder", f"{key}.options")
        self.member_list(name, key)


@dataclass
class DataConfig:
    train: SplitConfig = field(default_factory=lambda: SplitConfig(shuffle_buffer=1000))
    val: SplitConfig = field(default_factory=SplitConfig)
    modalities: dict[str, ModalityConfig] = field(
        default_factory=lambda: {"image": ModalityConfig(decoder="image"), "text": ModalityConfig(decoder="text")}
    )
    labels: Optional[ModalityConfig] = field(
        default_factory=lambda: ModalityConfig(decoder="class_label", required=False)
    )  # class labels (Batch.labels, -1 where absent) for evaluation; null: none
    image_size: int = 32  # images are resized to image_size x image_size RGB
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    context_length: int = 32  # text tokens per sample (byte tokenizer, with BOS/EOS)
    imports: list[str] = field(default_factory=list)  # modules that register more decoders (or towers)
    max_member_bytes: int = 256 * 2**20  # larger tar members are skipped and counted
    max_consecutive_bad: int = 1000  # stop with an error after this many dropped samples in a row (0: never)
    bad_log_per_minute: int = 10  # log lines about bad samples, per process (the rest are only counted)
    retries: int = 3  # a remote shard read that fails or is cut is continued where it stopped up to this often (0: never)
    retry_backoff: float = 1.0  # seconds before the first retry, doubled for each next one (at most 30 s)

    def import_plugins(self, key: str = "data") -> None:
        """Imports ``data.imports`` (modules that register decoders or towers)."""
        for i, name in enumerate(self.imports):
            try:
                importlib.import_module(name)
            except Exception as err:  # noqa: BLE001 - named in the message
                raise ConfigError(f"{key}.imports[{i}]: cannot import {name!r}: {type(err).__name__}: {err}") from None

    def check(self, key: str = "data") -> None:
        require(bool(self.train.urls) or bool(self.train.sources), f"{key}.train.urls",
                f"is required (shard paths or brace pattern), or {key}.train.sources")
        self.train.check_split(f"{key}.train", training=True)
        self.val.check_split(f"{key}.val", training=False)
        require(self.image_size >= 8, f"{key}.image_size", f"must be >= 8, got {self.image_size}")
        require(self.context_length >= 4, f"{key}.context_length", f"must be >= 4, got {self.context_length}")
        for name in ("image_mean", "image_std"):
            require(len(getattr(self, name)) == 3, f"{key}.{name}", "must have 3 values (RGB)")
        require(bool(self.modalities), f"{key}.modalities", "needs at least one modality")
        require(self.max_member_bytes > 0, f"{key}.max_member_bytes", f"must be > 0, got {self.max_member_bytes}")
        require(self.max_consecutive_bad >= 0, f"{key}.max_consecutive_bad",
                f"must be >= 0, got {self.max_consecutive_bad}")
        require(self.bad_log_per_minute >= 0, f"{key}.bad_log_per_minute",
                f"must be >= 0, got {self.bad_log_per_minute}")
        require(self.retries >= 0, f"{key}.retries", f"must be >= 0, got {self.retries}")
        require(math.isfinite(self.retry_backoff) and self.retry_backoff >= 0, f"{key}.retry_backoff",
                f"must be a number of seconds >= 0, got {self.retry_backoff}")
        self.import_plugins(key)
        for name, modality in self.modalities.items():
            require(name.isidentifier() and not name.startswith("_"), f"{key}.modalities.{name}",
                    "a modality name must be an identifier (letters, digits, _) not starting with _")
            modality.check_modality(name, f"{key}.modalities.{name}")
        if self.labels is not None:
            self.labels.check_modality("labels", f"{key}.labels")
