"""The trainer with a fault injected (or a probe), for the tests: ``python -m tests.faults --config ...
[overrides]`` runs ``pretrain.train.main()`` after patching one part as ``PRETRAIN_FAULT`` says (the
production code has no fault hooks):

- ``nan_loss:A-B``: rank 0's loss is NaN at steps A..B (a real NaN from the objective, through the
  step's real finiteness guard);
- ``die:R:S``: rank R exits at once (code 13, no clean-up) when it starts step S;
- ``crash_in_save:S``: every rank exits (code 17) in the middle of the save at step S, after its
  files are written and before the checkpoint is marked complete;
- ``kill_in_async_write:R:S`` (with ``train.async_checkpoint``): rank R's background writer kills its
  own process with SIGKILL (no clean-up) right after it wrote its first file of the save at step S,
  while the training thread goes on;
- ``fill_disk:S``: just before the save at step S, rank 0 fills the output folder's file system
  (another writer, as it were) with a file ``disk_filler``, leaving free half the size of the newest
  complete checkpoint;
- ``kill_in_upload:S:K``: rank 0 kills itself with SIGKILL (``kill -9``, no clean-up) in the
  middle of the upload of checkpoint step S to ``train.remote_sync.url``: when its K-th file is
  about to go up (the K-1 before it are up, COMPLETE is not);
- ``record_buffers:DIR`` (a probe): at every checkpoint save, each rank writes its model's buffers
  (BatchNorm statistics, ...) to ``DIR/step<S>.rank<R>.pt``, then saves as usual;
- ``save_after_resume:DIR`` (a probe): right after a resume, the engine's state as loaded is saved
  with DeepSpeed's own writer to ``DIR/resumed`` (before any step), then training goes on;
- ``record_partitions:PATH`` (a probe): right after the model is built, each rank saves
  ``{"rows": [(name, numel, ds_numel, local numel)], "decayed": [names]}`` to ``PATH.<rank>``
  (ZeRO-3 with ``train.zero3_init``: what each rank holds of each parameter), then trains on;
- ``record_memory:PATH`` (a probe): at the first step's last micro-batch, right after its backward
  (gradients held), inside the torch optimizer's step (DeepSpeed's fp32 gradient copies) and right
  after the update (optimizer states made), every tensor the engine holds, by owner (``param``,
  ``grad``, ``ds_tensor``, the DeepSpeed optimizer's attributes, the torch optimizer's parameters,
  gradients and states, the ZeRO-0 gradient buckets) with its dtype, numel and storage; after the
  run's first step, the same for the engines of every config listed in the JSON file
  ``PRETRAIN_CENSUS`` at every ZeRO stage (with a checkpoint each, ``PATH.ckpt/``), and, where an
  entry names ``loss_rows``, the peak bytes of its objective's forward and backward on that many rows
  per rank, its gathers real; each rank saves it all to ``PATH.<rank>``, then trains on
  (``pretrain.plan``'s figures are checked against it).
"""
from __future__ import annotations

import os
import shutil
import sys

import torch
import torch.distributed as dist

from pretrain import checkpoint, train
from pretrain.step import ContrastiveStep


def _steps(spec: str) -> range:
    lo, _, hi = spec.partition("-")
    return range(int(lo), int(hi or lo) + 1)


