"""Webdataset streaming: shard URLs in, ``Batch`` objects out."""
from pretrain.data.pipeline import Batch, SampleDecoder, ShardStream, collate, expand_urls, make_loader

__all__ = ["Batch", "SampleDecoder", "ShardStream", "collate", "expand_urls", "make_loader"]
