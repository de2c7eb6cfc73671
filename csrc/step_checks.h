// Argument checks of the step ops, shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <c10/core/InferenceMode.h>

#include "grid.h"

namespace adaround {

struct StepArgs {
  QuantGrid grid;  // per-channel scale and zero point, and the loop layout
  AdamStep adam{};
};

inline void check_same_layout(const at::Tensor& reference, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.sizes() == reference.sizes(), name, " must have shape ", reference.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.device() == reference.device(), name, " is on ", t.device(), " but v is on ", reference.device());
  TORCH_CHECK(t.scalar_type() == reference.scalar_type(), name, " must be ", reference.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

inline void check_reconstruction_args(const at::Tensor& pre, const at::Tensor& target) {
  TORCH_CHECK(pre.sizes() == target.sizes(), "target must have the shape of pre_activation ", pre.sizes(),
              ", got ", target.sizes());
  TORCH_CHECK(pre.scalar_type() == target.scalar_type(), "target must be ", pre.scalar_type(), ", got ",
              target.scalar_type());
  TORCH_CHECK(pre.device() == target.device(), "target is on ", target.device(), " but pre_activation is on ",
              pre.device());
}

// The operands of reconstruction_grad as its kernels walk them, element i of one at element i of
// the other: two dense tensors with the same strides (e.g. both channels-last) as they are, so the
// gradient keeps their layout; anything else as contiguous copies.
inline std::pair<at::Tensor, at::Tensor> elementwise_operands(const at::Tensor& pre, const at::Tensor& target) {
  if (pre.is_non_overlapping_and_dense() && pre.strides() == target.strides()) return {pre, target};
  return {pre.contiguous(), target.contiguous()};
}

// Adam's constants for step `step` (counting from 1), bias corrections included.
inline AdamStep adam_step_constants(double lr, double beta1, double beta2, double eps, int64_t step) {
  return AdamStep{lr, beta1, beta2, eps, 1.0 - std::pow(beta1, double(step)),
                  std::sqrt(1.0 - std::pow(beta2, double(step)))};
}

// The per-weight tensors of a step: V float32/float64 and contiguous, the others laid out as V; the
// four it writes in place share no memory with each other or with the two it reads (a kernel that
// reads one element's state while another thread writes it would update V from the wrong values),
// and none of them is a tensor autograd or inference mode guards against in-place updates.
inline void check_step_state(const at::Tensor& v, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                             const at::Tensor& soft_weight, const at::Tensor& grad, const at::Tensor& grid_base) {
  TORCH_CHECK(v.scalar_type() == at::kFloat || v.scalar_type() == at::kDouble,
              "v must be float32 or float64, got ", v.scalar_type());
  TORCH_CHECK(v.is_contiguous(), "v must be contiguous");
  check_same_layout(v, exp_avg, "exp_avg");
  check_same_layout(v, exp_avg_sq, "exp_avg_sq");
  check_same_layout(v, soft_weight, "soft_weight");
  check_same_layout(v, grad, "grad_soft_weight");
  check_same_layout(v, grid_base, "grid_base");
  const std::pair<const at::Tensor*, const char*> written[] = {
      {&v, "v"}, {&exp_avg, "exp_avg"}, {&exp_avg_sq, "exp_avg_sq"}, {&soft_weight, "soft_weight"}};
  const std::pair<const at::Tensor*, const char*> read[] = {{&grad, "grad_soft_weight"}, {&grid_base, "grid_base"}};
  for (size_t i = 0; i < 4; ++i) {
    const auto& [t, name] = written[i];
    TORCH_CHECK(!t->requires_grad(), name, " requires grad; the step updates it in place: pass a tensor that "
                "does not (e.g. ", name, ".detach())");
    TORCH_CHECK(!t->is_inference() || c10::InferenceMode::is_enabled(), name,
                " is an inference tensor, which may be updated in place only inside torch.inference_mode()");
    for (size_t j = i + 1; j < 4; ++j) {
      TORCH_CHECK(at::get_overlap_status(*t, *written[j].first) == at::MemOverlapStatus::No, name, " and ",
                  written[j].second, " share memory; the step writes both");
    }
    for (const auto& [r, read_name] : read) {
      TORCH_CHECK(at::get_overlap_status(*t, *r) == at::MemOverlapStatus::No, name, " and ", read_name,
                  " share memory; the step writes ", name, " while reading ", read_name);
    }
  }
}

// The regulariser's weight and exponent of one step: finite, reg_lambda >= 0 and beta >= 1.
inline void check_step_regularizer(double reg_lambda, double beta) {
  TORCH_CHECK(std::isfinite(reg_lambda) && reg_lambda >= 0, "reg_lambda must be finite and >= 0, got ", reg_lambda);
  TORCH_CHECK(std::isfinite(beta) && beta >= 1, "beta must be finite and >= 1, got ", beta);
}

// Validates the adam_rounding_step_ arguments (the grid's values where they are in CPU memory; no host
// sync) and derives the grid and the Adam constants.
inline StepArgs check_step_args(const at::Tensor& v, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                                  const at::Tensor& soft_weight, const at::Tensor& grad,
                                  const at::Tensor& grid_base, const at::Tensor& scale,
                                  const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
                                  std::optional<int64_t> axis, double lr, double beta1, double beta2,
                                  double eps, int64_t step) {
  check_step_state(v, exp_avg, exp_avg_sq, soft_weight, grad, grid_base);
  const QuantGrid grid = make_grid(v, scale, zero_point, quant_min, quant_max, axis);
  TORCH_CHECK(step >= 1, "step counts from 1, got ", step);
  TORCH_CHECK(lr > 0 && eps > 0 && beta1 >= 0 && beta1 < 1 && beta2 >= 0 && beta2 < 1 && std::isfinite(lr) &&
                  std::isfinite(eps),
              "Adam needs lr > 0, eps > 0 and betas in [0, 1); got lr=", lr, ", eps=", eps,
              ", betas=(", beta1, ", ", beta2, ")");
  StepArgs args;
  args.grid = grid;
  args.adam = adam_step_constants(lr, beta1, beta2, eps, step);
  return args;
}

// The per-iteration scalars of adam_rounding_step_scheduled_: float64 [4] (reg_lambda, beta,
// 1 - beta1^t, sqrt(1 - beta2^t)), contiguous, on v's device.
inline void check_schedule(const at::Tensor& schedule, const at::Tensor& v) {
  TORCH_CHECK(schedule.device() == v.device(), "schedule is on ", schedule.device(), " but v is on ", v.device());
  TORCH_CHECK(schedule.scalar_type() == at::kDouble && schedule.is_contiguous() && schedule.numel() == 4,
              "schedule must be a contiguous float64 tensor of 4 values (reg_lambda, beta, 1 - beta1^t, "
              "sqrt(1 - beta2^t)), got ", schedule.scalar_type(), " of shape ", schedule.sizes());
}

}  // namespace adaround
