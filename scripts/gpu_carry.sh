#!/usr/bin/env bash
# Before a device-tool call: copies what the GPU machine lacks into .gpu_carry/ (git-ignored), which
# the call names in `carry`. That machine has no Debian packages, so Fashion-MNIST (31 MB) travels.
# The FP32 checkpoint (45 MB) would not fit the 64 MiB a call may carry beside it: the job trains its
# own there, on the GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
mkdir -p .gpu_carry/fashion-mnist
cp "$SRC"/*-ubyte.gz .gpu_carry/fashion-mnist/
du -sh .gpu_carry
