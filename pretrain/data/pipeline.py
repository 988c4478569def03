"""Shard URLs -> decoded samples -> ``Batch`` for one rank, with an exact, saveable position.

How a rank's stream is made
---------------------------
Each rank runs ``W = max(1, data.<split>.workers)`` streams (DataLoader worker processes); stream
``w`` of rank ``r`` is *slot* ``r * W + w`` of ``world_size * W`` slots. Per slot and epoch:

1. A shard plan. Epoch mode: the split's shard list is shuffled by (seed, epoch), the same on
   every rank, and slot ``s`` takes shards ``s, s + slots, ...``, so every sample of an epoch goes
   to exactly one slot. With fewer shards than slots, shards are split inside: the ``k`` slots
   that share a shard each keep every ``k``-th sample of it (each reads the whole shard; no slot is
   left without data and nothing hangs). Resampled mode: each slot draws ``ceil(shards / slots)``
   shards per (nominal) epoch with replacement, seeded by (seed, epoch, rank, worker): a source
   with probability proportional to ``weight / mean samples per shard`` (so the *samples* follow
   the weights), then a shard of it uniformly.
2. Raw samples are read in order from the plan (``tarstream``: safe, nothing unpickled) and
   permuted in windows of ``shuffle_buffer`` samples by a generator seeded from (seed, epoch,
   rank, worker, window). A window (rather than webdataset's reservoir buffer) keeps the stream's
   position a handful of integers, which is what makes an exact resume cheap.
3. Samples are decoded per modality (``decoders``) as they leave the window, and batched in the
   worker. Decoder randomness (augmentation, caption choice, audio crop) is seeded per batch from
   (seed, rank, worker, batch number). Bad samples are dropped (or masked) and counted by reason.

The loader's position
---------------------
Every batch travels with the state of its slot *after* that batch: (epoch, window, where the
window starts in the plan, how many of its samples were passed on, batches made, counters). Where
the window starts is a shard of the plan, the samples of it already passed on, and the byte offset
of the tar header where the next of them begins (``tar_byte``, with that sample's index in the
shard, ``tar_sample``; 0, 0 where unknown: a compressed tar, or a state saved before byte offsets).
The ``Loader`` keeps the state of the last batch it handed out per slot and which worker comes
next (the DataLoader takes batches from its workers in turn). ``Loader.state_dict()`` returns that as
plain JSON-compatible data; ``load_state_dict()`` on a loader built with the same config, rank,
world size and workers makes the next ``iter()`` continue exactly where the saved one stopped:
each worker re-reads at most its current window from the shard where it starts (from that byte
offset: a seek, or a Range request for a remote shard; without decoding what was already passed
on), and worker roles are rotated so the batch order continues.

Retried reads
-------------
A remote shard read that fails or is cut mid-stream (``data.retries``, ``data.retry_backoff``) is
continued from the same kind of position the resume uses: the byte offset and index of the first
sample not yet passed on (``tarstream.iter_shard``); so nothing is read twice or lost, and only a
read whose retries are spent counts as ``data/skipped/corrupt_tar`` or ``unreadable_shard``. Each
retry adds one to the slot state's ``retries`` (``data/retries``).

On another layout
-----------------
``load_layout(states)`` takes every rank's saved state of another number of ranks or workers (or
batch size) and gives this rank its share of what is left, by one rule (``relayout``):

- epoch mode: each old slot's stream is a *virtual stream* (its old rank, worker and layout, and its
  position). Let F be the last epoch any old stream has started reading. Every virtual stream
  continues, with its old identity (so its shard plan and window order are the ones it had), to
  the end of epoch F; the virtual streams are dealt to the new slots in turn (stream i to slot
  i mod slots) and each new slot reads its virtual streams first, then its own stream from epoch
  F + 1 on. So every sample of the epochs in progress is read exactly once (what sat in prefetch
  queues and shuffle windows was never handed out, so it is read then), and later epochs follow
  the new layout. A slot that had itself inherited streams passes them on unchanged; done again,
  the rule stays exact.
- resampled mode: the new slots start their own streams at epoch F + 1 (shards drawn as always
  from (seed, epoch, rank, worker)), so the stream continues from the seed and where it was.

The bad-data counts of the old slots go to the new rank 0's first slot (the run's totals stay).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import json
import logging
import math
import random
import time
import weakref
from array import array
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import numpy.random  # noqa: F401 - imported before workers fork: DataLoader workers seed it, and a
import torch  # first import inside a forked child can trip over an import lock held at fork time
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pretrain.data.config import DataConfig, SplitConfig
from pretrain.data.decoders import DecodeError, Modalities, Modality, pack_ragged, packed_size
from pretrain.data.sources import ShardRef, SourceInfo, SplitSources, resolve_split
from pretrain.data.tarstream import RawSample, Retry, count_samples, iter_shard
from pretrain.member_names import WantedMembers

log = logging.getLogger("pretrain.data")

STATE_FORMAT = "pretrain.data.loader/1"


@dataclass
class Batch:
    """One micro-batch: a tensor per modality, a presence mask per modality, the sample keys."""

    modalities: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    keys: list[str]
    labels: Optional[torch.Tensor] = None  # class labels, -1 where a sample has none; None without data.labels
    epochs: Optional[list[int]] = None  # the epoch each sample was read in (the training loader's)

    def __len__(self) -> int:
        return len(self.keys)

    def pin_memory(self) -> "Batch":
        """The batch in page-locked memory (the DataLoader calls it with ``pin_memory``), so the
        step's copies to the GPU run asynchronously (``non_blocking``)."""
        pin = lambda d: {k: v.pin_memory() for k, v in d.items()}  # noqa: E731
        return Batch(pin(self.modalities), pin(self.masks), self.keys,
                     None if self.labels is None else self.labels.pin_memory(), self.epochs)


