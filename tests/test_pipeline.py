"""The loader splits shards across ranks x workers, reshuffles per epoch, and fails loud when short."""
import pytest
import torch
from torch.utils.data import DataLoader

from pretrain.data import SampleDecoder, ShardStream, collate, expand_urls
from pretrain.tokenizer import ByteTokenizer
from tests.conftest import build, make_caption_dataset


@pytest.fixture(scope="module")
def urls(tmp_path_factory):
    base = tmp_path_factory.mktemp("pipe")
    build(make_caption_dataset(base / "raw", n=16), base / "s", shard_size=4)
    return expand_urls(str(base / "s" / "shard-{000000..000003}.tar"))


def _decoder():
    return SampleDecoder(8, [0.5] * 3, [0.5] * 3, ByteTokenizer(16))


def _keys(stream, n):
    it = iter(stream)
    return [next(it)["__key__"] for _ in range(n)]


def test_one_epoch_is_partitioned_across_ranks_and_workers(urls):
    seen = []
    for rank in range(2):
        loader = DataLoader(ShardStream(urls, _decoder(), rank, 2, seed=3, shuffle_buffer=3),
                            batch_size=2, num_workers=2, collate_fn=collate)
        it = iter(loader)
        # 8 samples per rank per epoch: 2 workers x 1 shard x 4 samples
        seen.append([k for _ in range(4) for k in next(it).keys])
    assert len(set(seen[0])) == 8 and len(set(seen[1])) == 8
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == 16


def test_order_is_seeded_and_epochs_reshuffle(urls):
    a = _keys(ShardStream(urls, _decoder(), 0, 1, seed=1, shuffle_buffer=5), 48)
    b = _keys(ShardStream(urls, _decoder(), 0, 1, seed=1, shuffle_buffer=5), 48)
    c = _keys(ShardStream(urls, _decoder(), 0, 1, seed=2, shuffle_buffer=5), 48)
    assert a == b and a != c
    epochs = [a[i:i + 16] for i in range(0, 48, 16)]
    assert all(sorted(e) == sorted(epochs[0]) for e in epochs)  # every epoch covers every sample once
    assert epochs[0] != epochs[1]


def test_too_few_shards_is_a_clear_error(urls):
    stream = ShardStream(urls[:1], _decoder(), rank=0, world_size=2)
    with pytest.raises(ValueError, match="1 shards cannot feed 2 ranks x 1 loader workers"):
        next(iter(stream))


def test_batch_shapes(urls):
    batch = next(iter(DataLoader(ShardStream(urls, _decoder(), 0, 1), batch_size=5, collate_fn=collate)))
    assert batch.modalities["image"].shape == (5, 3, 8, 8)
    assert batch.modalities["text"].shape == (5, 16) and batch.modalities["text"].dtype == torch.long
    assert batch.masks["image"].all() and len(batch.keys) == 5
    assert batch.labels is not None and batch.labels.shape == (5,)


def test_byte_tokenizer_round_trip_and_truncation():
    tok = ByteTokenizer(8)
    ids = tok.encode("héllo")
    assert ids.shape == (8,) and tok.decode(ids) == "héllo"
    long = tok.encode("a much longer caption")
    assert long[0] == 1 and long[-1] == 2 and tok.decode(long) == "a much"
