#!/usr/bin/env bash
# The one device call (see benchmarks/gpu/README.md): installs what travelled in .whl/, then runs the
# GPU benchmark; everything lands under $OUT. Needs about 6-8 minutes on one H200.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-/tmp/out} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
# DeepSpeed from its source archive, against the machine's torch, without its CUDA ops (built lazily)
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/deepspeed-*.tar.gz \
    > "$OUT/deepspeed_install.log" 2>&1 || { tail -30 "$OUT/deepspeed_install.log"; exit 1; }
nvidia-smi > "$OUT/nvidia-smi.txt" || true
python3 -c "import torch, deepspeed, open_clip; print(torch.__version__, deepspeed.__version__, open_clip.__version__)"
python3 benchmarks/bench_gpu.py --out "$OUT" --steps "${STEPS:-40}" --warmup 10 --micro-batch 256 --zero-stage "${ZERO_STAGE:-1}" 2>&1 | tee "$OUT/bench_gpu.log"