def collate(samples: list[dict], names: Optional[list[str]] = None, ragged: frozenset[str] = frozenset()) -> Batch:
    """Decoded sample dicts (``__key__``, one tensor per modality, optional ``__masks__`` and
    ``__label__``/``label``) -> ``Batch``. ``ragged``: modalities whose rows differ in length (packed
    into one tensor by ``decoders.pack_ragged``)."""
    if names is None:
        names = [k for k in samples[0] if not k.startswith("__") and k != "label"]
    mods = {m: (_pack if m in ragged else _stack)([s[m] for s in samples]) for m in names}
    masks = {m: torch.tensor([s.get("__masks__", {}).get(m, True) for s in samples], dtype=torch.bool) for m in names}
    labels = None
    if any("__label__" in s or "label" in s for s in samples):
        labels = torch.tensor([s.get("__label__", s.get("label", -1)) for s in samples], dtype=torch.long)
    epochs = [s["__epoch__"] for s in samples] if all("__epoch__" in s for s in samples) else None
    return Batch(mods, masks, [s["__key__"] for s in samples], labels, epochs)


def _stack(rows: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack``; in a loader worker straight into shared memory, as torch's default_collate
    does: the DataLoader would otherwise copy the batch there once more to send it."""
    out = None
    if get_worker_info() is not None:
        first = rows[0]
        storage = first._typed_storage()._new_shared(sum(x.numel() for x in rows), device=first.device)
        out = first.new(storage).resize_(len(rows), *first.shape)
    return torch.stack(rows, out=out)


def _pack(rows: list[torch.Tensor]) -> torch.Tensor:
    """``pack_ragged``; in a loader worker straight into shared memory (as ``_stack``)."""
    out = None
    if get_worker_info() is not None:
        out = torch.empty(0, dtype=torch.uint8)
        out.set_(torch.UntypedStorage._new_shared(packed_size(rows)), 0, (packed_size(rows),), (1,))
    return pack_ragged(rows, out=out)


# ----------------------------------------------------------------------------------- the loader


def make_loader(
    split: SplitConfig,
    modalities: Modalities,
    data: DataConfig,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    train: bool,
    *,
    epochs: Optional[int] = None,
) -> Loader:
    """The loader of one rank. Training: endless (epoch after epoch, or resampled), shuffled,
    sample counts required. Evaluation (``train=False``): one pass in shard order, the last batch
    may be short. ``epochs`` overrides the number of passes (None: endless when training).
    ``modalities``: the built decoders (``build_modalities(data, train)``)."""
    key = "data.train" if train else "data.val"
    sources = resolve_split(split, key, need_counts=train, count=count_samples)
    spec = StreamSpec(
        shards=sources.shards,
        sources=sources.sources,
        mode=split.mode if train else "epoch",
        shuffle=train,
        window=split.shuffle_buffer if train else 0,
        seed=seed,
        rank=rank,
        world_size=world_size,
        epochs=epochs if epochs is not None else (None if train else 1),
        max_member_bytes=data.max_member_bytes,
        retries=data.retries,
        retry_backoff=data.retry_backoff,
    )
    stream = BatchStream(spec, SampleDecoding(modalities.items, modalities.label), batch_size, split.workers,
                         data.max_consecutive_bad, data.bad_log_per_minute)
    return Loader(stream, split.workers, sources, key)


def _identity(x):
    return x


class Loader:
    """What ``make_loader`` returns: iterate it for ``Batch`` objects; save and restore its
    position with ``state_dict()`` / ``load_state_dict()``.

    - ``iter(loader)`` starts (worker processes and all) from the current position: the start, a
      restored state, or just after the last batch handed out (a finite loader that ran to its end
      starts a new pass). Only one iteration is live at a time: a new ``iter()`` or
      ``load_state_dict()`` ends the previous one.
    - ``state_dict()``: JSON-compatible; the position after the last batch handed out, per rank
      (save one per rank). ``load_state_dict(state)`` checks that it belongs to this rank, world
      size, worker count, batch size, seed, mode, shuffle window and shard list, and raises
      ``ValueError`` naming the difference otherwise.
    - ``metrics(all_ranks=False)``: bad-data counts (``data/skipped/<reason>``,
      ``data/dropped_samples``) and retried reads (``data/retries``); with ``all_ranks=True`` summed
      over the process group (a collective: call it on every rank).
    """

    def __init__(self, dataset: BatchStream, num_workers: int, sources: SplitSources, key: str,
                 prefetch_factor: int = 2):
        self.dataset, self.num_workers, self.sources, self.key = dataset, num_workers, sources, key
        self.prefetch_factor = prefetch_factor
        self._slots = dataset.num_workers
        self._states: list[Optional[dict]] = [None] * self._slots
        self._next = 0
        self._batches = 0
        # the live iteration, weakly: the generator's frame holds this loader, so a strong reference
        # would make a cycle, and an abandoned iteration would then be closed by the cyclic collector,
        # which runs multiprocessing's queue finalizers first: the workers never hear the shutdown and
        # DataLoader waits 5 s per worker. Held weakly, it is closed as soon as its iterator is dropped.
        self._active: Optional[weakref.ref] = None
        self._exhausted = False
        spec = dataset.spec
        self._fingerprint = sources.digest()  # sha256 of json.dumps(sources.fingerprint())
        self.epoch_samples = sources.total_samples
        self.batches_per_epoch = (
            None if sources.total_samples is None else sources.total_samples // (spec.world_size * dataset.batch_size)
        )

    # -- iteration
    def __iter__(self) -> Iterator[Batch]:
        self.close()
        if self._exhausted:
            self._states, self._next, self._batches, self._exhausted = [None] * self._slots, 0, 0, False
        active = self._generate()
        self._active = weakref.ref(active)
        return active

    def _generate(self) -> Iterator[Batch]:
        ds = copy.copy(self.dataset)
        ds.start_states = [None if s is None else _copy_state(s) for s in self._states]
        ds.rotation = self._next
        if self.num_workers > 0:
            ds.warm_plans()  # before the workers fork: they share the epoch's shard order
        kwargs: dict[str, Any] = {}
        if self.num_workers > 0:
            kwargs["prefetch_factor"] = self.prefetch_factor
        # its own generator: the DataLoader draws a base seed per iteration (unused here), which
        # would otherwise move the training process's global generator at every resume
        dl = DataLoader(ds, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                        generator=torch.Generator().manual_seed(0), pin_memory=torch.cuda.is_available(), **kwargs)
        it = iter(dl)
        try:
            for batch, worker, state in it:
                self._states[worker] = state
                if batch is None:  # a finite stream's last word: its final counts
                    continue
                self._next = (worker + 1) % self._slots
                self._batches += 1
                yield batch
            self._exhausted = True  # a finite stream ran to its end: the next iter() is a new pass
        finally:
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            del it

    def close(self) -> None:
        active = self._active() if self._active is not None else None
        if active is not None:
            active.close()
        self._active = None

    # -- position
    def _identity_fields(self) -> dict:
        spec = self.dataset.spec
        return {
            "rank": spec.rank,
            "world_size": spec.world_size,
            "num_workers": self._slots,
            "batch_size": self.dataset.batch_size,
            "seed": spec.seed,
            "mode": spec.mode,
            "shuffle_buffer": spec.window if spec.shuffle else 0,
            "shards": self._fingerprint,
        }

    def state_dict(self) -> dict:
        return {
            "format": STATE_FORMAT,
            **self._identity_fields(),
            "batches": self._batches,
            "next_worker": self._next,
            "workers": [_copy_state(s) if s is not None else new_slot_state() for s in self._states],
        }

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a data loader state (format {state.get('format') if isinstance(state, dict) else None!r})")
        mine = self._identity_fields()
        for k, v in mine.items():
            if state.get(k) != v:
                what = "the shard list or source weights differ" if k == "shards" else f"saved {state.get(k)!r}, now {v!r}"
                raise ValueError(f"{self.key}: cannot resume the data position: {k} changed ({what})")
        workers = state["workers"]
        if len(workers) != self._slots:
            raise ValueError(f"{self.key}: saved state has {len(workers)} worker states, loader has {self._slots}")
        self.close()
        self._states = [_copy_state(w) for w in workers]
        self._next = int(state["next_worker"])
        self._batches = int(state["batches"])
        self._exhausted = False

    def layout_changed(self, state: dict) -> bool:
        """Whether a saved state of this rank comes from another layout: world size, workers or
        batch size (``load_layout`` continues it; ``load_state_dict`` refuses it)."""
        mine = self._identity_fields()
        return any(state.get(k) != mine[k] for k in ("world_size", "num_workers", "batch_size"))

    def load_layout(self, states: list[dict]) -> None:
        """Continues from every rank's saved state of another layout (``relayout``: the rule in the
        module docstring). Seed, mode, shuffle window and shard list must be the same."""
        mine = self._identity_fields()
        for state in states:
            if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
                raise ValueError(f"not a data loader state (format {state.get('format') if isinstance(state, dict) else None!r})")
            for k in ("seed", "mode", "shuffle_buffer", "shards"):
                if state.get(k) != mine[k]:
                    what = "the shard list or source weights differ" if k == "shards" else f"saved {state.get(k)!r}, now {mine[k]!r}"
                    raise ValueError(f"{self.key}: cannot resume the data position on a new layout: {k} changed ({what})")
        spec = self.dataset.spec
        self.close()
        self._states = relayout(states, spec.rank, spec.world_size, self._slots)
        self._next = 0
        self._batches = 0
        self._exhausted = False

    # -- counters
    def counters(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for s in self._states:
            if s is None:
                continue
            for k, v in s["counters"].items():
                total[k] = total.get(k, 0) + v
            total["dropped_samples"] = total.get("dropped_samples", 0) + s["dropped"]
            total["retries"] = total.get("retries", 0) + s.get("retries", 0)
        return total

    def metrics(self, all_ranks: bool = False) -> dict[str, float]:
        counts = self.counters()
        if all_ranks:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                gathered: list = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, counts)
                counts = {}
                for c in gathered:
                    for k, v in c.items():
                        counts[k] = counts.get(k, 0) + v
        out = {f"data/skipped/{k}": float(v) for k, v in sorted(counts.items()) if k not in _NOT_SKIPPED}
        out["data/dropped_samples"] = float(counts.get("dropped_samples", 0))
        out["data/retries"] = float(counts.get("retries", 0))
        return out

    def describe(self) -> str:
        spec = self.dataset.spec
        per = f", {self.batches_per_epoch} batches per rank per epoch" if self.batches_per_epoch is not None else ""
        return (f"{self.key}: {len(spec.shards)} shards, {self.epoch_samples if self.epoch_samples is not None else '?'} "
                f"samples per epoch ({self.sources.describe()}); mode {spec.mode}; "
                f"{spec.world_size} ranks x {self._slots} streams{per}")


# -------------------------------------------------------------------------- batches of one rank


class BatchStream(IterableDataset):
    """Batches of one rank, each with the slot that made it and that slot's state after it; a
    finite stream ends with ``(None, slot, final state)``."""

    def __init__(self, spec: StreamSpec, decoding: SampleDecoding, batch_size: int, num_workers: int,
                 max_consecutive_bad: int = 1000, bad_log_per_minute: int = 10):
        self.spec, self.decoding, self.batch_size = spec, decoding, batch_size
        self.num_workers = max(1, num_workers)
        self.max_consecutive_bad = max_consecutive_bad
        self.bad_log_per_minute = bad_log_per_minute
        self.start_states: list[Optional[dict]] = [None] * self.num_workers
        self.rotation = 0

    def warm_plans(self) -> None:
        """Computes the shard order of the epochs the streams start in (epoch mode), so that forked
        workers inherit it instead of shuffling the whole shard list once each."""
        spec = self.spec
        if spec.mode != "epoch" or not spec.shuffle:
            return
        epochs = set()
        for st in self.start_states:
            epochs.add(0 if st is None else st["epoch"])
            epochs.update(v["state"]["epoch"] for v in (st or {}).get("inherited") or [])
        for epoch in sorted(epochs)[:2]:
            if spec.epochs is None or epoch < spec.epochs:
                epoch_order(spec.seed, epoch, len(spec.shards))

    def _worker(self) -> tuple[int, bool]:
        info = get_worker_info()
        n = info.num_workers if info is not None else 1
        if n != self.num_workers:
            raise RuntimeError(f"BatchStream built for {self.num_workers} workers runs under {n}")
        return ((info.id if info is not None else 0) + self.rotation) % n, info is not None

    def __iter__(self) -> Iterator[tuple[Batch, int, dict]]:
        worker, in_worker = self._worker()
        start = self.start_states[worker]
        st = _copy_state(start) if start is not None else new_slot_state()
        events = _Events(st, BadDataLog(self.bad_log_per_minute))
        grng = _GlobalRng(in_worker) if self.decoding.uses_global_rng else None
        batch: list[dict] = []
        rng: Optional[random.Random] = None
        bad_run = 0
        for raw in slot_samples(self.spec, st, worker, self.num_workers, self.decoding.wanted, events):
            if rng is None:
                rng = random.Random(f"{self.spec.seed}-decode-{self.spec.rank}-{worker}-{st['batches']}")
                if grng is not None:
                    grng.start_batch(rng.getrandbits(63))
            if grng is not None:
                with grng:
                    sample = self.decoding(raw, rng, events)
            else:
                sample = self.decoding(raw, rng, events)
            if sample is None:
                st["dropped"] += 1
                bad_run += 1
                if self.max_consecutive_bad and bad_run >= self.max_consecutive_bad:
                    raise RuntimeError(
                        f"rank {self.spec.rank} worker {worker}: {bad_run} samples in a row dropped "
                        f"(data.max_consecutive_bad={self.max_consecutive_bad}); the data or a decoder is "
                        f"broken. Counts: {json.dumps(st['counters'], sort_keys=True)}"
                    )
                continue
            bad_run = 0
            batch.append(sample)
            if len(batch) == self.batch_size:
                st["batches"] += 1
                yield collate(batch, self.decoding.names, self.decoding.ragged), worker, _copy_state(st)
                batch, rng = [], None
        if batch:
            st["batches"] += 1
            yield collate(batch, self.decoding.names, self.decoding.ragged), worker, _copy_state(st)
        yield None, worker, _copy_state(st)  # the end: counts of what came after the last batch


# ------------------------------------------------------------------------------------- decoding


class SampleDecoding:
    """A raw sample -> decoded dict (or None when dropped), counting every problem."""

    def __init__(self, modalities: list[Modality], label: Optional[Modality]):
        self.modalities, self.label = modalities, label
        self.names = [m.name for m in modalities]
        every = list(modalities) + ([label] if label is not None else [])
        self.wanted = WantedMembers([m.rule for m in every])
        self.uses_global_rng = any(m.decoder.uses_global_rng for m in every)
        self.placeholders = {m.name: (m.decoder.placeholder() if not m.required else None) for m in every}
        self.shapes = {m.name: m.decoder.output_shape for m in every}
        self.ragged = frozenset(m.name for m in every if m.decoder.ragged)  # rows of varying length

    def _one(self, m: Modality, raw: RawSample, rng: random.Random, events: _Events):
        """(tensor or None, present)."""
        ext, several = m.rule.find(raw.members)
        if ext is None:
            if several:  # counted even for an optional modality: the data does not say which to read
                events(f"ambiguous_{m.name}", f"{raw.url}: sample {raw.key!r} has several members for "
                                              f"{m.rule.describe()} ({', '.join(several)}); name the one to read "
                                              f"in data.modalities.{m.name}.members")
            elif m.required:
                events(f"missing_{m.name}", f"{raw.url}: sample {raw.key!r} has no {m.rule.describe()} member "
                                            f"(it has: {', '.join(raw.seen) or 'nothing'}; a modality reads the "
                                            f"members listed in data.modalities.{m.name}.members)")
            return None, False
        try:
            x = m.decoder.host_decode(raw.members[ext], ext, rng)  # the worker's part (device_transform: the rest)
            if m.name in self.ragged:
                return x, True
            want = self.shapes[m.name]
            if want is None:
                self.shapes[m.name] = want = tuple(x.shape)
            if tuple(x.shape) != tuple(want):
                raise DecodeError("wrong_shape", f"decoded shape {tuple(x.shape)}, expected {tuple(want)}")
            return x, True
        except DecodeError as err:
            reason, detail = err.reason, err.detail
        except Exception as err:  # noqa: BLE001 - a decoder bug or an unforeseen format problem
            reason, detail = f"{m.decoder_name}_decoder_error", f"{type(err).__name__}: {err}"
        events(reason, f"{raw.url}: sample {raw.key!r} ({m.name}, .{ext}): {detail}")
        return None, False

    def __call__(self, raw: RawSample, rng: random.Random, events: _Events) -> Optional[dict]:
        out: dict[str, Any] = {"__key__": raw.key, "__epoch__": raw.epoch}
        masks: dict[str, bool] = {}
        for m in self.modalities:
            x, ok = self._one(m, raw, rng, events)
            if not ok:
                if m.required:
                    return None
                x = self.placeholders[m.name]
            out[m.name], masks[m.name] = x, ok
        if self.label is not None:
            y, ok = self._one(self.label, raw, rng, events)
            if not ok and self.label.required:
                return None
            out["__label__"] = int(y) if ok else -1
        out["__masks__"] = masks
        return out


class _GlobalRng:
    """For decoders that draw from the global generators (timm's augmentations): seeded per batch.
    In a worker process the globals are simply seeded; in the main process (workers: 0) they are
    swapped in and out around each sample, so the training loop's generators are untouched."""

    def __init__(self, in_worker: bool):
        self.in_worker = in_worker
        self.own: Optional[tuple] = None
        self.seed = 0

    def start_batch(self, seed: int) -> None:
        if self.in_worker:
            self._seed(seed)
        else:
            self.own, self.seed = None, seed

    @staticmethod
    def _seed(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.default_generator.manual_seed(seed)

    @staticmethod
    def _get() -> tuple:
        return random.getstate(), np.random.get_state(), torch.get_rng_state()

    @staticmethod
    def _set(state: tuple) -> None:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])

    def __enter__(self):
        if not self.in_worker:
            self.saved = self._get()
            if self.own is None:
                self._seed(self.seed)
            else:
                self._set(self.own)
        return self

    def __exit__(self, *exc) -> None:
        if not self.in_worker:
            self.own = self._get()
            self._set(self.saved)


