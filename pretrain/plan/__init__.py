"""Before a launch: what a recipe costs per rank, at every ZeRO stage, from arithmetic.

    python -m pretrain.plan --config configs/openclip_vit_b16.yaml --nodes 4 --gpus-per-node 8 --gpu-memory 80
    python -m pretrain.plan --config configs/quickstart.yaml --nodes 1 --gpus-per-node 2 --json

The config is read exactly as training reads it (``pretrain.config.load_config``, the same
overrides, errors and exit codes). Nothing is trained and no weights are read:

- **Parameters**: the model is built on the meta device (shapes, no memory; seconds even for
  ViT-L-14) and counted per tower, with the objective's own parameters (``model.objective``) and the
  temperature and bias. A tower whose library insists on real tensors is built for real, alone, and
  the output says so.
- **Model states per rank**, part by part, for ZeRO 0-3, as DeepSpeed lays them out (its flat groups,
  padding and partitions; checked against the engine's own buffers in ``tests/test_plan.py``): the
  weights in ``train.precision``; the fp32 master weights DeepSpeed keeps (ZeRO-0: for bf16/fp16 only,
  whole; ZeRO-1/2/3: a partition, also in fp32); the gradients held
  after backward (whole at ZeRO-0, the partition's parameters at ZeRO-1/2, a partition at ZeRO-3) plus
  the fp32 copies made at the update; the optimizer's two fp32 moments (AdamW and LAMB; LAMB is
  ZeRO-0 only); DeepSpeed's reduction bucket (``reduce_bucket_size``) and, at ZeRO-3, the parameters
  gathered in flight (whole between forward and backward as far as ``stage3_max_reuse_distance`` keeps
  them: the whole of a model under 500M parameters at DeepSpeed's defaults).
- **Activations** of one micro-batch: each tower's forward and backward run on the meta device under
  a tracker of live tensor bytes (the same tracker measures real runs), times a factor per kind of
  tower measured on this project's CPU machine in fp32 (``ACTIVATION_CALIBRATION``, re-measured by
  ``benchmarks/plan_calibration.py``, also on a GPU); with and without gradient checkpointing
  (``model.towers.<m>.grad_checkpointing``).
- **The loss layer's buffers**: the objective's own forward and backward on the meta device, each
  rank scoring its rows against the global batch (CLIP/SigLIP logits B_local x B_global per pair,
  Symile's candidates and chunks), the gathers simulated.
- The inputs on the device, the loader's prefetch in host memory, the global batch and negatives,
  the epoch (steps, samples per rank x worker) where sample counts are known without opening a shard,
  and the checkpoint's size on disk.

It recommends the fastest stage that fits with a margin (ZeRO-0 > 1 > 2 > 3: ZeRO-0 was measured
fastest in benchmarks/RESULTS.md, the others trade speed for memory) and says why; ``train.zero_stage:
auto`` makes the same choice when a run starts (``choose_stage``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

GIB = 2**30
MARGIN = 0.10  # a stage fits when its total stays under (1 - MARGIN) of the memory: allocator, context, NCCL

# Total memory of one device as the driver reports it (torch.cuda.get_device_properties(0).total_memory),
# GiB, approximate: a little under the marketed size.
GPUS = {
    "A100-40GB": 39.4,
    "A100-80GB": 79.1,
    "H100-80GB": 79.1,
    "H200": 139.8,
    "GH200": 94.5,
    "B200": 178.4,
    "L40S": 44.4,
    "L4": 22.0,
    "A10": 22.0,
    "A6000": 47.5,
    "V100-16GB": 15.8,
    "V100-32GB": 31.7,
    "RTX4090": 23.6,
    "MI250X": 63.98,
    "MI300X": 191.98,
}

# Activations: the simulated peak of live tensor bytes (meta device) times this factor, by kind of
# tower: the measured peak of a real forward and backward of one tower / the simulated one, CPU, fp32,
# mean over the towers of benchmarks/plan_calibration.py (2026-12-07, the project's 2-core x86_64
# machine, torch 2.14; figures in benchmarks/plan_calibration.json): quickstart's resnet10t and BERT,
# OpenCLIP ViT-B-32's image and text towers, Symile's MLPs. Convolutions and MLPs agree exactly;
# attention is cheaper for real (0.84-0.97: CPU's fused scaled-dot-product attention keeps no
# attention matrix, the meta device's reference path does). A GPU session re-measures with
# `python benchmarks/plan_calibration.py --device cuda` and replaces the rows it measured.
ACTIVATION_CALIBRATION = {
    # kind: (factor without gradient checkpointing, factor with it)
    "convolutional": (1.00, 1.00),
    "attention": (0.89, 0.97),
    "other": (1.00, 1.00),
}
CALIBRATION_LABEL = "calibrated on CPU fp32"

STAGES = (0, 1, 2, 3)
PART_LABELS = {
    "weights": "weights",
    "masters": "fp32 master weights",
    "gradients": "gradients (after backward)",
    "gradient_copies": "fp32 gradients (at the update)",
    "optimizer": "optimizer states",
    "deepspeed": "DeepSpeed buffers",
    "activations": "activations",
    "loss": "loss buffers",
    "inputs": "inputs on the device",
}


class PlanError(ValueError):
    """A question the plan cannot answer as asked (an unknown GPU name, a bad flag)."""


# ------------------------------------------------------------------------------- live tensor bytes


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of tensor storages alive while it is active, and their peak: every op's
    outputs are followed until freed (views and in-place results share a storage and count once).
    Storages made before it started (parameters, inputs) are not counted. Works on the meta device
    (shapes only) as on real tensors: the plan simulates with it, the tests and the calibration
    measure real runs with it."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _freed(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = None
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = id(storage)
                if key in self._seen:
                    continue
                if inputs is None:  # a view or in-place result of an input (a parameter's transpose) is not new
                    inputs = {id(x.untyped_storage()) for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)}
                if key not in inputs:
                    nbytes = storage.nbytes()
                    self._seen.add(key)
                    self.live += nbytes
                    weakref.finalize(storage, self._freed, key, nbytes)
        self.peak = max(self.peak, self.live)
        return out

    def reset_peak(self) -> None:
        self.peak = self.live


# ------------------------------------------------------------------------------ the model, counted


@dataclass
class ParamRow:
    name: str
    numel: int
    trainable: bool
    decay: bool  # in the weight-decay group (pretrain.optim.param_groups)
    module: str  # the module that holds it (ZeRO-3 gathers a module's parameters together)


@dataclass
class TowerCount:
    modality: str
    type: str
    params: int
    trainable: int
    built: str  # "meta", or why it was built for real


@dataclass
class CountedModel:
    model: torch.nn.Module
    rows: list[ParamRow]  # in the optimizer's order (decay group, then the others), frozen last
    towers: list[TowerCount]
    loss_params: int  # the objective's own parameters
    scale_params: int  # logit_scale (and logit_bias)
    real_towers: set[str]  # modalities built for real
    notes: list[str]
    buffers: dict[str, int] = field(default_factory=dict)  # floating and other buffers' elements (BatchNorm statistics)

    @property
    def total(self) -> int:
        return sum(r.numel for r in self.rows)

    @property
    def trainable(self) -> int:
        return sum(r.numel for r in self.rows if r.trainable)


@contextlib.contextmanager
def _towers_on_cpu(keys: set[str], building: list[str]):
    """Inside, the tower classes the registry hands out build on the CPU (real tensors) for the
    towers named in ``keys``, while the rest of the model is built on the meta device; ``building``
    records which tower was being built (the one a failure comes from)."""
    from pretrain.models import TOWERS

    original = TOWERS.get

    def get(name, key):
        cls = original(name, key)
        tower_key = key.rsplit(".", 1)[0]  # model.towers.<m>

        class Tracked(cls):  # the same class, its options included; only where it builds differs
            def __init__(self, options, ctx):
                building.append(tower_key)
                with torch.device("cpu") if tower_key in keys else contextlib.nullcontext():
                    super().__init__(options, ctx)

        Tracked.__name__, Tracked.__qualname__ = cls.__name__, cls.__qualname__
        return Tracked

    TOWERS.get = get
    try:
        yield
    finally:
        del TOWERS.get


def count_model(cfg, modalities=None) -> CountedModel:
    """The model of ``cfg`` built on the meta device (towers whose library refuses it, for real) and
    its parameters counted. ``model.init_from`` is not read and ``model.compile`` not applied: neither
    changes the parameters."""
    from pretrain.data import build_modalities
    from pretrain.models import build_model
    from pretrain.optim import param_groups
    from pretrain.options import ConfigError

    modalities = modalities if modalities is not None else build_modalities(cfg.data, train=True)
    model_cfg = dataclasses.replace(cfg.model, init_from=None, compile=False)
    notes, real, why = [], set(), {}
    if cfg.model.init_from is not None:
        notes.append(f"model.init_from ({cfg.model.init_from.path}) is not read: it sets values, not shapes")
    for _ in range(len(modalities) + 1):
        building: list[str] = []
        try:
            with torch.device("meta"), _towers_on_cpu(real, building):
                model = build_model(model_cfg, modalities, objective=cfg.loss.build())
            break
        except ConfigError:
            raise
        except Exception as err:  # noqa: BLE001 - a library that needs real tensors: that tower for real
            if not building or building[-1] in real:
                raise
            real.add(building[-1])
            why[building[-1]] = f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
    for key in sorted(real):
        notes.append(f"{key}: built for real on the CPU to count it (the meta device was refused: {why[key]})")
    groups = param_groups(model, 0.0)
    decay = {id(p) for p in groups[0]["params"]}
    order = [p for g in groups for p in g["params"]]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    names = {id(p): n for n, p in model.named_parameters()}
    rows = [ParamRow(names[id(p)], p.numel(), p.requires_grad, id(p) in decay, names[id(p)].rsplit(".", 1)[0])
            for p in order + frozen]
    towers = []
    for m, tower in model.towers.items():
        ps = list(tower.parameters())
        built = "meta" if f"model.towers.{m}" not in real else "real (CPU)"
        towers.append(TowerCount(m, _tower_type(cfg, m, modalities), sum(p.numel() for p in ps),
                                 sum(p.numel() for p in ps if p.requires_grad), built))
    loss_params = sum(p.numel() for p in model.objective.parameters()) if model.objective is not None else 0
    scale_params = model.logit_scale.numel() + (model.logit_bias.numel() if model.logit_bias is not None else 0)
    buffers = {"floating": sum(b.numel() for b in model.buffers() if b.is_floating_point()),
               "other_bytes": sum(b.numel() * b.element_size() for b in model.buffers() if not b.is_floating_point())}
    return CountedModel(model, rows, towers, loss_params, scale_params, {k.rsplit(".", 1)[1] for k in real}, notes,
                        buffers)


def _tower_type(cfg, modality: str, modalities) -> str:
    from pretrain.models import default_tower

    tower = cfg.model.towers.get(modality)
    if tower is None:
        m = next(x for x in modalities if x.name == modality)
        tower = default_tower(m.decoder_name, m.decoder.options)
    return tower.type if tower is not None else "?"


# -------------------------------------------------------------------------------- model states


# ZeroSettings' fields and the keys (with DeepSpeed's aliases) that set them in zero_optimization
ZERO_KEYS = {
    "reduce_bucket_size": ("reduce_bucket_size",),
    "contiguous_gradients": ("contiguous_gradients",),
    "overlap_comm": ("overlap_comm",),
    "param_persistence_threshold": ("stage3_param_persistence_threshold", "param_persistence_threshold"),
    "model_persistence_threshold": ("stage3_model_persistence_threshold", "model_persistence_threshold"),
    "prefetch_bucket_size": ("stage3_prefetch_bucket_size", "prefetch_bucket_size"),
    "max_live_parameters": ("stage3_max_live_parameters", "max_live_parameters"),
    "max_reuse_distance": ("stage3_max_reuse_distance", "max_reuse_distance"),
    "parameter_alignment": ("parameter_alignment",),
}


@dataclass
class ZeroSettings:
    """What of DeepSpeed's ZeRO settings shapes memory: DeepSpeed's defaults (``DeepSpeedZeroConfig``'s,
    checked equal in tests/test_plan.py; DeepSpeed is not imported here: it prints on import), with
    ``train.deepspeed``'s ``zero_optimization`` over them."""

    reduce_bucket_size: int = int(5e8)
    contiguous_gradients: bool = True
    overlap_comm: Optional[bool] = None  # None: DeepSpeed's default for the stage (on at ZeRO-3)
    param_persistence_threshold: int = int(1e5)
    model_persistence_threshold: int = sys.maxsize
    prefetch_bucket_size: int = int(5e7)
    max_live_parameters: int = int(1e9)
    max_reuse_distance: int = int(1e9)
    parameter_alignment: bool = False
    allreduce_bucket_size: int = int(5e8)

    @classmethod
    def from_train(cls, train, stage: int) -> "ZeroSettings":
        extra = dict((train.deepspeed or {}).get("zero_optimization") or {})
        out = cls()
        for name, keys in ZERO_KEYS.items():
            for key in keys:
                if extra.get(key) is not None:
                    kind = type(getattr(cls(), name)) if name != "overlap_comm" else bool
                    setattr(out, name, kind(extra[key]))
        if out.overlap_comm is None:
            out.overlap_comm = stage == 3  # DeepSpeed's default: on at ZeRO-3 only
        out.allreduce_bucket_size = int((train.deepspeed or {}).get("allreduce_bucket_size", 5e8))
        return out


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class ModelStates:
    """One stage's model states per rank, bytes."""

    weights: int
    masters: int
    grads_held: int  # after backward, until the update
    grads_update: int  # fp32 gradient copies DeepSpeed makes at the update (on top of the held ones)
    optimizer: int
    bucket: int  # DeepSpeed's gradient reduction bucket(s) (ZeRO-1/2: while backward runs; ZeRO-3: always)
    in_flight: int  # ZeRO-3: parameters gathered whole while their module runs; ZeRO-0 bf16/fp16: all-reduce copies
    checkpoint: int  # bytes on disk, all ranks together
    notes: list[str] = field(default_factory=list)

    @property
    def gradients(self) -> int:
        return self.grads_held + self.grads_update

    @property
    def deepspeed(self) -> int:
        return self.bucket + self.in_flight


