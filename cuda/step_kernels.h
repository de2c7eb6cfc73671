// The CUDA step with its per-iteration scalars in device memory, for optimize_layer's CUDA graph:
// a replay runs the captured kernels with the captured arguments, so what changes from iteration
// to iteration must be read on the device. The op form, adam_rounding_step_, is in step_kernels.cu.
#pragma once

#include <ATen/ATen.h>

#include "../csrc/grid.h"

namespace adaround::cuda {

// adam_rounding_step_ on CUDA tensors (the grid laid out by make_grid, in v's dtype), with
// `schedule` a float64 [4] tensor on v's device holding reg_lambda, beta and Adam's two bias
// corrections (1 - beta1^t, sqrt(1 - beta2^t)) of this iteration.
void adam_rounding_step_scheduled_(at::Tensor& v, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                                   at::Tensor& soft_weight, const at::Tensor& grad_soft_weight,
                                   const at::Tensor& grid_base, const QuantGrid& grid, const at::Tensor& schedule,
                                   double lr, double beta1, double beta2, double eps);

}  // namespace adaround::cuda