# ---------------------------------------------------------------------- raw samples of one slot


def slot_samples(spec: StreamSpec, st: dict, worker: int, num_workers: int, wanted: Optional[WantedMembers],
                 events: _Events) -> Iterator[RawSample]:
    """Raw samples of one slot from position ``st`` on; ``st`` is updated as samples are passed on
    (after sample i of a window, ``st['emitted'] == i + 1``)."""
    inherited = st.get("inherited") or []
    while inherited:  # streams of an earlier layout, each to the end of its epochs (relayout)
        v = inherited[0]
        until = v["until"] if spec.epochs is None else min(v["until"], spec.epochs)
        old = dataclasses.replace(spec, rank=v["rank"], world_size=v["world_size"], epochs=until)
        yield from slot_samples(old, v["state"], v["worker"], v["num_workers"], wanted, events)
        inherited.pop(0)
    empty_epochs = 0
    while spec.epochs is None or st["epoch"] < spec.epochs:
        plan = slot_plan(spec, st["epoch"], worker, num_workers)
        pos = [st["shard"], st["offset"], st.get("tar_byte", 0), st.get("tar_sample", 0)]
        reader = _read_plan(spec, plan, pos, wanted, events)
        got = 0
        while True:
            events.replay = st["emitted"] > 0  # this window was read (and its events counted) before
            window = list(itertools.islice(reader, max(1, spec.window)))
            events.replay = False
            if not window:
                break
            got += len(window)
            order = list(range(len(window)))
            if spec.shuffle and spec.window > 1:
                random.Random(f"{spec.seed}-window-{st['epoch']}-{spec.rank}-{worker}-{st['window']}").shuffle(order)
            for i in range(st["emitted"], len(window)):
                raw = window[order[i]]
                window[order[i]] = None  # type: ignore[call-overload]
                st["emitted"] = i + 1
                raw.epoch = st["epoch"]
                yield raw
            st["window"] += 1
            st["shard"], st["offset"], st["tar_byte"], st["tar_sample"] = pos
            st["emitted"] = 0
        reader.close()
        st["epoch"] += 1
        st["window"] = st["shard"] = st["offset"] = st["emitted"] = st["tar_byte"] = st["tar_sample"] = 0
        empty_epochs = empty_epochs + 1 if got == 0 else 0
        if spec.epochs is None and empty_epochs >= 3:
            raise RuntimeError(
                f"rank {spec.rank} worker {worker}: no samples read in {empty_epochs} epochs in a row from "
                f"{len(spec.shards)} shards (empty or unreadable shards? counts so far: {st['counters']})"
            )


