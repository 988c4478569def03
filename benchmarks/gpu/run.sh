#!/usr/bin/env bash
# The one device call (see benchmarks/gpu/README.md): installs what travelled in .whl/, then runs the
# GPU benchmark; everything lands under $OUT. Needs about 7-9 minutes on one H100/H200.
# STEPS=N and ZERO_STAGE=S change the run; WHEELS=DIR, SITE=DIR and TINY=1 (the CPU-size run) are
# for rehearse.sh, which tries this script on a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-/tmp/out} PYTHONUNBUFFERED=1
WHEELS=${WHEELS:-.whl} SITE=${SITE:-/tmp/site}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
export PYTHONPATH=$SITE:$PWD
# DeepSpeed from its source archive, against the machine's torch, without its CUDA ops (built lazily)
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target "$SITE" "$WHEELS"/deepspeed-*.tar.gz \
    > "$OUT/deepspeed_install.log" 2>&1 || { tail -30 "$OUT/deepspeed_install.log"; exit 1; }
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
# every import the benchmark's processes make, before any time is spent on them
python3 -c "import torch, deepspeed, open_clip, webdataset, braceexpand, submitit, soundfile, soxr, pretrain.train
print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'open_clip', open_clip.__version__)"
# each of the three training runs (ours on synthetic inputs, on shards; OpenCLIP's) gets at most RUN_TIMEOUT s
# and each of the two data-only runs DATA_SECONDS s, so that one hung run leaves the others time inside the
# call's 600 s (the web-like shards are written first, with every core: about half a minute)
size=(--steps "${STEPS:-40}" --warmup 10 --micro-batch 256 --timeout "${RUN_TIMEOUT:-140}"
      --data-seconds "${DATA_SECONDS:-30}")
if [ "${TINY:-0}" = 1 ]; then size=(--tiny); fi
python3 benchmarks/bench_gpu.py --out "$OUT" "${size[@]}" --zero-stage "${ZERO_STAGE:-1}" 2>&1 | tee "$OUT/bench_gpu.log"
