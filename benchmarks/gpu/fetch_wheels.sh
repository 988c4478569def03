#!/usr/bin/env bash
# Run here (a machine with pip access), from the repository root, before a device call: downloads
# into .whl/ (ignored by git, carried with `carry: [".whl"]`) what the GPU machine lacks. That
# machine has Python 3.12 with torch, timm, transformers, accelerate, tensorboard and pyarrow, and
# no package registry. DeepSpeed ships as a source archive: run.sh builds it there against its torch.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
wheels=(webdataset braceexpand submitit soundfile soxr open-clip-torch ftfy wcwidth hjson py-cpuinfo ninja
        msgpack nvidia-ml-py einops fsspec)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "${wheels[@]}"
python3 -m pip download -q --no-deps --no-binary=:all: -d .whl "deepspeed>=0.16,<0.20"
du -sh .whl && ls .whl