def _read_plan(spec: StreamSpec, plan, pos: list[int], wanted, events: _Events) -> Iterator[RawSample]:
    """Raw samples of ``plan`` from ``pos`` on: [plan entry, samples of its shard already passed on
    (of this slot's share), byte offset and index of the sample where its tar is read from]; ``pos``
    follows each sample passed on."""
    retry = Retry(spec.retries, spec.retry_backoff, events.retried) if spec.retries else None
    while pos[0] < len(plan):
        shard, k, j = plan[pos[0]]
        start = pos[1]

        def select(i: int, k=k, j=j, start=start) -> bool:
            return i % k == j and i // k >= start

        for raw in iter_shard(spec.shards[shard].url, wanted, select, events, spec.max_member_bytes,
                              start=(pos[2], pos[3]), retry=retry):
            pos[1] = raw.index // k + 1
            pos[2], pos[3] = (raw.next_at, raw.index + 1) if raw.next_at is not None else (0, 0)
            yield raw
        pos[0] += 1
        pos[1] = pos[2] = pos[3] = 0


@dataclass
class StreamSpec:
    """Everything a slot needs to make its raw sample stream (picklable, sent to workers)."""

    shards: Sequence[ShardRef]  # a ShardList (compact) from make_loader
    sources: list[SourceInfo]
    mode: str = "epoch"  # epoch | resampled
    shuffle: bool = True
    window: int = 0  # shuffle window in samples (<= 1: shard order)
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    epochs: Optional[int] = None  # None: forever
    max_member_bytes: int = 256 * 2**20
    retries: int = 0  # a failed remote read is continued this many times (data.retries; 0: never)
    retry_backoff: float = 1.0  # seconds before the first retry, doubled for each next one


