#!/usr/bin/env bash
# Tries the device call on this CPU machine, in an environment shaped like the GPU machine's, so that a
# lent machine's minutes are not spent on a missing package or a broken install step:
#   1. a bare virtual environment holding only the distributions of image_packages.txt (those of them
#      installed in .venv, linked in: torch, timm, transformers, setuptools, pip, ...);
#   2. fetch_wheels.sh for this machine's Python, into a folder of the rehearsal's own;
#   3. run.sh in it, as on the device (offline install, DeepSpeed built from its source archive, the
#      imports), then the benchmark at its CPU size (TINY=1).
# Differences left: Python 3.11 and torch 2.14 here (3.12 and 2.11 there), no CUDA. Needs pip access
# for step 2. Writes under WORK (default: a new folder in /tmp, removed at the end unless KEEP=1).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
venv_py=${VENV_PY:-$root/.venv/bin/python}
work=${WORK:-$(mktemp -d /tmp/gpu_rehearsal_XXXXXX)}
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$work"' EXIT
base_py=$("$venv_py" -c "import sys; print(sys._base_executable)")
"$base_py" -m venv --without-pip "$work/image"
"$venv_py" benchmarks/gpu/packages.py link "$work/image"
py_version=$("$venv_py" -c "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')")
PY_VERSION=$py_version WHEELS=$work/whl bash benchmarks/gpu/fetch_wheels.sh 2>&1 | grep -v "is ignored" || true
# DeepSpeed's CPU op is built in a folder of the rehearsal's own: torch 2.14 leaves its lock file in
# the shared cache by design (it locks the file, not its existence), and an older torch (2.11, as on
# the GPU machine) meeting that file waits for it to go, forever (seen: VENV_PY of a torch 2.11 venv)
PATH=$work/image/bin:$PATH OUT=$work/out SITE=$work/site WHEELS=$work/whl TINY=1 \
    TORCH_EXTENSIONS_DIR=$work/torch_extensions ZERO_STAGE=${ZERO_STAGE:-1} bash benchmarks/gpu/run.sh
echo "rehearsal passed: run.sh installed what travels and ran the benchmark at its CPU size"
