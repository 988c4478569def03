"""The data pipeline's stream: partition, order, exact resume, weights, few shards, counts, URLs.

Real tar shards are written here (``write_shard``) in webdataset layout, with an ``index.json`` in
the shard CLI's format; loaders run real DataLoader worker processes where a test says so.
"""
from __future__ import annotations

import functools
import http.server
import json
import math
import threading
from pathlib import Path

import pytest
import torch

from pretrain.data import DataConfig, DataSourceError, slot_plan
from pretrain.data.pipeline import StreamSpec
from pretrain.data.sources import ShardRef, SourceInfo
from pretrain.options import ConfigError
from pretrain.tokenizer import ByteTokenizer
from tests.helpers import data_config, deadline, flat, loader, png_bytes, take, text_shards, write_index, write_shard

SIZES = [5, 6, 7, 4, 6, 5, 3]  # 36 samples in 7 shards of unequal size


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    return text_shards(tmp_path_factory.mktemp("text"), SIZES)


def all_keys(sizes=SIZES, prefix="s"):
    return {f"{prefix}{s:02d}_{i:03d}" for s, n in enumerate(sizes) for i in range(n)}


# ------------------------------------------------------------------------------- partition, order


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_one_epoch_gives_every_sample_to_exactly_one_rank_and_worker(shards, workers):
    d = data_config({"urls": shards, "shuffle_buffer": 4, "workers": workers})
    seen = []
    for rank in range(2):
        with deadline(60):
            seen.append(flat(b.keys for b in loader(d, rank=rank, world=2, batch=2, epochs=1)))
    assert len(seen[0]) == len(set(seen[0])) and len(seen[1]) == len(set(seen[1]))
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == all_keys()


def test_same_config_same_order_and_epochs_reshuffle(shards):
    d = data_config({"urls": shards, "shuffle_buffer": 8})
    a = flat(take(iter(loader(d, seed=1)), 36))  # 108 samples: 3 epochs of 36
    b = flat(take(iter(loader(d, seed=1)), 36))
    c = flat(take(iter(loader(d, seed=2)), 36))
    assert a == b and a != c
    epochs = [a[i:i + 36] for i in range(0, 108, 36)]
    assert all(sorted(e) == sorted(all_keys()) for e in epochs)  # each epoch: every sample once
    assert epochs[0] != epochs[1] != epochs[2]
    # shard order in shard-order mode (no window) is still reshuffled per epoch, samples in order inside
    e = flat(take(iter(loader(data_config({"urls": shards, "shuffle_buffer": 0}))), 12))
    first_shard = e[0][:3]
    assert e[: SIZES[int(first_shard[1:])]] == sorted(k for k in all_keys() if k.startswith(first_shard + "_"))


def test_window_shuffle_mixes_across_shards(shards):
    d = data_config({"urls": shards, "shuffle_buffer": 36})
    keys = flat(take(iter(loader(d)), 12))
    runs = sum(1 for x, y in zip(keys, keys[1:]) if x[:3] == y[:3])
    assert runs < 12  # a whole-epoch window: consecutive samples rarely share a shard


# ------------------------------------------------------------------------------------ exact resume


def _resume_check(d: DataConfig, rank: int, total: int, cuts: list[int], batch: int = 3):
    whole = loader(d, rank=rank, world=2, batch=batch)
    full = take(iter(whole), total)
    whole.close()  # shut its workers down now: a loader left to the garbage collector waits 5 s per worker
    for cut in cuts:
        first = loader(d, rank=rank, world=2, batch=batch)
        head = take(iter(first), cut)
        state = json.loads(json.dumps(first.state_dict()))  # plain JSON: saved per rank in the checkpoint
        first.close()
        second = loader(d, rank=rank, world=2, batch=batch)
        second.load_state_dict(state)
        tail = take(iter(second), total - cut)
        second.close()
        assert head + tail == full, (rank, cut)
    return full


@pytest.mark.slow
def test_resume_is_exact_at_two_ranks_two_workers(shards):
    d = data_config({"urls": shards, "shuffle_buffer": 5, "workers": 2})
    fulls = []
    with deadline(150):
        for rank in range(2):
            # 30 batches of 3 per rank cross ~5 epochs; cuts at odd and even batch counts (the next
            # worker differs), inside a window, and after an epoch boundary
            fulls.append(_resume_check(d, rank, total=30, cuts=[1, 4, 7, 17]))
    # the two ranks' first epochs are disjoint
    assert not set(flat(fulls[0][:5])) & set(flat(fulls[1][:5]))


