"""A checkpoint continued on another layout: another number of ranks, or another ZeRO stage.

DeepSpeed's own files hold the optimizer state cut for the world size and ZeRO stage that wrote
them (it refuses another: "used a DP world size of 2 but the current world size is 1"). Here the
checkpoint is first read into a layout-free ``FullState``, one entry per parameter name: its fp32
value, its optimizer moments (``exp_avg``, ``exp_avg_sq``) and step count, plus the buffers and the
schedule's position. ZeRO 1-3 files go through DeepSpeed's own converter to its universal format
(``deepspeed.checkpoint.ds_to_universal``, run once, by rank 0, into a scratch folder); ZeRO-0 files
hold whole tensors already. ``load_full_state`` then puts it into an engine of any stage and world
size through DeepSpeed's fragment API (``safe_set_full_fp32_param``, ``safe_set_full_optimizer_state``),
or, under ZeRO-0, into the torch optimizer directly. Same layout: the checkpoint loads as it always
did (``engine.load_checkpoint``), bit for bit.

ZeRO-0 in bf16/fp16 keeps DeepSpeed's flat fp32 master per parameter group: it is read and written
slice by slice in the optimizer's parameter order.

Scope: fp32 and bf16 at ZeRO 0-3 on either side; the optimizers with ``exp_avg`` / ``exp_avg_sq``
moments (AdamW, LAMB).
"""
from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")  # ZeRO 0-2, ZeRO-3
MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass
class SavedLayout:
    zero_stage: int
    world_size: int
    precision: str
    global_batch: Optional[int] = None  # samples per optimizer step (DeepSpeed's train_batch_size)
    optimizer_groups: Optional[list] = None  # each optimizer group's parameter names (None: not recorded)


def _model_states(folder: Path) -> dict:
    for name in MODEL_STATES:
        if (Path(folder) / name).is_file():
            return torch.load(Path(folder) / name, map_location="cpu", weights_only=False)
    raise FileNotFoundError(f"{folder}: no {' or '.join(MODEL_STATES)}")


def saved_layout(folder: Path) -> SavedLayout:
    """The ZeRO stage, world size and precision that wrote a checkpoint folder."""
    states = _model_states(folder)
    ds = states.get("ds_config") or {}
    stage = int((ds.get("zero_optimization") or {}).get("stage", 0))
    precision = "bf16" if (ds.get("bf16") or {}).get("enabled") else "fp16" if (ds.get("fp16") or {}).get("enabled") else "fp32"
    batch = ds.get("train_batch_size")
    return SavedLayout(stage, int(states.get("dp_world_size", 1)), precision, int(batch) if batch else None,
                       states.get("optimizer_groups"))


@dataclass
class FullState:
    """One checkpoint's training state by parameter name, whatever layout wrote it."""

    params: dict[str, torch.Tensor]  # fp32
    buffers: dict[str, torch.Tensor]
    moments: dict[str, dict[str, torch.Tensor]]  # name -> {exp_avg, exp_avg_sq}
    scheduler: dict
    optimizer_steps: float = 0.0  # updates the optimizer made (Adam's bias correction counts them)
    global_steps: int = 0
    global_samples: int = 0
    source: SavedLayout = field(default_factory=lambda: SavedLayout(0, 1, "fp32"))


