#!/usr/bin/env bash
# One call on the lent GPU machine (torch + nvcc preinstalled there): build with CUDA, run the CUDA
# tests and the benchmarks, write everything under $OUT (default ./gpu_out).
#   device tool: run  command="bash scripts/gpu_check.sh"  timeout_s=540
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
pip install -q tqdm pytest expecttest 2>/dev/null || true
time python setup.py -q build_ext --inplace || { echo "BUILD FAILED"; exit 1; }
export PYTHONPATH=$PWD/python
# CUDA variants of the op and optimize_layer tests (the pipeline tests run on the CPU in CI).
timeout 200 python -m pytest -q -x tests/test_ops.py tests/test_optimize_layer.py -k "(cuda and not cpu) or streamed" \
  tests/test_pipeline.py::test_caches_in_pinned_host_memory_are_streamed 2>&1 | tail -15
cd benchmarks
timeout 90 python bench_ops.py --device cuda
timeout 150 python bench_optimize_layer.py --device cuda --imagenet --iterations 300
timeout 60 python bench_optimize_layer.py --device cuda --iterations 300 --layers layer1.0.conv1,layer4.0.conv2