@pytest.mark.slow
def test_resume_is_exact_in_resampled_mode_with_weights(tmp_path):
    a = text_shards(tmp_path / "a", [6, 6, 6], prefix="a")
    b = text_shards(tmp_path / "b", [9, 9], prefix="b")
    d = data_config({"sources": [{"urls": a, "weight": 2.0}, {"urls": b, "weight": 1.0}], "mode": "resampled",
                     "shuffle_buffer": 4, "workers": 2})
    with deadline(120):
        for rank in range(2):
            _resume_check(d, rank, total=20, cuts=[3, 10])


def test_an_abandoned_iteration_shuts_its_workers_down_at_once(shards):
    """Dropping the last reference to an iteration (a loop left early) ends its worker processes
    right away, with no help from the cyclic garbage collector: were the loader to hold its
    iteration strongly (a cycle), the collector would close it later, after multiprocessing's queue
    finalizers, and DataLoader would wait out 5 s per worker that never heard the shutdown."""
    import gc
    import multiprocessing

    before = {p.pid for p in multiprocessing.active_children()}
    gc.disable()  # only reference counting may end the iteration here
    try:
        kept = loader(data_config({"urls": shards, "shuffle_buffer": 5, "workers": 2}))
        it = iter(kept)
        take(it, 3)
        assert len({p.pid for p in multiprocessing.active_children()} - before) == 2  # its two workers
        del it  # the loader itself is kept: its state stays readable
        assert {p.pid for p in multiprocessing.active_children()} - before == set()
        assert kept.state_dict()["batches"] == 3
        take(iter(loader(data_config({"urls": shards, "workers": 2}))), 2)  # loader and iteration dropped at once
        assert {p.pid for p in multiprocessing.active_children()} - before == set()
    finally:
        gc.enable()


def test_state_is_taken_between_batches_of_a_live_iteration(shards):
    d = data_config({"urls": shards, "shuffle_buffer": 5})
    ref = take(iter(loader(d)), 10)
    live = loader(d)
    it = iter(live)
    head = take(it, 4)
    state = live.state_dict()
    head += take(it, 6)  # iteration goes on after the state was taken
    assert head == ref
    other = loader(d)
    other.load_state_dict(state)
    assert take(iter(other), 6) == ref[4:]
    assert state["batches"] == 4 and state["next_worker"] == 0 and len(state["workers"]) == 1


def test_resume_restores_decoder_randomness_and_leaves_global_rngs_alone(tmp_path):
    samples = [(f"k{i:02d}", {"png": png_bytes(i, (12, 10)),
                              "json": json.dumps([f"caption {i} a", f"caption {i} b", f"caption {i} c"]).encode()})
               for i in range(12)]
    url = str(write_shard(tmp_path / "s-000000.tar", samples))
    write_index(tmp_path, {"s-000000.tar": 12})
    d = data_config({"urls": url, "shuffle_buffer": 4},
                    modalities={"image": {"decoder": "image", "options": {"augment": {"scale": [0.5, 1.0]}}},
                                "text": {"decoder": "text"}}, image_size=8)
    ref_loader = loader(d, batch=2)
    it = iter(ref_loader)
    torch.manual_seed(123)
    want_rand = torch.rand(3)
    torch.manual_seed(123)
    ref = [next(it) for _ in range(8)]
    assert torch.equal(torch.rand(3), want_rand)  # the main process's generator did not move
    first = loader(d, batch=2)
    it = iter(first)
    for _ in range(3):
        next(it)
    second = loader(d, batch=2)
    second.load_state_dict(first.state_dict())
    it = iter(second)
    for want in ref[3:]:
        got = next(it)
        assert got.keys == want.keys
        assert torch.equal(got.modalities["image"], want.modalities["image"])  # same augmentation
        assert torch.equal(got.modalities["text"], want.modalities["text"])  # same caption choice
    texts = {ByteTokenizer(24).decode(t) for b in ref for t in b.modalities["text"]}
    assert any(t.endswith(" b") or t.endswith(" c") for t in texts)  # training picks among the captions