def new_slot_state() -> dict:
    return {"epoch": 0, "window": 0, "shard": 0, "offset": 0, "tar_byte": 0, "tar_sample": 0, "emitted": 0,
            "batches": 0, "dropped": 0, "retries": 0, "counters": {}}


_NOT_SKIPPED = ("dropped_samples", "retries")  # Loader.counters() entries that are not data/skipped/<reason>


def _copy_state(st: dict) -> dict:
    out = dict(st)
    out["counters"] = dict(st["counters"])
    if st.get("inherited"):  # streams of an earlier layout this slot finishes first (see relayout)
        out["inherited"] = [{**v, "state": _copy_state(v["state"])} for v in st["inherited"]]
    return out


def _started(st: dict) -> bool:
    """Whether a stream has read anything of its current epoch."""
    return any(st[k] for k in ("window", "shard", "offset", "emitted"))


def relayout(old: list[dict], rank: int, world_size: int, num_workers: int) -> list[dict]:
    """This rank's new slot states from every old rank's loader state (``Loader.state_dict()``), by
    the rule in the module docstring."""
    old = sorted(old, key=lambda s: s["rank"])
    if [s["rank"] for s in old] != list(range(len(old))) or any(s["world_size"] != len(old) for s in old):
        raise ValueError(f"the saved loader states are not one per rank of one layout: ranks "
                         f"{[s['rank'] for s in old]}, world sizes {sorted({s['world_size'] for s in old})}")
    own = [(s, w, st) for s in old for w, st in enumerate(s["workers"])]
    # F: the last epoch an old stream has started (a stream at the very start of an epoch has not)
    last = max(st["epoch"] - (not _started(st)) for _, _, st in own)
    slots = world_size * num_workers
    mine = [rank * num_workers + w for w in range(num_workers)]
    states = []
    for slot in mine:
        st = new_slot_state()
        st["epoch"] = max(last + 1, 0)
        states.append(st)
    if old[0]["mode"] == "epoch":
        streams = []
        for s, w, st in own:
            streams += [{**v, "state": _copy_state(v["state"])} for v in st.get("inherited") or []]
            mine_part = {k: v for k, v in _copy_state(st).items() if k != "inherited"}
            mine_part.update(counters={}, dropped=0, batches=0, retries=0)
            streams.append({"rank": s["rank"], "worker": w, "world_size": s["world_size"],
                            "num_workers": s["num_workers"], "until": last + 1, "state": mine_part})
        live = [v for v in streams if v["state"]["epoch"] < v["until"]]  # those with something left to read
        for i, stream in enumerate(live):
            if i % slots in mine:
                states[mine.index(i % slots)].setdefault("inherited", []).append(stream)
    if rank == 0:  # the run's bad-data totals stay whole
        for _, _, st in own:
            states[0]["dropped"] += st["dropped"]
            states[0]["retries"] += st.get("retries", 0)
            for k, v in st["counters"].items():
                states[0]["counters"][k] = states[0]["counters"].get(k, 0) + v
            for v in st.get("inherited") or []:
                states[0]["dropped"] += v["state"]["dropped"]
                states[0]["retries"] += v["state"].get("retries", 0)
                for k, n in v["state"]["counters"].items():
                    states[0]["counters"][k] = states[0]["counters"].get(k, 0) + n
    return states