def optimizer_state_bytes(train) -> int:
    """fp32 bytes the optimizer keeps per element it updates: AdamW's and LAMB's two moments, SGD's
    momentum (none without), plus Lookahead's slow weights (``train.lookahead``)."""
    per = 8 if train.optimizer in ("adamw", "lamb") else (4 if getattr(train, "momentum", 0) else 0)
    return per + (4 if getattr(train, "lookahead", None) is not None else 0)


def model_states(rows: list[ParamRow], stage: int, world: int, precision: str, optimizer: str,
                 accumulation: int, zero: ZeroSettings, buffers: Optional[dict] = None,
                 state_bytes: int = 8) -> ModelStates:
    """What the DeepSpeed engine holds per rank at ``stage`` for the parameters ``rows`` (in the
    optimizer's order), in the largest rank where ranks differ. The layout is DeepSpeed 0.16-0.19's:

    - ZeRO-0: the module's weights; fp32: the optimizer updates them in place (no copy), bf16/fp16: a
      whole fp32 copy per parameter (DeepSpeed's unfused fp16 optimizer) and, at the update, an fp32
      copy of every gradient; gradients whole (pretrain.gradsync's buckets in fp32: the same bytes).
    - ZeRO-1/2: each optimizer group flattened in order and padded to a multiple of 2 x ranks (and
      each parameter to 16 bytes with ``parameter_alignment``); a rank's partition is 1/ranks of it;
      fp32 master copy of the partition in every precision; after backward the gradients of the
      parameters that touch the partition, whole (ZeRO-1 with accumulation: every gradient, between
      micro-batches); at the update, one group's partition of fp32 gradients at a time; the reduction
      bucket (``reduce_bucket_size`` elements, two with ``overlap_comm``) while backward runs.
    - ZeRO-3: each parameter cut in ``ceil(numel / ranks)`` pieces; parameters of at most
      ``stage3_param_persistence_threshold`` elements also kept whole (in a buffer of ranks x the
      partition); fp32 masters of the partition (a copy in fp32 too); the gradient partition; the reduction bucket
      (allocated once, at start); the parameters gathered for the module being run plus the prefetch
      bucket.
    - Optimizer states: ``state_bytes`` per element it updates (``optimizer_state_bytes``: AdamW's and
      LAMB's two fp32 moments, SGD's momentum, Lookahead's slow weights), and AdamW's step count (one
      fp32 per tensor it updates).
    """
    b = {"fp32": 4, "bf16": 2, "fp16": 2}[precision]
    buffer_bytes = b * (buffers or {}).get("floating", 0) + (buffers or {}).get("other_bytes", 0)  # in each module file
    train = [r for r in rows if r.trainable]
    frozen = [r for r in rows if not r.trainable]
    groups = [g for g in ([r for r in train if r.decay], [r for r in train if not r.decay]) if g]
    n_train = sum(r.numel for r in train)
    n_frozen = sum(r.numel for r in frozen)
    steps = 4 if optimizer == "adamw" else 0  # fused AdamW keeps a float32 step per tensor it updates
    notes: list[str] = []
    if stage == 0:
        weights = b * (n_train + n_frozen)
        masters = 4 * n_train if b != 4 else 0
        held = b * n_train
        update = 4 * n_train if b != 4 else 0
        opt = state_bytes * n_train + steps * len(train)
        in_flight = 0
        if b != 4 and world > 1:  # DeepSpeed's all-reduce flattens the gradients bucket by bucket
            in_flight = b * min(n_train, zero.allreduce_bucket_size)
            notes.append("gradient all-reduce: flattened copies of up to allreduce_bucket_size elements")
        # rank 0 writes the module and the optimizer (masters for bf16/fp16) in one file
        checkpoint = weights + masters + opt + buffer_bytes
        return ModelStates(weights, masters, held, update, opt, 0, in_flight, checkpoint, notes)
    if stage in (1, 2):
        align = 2 * world
        pad_to = 16 // math.gcd(16, b) if zero.parameter_alignment else 1
        flats, parts, touched = [], [], [0] * world
        for g in groups:
            sizes, paddings, offset = [r.numel for r in g], [], 0
            for i, n in enumerate(sizes):  # each parameter padded to 16 bytes with parameter_alignment, not the last
                offset += n
                pad = 0 if i == len(sizes) - 1 else (-offset) % pad_to
                paddings.append(pad)
                offset += pad
            flat = _ceil_div(offset, align) * align
            part = flat // world
            flats.append(flat)
            parts.append(part)
            for r in range(world):  # DeepSpeed's get_partition_info: the whole parameters that touch it
                lo, hi, at = part * r, part * (r + 1), 0
                for n, pad in zip(sizes, paddings):
                    if lo <= at < hi or at < lo < at + n:
                        touched[r] += n
                    at += n + pad
            touched[world - 1] += flat - offset  # the group's closing padding, a gradient of its own
        weights = b * (sum(flats) + n_frozen)
        masters = 4 * sum(parts)
        held = b * max(touched)
        if stage == 1 and accumulation > 1:
            held += b * n_train
            notes.append("ZeRO-1 with accumulation keeps every gradient between micro-batches")
        update = 4 * max(parts)
        opt = state_bytes * sum(parts) + steps * len(parts)
        buckets = 2 if zero.overlap_comm else 1
        bucket = b * zero.reduce_bucket_size * buckets if zero.contiguous_gradients else 0
        checkpoint = b * (n_train + n_frozen) + buffer_bytes + world * (masters + opt)
        return ModelStates(weights, masters, held, update, opt, bucket, 0, checkpoint, notes)
    # ZeRO-3
    part = lambda n: _ceil_div(n, world)  # noqa: E731
    persistent, total_persistent = [], 0
    for r in rows:  # DeepSpeed's mark_persistent_parameters (module order; the optimizer's order here)
        if r.numel + total_persistent > zero.model_persistence_threshold:
            continue
        if r.numel <= zero.param_persistence_threshold:
            persistent.append(r)
            total_persistent += r.numel
    parts_train = sum(part(r.numel) for r in train)
    # a parameter gathered whole lives in a buffer of ranks x its partition
    whole = sum(part(r.numel) * world for r in persistent)
    weights = b * (parts_train + sum(part(r.numel) for r in frozen) + whole)
    masters = 4 * parts_train  # fp32 too: DeepSpeed 0.19 copies (it compares a torch.device with a device name)
    held = b * parts_train
    update = 4 * max((sum(part(r.numel) for r in g) for g in groups), default=0)
    opt = state_bytes * parts_train + steps * len(groups)
    by_module: dict[str, int] = {}
    for r in rows:
        if r not in persistent:
            by_module[r.module] = by_module.get(r.module, 0) + r.numel
    largest, total = max(by_module.values(), default=0), sum(by_module.values())
    # From the second step on (DeepSpeed has traced the module order), a gathered parameter stays whole
    # when it is used again within stage3_max_reuse_distance elements fetched: a module's forward and
    # its backward are 2 x (the parameters after it) apart, so at the turn from forward to backward
    # the last reuse_distance / 2 elements of the model are all whole (all of ViT-L-14's 428M at the
    # default 1e9; measured on 2 ranks, benchmarks/RESULTS.md), at most stage3_max_live_parameters.
    kept = min(total, zero.max_reuse_distance // 2)
    gathered = min(zero.max_live_parameters, total, max(largest + zero.prefetch_bucket_size, kept + largest))
    bucket = b * zero.reduce_bucket_size if zero.contiguous_gradients else 0
    notes.append(f"{len(persistent)} parameters of at most {zero.param_persistence_threshold} elements kept whole "
                 f"({total_persistent:,} elements); gathered in flight: {gathered:,} elements (the model's last "
                 f"stage3_max_reuse_distance / 2 kept whole between forward and backward, plus the largest module "
                 f"({largest:,}) or the prefetch bucket, at most stage3_max_live_parameters)")
    checkpoint = world * (4 * parts_train + opt + buffer_bytes)  # each rank: its fp32 partition, moments, buffers
    return ModelStates(weights, masters, held, update, opt, bucket, b * gathered, checkpoint, notes)


# ----------------------------------------------------------------------------------- activations


def _kind(module: torch.nn.Module) -> str:
    """The calibration row of a tower: attention, convolutional or other."""
    names = {type(m).__name__.lower() for m in module.modules()}
    if any("attention" in n or "multihead" in n for n in names):
        return "attention"
    if any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in module.modules()):
        return "convolutional"
    return "other"


