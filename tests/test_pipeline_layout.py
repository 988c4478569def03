"""The data position on another layout (``Loader.load_layout``): a run saved at one number of ranks
and loader workers continues at another, and every sample of the epochs in progress is read exactly
once, then the next epoch follows the new layout; twice over, and in resampled mode."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from tests.helpers import data_config, deadline, flat, loader, take, text_shards

SIZES = [5, 6, 7, 4, 6, 5, 3]  # 36 samples in 7 shards of unequal size
KEYS = {f"s{s:02d}_{i:03d}" for s, n in enumerate(SIZES) for i in range(n)}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    return text_shards(tmp_path_factory.mktemp("text"), SIZES)


def _save(d, world: int, batches: int, batch: int = 3, states=None, epochs=None) -> tuple[list[str], list[dict]]:
    """``batches`` batches on every rank of ``world`` (from ``states`` of another layout, if given):
    the keys handed out and every rank's saved state (as JSON, as a checkpoint holds it)."""
    keys, saved = [], []
    for rank in range(world):
        ld = loader(d, rank=rank, world=world, batch=batch, epochs=epochs)
        if states is not None:
            ld.load_layout(states)
        keys += flat(take(iter(ld), batches))
        saved.append(json.loads(json.dumps(ld.state_dict())))
        ld.close()
    return keys, saved


def _rest(d, world: int, states: list[dict], epochs_after: int = 1, batch: int = 2) -> list[str]:
    """Everything the new layout reads from ``states`` to the end of the epochs in progress, and then
    ``epochs_after`` more epochs of its own."""
    first = loader(d, rank=0, world=world, batch=batch)
    first.load_layout(states)
    last = first.state_dict()["workers"][0]["epoch"]  # the new layout's own first epoch (F + 1)
    keys = []
    for rank in range(world):
        ld = loader(d, rank=rank, world=world, batch=batch, epochs=last + epochs_after)
        ld.load_layout(states)
        keys += flat(b.keys for b in ld)
    return keys, last


def _exactly(keys: list[str], times: int) -> None:
    counts = Counter(keys)
    assert set(counts) == KEYS, sorted(KEYS ^ set(counts))[:5]
    wrong = {k: n for k, n in counts.items() if n != times}
    assert not wrong, (times, dict(list(wrong.items())[:5]))


@pytest.mark.slow
def test_two_ranks_two_workers_continue_on_three_ranks_one_worker(shards):
    d2 = data_config({"urls": shards, "shuffle_buffer": 4, "workers": 2})
    d1 = data_config({"urls": shards, "shuffle_buffer": 4, "workers": 0})
    with deadline(120):
        # 2 ranks x 2 workers, 4 batches of 3 each: 24 of the 36 samples, some slots into epoch 1
        before, states = _save(d2, world=2, batches=4)
        after, last = _rest(d1, world=3, states=states)
    # every sample of the epochs in progress (0 .. last - 1) exactly once, then one epoch of the new layout
    _exactly(before + after, last + 1)


def test_a_second_change_mid_remainder_stays_exact(shards):
    """2 ranks -> 3 ranks (stopped while they still finish the old streams) -> 1 rank."""
    d = data_config({"urls": shards, "shuffle_buffer": 5, "workers": 0})
    a, first = _save(d, world=2, batches=5)
    b, second = _save(d, world=3, batches=1, batch=2, states=first)
    assert any(w.get("inherited") for s in second for w in s["workers"])  # stopped mid-remainder
    c, last = _rest(d, world=1, states=second, epochs_after=2)
    _exactly(a + b + c, last + 2)


def test_fewer_new_slots_and_a_resume_on_the_same_new_layout_are_exact(shards):
    """4 ranks -> 1: one slot reads what the four left; saved and resumed on that one rank midway,
    the same keys follow (the same-layout resume of a slot that still has inherited streams)."""
    d = data_config({"urls": shards, "shuffle_buffer": 3, "workers": 0})
    before, states = _save(d, world=4, batches=2)
    whole = loader(d, rank=0, world=1, batch=2)
    whole.load_layout(states)
    full = take(iter(whole), 16)
    whole.close()
    head_loader = loader(d, rank=0, world=1, batch=2)
    head_loader.load_layout(states)
    head = take(iter(head_loader), 5)
    saved = json.loads(json.dumps(head_loader.state_dict()))
    head_loader.close()
    tail_loader = loader(d, rank=0, world=1, batch=2)
    tail_loader.load_state_dict(saved)
    assert head + take(iter(tail_loader), 11) == full
    tail_loader.close()
    after, last = _rest(d, world=1, states=states)
    _exactly(before + after, last + 1)


def test_resampled_mode_continues_on_the_new_layout(tmp_path):
    a = text_shards(tmp_path / "a", [10] * 3, prefix="a", label=False)
    b = text_shards(tmp_path / "b", [20] * 2, prefix="b", label=False)
    d = data_config({"sources": [{"urls": a, "weight": 3.0}, {"urls": b, "weight": 1.0}],
                     "mode": "resampled", "shuffle_buffer": 4}, labels=None)
    _, states = _save(d, world=2, batches=3)
    runs = []
    for _ in range(2):  # the same states give the same stream on the new layout
        ld = loader(d, rank=1, world=3, batch=4)
        ld.load_layout(states)
        runs.append(take(iter(ld), 6))
        ld.close()
    assert runs[0] == runs[1] and len(flat(runs[0])) == 24


def test_another_seed_shard_list_or_mode_is_refused(shards):
    d = data_config({"urls": shards, "shuffle_buffer": 4})
    _, states = _save(d, world=2, batches=1)
    ld = loader(d, rank=0, world=3)
    assert ld.layout_changed(states[0])
    with pytest.raises(ValueError, match="seed changed"):
        loader(d, rank=0, world=3, seed=5).load_layout(states)
    with pytest.raises(ValueError, match="shards changed"):
        loader(data_config({"urls": shards[:-1], "shuffle_buffer": 4}), world=3).load_layout(states)
    with pytest.raises(ValueError, match="one per rank"):
        ld.load_layout(states[:1])


@pytest.mark.slow
def test_eight_ranks_two_workers_fewer_shards_than_slots_then_two_ranks(shards):
    """7 shards for 8 ranks x 2 workers = 16 slots (shards split inside): one epoch reads every
    sample exactly once; stopped after one batch per rank and continued on 2 ranks, still exact."""
    d = data_config({"urls": shards, "shuffle_buffer": 2, "workers": 2})
    with deadline(240):
        epoch = []
        for rank in range(8):
            epoch += flat(b.keys for b in loader(d, rank=rank, world=8, batch=1, epochs=1))
        _exactly(epoch, 1)
        before, states = _save(d, world=8, batches=1, batch=2)
        after, last = _rest(data_config({"urls": shards, "shuffle_buffer": 2, "workers": 0}), world=2, states=states)
    _exactly(before + after, last + 1)
