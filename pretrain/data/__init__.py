"""Webdataset streaming: shard URLs in, ``Batch`` objects out, with a saveable position.

- ``make_loader(split, data, batch_size, rank, world_size, seed, train)`` -> ``Loader``: iterate
  for ``Batch``; ``state_dict()`` / ``load_state_dict()`` for exact mid-epoch resume;
  ``metrics()`` for the bad-data counts.
- ``register_decoder(name)`` adds a decoder that configs can name (``data.modalities.<m>.decoder``).
- ``expand_urls``, ``open_url``: brace patterns and any shard URL (local, pipe:, http(s), fsspec).
"""
from pretrain.data.decoders import (
    AudioDecoder,
    ClassLabelDecoder,
    Decoder,
    DecoderContext,
    DecodeError,
    ImageDecoder,
    JsonFieldsDecoder,
    NpyDecoder,
    TextDecoder,
    decoder_names,
    mel_filterbank,
    register_decoder,
)
from pretrain.data.pipeline import (
    Batch,
    BatchStream,
    Loader,
    SampleDecoder,
    ShardStream,
    StreamSpec,
    build_modalities,
    collate,
    make_loader,
    slot_plan,
)
from pretrain.data.sources import DataSourceError, expand_urls, open_url, resolve_split
from pretrain.data.tarstream import REFUSED_EXTENSIONS, iter_shard

__all__ = [
    "AudioDecoder", "Batch", "BatchStream", "ClassLabelDecoder", "DataSourceError", "DecodeError", "Decoder",
    "DecoderContext", "ImageDecoder", "JsonFieldsDecoder", "Loader", "NpyDecoder", "REFUSED_EXTENSIONS",
    "SampleDecoder", "ShardStream", "StreamSpec", "TextDecoder", "build_modalities", "collate", "decoder_names",
    "expand_urls", "iter_shard", "make_loader", "mel_filterbank", "open_url", "register_decoder",
    "resolve_split", "slot_plan",
]