def test_load_state_dict_refuses_another_setup(shards):
    d = data_config({"urls": shards, "shuffle_buffer": 5})
    src = loader(d, rank=0, world=2)
    next(iter(src))
    state = src.state_dict()
    with pytest.raises(ValueError, match="rank changed"):
        loader(d, rank=1, world=2).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size changed"):
        loader(d, rank=0, world=2, batch=4).load_state_dict(state)
    with pytest.raises(ValueError, match="num_workers changed"):
        loader(data_config({"urls": shards, "shuffle_buffer": 5, "workers": 2}), world=2).load_state_dict(state)
    with pytest.raises(ValueError, match="shards changed"):
        loader(data_config({"urls": shards[:-1], "shuffle_buffer": 5}), world=2).load_state_dict(state)
    with pytest.raises(ValueError, match="not a data loader state"):
        loader(d).load_state_dict({"step": 3})


def test_a_finite_loader_starts_a_new_pass_each_time(shards):
    d = data_config({"urls": shards}, val={"urls": shards})
    val = loader(d, train=False, batch=5)
    a, b = [flat(x.keys for x in val) for _ in range(2)]
    assert a == b and sorted(a) == sorted(all_keys())
    assert [len(x) for x in val][-1] == 36 % 5  # the last batch of a pass may be short


# ---------------------------------------------------------------------------------------- weights


def test_resampled_weights_give_sample_frequencies(tmp_path):
    """Source a: 4 shards x 10 samples, weight 3; source b: 2 shards x 20 samples, weight 1. The
    samples must follow 3:1 (drawing *shards* 3:1 would give b 40% of the samples)."""
    a = text_shards(tmp_path / "a", [10] * 4, prefix="a", label=False)
    b = text_shards(tmp_path / "b", [20] * 2, prefix="b", label=False)
    d = data_config({"sources": [{"urls": a, "weight": 3.0}, {"urls": b, "weight": 1.0}],
                     "mode": "resampled", "shuffle_buffer": 0}, labels=None)
    keys = flat(take(iter(loader(d, batch=25)), 640))  # 16,000 samples
    frac_b = sum(k.startswith("b") for k in keys) / len(keys)
    # b arrives in whole shards of 20, drawn with probability 1/7 (weight / mean shard size):
    # its share has the binomial variance of the number of b draws
    draws = len(keys) / (10 * 6 / 7 + 20 * 1 / 7)
    se = math.sqrt(draws * (1 / 7) * (6 / 7)) * 20 / len(keys)
    assert abs(frac_b - 0.25) < 3 * se, (frac_b, se)
    assert abs(frac_b - 0.40) > 3 * se, (frac_b, se)
    # every shard of a source is drawn (uniformly within the source)
    assert {k[:3] for k in keys} == {"a00", "a01", "a02", "a03", "b00", "b01"}


def test_weights_need_resampled_mode(shards):
    with pytest.raises(ConfigError, match=r"^data\.train\.sources\[1\]\.weight: weights apply in mode: resampled"):
        data_config({"sources": [{"urls": shards[:3]}, {"urls": shards[3:], "weight": 2.0}]})
    with pytest.raises(ConfigError, match=r"^data\.train\.urls: give either"):
        data_config({"urls": shards, "sources": [{"urls": shards}]})


# ------------------------------------------------------------------------------ fewer shards than slots


@pytest.mark.slow
def test_fewer_shards_than_ranks_times_workers_splits_inside_shards(tmp_path):
    """3 shards (and 1 shard) for 2 ranks x 2 workers = 4 streams: no hang, every stream gets data,
    and one epoch still gives every sample exactly once."""
    for sizes in ([5, 6, 7], [9]):
        urls = text_shards(tmp_path / f"n{len(sizes)}", sizes)
        d = data_config({"urls": urls, "shuffle_buffer": 3, "workers": 2})
        seen = []
        with deadline(60):
            for rank in range(2):
                seen.extend(flat(b.keys for b in loader(d, rank=rank, world=2, batch=1, epochs=1)))
                # endless training mode makes batches on every rank
                live = iter(loader(d, rank=rank, world=2, batch=2))
                assert len(take(live, 6)) == 6
                live.close()
        assert sorted(seen) == sorted(all_keys(sizes)), sizes