def install(spec: str) -> None:
    kind, _, arg = spec.partition(":")
    if kind == "nan_loss":
        steps, init = _steps(arg), ContrastiveStep.__init__

        def with_nan_loss(self, engine, loss_fn, *args, **kwargs):
            def nan_loss(features, scale, bias=None, masks=None, step=None, **kw):
                out = loss_fn(features, scale, bias, masks=masks, step=step, **kw)
                if dist.get_rank() == 0 and step is not None and step + 1 in steps:
                    out = {**out, "loss": out["loss"] * float("nan")}  # a real NaN, through the real guard
                return out

            init(self, engine, nan_loss, *args, **kwargs)

        ContrastiveStep.__init__ = with_nan_loss
    elif kind == "die":
        rank, step = (int(x) for x in arg.split(":"))
        call = ContrastiveStep.__call__

        def die(self, batches, index, **kwargs):
            if dist.get_rank() == rank and index + 1 == step:
                print(f"[train] rank {rank}: injected death at step {step}", flush=True)
                os._exit(13)
            return call(self, batches, index, **kwargs)

        ContrastiveStep.__call__ = die
    elif kind == "crash_in_save":
        step, commit = int(arg), checkpoint._commit

        def crash(ckpt_dir, folder, at, rank, keep):
            if at == step:
                os._exit(17)
            return commit(ckpt_dir, folder, at, rank, keep)

        checkpoint._commit = crash
    elif kind == "kill_in_async_write":
        import signal

        from pretrain import checkpoint_writer

        rank, step = (int(x) for x in arg.split(":"))
        write = checkpoint_writer.write_file

        def write_then_die(pending):
            write(pending)
            if dist.get_rank() == rank and pending.path.parent.name == checkpoint.tag_for(step):
                print(f"[train] rank {rank}: injected kill -9 during the background write of step {step}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

        checkpoint_writer.write_file = write_then_die
    elif kind == "fill_disk":
        step, save = int(arg), checkpoint.save

        def fill_then_save(engine, ckpt_dir, at, rank, *args, **kwargs):
            if at == step and rank == 0:
                before = checkpoint.latest_complete(ckpt_dir)
                size = sum(p.stat().st_size for p in before.rglob("*") if p.is_file())
                room = shutil.disk_usage(ckpt_dir).free - size // 2
                with open(ckpt_dir.parent / "disk_filler", "wb") as f:
                    f.write(bytes(room))
            return save(engine, ckpt_dir, at, rank, *args, **kwargs)

        checkpoint.save = fill_then_save
    elif kind == "kill_in_upload":
        import signal

        from pretrain import remote

        step, nth = (int(x) for x in arg.split(":"))
        put, prefix, count = remote.RemoteFolder.put, f"checkpoints/{checkpoint.tag_for(step)}/", [0]

        def put_or_die(self, local, rel, *args, **kwargs):
            if rel.startswith(prefix):
                count[0] += 1
                if count[0] == nth:
                    print(f"[train] injected kill -9 in the upload of {rel}", flush=True)
                    os.kill(os.getpid(), signal.SIGKILL)
            return put(self, local, rel, *args, **kwargs)

        remote.RemoteFolder.put = put_or_die
    elif kind == "record_buffers":
        save = checkpoint.save

        def record_then_save(engine, ckpt_dir, at, rank, *args, **kwargs):
            os.makedirs(arg, exist_ok=True)
            torch.save({n: b.detach().clone() for n, b in engine.module.named_buffers()},
                       os.path.join(arg, f"step{at}.rank{rank}.pt"))
            return save(engine, ckpt_dir, at, rank, *args, **kwargs)

        checkpoint.save = record_then_save
    elif kind == "save_after_resume":
        resume = checkpoint.Checkpointer.resume

        def resume_then_save(self, state):
            folder = resume(self, state)
            self.engine.save_checkpoint(arg, tag="resumed", client_state={"step": state.step}, save_latest=False)
            return folder

        checkpoint.Checkpointer.resume = resume_then_save
    elif kind == "record_partitions":
        from pretrain import trainer
        from pretrain.optim import param_groups

        build = trainer.build_model

        def build_and_record(*args, **kwargs):
            model = build(*args, **kwargs)
            names = {id(p): n for n, p in model.named_parameters()}
            rows = [(n, p.numel(), getattr(p, "ds_numel", p.numel()),
                     p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()) for n, p in model.named_parameters()]
            decayed = sorted(names[id(p)] for p in param_groups(model, 0.1)[0]["params"])
            torch.save({"rows": rows, "decayed": decayed}, f"{arg}.{dist.get_rank()}")
            return model

        trainer.build_model = build_and_record
    elif kind == "record_memory":
        from pretrain import engine as engine_module

        records: dict = {}
        recording = {"into": records.setdefault("run", {})}  # the run's own engine first
        step = engine_module.Engine.step

        def step_and_record(self):
            into = recording["into"]
            first = into is not None and "after_backward" not in into and self.last_micro_batch()
            if first:
                into["after_backward"] = _held_tensors(self)
                update = self.optimizer.step

                def update_and_record(*args, **kwargs):  # the torch optimizer's own step, inside DeepSpeed's
                    into.setdefault("at_update", []).append(_held_tensors(self))  # one call per group at ZeRO 1-3
                    return update(*args, **kwargs)

                self.optimizer.step = update_and_record
            step(self)
            if first:
                del self.optimizer.step
                into["after_step"] = _held_tensors(self)
                recording["into"] = None

        engine_module.Engine.step = step_and_record
        call = ContrastiveStep.__call__

        def call_then_census(self, batches, index, **kwargs):
            out = call(self, batches, index, **kwargs)
            if "census" not in records:  # after the run's first step: the engines of PRETRAIN_CENSUS
                records["census"] = {}  # (their own steps come through here too)
                records["census"] = _census(os.environ.get("PRETRAIN_CENSUS"), recording, arg)
                torch.save(records, f"{arg}.{dist.get_rank()}")
            return out

        ContrastiveStep.__call__ = call_then_census
    elif spec:
        raise SystemExit(f"tests.faults: unknown PRETRAIN_FAULT {spec!r}")


def _census(spec_file, recording: dict, path: str) -> dict:
    """For each entry of the JSON file ``spec_file`` (``[{"name", "config", "overrides", "precisions"}]``,
    optionally ``"zero3_init": true``: also ZeRO-3 built partitioned, under the stage name ``3i``),
    at every ZeRO stage and each precision: the model and engine built as the trainer builds them, one
    step on a random batch (what the engine holds recorded by ``step_and_record``), then a checkpoint
    saved with DeepSpeed's writer to ``<path>.ckpt/<name>/`` under the tag ``<stage>-<precision>``."""
    import dataclasses
    import gc
    import json

    from pretrain.config import load_config
    from pretrain.data import build_modalities
    from pretrain.data.pipeline import collate
    from pretrain.distributed import StopSignal
    from pretrain.engine import build_engine, construction
    from pretrain.models import build_model
    from pretrain.step import FlagChannel

    out: dict = {}
    if not spec_file:
        return out
    device = torch.device("cpu")
    for entry in json.loads(open(spec_file).read()):
        cfg = load_config(entry["config"], entry.get("overrides", []))
        modalities = build_modalities(cfg.data, train=True)
        gen = torch.Generator().manual_seed(dist.get_rank())

        def random_input(decoder):
            if decoder.dtype.is_floating_point:
                return torch.randn(decoder.output_shape, generator=gen)
            if getattr(decoder, "device_transform", None) is not None:  # uint8 pixels, normalised on the device
                return torch.randint(0, 256, decoder.output_shape, generator=gen, dtype=decoder.dtype)
            high = getattr(getattr(decoder, "tokenizer", None), "vocab_size", 2)
            return torch.randint(0, high, decoder.output_shape, generator=gen, dtype=decoder.dtype)

        t0 = cfg.train

        def batch(seed):
            gen.manual_seed(100 * seed + dist.get_rank())
            return collate([{"__key__": f"s{i}", **{m.name: random_input(m.decoder) for m in modalities}}
                            for i in range(t0.micro_batch_size)], [m.name for m in modalities])

        if entry.get("loss_rows"):  # the objective's own forward and backward on real tensors, gathers and all
            from pretrain.plan import LiveBytes

            rows, d = entry["loss_rows"], cfg.model.embed_dim
            loss_fn = cfg.loss.build()
            loss_fn.check_finite = False
            features = {m.name: torch.nn.functional.normalize(torch.randn(rows, d, generator=gen), dim=-1).requires_grad_()
                        for m in modalities}
            scale = torch.full((1,), 10.0, requires_grad=True)
            tracker = LiveBytes()
            with tracker:
                loss_out = loss_fn(features, scale, None, step=0, sizes=(rows,) * dist.get_world_size())
                loss_out["loss"].backward()
                del loss_out
            out[f"{entry['name']}/loss"] = tracker.peak
        for precision in entry["precisions"]:
            # ZeRO 0-3, and "3i": ZeRO-3 built partitioned (train.zero3_init) where the entry asks
            for stage in (0, 1, 2, 3, *(["3i"] if entry.get("zero3_init") else [])):
                t = dataclasses.replace(t0, zero_stage=3 if stage == "3i" else stage, precision=precision,
                                        zero3_init=stage == "3i")
                loss_fn = cfg.loss.build()
                with construction(t, dist.get_world_size()):
                    model = build_model(cfg.model, modalities, objective=loss_fn)
                engine = build_engine(model, t, dist.get_world_size())
                into = out.setdefault(f"{entry['name']}/{stage}/{precision}", {})
                step = ContrastiveStep(engine, loss_fn, FlagChannel(device), dtype=t.dtype,
                                       stop_signal=StopSignal(signals=()), seed=t.seed,
                                       device_transforms=modalities.device_transforms())
                for attempt in range(3):  # until an update happens (bf16 on random inputs may overflow)
                    into.clear()
                    recording["into"] = into
                    step([batch(attempt)] * t.grad_accumulation_steps, attempt)
                    if step.flags.receive().finite:
                        break
                engine.ds.save_checkpoint(f"{path}.ckpt/{entry['name']}", tag=f"{stage}-{precision}",
                                          client_state={"step": 1}, save_latest=False)
                del step, engine, model
                gc.collect()
    recording["into"] = None
    return out


def _held_tensors(engine) -> list[tuple]:
    """(owner, name, dtype, numel, storage pointer, storage bytes) of every tensor the engine holds:
    the module's parameters, their gradients and ZeRO-3 partitions, the DeepSpeed optimizer's tensor
    attributes (lists and dicts of them one level down), the torch optimizer's parameters, their
    gradients and its states, and the ZeRO-0 gradient buckets."""
    rows = []

    def add(owner, name, t):
        if torch.is_tensor(t):
            storage = t.untyped_storage()
            rows.append((owner, name, t.dtype, t.numel(), storage.data_ptr(), storage.nbytes()))

    for name, p in engine.module.named_parameters():
        add("param", name, p.data)
        add("grad", name, p.grad)
        add("ds_tensor", name, getattr(p, "ds_tensor", None))
    wrapper, inner = engine.ds.optimizer, engine.optimizer
    def items(value):
        if isinstance(value, dict):
            return list(value.items())
        if isinstance(value, (list, tuple)):
            return list(enumerate(value))
        return [("", value)]

    if wrapper is not inner:
        for attr, value in vars(wrapper).items():
            for key, v in items(value):
                if hasattr(v, "__dict__") and not torch.is_tensor(v):  # e.g. the gradient buckets: one level in
                    v = [t for x in vars(v).values() for _, t in items(x)]
                for sub_key, t in items(v):
                    add("ds_optimizer", f"{attr}.{key}.{sub_key}", t)
    for gi, group in enumerate(inner.param_groups):
        for pi, p in enumerate(group["params"]):
            add("optimizer_param", f"{gi}.{pi}", p)
            add("optimizer_grad", f"{gi}.{pi}", p.grad)
    for si, (p, state) in enumerate(inner.state.items()):  # ZeRO-3 swaps its sub-groups into param_groups for the step
        for key, t in state.items():
            add("optimizer_state", f"{si}.{key}", t)
    if engine.grad_sync is not None:
        for bi, bucket in enumerate(engine.grad_sync.buckets):
            add("grad_bucket", str(bi), bucket.buffer)
    return rows


# DeepSpeed optimizer attributes holding gradients and fp32 master weights (ZeRO-1/2 and ZeRO-3 names)
GRAD_ATTRS = ("averaged_gradients", "grad_partitions_flat_buffer", "grads_in_partition")
MASTER_ATTRS = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups")


def _storages(rows, pick) -> set:
    return {(r[4], r[5]) for r in rows if pick(r) and r[5] > 0}


def measured_parts(rec: dict) -> dict:
    """What one rank's engine held (a ``record_memory`` record: ``records["run"]`` or a census entry), by
    ``pretrain.plan``'s parts: unique storages (views and flat buffers once), bytes."""
    after, back = rec["after_step"], rec["after_backward"]
    weights = _storages(after, lambda r: r[0] in ("param", "ds_tensor"))
    masters = _storages(after, lambda r: r[0] == "optimizer_param"
                        or r[0] == "ds_optimizer" and r[1].split(".")[0] in MASTER_ATTRS) - weights
    held = _storages(back, lambda r: r[0] in ("grad", "grad_bucket")
                     or r[0] == "ds_optimizer" and r[1].split(".")[0].endswith(GRAD_ATTRS))
    # DeepSpeed's fp32 gradient copies, one optimizer group (ZeRO 1-3) or every parameter (ZeRO-0) at a time
    update = max((sum(b for _, b in _storages(call, lambda r: r[0] == "optimizer_grad") - held)
                  for call in rec.get("at_update", [])), default=0)
    total = lambda s: sum(b for _, b in s)  # noqa: E731
    return {"weights": total(weights), "masters": total(masters), "grads_held": total(held), "grads_update": update,
            "optimizer": total(_storages(after, lambda r: r[0] == "optimizer_state")),
            "bucket": total(_storages(after, lambda r: r[0] == "ds_optimizer" and r[1].startswith("ipg_buckets")))}


if __name__ == "__main__":
    install(os.environ.get("PRETRAIN_FAULT", ""))
    sys.exit(train.main())
