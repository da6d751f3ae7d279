#!/usr/bin/env bash
# Download the wheels the GPU check needs into .whl/ (git-ignored locally), on a machine that reaches PyPI.
# The GPU machine has Python 3.12, torch 2.11.0+cu130 and nvcc 13.0 but no network; FlashInfer's wheel is pure
# Python + JIT sources, so it only needs apache-tvm-ffi besides what that image already holds (scripts/gpu/README.md).
set -euo pipefail
cd "$(dirname "$0")/../.."

FLASHINFER_VERSION=0.6.15.post1   # SGLang 0.5.17's pin: the last SGLang release on torch 2.11 (the GPU image's torch)
TVM_FFI_VERSION=0.1.15.post2      # flashinfer 0.6.15 needs apache-tvm-ffi >=0.1.6,<0.2 (!=0.1.8)
DEST=.whl
PYTHON=${PYTHON:-python3}

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"

mkdir -p "$DEST"
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$DEST" \
    "flashinfer-python==${FLASHINFER_VERSION}" "apache-tvm-ffi==${TVM_FFI_VERSION}"
ls -l "$DEST"
du -ch "$DEST"/*.whl | tail -1   # must stay well under the 64 MiB a device call may carry (about 18 MB)