def test_shard_plans_cover_every_sample_once_for_any_shape():
    for n in (1, 2, 3, 5, 8, 13):
        for world, workers in ((1, 1), (2, 2), (3, 2), (4, 4)):
            spec = StreamSpec([ShardRef(f"{i}", 0, 10) for i in range(n)], [SourceInfo("x", 1, 0, n, 10 * n, "")],
                              seed=3, world_size=world)
            owners: dict[tuple[int, int], int] = {}
            for r in range(world):
                for w in range(workers):
                    spec.rank = r
                    plan = slot_plan(spec, 2, w, workers)
                    assert plan, (n, world, workers)  # every stream has something to read
                    for shard, k, j in plan:
                        for i in range(10):
                            if i % k == j:
                                assert (shard, i) not in owners
                                owners[(shard, i)] = r
            assert len(owners) == 10 * n


# --------------------------------------------------------------------------------- sample counts


def test_counts_from_index_sizes_or_explicit_and_a_clear_error(tmp_path):
    # the shard CLI's split layout: index.json one folder up, names "train/shard-...tar"
    root = tmp_path / "built"
    urls = text_shards(root / "train", [4, 5])
    (root / "train" / "index.json").unlink()
    write_index(root, {"train/s-000000.tar": 4, "train/s-000001.tar": 5})
    l = loader(data_config({"urls": urls}))
    assert l.epoch_samples == 9 and "index.json" in l.describe()
    # OpenCLIP's sizes.json
    (root / "index.json").unlink()
    (root / "train" / "sizes.json").write_text(json.dumps({"s-000000.tar": 4, "s-000001.tar": 5}))
    assert loader(data_config({"urls": urls})).epoch_samples == 9
    # an explicit index anywhere (here read through a pipe: URL), or an explicit number
    (root / "train" / "sizes.json").rename(tmp_path / "elsewhere.json")
    assert loader(data_config({"urls": urls, "index": f"pipe:cat {tmp_path / 'elsewhere.json'}"})).epoch_samples == 9
    assert loader(data_config({"urls": urls, "samples": 1000})).epoch_samples == 1000
    # none: local shards are counted from their tar headers (tests/test_data_formats.py: and remote ones stop
    # training with a message); evaluation does not need counts
    assert loader(data_config({"urls": urls})).epoch_samples == 9
    d = data_config({"urls": urls, "samples": 9}, val={"urls": urls})
    assert sorted(flat(b.keys for b in loader(d, train=False))) == sorted(all_keys([4, 5]))
    with pytest.raises(DataSourceError, match=r"data\.train\.urls: no such shard: .*missing\.tar"):
        loader(data_config({"urls": urls + [str(tmp_path / "missing.tar")], "samples": 9}))


def _keys_for(urls, **extra):
    return flat(take(iter(loader(data_config({"urls": urls, "shuffle_buffer": 0, "samples": 36, **extra}))), 12))


def test_urls_by_pipe_file_and_fsspec(shards):
    import fsspec

    want = flat(take(iter(loader(data_config({"urls": shards, "shuffle_buffer": 0}))), 12))
    assert _keys_for([f"pipe:cat {u}" for u in shards]) == want
    assert _keys_for([f"file://{u}" for u in shards]) == want
    mem = fsspec.filesystem("memory")
    for u in shards:
        mem.pipe(f"/pipeline-test/{Path(u).name}", Path(u).read_bytes())
    assert _keys_for([f"memory://pipeline-test/{Path(u).name}" for u in shards]) == want
    assert _keys_for("::".join(shards)) == want  # OpenCLIP's way of joining patterns


def test_urls_by_http(shards):
    want = flat(take(iter(loader(data_config({"urls": shards, "shuffle_buffer": 0}))), 12))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(Path(shards[0]).parent))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        pattern = base + "/s-{000000..000006}.tar"
        assert _keys_for(pattern) == want
        # counts through the same kind of URL: the index beside the shards on the server
        assert loader(data_config({"urls": pattern, "index": base + "/index.json"})).epoch_samples == 36
        # a missing shard is counted (unreadable), the others are read
        d = data_config({"urls": [base + "/nope.tar"] + shards, "samples": 36, "shuffle_buffer": 0})
        l = loader(d, epochs=1)
        assert sorted(flat(b.keys for b in l)) == sorted(all_keys())
        assert l.metrics()["data/skipped/unreadable_shard"] == 1
    finally:
        server.shutdown()