def read_full_state(folder: Path, scratch: Path, optimized: list[str]) -> FullState:
    """Collective where torch.distributed is initialised (every rank calls it): ``folder``'s state by parameter name; ``scratch`` is a
    folder rank 0 may fill and remove (the universal conversion of ZeRO 1-3 files); ``optimized``:
    the names of the parameters in the optimizer's order (``pretrain.optim.optimized_names``), which
    names a ZeRO-0 checkpoint's optimizer state (kept by position)."""
    folder = Path(folder)
    layout = saved_layout(folder)
    states = _model_states(folder)
    buffer_names = set(states.get("buffer_names") or [])
    buffers = {k: v for k, v in states["module"].items() if k in buffer_names}
    common = dict(scheduler=states.get("lr_scheduler") or {}, global_steps=int(states.get("global_steps", 0)),
                  global_samples=int(states.get("global_samples", 0)), source=layout)
    if layout.zero_stage == 0:
        read = _zero0 if layout.precision == "fp32" else _zero0_masters
        params, moments, steps = read(states, optimized)
        return FullState(params, buffers, moments, optimizer_steps=steps, **common)
    universal = Path(scratch) / f"{folder.name}.universal"
    lead = not dist.is_initialized() or dist.get_rank() == 0
    if lead:
        shutil.rmtree(universal, ignore_errors=True)
        _convert(folder, universal)
    _barrier()
    try:
        params, moments, steps = _read_universal(universal / "zero")
        params = {k: v for k, v in params.items() if k not in buffer_names}  # (the converter writes buffers too)
    finally:
        _barrier()  # every rank has read it
        if lead:
            shutil.rmtree(universal, ignore_errors=True)
    return FullState(params, buffers, moments, optimizer_steps=steps, **common)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _zero0(states: dict, names: list[str]) -> tuple[dict, dict, float]:
    """(fp32 params, moments) of a ZeRO-0 checkpoint: whole tensors; the torch optimizer's state
    is keyed by position in its groups (``names``)."""
    optim = states["optimizer"]
    count = sum(len(g["params"]) for g in optim["param_groups"])
    if count != len(names):
        raise ValueError(f"the checkpoint's optimizer holds {count} tensors, this model's {len(names)} (another model?)")
    buffers = set(states.get("buffer_names") or [])
    params = {k: v.float() for k, v in states["module"].items() if k not in buffers}
    moments, steps = {}, 0.0
    for i, name in enumerate(names):
        st = optim["state"].get(i)
        if st:
            moments[name] = {k: st[k].float() for k in MOMENTS if k in st}
            steps = max(steps, float(st.get("step", 0)))
    return params, moments, steps


def _zero0_masters(states: dict, names: list[str]) -> tuple[dict, dict, float]:
    """(fp32 params, moments) of a ZeRO-0 bf16/fp16 checkpoint: DeepSpeed keeps fp32 masters in
    the optimizer's parameter order (``names``): one per parameter (``FP16_UnfusedOptimizer``,
    whose torch optimizer state is kept by position, as ZeRO-0 in fp32), or one flat tensor per
    group, the group's parameters end to end (``FP16_Optimizer``)."""
    optim = states["optimizer"]
    if "fp32_groups" in optim:
        masters = [t for group in optim["fp32_groups"] for t in group]
        if len(masters) != len(names):
            raise ValueError(f"the checkpoint's optimizer holds {len(masters)} tensors, this model's {len(names)} (another model?)")
        _, moments, steps = _zero0({"optimizer": optim["optimizer_state_dict"], "module": {}}, names)
        return {n: t.detach().float().clone() for n, t in zip(names, masters)}, moments, steps
    flats = optim["fp32_groups_flat"]
    inner = optim["optimizer_state_dict"]["state"]
    sizes = [states["module"][n].numel() for n in names]
    if sum(sizes) != sum(f.numel() for f in flats):
        raise ValueError(f"the checkpoint's optimizer holds {sum(f.numel() for f in flats)} values, this model's "
                         f"parameters {sum(sizes)} (another model?)")
    params, moments, steps, k = {}, {}, 0.0, 0
    for i, flat in enumerate(flats):
        st, offset = inner.get(i) or {}, 0
        steps = max(steps, float(st.get("step", 0)))
        while offset < flat.numel():
            name, n = names[k], sizes[k]
            shape = states["module"][name].shape
            params[name] = flat[offset:offset + n].float().reshape(shape).clone()
            moments[name] = {m: st[m][offset:offset + n].float().reshape(shape).clone() for m in MOMENTS if m in st}
            offset, k = offset + n, k + 1
    return params, moments, steps


