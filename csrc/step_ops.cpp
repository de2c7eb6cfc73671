// Schemas of the optimisation-step op family and their C++ entry points.
#include "step_ops.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace adaround::ops {

at::Tensor reconstruction_grad(const at::Tensor& pre_activation, const at::Tensor& target,
                               const std::string& activation, double norm) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("adaround::reconstruction_grad", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, c10::string_view, double)>();
  return op.call(pre_activation, target, activation, norm);
}

void adam_rounding_step_(at::Tensor& v, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                         at::Tensor& soft_weight, const at::Tensor& grad_soft_weight,
                         const at::Tensor& grid_base, const at::Tensor& scale,
                         const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
                         std::optional<int64_t> axis, double reg_lambda, double beta, double lr,
                         double beta1, double beta2, double eps, int64_t step) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("adaround::adam_rounding_step_", "")
                       .typed<decltype(adam_rounding_step_)>();
  op.call(v, exp_avg, exp_avg_sq, soft_weight, grad_soft_weight, grid_base, scale, zero_point,
          quant_min, quant_max, axis, reg_lambda, beta, lr, beta1, beta2, eps, step);
}

void adam_rounding_step_scheduled_(at::Tensor& v, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                                   at::Tensor& soft_weight, const at::Tensor& grad_soft_weight,
                                   const at::Tensor& grid_base, const at::Tensor& scale, const at::Tensor& zero_point,
                                   int64_t quant_min, int64_t quant_max, std::optional<int64_t> axis,
                                   const at::Tensor& schedule, double lr, double beta1, double beta2, double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("adaround::adam_rounding_step_scheduled_", "")
                       .typed<decltype(adam_rounding_step_scheduled_)>();
  op.call(v, exp_avg, exp_avg_sq, soft_weight, grad_soft_weight, grid_base, scale, zero_point, quant_min, quant_max,
          axis, schedule, lr, beta1, beta2, eps);
}

}  // namespace adaround::ops

TORCH_LIBRARY_FRAGMENT(adaround, m) {
  m.def("reconstruction_grad(Tensor pre_activation, Tensor target, str activation, float norm) -> Tensor");
  m.def("adam_rounding_step_(Tensor(a!) v, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
        "Tensor(d!) soft_weight, Tensor grad_soft_weight, Tensor grid_base, Tensor scale, "
        "Tensor zero_point, int quant_min, int quant_max, int? axis, float reg_lambda, float beta, "
        "float lr, float beta1, float beta2, float eps, int step) -> ()");
  m.def("adam_rounding_step_scheduled_(Tensor(a!) v, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
        "Tensor(d!) soft_weight, Tensor grad_soft_weight, Tensor grid_base, Tensor scale, "
        "Tensor zero_point, int quant_min, int quant_max, int? axis, Tensor schedule, "
        "float lr, float beta1, float beta2, float eps) -> ()");
}
