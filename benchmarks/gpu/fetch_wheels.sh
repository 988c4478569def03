#!/usr/bin/env bash
# Run here (a machine with pip access), from the repository root, before a device call: downloads
# into .whl/ (ignored by git, carried with `carry: [".whl"]`) what the GPU machine lacks. That
# machine has Python 3.12 with torch, timm, transformers, accelerate, tensorboard and pyarrow
# (image_packages.txt lists all it has), and no package registry; carry.txt lists what it lacks.
# DeepSpeed ships as a source archive: run.sh builds it there against its torch.
# WHEELS=DIR and PY_VERSION=3.N choose another folder and Python (rehearse.sh uses both).
set -euo pipefail
cd "$(dirname "$0")/../.."
WHEELS=${WHEELS:-.whl}
PY_VERSION=${PY_VERSION:-3.12}
if [ "$WHEELS" = .whl ]; then grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude; fi
mkdir -p "$WHEELS"
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
binary=(--only-binary=:all: --python-version "$PY_VERSION" --implementation cp "${platforms[@]}" -d "$WHEELS")
# carry.txt says what and how
read_carry() { python3 benchmarks/gpu/packages.py carried "$1"; }
mapfile -t wheel < <(read_carry wheel)
mapfile -t with_deps < <(read_carry with-deps)
mapfile -t source < <(read_carry source)
python3 -m pip download -q --no-deps "${binary[@]}" "${wheel[@]}"
python3 -m pip download -q "${binary[@]}" "${with_deps[@]}"
python3 -m pip download -q --no-deps --no-binary=:all: -d "$WHEELS" "${source[@]}"
du -sh "$WHEELS" && ls "$WHEELS"
