"""The DeepSpeed engine, built directly with ``deepspeed.initialize`` from the engine fields of
``train.*`` (ZeRO stage, precision, clipping, extra DeepSpeed settings) and the optimizer of
``pretrain.optim``. The process group comes from ``pretrain.distributed.init_distributed``.

``Engine`` holds it with the optimizer, the schedule and the ZeRO-0 gradient averaging, and is the
one place that says in what order an update happens (its docstring)."""
from __future__ import annotations

import contextlib
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import torch

from pretrain.distributed import partitioned_build
from pretrain.optim import build_optimizer, build_schedule
from pretrain.options import require

# DeepSpeed settings the training config owns, and the key that sets each
OWNED_KEYS = {"train_micro_batch_size_per_gpu": "train.micro_batch_size", "train_batch_size": "train.micro_batch_size",
              "gradient_accumulation_steps": "train.grad_accumulation_steps", "gradient_clipping": "train.grad_clip",
              "bf16": "train.precision", "fp16": "train.precision", "optimizer": "train.optimizer",
              "scheduler": "train.schedule"}


@dataclass(kw_only=True)  # built from the config by name
class EngineConfig:
    """The engine fields of ``train.*``."""

    # 0-3, or auto: the fastest stage that fits this world's memory, chosen when the run starts
    # (pretrain.plan.choose_stage; the run's config.yaml records the stage chosen)
    zero_stage: Union[int, str] = 2
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_clip: float = 1.0
    deepspeed: dict[str, Any] = field(default_factory=dict)  # merged over the generated DeepSpeed config
    zero3_init: bool = False  # ZeRO-3: build the model already partitioned (deepspeed.zero.Init)
    # ZeRO-0 in fp32 on several ranks: average gradients in buckets while backward runs (pretrain.gradsync)
    # instead of DeepSpeed's one reduction after it
    overlap_grad_reduce: bool = True

    def check_engine(self, key: str = "train") -> None:
        require(self.zero_stage in (0, 1, 2, 3, "auto") and not isinstance(self.zero_stage, bool), f"{key}.zero_stage",
                f"must be 0, 1, 2 or 3, or auto (the fastest that fits, chosen at start), got {self.zero_stage!r}")
        require(self.grad_clip >= 0, f"{key}.grad_clip", f"must be >= 0, got {self.grad_clip}")
        for k in self.deepspeed:
            require(k not in OWNED_KEYS, f"{key}.deepspeed.{k}", f"set by {OWNED_KEYS.get(k)}; give it there")
        require("stage" not in (self.deepspeed.get("zero_optimization") or {}),
                f"{key}.deepspeed.zero_optimization.stage", f"set by {key}.zero_stage; give it there")
        require(not self.zero3_init or self.zero_stage == 3, f"{key}.zero3_init",
                f"goes with {key}.zero_stage=3" + (" (auto may choose another stage: name 3)" if self.zero_stage == "auto" else ""))

    @property
    def dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(cfg, world_size: int) -> dict:
    """The DeepSpeed config from the training config (``TrainConfig``), with ``train.deepspeed``
    merged over it (e.g. ``zero_optimization: {overlap_comm: true, reduce_bucket_size: 5e8}``)."""
    generated = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accumulation_steps,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accumulation_steps * world_size,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _merge(generated, cfg.deepspeed)


def construction(cfg, world_size: int):
    """Where the model is built: with ``train.zero3_init`` (ZeRO-3), inside ``deepspeed.zero.Init``,
    so each parameter is partitioned over the ranks as soon as its module is made and no rank ever
    holds the whole model (one larger than a rank's memory can be built); otherwise as usual."""
    if cfg.zero_stage == 3 and cfg.zero3_init:
        import deepspeed
        import timm  # noqa: F401 - imported before deepspeed patches the tensor constructors: importing
        import transformers  # noqa: F401 - them (torch._dynamo) inside zero.Init fails

        config = deepspeed_config(cfg, world_size)
        config.pop("train_batch_size")  # derived again from the micro-batch (DeepSpeed's world is not set up yet)
        return partitioned_build(deepspeed.zero.Init(config_dict_or_path=config))
    return contextlib.nullcontext()


