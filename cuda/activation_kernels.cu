// CUDA kernels of the activation ops (schemas in csrc/activation_ops.cpp): the
// shared implementation of csrc/device/activation_ops_impl.h on the CUDA launch back end.
#include <torch/library.h>

#include "../csrc/device/activation_ops_impl.h"
#include "cuda_launch.cuh"

namespace adaround::cuda {

using ActivationQuant = device::ActivationQuantKernels<CudaLaunch>;

TORCH_LIBRARY_IMPL(adaround, CUDA, m) {
  m.impl("fake_quantize_activation", &ActivationQuant::fake_quantize_activation);
  m.impl("fake_quantize_activation_backward", &ActivationQuant::fake_quantize_activation_backward);
  m.impl("channel_clip", &ActivationQuant::channel_clip);
  m.impl("channel_clip_backward", &ActivationQuant::channel_clip_backward);
}

}  // namespace adaround::cuda