def _meta_input(decoder, rows: int, dtype: torch.dtype, device) -> torch.Tensor:
    shape = tuple(getattr(decoder, "output_shape", None) or ())
    in_dtype = getattr(decoder, "dtype", torch.float32)
    # a decoder that leaves its last step to the device (uint8 pixels normalised there) hands the
    # model floating values
    if in_dtype.is_floating_point or getattr(decoder, "device_transform", None) is not None:
        return torch.zeros((rows, *shape), dtype=dtype, device=device)
    return torch.zeros((rows, *shape), dtype=in_dtype, device=device)


def tower_activation_peak(tower: torch.nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(bytes alive at the end of the forward, peak bytes over forward and backward) of one tower's
    forward to L2-normalised features and a backward from their sum; the parameters' gradients exist
    beforehand (as in training after the first step), so only activations and temporaries count."""
    for p in tower.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    tracker = LiveBytes()
    with tracker:
        out = torch.nn.functional.normalize(tower(x), dim=-1)
        at_end = tracker.live
        if out.requires_grad:
            out.float().sum().backward()
        del out
    for p in tower.parameters():
        p.grad = None
    return at_end, tracker.peak


@dataclass
class TowerActivations:
    modality: str
    kind: str
    checkpointing: bool  # as configured
    at_end: int  # bytes alive after the forward (saved for backward), calibrated
    peak: int  # peak over forward and backward, calibrated
    other: Optional[int]  # the peak with gradient checkpointing switched the other way (None: unsupported)
    how: str  # "meta" or how it was measured instead


def tower_activations(counted: CountedModel, modalities, cfg, rows: int) -> list[TowerActivations]:
    """Each tower's activations at ``rows`` samples (a micro-batch), in ``train.precision``: simulated
    on the meta device, times ``ACTIVATION_CALIBRATION``; towers built for real are measured for
    real on the CPU at 2 samples and scaled."""
    from pretrain.options import ConfigError

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.train.precision]
    model = counted.model
    model.train()
    out = []
    for m in modalities:
        tower = model.towers[m.name]
        configured = bool(getattr(cfg.model.towers.get(m.name), "grad_checkpointing", False))
        kind = _kind(tower)
        n, device, how = rows, torch.device("meta"), "meta"
        try:
            if m.name in counted.real_towers:
                raise RuntimeError("its tower was built for real")
            tower.to(dtype)
            at_end, peak = tower_activation_peak(tower, _meta_input(m.decoder, n, dtype, device))
        except Exception as err:  # noqa: BLE001 - an op the meta device lacks: measure a real build
            n, device = 2, torch.device("cpu")
            how = f"measured on a real build at {n} samples, scaled ({type(err).__name__} on the meta device)"
            with torch.device("cpu"):
                tower = _rebuild_real(cfg, m, modalities).to(dtype)
            tower.train()
            at_end, peak = tower_activation_peak(tower, _meta_input(m.decoder, n, dtype, device))
        other = None
        try:
            tower.backbone.set_grad_checkpointing(not configured)
            _, other = tower_activation_peak(tower, _meta_input(m.decoder, n, dtype, device))
        except ConfigError:
            other = None
        except Exception:  # noqa: BLE001 - the other setting could not be simulated: not reported
            other = None
        finally:
            with contextlib.suppress(ConfigError):
                tower.backbone.set_grad_checkpointing(configured)
        plain, ckpt = ACTIVATION_CALIBRATION.get(kind, ACTIVATION_CALIBRATION["other"])
        f_now, f_other = (ckpt, plain) if configured else (plain, ckpt)
        scale = rows / n
        out.append(TowerActivations(m.name, kind, configured, int(at_end * f_now * scale), int(peak * f_now * scale),
                                    None if other is None else int(other * f_other * scale), how))
    return out


def _rebuild_real(cfg, modality, modalities):
    from pretrain.models import EncoderTower, default_tower, tower_contexts

    tower_cfg = cfg.model.towers.get(modality.name) or default_tower(modality.decoder_name, modality.decoder.options)
    ctx = tower_contexts(modalities)[modality.name]
    return EncoderTower(tower_cfg, cfg.model.embed_dim, ctx)


def combined_activations(towers: list[TowerActivations]) -> int:
    """The step's activation peak: every tower's saved activations alive together at the end of the
    forward, plus the largest backward transient of one tower (their backwards run one after another)."""
    if not towers:
        return 0
    return sum(t.at_end for t in towers) + max(t.peak - t.at_end for t in towers)


# ------------------------------------------------------------------------------------ loss layer


@contextlib.contextmanager
def _simulated_world(world: int):
    """Inside, the loss layer's gathers behave as in a world of ``world`` ranks that all hold as many
    rows as this one: ``all_gather_with_grad`` returns ``world`` stacked copies (what arrives, in size
    and gradient path) and ``ring_shift`` a copy (a neighbour's block), wherever a module bound them."""
    from pretrain.losses import gather

    def all_gather_with_grad(x, layout=None):
        return torch.cat([x] * world)

    def ring_shift(x, grad=True):
        return x.clone() if grad else x.detach().clone()

    fakes = [(gather.all_gather_with_grad, all_gather_with_grad), (gather.ring_shift, ring_shift)]
    patched = []
    for module in list(sys.modules.values()):
        for name, value in list(getattr(module, "__dict__", {}).items()):
            for original, fake in fakes:
                if value is original:
                    patched.append((module, name, value))
                    setattr(module, name, fake)
    try:
        yield
    finally:
        for module, name, value in patched:
            setattr(module, name, value)


def loss_buffers(cfg, counted: CountedModel, modalities, rows: int, world: int) -> tuple[Optional[int], str]:
    """Peak bytes of the objective's forward and backward on one rank holding ``rows`` of a global
    batch of ``rows x world``, simulated on the meta device in fp32 (the step computes the loss in
    fp32); (None, why) when the objective cannot be simulated."""
    loss = cfg.loss.build()
    loss.check_finite = False
    d = cfg.model.embed_dim
    names = [m.name for m in modalities]
    meta = torch.device("meta")
    features = {m: torch.zeros(rows, d, device=meta, requires_grad=True) for m in names}
    scale = torch.zeros(1, device=meta, requires_grad=True)
    bias = torch.zeros(1, device=meta, requires_grad=True) if counted.model.logit_bias is not None else None
    params: dict = {}
    objective = counted.model.objective
    if objective is not None and sum(p.numel() for p in objective.parameters()):
        params = _objective_outputs(cfg, counted, modalities, rows)
        if params is None:
            return None, "the objective's own parameters' outputs could not be simulated"
    try:
        tracker = LiveBytes()
        with _simulated_world(world), tracker:
            out = loss(features, scale, bias, step=0, sizes=(rows,) * world, params=params or None)
            out["loss"].backward()
            del out
        return tracker.peak, "meta"
    except Exception as err:  # noqa: BLE001 - an objective the simulation cannot run (other collectives)
        return None, f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"


def _objective_outputs(cfg, counted, modalities, rows: int):
    """What the objective's parameters give the loss at ``rows`` rows, as meta tensors: their forward
    run for real on 2 random rows (on a real copy of the objective) and resized."""
    from pretrain.losses import BatchContext, LossContext

    try:
        widths = {m: t.backbone.width for m, t in counted.model.towers.items()}
        with torch.device("cpu"):
            objective = cfg.loss.build().parameters(LossContext(sorted(widths), cfg.model.embed_dim, widths))
        gen = torch.Generator().manual_seed(0)
        feats = {m: torch.nn.functional.normalize(torch.randn(2, cfg.model.embed_dim, generator=gen), dim=-1)
                 for m in widths}
        backbone = {m: torch.randn(2, w, generator=gen) for m, w in widths.items()}
        with torch.no_grad():
            out = objective(feats, backbone, BatchContext(0, 0, 0, 2, 2))
        per_sample = getattr(objective, "per_sample", frozenset())

        def grow(key):
            def to_meta(t):
                if not torch.is_tensor(t):
                    return t
                shape = (rows, *t.shape[1:]) if key in per_sample and t.dim() else tuple(t.shape)
                return torch.zeros(shape, dtype=t.dtype, device="meta", requires_grad=t.is_floating_point())
            return to_meta

        return {k: tree_map(grow(k), v) for k, v in out.items()}
    except Exception:  # noqa: BLE001
        return None


# ---------------------------------------------------------------------------------------- data


@dataclass
class EpochFigures:
    key: str
    shards: int
    samples: Optional[int]
    counted_by: str
    mode: str
    steps_per_epoch: Optional[int] = None  # whole global batches in one epoch (nominal)
    slot_samples: Optional[tuple[int, int]] = None  # min, max samples of one rank x worker in epoch 0
    epoch0_done_at: Optional[int] = None  # the step after which every sample of epoch 0 has been read
    epoch1_starts_at: Optional[int] = None  # the first step holding a sample of epoch 1
    epochs_in_run: Optional[float] = None
    note: str = ""


def epoch_figures(cfg, world: int) -> EpochFigures:
    """The training split's epoch on ``world`` ranks, from sample counts found without opening a shard
    (an index.json, sizes.json or _stats.json beside local shards, ``samples:``, a local ``index:``)."""
    from pretrain.data.pipeline import StreamSpec, slot_plan
    from pretrain.data.sources import DataSourceError, local_path, resolve_split

    split, t = cfg.data.train, cfg.train
    split = dataclasses.replace(split, sources=[dataclasses.replace(s) for s in split.sources])
    skipped = []
    for src in [split, *split.sources]:
        if src.index is not None and (local_path(src.index) is None or not local_path(src.index).is_file()):
            skipped.append(src.index)
            src.index = None  # not opened: it is not local
    try:
        sources = resolve_split(split, "data.train", need_counts=False, check_local=False)
    except DataSourceError as err:
        return EpochFigures("data.train", 0, None, "", split.mode, note=f"not computed: {err}")
    shards = sources.shards
    fig = EpochFigures("data.train", len(shards), sources.total_samples, sources.describe(), split.mode)
    micro, accum = t.micro_batch_size, t.grad_accumulation_steps
    global_batch = micro * accum * world
    missing = sum(1 for s in shards if s.samples is None)
    if sources.total_samples is None:
        absent = sum(1 for s in shards if local_path(s.url) is not None and not local_path(s.url).is_file())
        where = (f"; {absent:,} of them are not on this machine" if absent else "")
        fig.note = (f"sample counts unknown for {missing:,} of {len(shards):,} shards (no index.json, sizes.json or "
                    f"_stats.json beside them{where}; shards are not opened here{', nor ' + ', '.join(skipped) if skipped else ''}): "
                    f"steps per epoch and samples per rank x worker not computed; give data.train.samples")
        return fig
    fig.steps_per_epoch = sources.total_samples // global_batch
    fig.epochs_in_run = t.steps * global_batch / sources.total_samples if sources.total_samples else None
    workers = max(1, split.workers)
    if split.mode == "resampled":
        fig.note = "resampled: shards drawn with replacement; an epoch is nominal (samples / global batch)"
        return fig
    if missing:
        per = sources.total_samples / (world * workers)
        fig.note = (f"per-shard counts unknown ({sources.describe()}): samples per rank x worker about {per:.0f} "
                    "if the shards are even")
        return fig
    spec = StreamSpec(shards=shards, sources=sources.sources, mode="epoch", shuffle=True, window=split.shuffle_buffer,
                      seed=t.seed, world_size=world)
    counts, done, first_next = [], 0, None
    for rank in range(world):
        spec.rank = rank
        for w in range(workers):
            n = 0
            for shard, k, j in slot_plan(spec, 0, w, workers):
                total = shards[shard].samples or 0
                n += len(range(j, total, k))
            counts.append(n)
            # the rank's batches come from its workers in turn: worker w's i-th batch (0-based) is the
            # rank's batch i * workers + w; a step takes `accum` of them
            if n:
                last = (_ceil_div(n, micro) - 1) * workers + w  # the batch holding its last epoch-0 sample
                done = max(done, last // accum + 1)
            crossing = (n // micro) * workers + w  # the first batch holding an epoch-1 sample
            first = crossing // accum + 1
            first_next = first if first_next is None else min(first_next, first)
    fig.slot_samples = (min(counts), max(counts))
    fig.epoch0_done_at, fig.epoch1_starts_at = done, first_next
    return fig


# ----------------------------------------------------------------------------------- the plan


@dataclass
class StagePlan:
    stage: int
    parts: dict[str, int]
    total: int
    fits: bool
    allowed: bool
    refusal: str
    states: ModelStates


@dataclass
class Plan:
    config: str
    nodes: int
    per_node: int
    device: str
    capacity: int  # bytes per rank
    margin: float
    precision: str
    optimizer: str
    counted: CountedModel
    batch: dict
    negatives: str
    activations: list[TowerActivations]
    loss_bytes: Optional[int]
    loss_how: str
    inputs: int
    loader_host: int
    loader_note: str
    epoch: EpochFigures
    stages: dict[int, StagePlan]
    choice: Optional[int]
    reason: str
    notes: list[str]

    @property
    def world(self) -> int:
        return self.nodes * self.per_node

    @property
    def usable(self) -> int:
        return int(self.capacity * (1 - self.margin))

    def to_json(self) -> dict:
        c = self.counted
        return {
            "config": self.config, "nodes": self.nodes, "gpus_per_node": self.per_node, "world_size": self.world,
            "device": self.device, "memory_per_rank": self.capacity, "margin": self.margin,
            "usable_per_rank": self.usable, "precision": self.precision, "optimizer": self.optimizer,
            "parameters": {"total": c.total, "trainable": c.trainable, "loss": c.loss_params,
                           "temperature_and_bias": c.scale_params,
                           "towers": [dataclasses.asdict(t) for t in c.towers]},
            "batch": self.batch, "negatives": self.negatives,
            "activations": {"calibration": CALIBRATION_LABEL, "micro_batch": self.batch["micro_batch"],
                            "towers": [dataclasses.asdict(a) for a in self.activations],
                            "total": combined_activations(self.activations)},
            "loss_buffers": {"bytes": self.loss_bytes, "how": self.loss_how},
            "inputs": self.inputs, "loader_host_memory": {"bytes": self.loader_host, "note": self.loader_note},
            "epoch": dataclasses.asdict(self.epoch),
            "stages": {str(s): {"parts": p.parts, "total": p.total, "fits": p.fits, "allowed": p.allowed,
                                "refusal": p.refusal, "gradients_held": p.states.grads_held,
                                "gradients_at_update": p.states.grads_update, "checkpoint_bytes": p.states.checkpoint,
                                "notes": p.states.notes}
                       for s, p in self.stages.items()},
            "choice": self.choice, "reason": self.reason, "notes": self.notes + c.notes,
        }


def stage_refusal(train, stage: int) -> str:
    """Why ``stage`` cannot train this config ("" when it can): the optimizer's rule."""
    if train.optimizer == "lamb" and stage != 0:
        return "lamb needs ZeRO-0 (train.optimizer)"
    return ""


def make_plan(cfg, nodes: int, per_node: int, capacity: int, device: str, *, config: str = "",
              margin: float = MARGIN, counted: Optional[CountedModel] = None) -> Plan:
    """The plan of ``cfg`` on ``nodes`` x ``per_node`` ranks with ``capacity`` bytes per rank."""
    from pretrain.data import build_modalities

    t = cfg.train
    world = nodes * per_node
    modalities = build_modalities(cfg.data, train=True)
    counted = counted or count_model(cfg, modalities)
    micro, accum = t.micro_batch_size, t.grad_accumulation_steps
    global_batch = micro * accum * world
    loss = cfg.loss.build()
    negatives = loss.negatives(global_batch, [m.name for m in modalities]) if hasattr(loss, "negatives") else ""
    acts = tower_activations(counted, modalities, cfg, micro)
    loss_bytes, loss_how = loss_buffers(cfg, counted, modalities, micro * accum, world)
    b = {"fp32": 4, "bf16": 2, "fp16": 2}[t.precision]
    # on the device: the model's inputs, floating in the run's precision (uint8 pixels become that
    # there: the uint8 batch itself is freed once normalised) + the mask
    per_sample = sum(_sample_bytes(m.decoder, b, device=True) + 1 for m in modalities)
    inputs = micro * per_sample
    workers = max(1, cfg.data.train.workers)
    in_flight = (2 * workers + 1) if cfg.data.train.workers else 1  # DataLoader's prefetch_factor 2 per worker
    host_sample = sum(_sample_bytes(m.decoder, 4 if getattr(m.decoder, "dtype", torch.float32).is_floating_point
                                    else b) + 1 for m in modalities)
    loader_host = in_flight * micro * host_sample
    flight = (f"{in_flight} decoded micro-batches ({workers} worker{'s' if workers > 1 else ''} x prefetch 2 + the one "
              f"in use)"
              if cfg.data.train.workers else "1 decoded micro-batch (no worker processes)")
    loader_note = (f"{flight} x {micro} samples x {_fmt(host_sample)}; plus each worker's shuffle window of "
                   f"{cfg.data.train.shuffle_buffer} raw samples")
    epoch = epoch_figures(cfg, world)
    activations = combined_activations(acts)
    stages = {}
    for stage in STAGES:
        zero = ZeroSettings.from_train(t, stage)
        states = model_states(counted.rows, stage, world, t.precision, t.optimizer, accum, zero, counted.buffers,
                              state_bytes=optimizer_state_bytes(t))
        if getattr(t, "ema", None) is not None:  # train.ema: each rank's fp32 share of every trained parameter
            states.optimizer += 4 * sum(-(-r.numel // world) for r in counted.rows if r.trainable)
        parts = {"weights": states.weights, "masters": states.masters, "gradients": states.grads_held,
                 "gradient_copies": states.grads_update, "optimizer": states.optimizer, "deepspeed": states.deepspeed, "activations": activations,
                 "loss": loss_bytes or 0, "inputs": inputs}
        total = sum(parts.values())
        if "this machine" in device:
            total += loader_host  # the loader's host memory shares the same memory
            parts["loader"] = loader_host
        refusal = stage_refusal(t, stage)
        stages[stage] = StagePlan(stage, parts, total, total <= capacity * (1 - margin), not refusal, refusal, states)
    choice, reason = choose(stages, capacity, margin)
    notes = []
    if loss_bytes is None:
        notes.append(f"loss buffers not estimated: {loss_how}")
    return Plan(config, nodes, per_node, device, capacity, margin, t.precision, t.optimizer, counted,
                {"micro_batch": micro, "accumulation": accum, "world_size": world, "global_batch": global_batch},
                negatives, acts, loss_bytes, loss_how, inputs, loader_host, loader_note, epoch, stages, choice,
                reason, notes)


def _sample_bytes(decoder, float_bytes: int, device: bool = False) -> int:
    """One sample's bytes as the loader hands it over, or (``device``) as the model takes it."""
    shape = getattr(decoder, "output_shape", None) or ()
    dtype = getattr(decoder, "dtype", torch.float32)
    floating = dtype.is_floating_point or (device and getattr(decoder, "device_transform", None) is not None)
    size = float_bytes if floating else torch.empty((), dtype=dtype).element_size()
    return math.prod(shape) * size


def choose(stages: dict[int, StagePlan], capacity: int, margin: float) -> tuple[Optional[int], str]:
    """The fastest stage that fits (ZeRO-0, then 1, 2, 3) among those the optimizer allows, and why."""
    usable = capacity * (1 - margin)
    allowed = [s for s in STAGES if stages[s].allowed]
    for s in allowed:
        p = stages[s]
        if p.total <= usable:
            faster = [f"ZeRO-{x} ({_fmt(stages[x].total)})" for x in allowed if x < s]
            why = (f"ZeRO-{s}: the fastest stage that fits ({_fmt(p.total)} of {_fmt(usable)} usable per rank, "
                   f"{_fmt(capacity)} less {margin:.0%} margin)")
            if faster:
                why += f"; faster stages do not fit: {', '.join(faster)}"
            elif s == 0:
                why += "; ZeRO-0 keeps whole copies and was measured fastest (benchmarks/RESULTS.md)"
            refused = [f"ZeRO-{x} ({stages[x].refusal})" for x in STAGES if not stages[x].allowed]
            if refused:
                why += f"; not allowed: {', '.join(refused)}"
            return s, why
    best = min(allowed, key=lambda s: stages[s].total) if allowed else None
    if best is None:
        return None, "no stage is allowed"
    return None, (f"no allowed stage fits: the smallest is ZeRO-{best} at {_fmt(stages[best].total)} of "
                  f"{_fmt(usable)} usable per rank; lower train.micro_batch_size (raise train.grad_accumulation_steps "
                  f"to keep the global batch), set model.towers.<m>.grad_checkpointing=true, use bf16, or add ranks")


# --------------------------------------------------------------------------------- memory sources


def gpu_capacity(name: str) -> tuple[int, str]:
    """(bytes, label) of a GPU named as in ``GPUS`` (case, spaces and dashes ignored; a unique prefix will do)."""
    norm = lambda s: "".join(ch for ch in s.lower() if ch.isalnum())  # noqa: E731
    table = {norm(k): k for k in GPUS}
    key = norm(name)
    hits = [table[key]] if key in table else [v for k, v in table.items() if k.startswith(key)]
    if len(hits) != 1:
        what = "matches several" if hits else "is not in the table"
        raise PlanError(f"--gpu {name}: {what} ({', '.join(hits or GPUS)}); or give --gpu-memory GiB")
    return int(GPUS[hits[0]] * GIB), f"{GPUS[hits[0]]:.1f} GiB ({hits[0]}, --gpu)"


def host_memory() -> int:
    """This machine's physical memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def local_capacity(per_node: int, device: Optional[torch.device] = None) -> tuple[int, str]:
    """Memory per rank where this process runs: the GPU's memory on CUDA, else the machine's memory
    divided among its ``per_node`` ranks."""
    if device is not None and device.type == "cuda" or device is None and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device if device is not None else 0)
        return int(props.total_memory), f"{props.total_memory / GIB:.1f} GiB ({props.name})"
    total = host_memory()
    return total // per_node, f"{total / per_node / GIB:.1f} GiB (this machine's {total / GIB:.1f} GiB / {per_node} ranks)"


# ---------------------------------------------------------------------------------- train.zero_stage: auto


def choose_stage(cfg, world: int, local: int, capacity: int, device: str) -> tuple[int, str]:
    """``train.zero_stage: auto`` at start: the plan's choice for this world and memory, and the
    sentence that says why; ZeRO-3 (the smallest) when nothing fits, ZeRO-0 when the optimizer
    allows nothing else."""
    nodes = max(1, world // max(1, local))
    plan = make_plan(cfg, nodes, world // nodes if world % nodes == 0 else world, capacity, device)
    if plan.choice is not None:
        return plan.choice, plan.reason
    allowed = [s for s in STAGES if plan.stages[s].allowed]
    fallback = allowed[-1] if allowed else 0
    return fallback, f"ZeRO-{fallback}: {plan.reason}"


# ------------------------------------------------------------------------------------- printing


def _fmt(n: Optional[float]) -> str:
    if n is None:
        return "?"
    n = float(n)
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _wrap(text: str, indent: str = "  ") -> str:
    import textwrap

    return textwrap.fill(text, width=110, subsequent_indent=indent, break_on_hyphens=False, break_long_words=False)


def format_plan(plan: Plan) -> str:
    c, lines = plan.counted, []
    lines.append(f"plan: {plan.config or 'config'} on {plan.nodes} node(s) x {plan.per_node} = {plan.world} ranks; "
                 f"memory per rank: {plan.device}")
    lines.append(f"model: {c.total:,} parameters ({c.trainable:,} trainable), {plan.precision}, {plan.optimizer}")
    for tw in c.towers:
        built = "" if tw.built == "meta" else f"  [{tw.built}]"
        frozen = f" ({tw.trainable:,} trainable)" if tw.trainable != tw.params else ""
        lines.append(f"  {tw.modality:<10} {tw.type:<18} {tw.params:>14,}{frozen}{built}")
    lines.append(f"  {'loss':<10} {'objective':<18} {c.loss_params:>14,}")
    lines.append(f"  {'scale':<10} {'temperature/bias':<18} {c.scale_params:>14,}")
    bt = plan.batch
    lines.append(_wrap(f"batch: micro {bt['micro_batch']} x accumulation {bt['accumulation']} x {bt['world_size']} "
                       f"ranks = global {bt['global_batch']:,}" + (f"; negatives: {plan.negatives}" if plan.negatives else "")))
    e = plan.epoch
    head = f"data: {e.key}: {e.shards:,} shards, " + (f"{e.samples:,} samples" if e.samples is not None else "samples unknown")
    lines.append(head + (f" ({e.counted_by})" if e.samples is not None else ""))
    if e.steps_per_epoch is not None:
        lines.append(f"  steps per epoch: {e.steps_per_epoch:,} (samples // global batch)"
                     + (f"; the run's {e.epochs_in_run:.2f} epochs" if e.epochs_in_run is not None else ""))
    if e.slot_samples is not None:
        lines.append(f"  samples per rank x worker in epoch 0: min {e.slot_samples[0]:,}, max {e.slot_samples[1]:,}; "
                     f"epoch 0 read in full by step {e.epoch0_done_at:,}, the first sample of epoch 1 at step "
                     f"{e.epoch1_starts_at:,}")
    if e.note:
        lines.append(_wrap(f"  {e.note}", "    "))
    lines.append("")
    widths = 13
    lines.append(f"memory per rank{'':<22}" + "".join(f"{'ZeRO-' + str(s):>{widths}}" for s in STAGES))
    keys = list(plan.stages[0].parts)
    for key in keys:
        label = PART_LABELS.get(key, "loader (host memory)")
        if key == "weights":
            label = f"weights ({plan.precision})"
        elif key == "activations":
            label = f"activations ({CALIBRATION_LABEL})"
        lines.append(f"  {label:<35}" + "".join(f"{_fmt(plan.stages[s].parts[key]):>{widths}}" for s in STAGES))
    lines.append(f"  {'total':<35}" + "".join(f"{_fmt(plan.stages[s].total):>{widths}}" for s in STAGES))
    fits = []
    for s in STAGES:
        p = plan.stages[s]
        fits.append("refused" if not p.allowed else "yes" if p.fits else "no")
    lines.append(f"  {'fits in ' + _fmt(plan.usable) + '?':<35}" + "".join(f"{f:>{widths}}" for f in fits))
    lines.append(f"  {'checkpoint on disk (all ranks)':<35}"
                 + "".join(f"{_fmt(plan.stages[s].states.checkpoint):>{widths}}" for s in STAGES))
    lines.append("")
    lines.append(f"activations per tower at micro-batch {bt['micro_batch']} ({plan.precision}; meta-device "
                 f"simulation x {CALIBRATION_LABEL} factors):")
    for a in plan.activations:
        now = "on" if a.checkpointing else "off"
        other = ("not supported by this tower" if a.other is None else
                 f"{'off' if a.checkpointing else 'on'}: {_fmt(a.other)}")
        how = "" if a.how == "meta" else f"  [{a.how}]"
        lines.append(f"  {a.modality:<10} {a.kind:<14} peak {_fmt(a.peak):>11} (grad checkpointing {now}; {other}){how}")
    how = plan.loss_how if plan.loss_bytes is None else "the objective run on the meta device, its gathers simulated"
    lines.append(_wrap(f"loss buffers: {_fmt(plan.loss_bytes)} per rank ({how})"))
    lines.append(_wrap(f"loader: {_fmt(plan.loader_host)} of host memory per rank ({plan.loader_note})"))
    for s, p in plan.stages.items():
        for note in p.states.notes:
            lines.append(_wrap(f"note (ZeRO-{s}): {note}"))
    for note in plan.notes + c.notes:
        lines.append(_wrap(f"note: {note}"))
    lines.append("")
    lines.append(_wrap(f"recommended: {plan.reason}" if plan.choice is not None else f"recommended: none -- {plan.reason}"))
    return "\n".join(lines)