def _convert(folder: Path, out: Path) -> None:
    from deepspeed.checkpoint.ds_to_universal import main

    args = argparse.Namespace(input_folder=str(folder), output_folder=str(out), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    main(args)


def _read_universal(zero: Path) -> tuple[dict, dict, float]:
    """(fp32 params, moments, optimizer steps) of a universal folder (its tensors may be flat: ZeRO-3)."""
    params, moments, steps = {}, {}, 0.0
    for d in sorted(p for p in zero.iterdir() if p.is_dir()):
        if not (d / "fp32.pt").is_file():
            continue
        params[d.name] = _param(d / "fp32.pt")
        entry = {k: _param(d / f"{k}.pt") for k in MOMENTS if (d / f"{k}.pt").is_file()}
        if entry:
            moments[d.name] = entry
        if (d / "step.pt").is_file():
            steps = max(steps, float(_param(d / "step.pt")))
    common = torch.load(zero / "optimizer_state.pt", map_location="cpu", weights_only=False)
    for st in ((common.get("optimizer_state_dict") or {}).get("state") or {}).values():  # ZeRO-3: per group
        if "step" in st:
            steps = max(steps, float(st["step"]))
    return params, moments, steps


def _param(path: Path) -> torch.Tensor:
    value = torch.load(path, map_location="cpu", weights_only=False)
    value = value["param"] if isinstance(value, dict) else value
    return value.float() if torch.is_tensor(value) else torch.tensor(float(value))


def load_full_state(engine, full: FullState) -> None:
    """Collective: ``full`` into ``engine`` (a ``pretrain.engine.Engine`` of any stage and world
    size): weights, moments and step counts, buffers, the schedule. Parameters the checkpoint lacks,
    or has of another shape, are named in a ``ValueError``."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    model = engine.module
    named = dict(model.named_parameters())
    missing = sorted(set(named) - set(full.params))
    if missing:
        raise ValueError(f"the checkpoint has no value for {', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''} (another model?)")
    for name, p in named.items():
        want = torch.Size(getattr(p, "ds_shape", p.shape))
        if full.params[name].numel() != want.numel():
            raise ValueError(f"{name}: the checkpoint holds {tuple(full.params[name].shape)}, the model {tuple(want)}")
    _prime(engine)  # the moments exist only after a first step: make them, then overwrite all
    stage = engine.ds.zero_optimization_stage()
    flat = stage == 0 and hasattr(engine.ds.optimizer, "fp16_groups")  # ZeRO-0 in bf16/fp16: fp32 masters
    if flat:
        _set_masters(engine, {id(p): n for n, p in named.items()}, full)
    for name, p in named.items():
        shape = torch.Size(getattr(p, "ds_shape", p.shape))  # (a ZeRO-3 source holds them flat)
        value = full.params[name].reshape(shape)
        moments = {k: v.reshape(shape) for k, v in full.moments.get(name, {}).items()}
        if stage == 3:
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                p.data.copy_(value.to(p.dtype))
        elif not hasattr(p, "_hp_mapping"):
            p.data.copy_(value.to(p.dtype))  # ZeRO-0 in fp32, or a frozen parameter
        if not p.requires_grad or flat:
            continue
        if stage == 0 and not hasattr(p, "_hp_mapping"):
            state = engine.optimizer.state[p]
            for key in MOMENTS:
                if key in moments:
                    state[key].copy_(moments[key])
            continue
        if stage == 3:
            _set_zero3_partition(engine.ds.optimizer, p, value, None)
            for key in MOMENTS:
                if key in moments:
                    _set_zero3_partition(engine.ds.optimizer, p, moments[key], key)
            continue
        safe_set_full_fp32_param(p, value)
        for key in MOMENTS:
            if key in moments:
                safe_set_full_optimizer_state(p, moments[key], key)
    if stage in (1, 2) or (stage == 0 and hasattr(engine.ds.optimizer, "update_lp_params")):
        engine.ds.optimizer.update_lp_params()  # the bf16/fp16 copies from the fp32 masters
    step = full.optimizer_steps
    for state in engine.optimizer.state.values():
        if "step" in state:
            state["step"] = torch.full_like(state["step"], step) if torch.is_tensor(state["step"]) else step
    for name, buf in model.named_buffers():
        if name in full.buffers:
            buf.copy_(full.buffers[name].to(buf.dtype))
    if full.scheduler:
        _load_schedule(engine, full.scheduler)
    engine.ds.global_steps, engine.ds.global_samples = full.global_steps, full.global_samples


def _load_schedule(engine, saved: dict) -> None:
    """The schedule's position; with other optimizer groups than the checkpoint's, each group's
    rate follows from its own base rate at that position (the saved rates were per old group)."""
    sched = engine.scheduler
    if len(saved.get("base_lrs") or []) == len(engine.optimizer.param_groups):
        sched.load_state_dict(saved)
        return
    sched.last_epoch = int(saved["last_epoch"])
    sched._step_count = int(saved.get("_step_count", sched.last_epoch + 1))
    for group, base, factor in zip(engine.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["lr"] = base * factor(sched.last_epoch)
    sched._last_lr = [g["lr"] for g in engine.optimizer.param_groups]


def _set_masters(engine, names: dict, full: FullState) -> None:
    """ZeRO-0 in bf16/fp16: DeepSpeed's fp32 masters and their moments, one per parameter
    (``FP16_UnfusedOptimizer``) or one flat tensor per group, slice by slice in the group's order
    (``FP16_Optimizer``)."""
    zero = engine.ds.optimizer
    if hasattr(zero, "fp32_groups"):
        for group, masters in zip(zero.fp16_groups, zero.fp32_groups):
            for p, master in zip(group, masters):
                name, state = names[id(p)], engine.optimizer.state[master]
                master.data.copy_(full.params[name].reshape(master.shape))
                for key in MOMENTS:
                    if key in full.moments.get(name, {}):
                        state[key].copy_(full.moments[name][key].reshape(master.shape))
        return
    for group, master in zip(zero.fp16_groups, zero.fp32_groups_flat):
        state, offset = engine.optimizer.state[master], 0
        for p in group:
            n, name = p.numel(), names[id(p)]
            master.data[offset:offset + n].copy_(full.params[name].reshape(-1))
            for key in MOMENTS:
                if key in full.moments.get(name, {}):
                    state[key][offset:offset + n].copy_(full.moments[name][key].reshape(-1))
            offset += n


def _set_zero3_partition(zero, p, value: torch.Tensor, key) -> None:
    """This rank's slice of a whole fp32 tensor (the value, or a moment) into ZeRO-3's partition.
    (DeepSpeed's own setter misses the padding of a tensor smaller than the ranks: a (1,) tensor
    over 4 ranks.)"""
    part, _ = zero._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=key)
    start = part.numel() * zero._get_param_partition_rank(p)
    chunk = value.reshape(-1)[start:start + part.numel()]
    part.data.zero_()
    part.data[:chunk.numel()].copy_(chunk)


def _prime(engine) -> None:
    """One optimizer step with zero gradients, so that the optimizer's lazily made state (moments,
    step counts) exists and DeepSpeed links it to each parameter's fragment; what it does to the
    weights (weight decay) is overwritten after. Under ZeRO-3 the torch optimizer holds each fp32
    partition only while it steps it: they are stepped one sub-group at a time, as DeepSpeed does."""
    optimizer, zero = engine.optimizer, engine.ds.optimizer
    found_inf = getattr(optimizer, "found_inf", None)
    optimizer.found_inf = None
    if hasattr(zero, "fp32_partitioned_groups_flat"):  # ZeRO-3
        for i, flat in enumerate(zero.fp32_partitioned_groups_flat):
            grad, flat.grad = flat.grad, torch.zeros_like(flat)
            zero._optimizer_step(i)
            flat.grad = grad
    else:
        tensors = [t for g in optimizer.param_groups for t in g["params"] if t.grad is None]
        for t in tensors:
            t.grad = torch.zeros_like(t)
        optimizer.step()
        for t in tensors:
            t.grad = None
        link = getattr(zero, "_lazy_init_hp_params_optimizer_state", None)
        if link is not None:  # ZeRO 1-2 and bf16: each parameter's view into the moments
            link()
    optimizer.found_inf = found_inf
