"""Runs OpenCLIP's own trainer (``open_clip_train.main``) with the benchmark's model config registered.

    torchrun --nproc_per_node=2 -- benchmarks/openclip_launch.py --model openclip_bench_vit \
        --dataset-type synthetic --device cpu --dist-backend gloo ...

``benchmarks/openclip_bench_vit.json`` (model name: the file's stem) is added to OpenCLIP's model
registry, then the arguments go to ``open_clip_train.main.main`` unchanged. (The ``--`` keeps
torchrun from reading OpenCLIP's ``--logs`` as an abbreviation of its own ``--logs-specs``.)

``open_clip_train.data`` imports pandas at the top for its CSV dataset only; pandas is not a
dependency of ``open-clip-torch`` nor of this project, so when it is missing a stand-in module is
registered while that module is imported (an empty module: the CSV dataset would fail on
`pd.read_csv`; the synthetic dataset never touches it). And the trainer passes ``device_ids=[cpu]``
to ``DistributedDataParallel``, which torch refuses for CPU modules: on CPU they are dropped
(DDP itself, with its default buckets, is unchanged).
Used by ``benchmarks/bench_train.py``.
"""
import sys
import types
from pathlib import Path

import open_clip  # noqa: E402  (imports torch before any stand-in exists)

try:
    import pandas  # noqa: F401
except ImportError:  # only while open_clip_train.data is imported; its `pd` stays an empty module
    sys.modules["pandas"] = types.ModuleType("pandas")
    try:
        import open_clip_train.data  # noqa: F401
    finally:
        del sys.modules["pandas"]
from open_clip_train.main import main  # noqa: E402

import torch  # noqa: E402


class _DDP(torch.nn.parallel.DistributedDataParallel):
    """``open_clip_train.main`` wraps the model as ``DistributedDataParallel(model, device_ids=[device])``,
    which torch refuses for a CPU module (device_ids must be None there); drop them on CPU only."""

    def __init__(self, module, device_ids=None, **kwargs):
        if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
            device_ids = None
        super().__init__(module, device_ids=device_ids, **kwargs)


torch.nn.parallel.DistributedDataParallel = _DDP

if __name__ == "__main__":
    import os

    open_clip.add_model_config(Path(__file__).resolve().parent / "openclip_bench_vit.json")
    if os.environ.get("OPENCLIP_MODEL_CONFIG"):  # another model config (benchmarks/bench_gpu.py --tiny)
        open_clip.add_model_config(os.environ["OPENCLIP_MODEL_CONFIG"])
    sys.exit(main(sys.argv[1:]))
