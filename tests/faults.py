"""The trainer with a fault injected (or a probe), for the tests: ``python -m tests.faults --config ...
[overrides]`` runs ``pretrain.train.main()`` after patching one part as ``PRETRAIN_FAULT`` says (the
production code has no fault hooks):

- ``nan_loss:A-B``: rank 0's loss is NaN at steps A..B (a real NaN from the objective, through the
  step's real finiteness guard);
- ``die:R:S``: rank R exits at once (code 13, no clean-up) when it starts step S;
- ``crash_in_save:S``: every rank exits (code 17) in the middle of the save at step S, after its
  files are written and before the checkpoint is marked complete;
- ``fill_disk:S``: just before the save at step S, rank 0 fills the output folder's file system
  (another writer, as it were) with a file ``disk_filler``, leaving free half the size of the newest
  complete checkpoint;
- ``record_buffers:DIR`` (a probe): at every checkpoint save, each rank writes its model's buffers
  (BatchNorm statistics, ...) to ``DIR/step<S>.rank<R>.pt``, then saves as usual;
- ``save_after_resume:DIR`` (a probe): right after a resume, the engine's state as loaded is saved
  with DeepSpeed's own writer to ``DIR/resumed`` (before any step), then training goes on;
- ``record_partitions:PATH`` (a probe): right after the model is built, each rank saves
  ``{"rows": [(name, numel, ds_numel, local numel)], "decayed": [names]}`` to ``PATH.<rank>``
  (ZeRO-3 with ``train.zero3_init``: what each rank holds of each parameter), then trains on.
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
    elif spec:
        raise SystemExit(f"tests.faults: unknown PRETRAIN_FAULT {spec!r}")


if __name__ == "__main__":
    install(os.environ.get("PRETRAIN_FAULT", ""))
    sys.exit(train.main())