def slot_plan(spec: StreamSpec, epoch: int, worker: int, num_workers: int) -> list[tuple[int, int, int]]:
    """This slot's shards for an epoch: (shard index, stride k, phase j) -- keep sample i of the
    shard when i % k == j."""
    n = len(spec.shards)
    slots = spec.world_size * num_workers
    slot = spec.rank * num_workers + worker
    if spec.mode == "resampled":
        rng = random.Random(f"{spec.seed}-draws-{epoch}-{spec.rank}-{worker}")
        # weight per shard draw: the source's weight / its mean samples per shard (0 for an empty source)
        weights = [s.weight if s.samples is None else (s.weight / s.mean_shard_samples if s.samples else 0.0)
                   for s in spec.sources]
        if not any(weights):
            raise RuntimeError("resampled mode: every source has 0 samples")
        cum = list(itertools.accumulate(weights))
        plan = []
        for _ in range(max(1, math.ceil(n / slots))):
            src = spec.sources[min(len(cum) - 1, _bisect(cum, rng.random() * cum[-1]))]
            plan.append((src.first + rng.randrange(src.count), 1, 0))
        return plan
    order = epoch_order(spec.seed, epoch, n) if spec.shuffle else range(n)
    if n >= slots:
        return [(order[i], 1, 0) for i in range(slot, n, slots)]
    i = slot % n  # fewer shards than slots: split inside the shard
    return [(order[i], len(range(i, slots, n)), slot // n)]


@functools.lru_cache(maxsize=4, typed=True)
def epoch_order(seed: int, epoch: int, n: int) -> array:
    """Epoch mode's shard order: ``range(n)`` shuffled by (seed, epoch), the same on every rank and
    worker; computed once per process and epoch and kept for the last few asked (read-only). Once
    per slot, the 1,024 x 8 slots of a 100k-shard epoch took ~9 minutes in one process (issue 28)."""
    order = array("i" if n < 2**31 else "q", range(n))
    random.Random(f"{seed}-shards-{epoch}").shuffle(order)
    return order


def _bisect(cum: list[float], x: float) -> int:
    lo, hi = 0, len(cum)
    while lo < hi:
        mid = (lo + hi) // 2
        if cum[mid] <= x:
            lo = mid + 1
        else:
            hi = mid
    return lo


# ------------------------------------------------------------------------------ bad-data events


class BadDataLog:
    """Logs bad-data events at a bounded rate per process: ``per_minute`` lines a minute, then a
    count of the suppressed ones."""

    def __init__(self, per_minute: int):
        self.per_minute = per_minute
        self.window_start = time.monotonic()
        self.in_window = 0
        self.suppressed = 0

    def __call__(self, reason: str, detail: str, what: str = "skipped") -> None:
        now = time.monotonic()
        if now - self.window_start >= 60.0:
            if self.suppressed:
                log.warning("[data] %d more bad-data messages suppressed in the last minute (still counted)", self.suppressed)
            self.window_start, self.in_window, self.suppressed = now, 0, 0
        if self.in_window < self.per_minute:
            self.in_window += 1
            log.warning("[data] %s (%s): %s", what, reason, detail)
        else:
            self.suppressed += 1


class _Events:
    """Counts events into a slot's counters; silent while a window is being re-read on resume
    (its events are already in the restored counters). Retries are counted always (each is a read
    made now)."""

    def __init__(self, state: dict, logger: BadDataLog):
        self.state, self.counters, self.logger, self.replay = state, state["counters"], logger, False

    def retried(self, detail: str) -> None:
        self.state["retries"] = self.state.get("retries", 0) + 1
        self.logger("retry", detail, what="retrying")

    def __call__(self, reason: str, detail: str, index: int = 0) -> None:
        if self.replay:
            return
        self.counters[reason] = self.counters.get(reason, 0) + 1
        self.logger(reason, detail)
