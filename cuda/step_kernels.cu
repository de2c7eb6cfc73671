// CUDA kernels of the optimisation-step ops (schemas in csrc/step_ops.cpp): the shared
// implementation of csrc/device/step_ops_impl.h on the CUDA launch back end.
#include <torch/library.h>

#include "../csrc/device/step_ops_impl.h"
#include "cuda_launch.cuh"

namespace adaround::cuda {

using Step = device::StepKernels<CudaLaunch>;

TORCH_LIBRARY_IMPL(adaround, CUDA, m) {
  m.impl("reconstruction_grad", &Step::reconstruction_grad);
  m.impl("adam_rounding_step_", &Step::adam_rounding_step_);
  m.impl("adam_rounding_step_scheduled_", &Step::adam_rounding_step_scheduled_);
}

}  // namespace adaround::cuda
