#!/bin/bash
# Build what tests/gpu_check.sh installs on a GPU machine that has no package
# index (this workplace's device machines: Python 3.12, x86-64): heel's wheel
# and the runtime and test dependencies such a machine may lack.
#
# Usage: tests/gpu_wheels.sh [DIR] [PYTHON_VERSION]   (default: .whl, 3.12)
# Then, on the GPU machine: tests/gpu_check.sh DIR LOG_DIR
set -eu
dir=${1:-.whl}
version=${2:-3.12}
cd "$(dirname "$0")/.."
mkdir -p "$dir"
rm -f "$dir"/heel-*.whl
python3 -m pip wheel -q --no-deps . -w "$dir"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dir" cffi trio outcome sniffio pytest-trio
ls -1 "$dir"/*.whl
