#!/usr/bin/env bash
# Optional, before a call on a GPU machine that reaches no package registry: copies into .gpu_carry/
# (git-ignored; name it in the call's carry) what scripts/check_cuda.sh would otherwise have to
# download there: pure-Python wheels of the test tools, ninja's wheel (any Python 3) and the
# Fashion-MNIST files (31 MB) for the main job. check_cuda.sh runs without it and reports what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
SRC=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
mkdir -p .gpu_carry/fashion-mnist .gpu_carry/wheels
cp "$SRC"/*-ubyte.gz .gpu_carry/fashion-mnist/
# Wheels that install on any CPython 3 on x86-64 Linux.
"$PY" -m pip download -q --dest .gpu_carry/wheels --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_12_x86_64 \
  --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform any \
  pytest ninja
du -sh .gpu_carry