@dataclass
class Engine:
    """The DeepSpeed engine and what updates with it. One optimizer step, in this order:

    1. ``lr()``: the learning rate the coming update uses (the schedule's current value);
    2. for each micro-batch, ``backward(loss)``: gradients accumulate (under ZeRO-0 with the overlapped
       averaging, the last micro-batch's buckets are averaged while its backward runs), then
       ``step()``: DeepSpeed counts the micro-batch and, at the last one of the step, clips the
       gradients, runs the optimizer (the fused AdamW leaves weights and moments as they were where
       ``optimizer.found_inf`` is 1: a step skipped on the device) and then advances the schedule;
    3. a step skipped on the host instead (an optimizer without ``found_inf``, e.g. LAMB): no backward,
       no ``step()``; ``skip()`` advances the schedule alone, so it stays on the step count.
    """

    ds: Any  # the DeepSpeed engine (its ``module`` is the model)
    optimizer: torch.optim.Optimizer  # the torch optimizer inside DeepSpeed's ZeRO wrapper
    scheduler: Any  # torch's LambdaLR (pretrain.optim.build_schedule), stepped by DeepSpeed
    grad_sync: Any = None  # pretrain.gradsync.OverlappedGradSync, or None: DeepSpeed averages

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    @property
    def skips_on_device(self) -> bool:
        """The optimizer skips an update on the device when told ``found_inf`` (what GradScaler uses)."""
        return bool(getattr(self.optimizer, "defaults", {}).get("fused"))

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def last_micro_batch(self) -> bool:
        """Whether the next backward is the step's last micro-batch's."""
        return self.ds.is_gradient_accumulation_boundary()

    def backward(self, loss: torch.Tensor, **kwargs) -> None:
        if self.grad_sync is None:
            self.ds.backward(loss, **kwargs)
            return
        self.grad_sync.arm(self.last_micro_batch())  # the buckets go out while backward runs
        self.ds.backward(loss, **kwargs)
        self.grad_sync.finish()  # averaged before DeepSpeed's step

    def step(self) -> None:
        self.ds.step()  # at the step's last micro-batch: clip, optimizer, schedule

    def skip(self) -> None:
        self.scheduler.step()


# DeepSpeed settings that change how ZeRO-0 averages gradients: with any of them DeepSpeed does it
DS_REDUCTION_KEYS = ("prescale_gradients", "gradient_predivide_factor", "communication_data_type", "sparse_gradients")


def build_engine(model: torch.nn.Module, cfg, world_size: int) -> Engine:
    """The DeepSpeed engine with the configured optimizer and schedule (``cfg``: a ``TrainConfig``)
    and, under ZeRO-0 in fp32 on several ranks, the overlapped gradient averaging (``pretrain.gradsync``)."""
    import deepspeed

    optimizer = build_optimizer(model, cfg)
    scheduler = build_schedule(optimizer, cfg, cfg.steps)
    _stand_in_for_deepspeed_muon()
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, world_size)
    )
    if cfg.precision != "fp32":
        # DeepSpeed casts parameters only; floating buffers (BatchNorm statistics) must follow, or
        # normalisation layers meet bf16/fp16 inputs and weights beside fp32 statistics.
        for buf in engine.module.buffers():
            if buf.is_floating_point():
                buf.data = buf.data.to(cfg.dtype)
    sync = None
    if (cfg.overlap_grad_reduce and cfg.zero_stage == 0 and cfg.precision == "fp32" and world_size > 1
            and not any(k in cfg.deepspeed for k in DS_REDUCTION_KEYS)):
        from pretrain.gradsync import OverlappedGradSync

        timeout = 2 * getattr(cfg, "collective_timeout", 0) or None  # as the default group's (pretrain.trainer)
        sync = OverlappedGradSync(engine.module, timeout=timeout)
        engine.enable_backward_allreduce = False  # the buckets are averaged by the step (sync.finish)
        engine.zero_grad = sync.zero_grad  # between steps: buckets zeroed, gradients kept as their views
    return Engine(engine, optimizer, scheduler, sync)


MUON_MODULES = ("deepspeed.runtime.zero.muon.muon_optimizer", "deepspeed.runtime.zero.muon.original_muon")


def _not_here(*args, **kwargs):
    raise RuntimeError("DeepSpeed's Muon is not used by this project (pretrain.engine stands in for it)")


def _stand_in_for_deepspeed_muon() -> None:
    """DeepSpeed's ZeRO code imports its Muon optimizer only to ask whether the optimizer is one (when
    the engine is built, and again in ZeRO-1/2's first gradient reduction, which also takes Muon's
    update function and calls it only for Muon parameters). That import wraps three functions in
    ``torch.compile``, which loads inductor: 1.1-1.4 s of CPU in every rank of every run (DeepSpeed
    0.19, torch 2.14, the project's 2-core machine). No optimizer here is Muon: ``train.optimizer`` is
    AdamW or LAMB and ``train.deepspeed.optimizer`` is refused. So, unless something imported the real
    modules already, stand-ins answer the same "no" without that import: a class nothing is an
    instance of, and update functions that would say so if ever called."""
    if any(name in sys.modules for name in MUON_MODULES):
        return

    class MuonWithAuxAdam:  # no optimizer of this project is one
        pass

    for name in MUON_MODULES:
        stand_in = types.ModuleType(name, "pretrain.engine's stand-in: DeepSpeed's Muon is not used here")
        stand_in.MuonWithAuxAdam, stand_in.muon_update, stand_in.adam_update = MuonWithAuxAdam, _not_here, _not_here
        sys.modules[name] = stand_in
