// The two fused passes of one optimize_layer iteration, as ops with CPU and CUDA kernels.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

namespace adaround::ops {

// d/d(pre) of norm * sum((f_a(pre) - target)^2), in one pass.
at::Tensor reconstruction_grad(const at::Tensor& pre_activation, const at::Tensor& target,
                               const std::string& activation, double norm);

// One AdaRound iteration on the weights, in one pass: dL/dV from dL/dW~ (soft-quantize backward)
// plus reg_lambda * the regularizer gradient, the Adam update of V (step counts from 1), and the
// soft weights W~ for the next forward pass. `grid_base` is floor(W/s) + z; `scale` and
// `zero_point` hold one value per channel of `axis` (one in all for per tensor).
// `soft_weight` is in/out: it must hold W~ of the incoming `v` (as soft_quantize or the previous
// step left it). Where V stays saturated (h exactly 0 or 1 before and after the update) W~ cannot
// change, and the kernels skip its store together with the rest of the gradient math.
void adam_rounding_step_(at::Tensor& v, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                         at::Tensor& soft_weight, const at::Tensor& grad_soft_weight,
                         const at::Tensor& grid_base, const at::Tensor& scale,
                         const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
                         std::optional<int64_t> axis, double reg_lambda, double beta, double lr,
                         double beta1, double beta2, double eps, int64_t step);

// adam_rounding_step_ with reg_lambda, beta and Adam's bias corrections (1 - beta1^t,
// sqrt(1 - beta2^t)) read from `schedule`, a contiguous float64 [4] tensor on v's device: every
// call has the same arguments, so a CUDA graph can replay it while the schedule advances in memory.
void adam_rounding_step_scheduled_(at::Tensor& v, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                                   at::Tensor& soft_weight, const at::Tensor& grad_soft_weight,
                                   const at::Tensor& grid_base, const at::Tensor& scale, const at::Tensor& zero_point,
                                   int64_t quant_min, int64_t quant_max, std::optional<int64_t> axis,
                                   const at::Tensor& schedule, double lr, double beta1, double beta2, double eps);

}  // namespace adaround::ops
