"""Webdataset streaming: shard URLs in, ``Batch`` objects out, with a saveable position.

- ``build_modalities(data, train)`` builds every modality's decoder once (``Modalities``);
- ``make_loader(split, modalities, data, batch_size, rank, world_size, seed, train)`` -> ``Loader``:
  iterate for ``Batch``; ``state_dict()`` / ``load_state_dict()`` for exact mid-epoch resume;
  ``metrics()`` for the bad-data counts.
- ``register_decoder(name)`` adds a decoder that configs can name (``data.modalities.<m>.decoder``).
- ``expand_urls``, ``open_url``: brace patterns and any shard URL (local, pipe:, http(s), fsspec).
- ``DataConfig`` (``pretrain.data.config``): the ``data`` section of a recipe.
"""
from pretrain.data.config import DataConfig, ModalityConfig, SourceConfig, SplitConfig
from pretrain.data.decoders import (
    DECODERS,
    AudioDecoder,
    ClassLabelDecoder,
    Decoder,
    DecoderContext,
    DecodeError,
    ImageDecoder,
    JsonFieldsDecoder,
    Modalities,
    Modality,
    NpyDecoder,
    TextDecoder,
    build_modalities,
    decoder_names,
    mel_filterbank,
    register_decoder,
)
from pretrain.data.pipeline import Batch, BatchStream, Loader, StreamSpec, collate, make_loader, slot_plan
from pretrain.data.sources import DataSourceError, expand_urls, open_url, resolve_split
from pretrain.data.tarstream import iter_shard
from pretrain.member_names import REFUSED_EXTENSIONS

__all__ = [
    "AudioDecoder", "Batch", "BatchStream", "ClassLabelDecoder", "DECODERS", "DataConfig", "DataSourceError",
    "DecodeError", "Decoder", "DecoderContext", "ImageDecoder", "JsonFieldsDecoder", "Loader", "Modalities",
    "Modality", "ModalityConfig", "NpyDecoder", "REFUSED_EXTENSIONS", "SourceConfig", "SplitConfig", "StreamSpec",
    "TextDecoder", "build_modalities", "collate", "decoder_names", "expand_urls", "iter_shard", "make_loader",
    "mel_filterbank", "open_url", "register_decoder", "resolve_split", "slot_plan",
]
