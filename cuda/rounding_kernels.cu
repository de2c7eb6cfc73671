// CUDA kernels of the rounding ops (schemas in csrc/rounding_ops.cpp): the shared implementation of
// csrc/device/rounding_ops_impl.h on the CUDA launch back end.
#include <torch/library.h>

#include "../csrc/device/rounding_ops_impl.h"
#include "cuda_launch.cuh"

namespace adaround::cuda {

using Rounding = device::RoundingKernels<CudaLaunch>;

TORCH_LIBRARY_IMPL(adaround, CUDA, m) {
  m.impl("soft_quantize", &Rounding::soft_quantize);
  m.impl("soft_quantize_backward", &Rounding::soft_quantize_backward);
  m.impl("round_regularizer", &Rounding::round_regularizer);
  m.impl("round_regularizer_backward", &Rounding::round_regularizer_backward);
  m.impl("hard_quantize", &Rounding::hard_quantize);
  m.impl("init_v", &Rounding::init_v);
}

}  // namespace adaround::cuda
