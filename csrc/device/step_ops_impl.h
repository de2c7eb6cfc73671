// The optimisation-step ops of a device back end (schemas in csrc/step_ops.cpp), written once and
// instantiated with a launch back end, as rounding_ops_impl.h.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <optional>
#include <string>

#include "../grid.h"
#include "../step_checks.h"
#include "element_kernels.h"
#include "rounding_ops_impl.h"

namespace adaround::device {

template <typename Launch>
struct StepKernels {
  using Tensor = at::Tensor;

  static Tensor reconstruction_grad(const Tensor& pre, const Tensor& target, c10::string_view activation,
                                    double norm) {
    const Activation act = parse_activation(std::string(activation));
    check_reconstruction_args(pre, target);
    [[maybe_unused]] const auto guard = on_device_of<Launch>(pre, "pre_activation");
    const std::pair<Tensor, Tensor> operands = elementwise_operands(pre, target);
    const Tensor& p = operands.first;
    const Tensor& t = operands.second;
    Tensor grad = at::empty_like(p);
    AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "reconstruction_grad", [&] {
      Launch::elementwise(p.numel(), ReconstructionGradElement<scalar_t>{p.const_data_ptr<scalar_t>(),
                                                                         t.const_data_ptr<scalar_t>(),
                                                                         grad.mutable_data_ptr<scalar_t>(),
                                                                         scalar_t(norm), act});
    });
    return grad;
  }

  static void adam_rounding_step_(Tensor& v, Tensor& exp_avg, Tensor& exp_avg_sq, Tensor& soft_weight,
                                  const Tensor& grad, const Tensor& grid_base, const Tensor& scale,
                                  const Tensor& zero_point, int64_t quant_min, int64_t quant_max,
                                  std::optional<int64_t> axis, double reg_lambda, double beta, double lr,
                                  double beta1, double beta2, double eps, int64_t step) {
    const StepArgs args = check_step_args(v, exp_avg, exp_avg_sq, soft_weight, grad, grid_base, scale, zero_point,
                                          quant_min, quant_max, axis, lr, beta1, beta2, eps, step);
    check_step_regularizer(reg_lambda, beta);
    [[maybe_unused]] const auto guard = on_device_of<Launch>(v, "v");
    const StepSchedule schedule{reg_lambda, beta, args.adam.bias_correction1, args.adam.bias_correction2_sqrt};
    launch_step(v, exp_avg, exp_avg_sq, soft_weight, grad, grid_base, args.grid, args.adam, ScheduleArgument{schedule});
  }

  // adam_rounding_step_ with reg_lambda, beta and Adam's bias corrections of this iteration read
  // from `schedule`, a contiguous float64 [4] tensor on v's device (see ScheduleInMemory).
  static void adam_rounding_step_scheduled_(Tensor& v, Tensor& exp_avg, Tensor& exp_avg_sq, Tensor& soft_weight,
                                            const Tensor& grad, const Tensor& grid_base, const Tensor& scale,
                                            const Tensor& zero_point, int64_t quant_min, int64_t quant_max,
                                            std::optional<int64_t> axis, const Tensor& schedule, double lr,
                                            double beta1, double beta2, double eps) {
    const StepArgs args = check_step_args(v, exp_avg, exp_avg_sq, soft_weight, grad, grid_base, scale, zero_point,
                                          quant_min, quant_max, axis, lr, beta1, beta2, eps, /*step=*/1);
    check_schedule(schedule, v);
    [[maybe_unused]] const auto guard = on_device_of<Launch>(v, "v");
    launch_step(v, exp_avg, exp_avg_sq, soft_weight, grad, grid_base, args.grid, args.adam,
                ScheduleInMemory{schedule.const_data_ptr<double>()});
  }

 private:
  template <typename GetSchedule>
  static void launch_step(Tensor& v, Tensor& exp_avg, Tensor& exp_avg_sq, Tensor& soft_weight, const Tensor& grad,
                          const Tensor& grid_base, const QuantGrid& grid, const AdamStep& adam_constants,
                          GetSchedule get_schedule) {
    AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "adam_rounding_step", [&] {
      using T = scalar_t;
      Launch::elementwise(v.numel(), RoundingStepElement<T, GetSchedule>{
                                         v.mutable_data_ptr<T>(), exp_avg.mutable_data_ptr<T>(),
                                         exp_avg_sq.mutable_data_ptr<T>(), soft_weight.mutable_data_ptr<T>(),
                                         grad.const_data_ptr<T>(), grid_base.const_data_ptr<T>(), grid_view<T>(grid),
                                         adam_constants, get_schedule});
    });
  }
};

}  // namespace adaround::device
