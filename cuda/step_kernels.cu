// CUDA kernels of the optimisation-step ops (schemas in csrc/step_ops.cpp).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../csrc/grid.h"
#include "../csrc/rounding_math.h"
#include "../csrc/step_checks.h"
#include "cuda_loops.cuh"
#include "step_kernels.h"

namespace adaround::cuda {
namespace {

using at::Tensor;

Tensor reconstruction_grad_cuda(const Tensor& pre, const Tensor& target, c10::string_view activation,
                                double norm) {
  c10::cuda::CUDAGuard guard(pre.device());
  const Activation act = parse_activation(std::string(activation));
  check_reconstruction_args(pre, target);
  const Tensor p = pre.contiguous();
  const Tensor t = target.contiguous();
  Tensor grad = at::empty_like(p);
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "reconstruction_grad_cuda", [&] {
    const scalar_t* p_ptr = p.const_data_ptr<scalar_t>();
    const scalar_t* t_ptr = t.const_data_ptr<scalar_t>();
    scalar_t* g_ptr = grad.mutable_data_ptr<scalar_t>();
    const scalar_t n = scalar_t(norm);
    launch_elementwise(p.numel(), [=] __device__(int64_t i) {
      g_ptr[i] = reconstruction_grad<scalar_t>(act, p_ptr[i], t_ptr[i], n);
    });
  });
  return grad;
}

// The scalars of one step that change from iteration to iteration.
struct StepSchedule {
  double reg_lambda, beta, bias_correction1, bias_correction2_sqrt;
};

// Where the step finds its schedule: in its arguments, or in device memory (a graph replay cannot
// pass new host arguments).
struct ScheduleArgument {
  StepSchedule s;
  __device__ StepSchedule operator()() const { return s; }
};
struct ScheduleInMemory {
  const double* p;  // reg_lambda, beta, bias_correction1, bias_correction2_sqrt
  __device__ StepSchedule operator()() const { return {p[0], p[1], p[2], p[3]}; }
};

template <typename GetSchedule>
void launch_step(Tensor& v, Tensor& exp_avg, Tensor& exp_avg_sq, Tensor& soft_weight, const Tensor& grad,
                 const Tensor& grid_base, const QuantGrid& grid, const AdamStep& adam_constants,
                 GetSchedule get_schedule) {
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "adam_rounding_step_cuda", [&] {
    using T = scalar_t;
    T* v_ptr = v.mutable_data_ptr<T>();
    T* m_ptr = exp_avg.mutable_data_ptr<T>();
    T* m2_ptr = exp_avg_sq.mutable_data_ptr<T>();
    T* w_ptr = soft_weight.mutable_data_ptr<T>();
    const T* g_ptr = grad.const_data_ptr<T>();
    const T* base_ptr = grid_base.const_data_ptr<T>();
    const T* s_ptr = grid.scale.const_data_ptr<T>();
    const T* z_ptr = grid.zero_point.const_data_ptr<T>();
    const T qmin = T(grid.qmin), qmax = T(grid.qmax);
    const AdamStep constants = adam_constants;
    const int64_t inner = grid.inner, channels = grid.channels;
    launch_elementwise(v.numel(), [=] __device__(int64_t i) {
      const StepSchedule sched = get_schedule();
      AdamStep adam = constants;
      adam.bias_correction1 = sched.bias_correction1;
      adam.bias_correction2_sqrt = sched.bias_correction2_sqrt;
      const T lam = T(sched.reg_lambda), b = T(sched.beta);
      const int64_t c = (i / inner) % channels;
      T vi = v_ptr[i], m = m_ptr[i], m2 = m2_ptr[i], w;
      const bool w_set = rounding_step<T>(
          vi, m, m2, w, [&] { return g_ptr[i]; }, [&] { return base_ptr[i]; }, s_ptr[c], z_ptr[c], qmin, qmax,
          lam, b, lam != T(0), adam);
      v_ptr[i] = vi;
      m_ptr[i] = m;
      m2_ptr[i] = m2;
      if (w_set) w_ptr[i] = w;
    });
  });
}

void adam_rounding_step_cuda(Tensor& v, Tensor& exp_avg, Tensor& exp_avg_sq, Tensor& soft_weight,
                             const Tensor& grad, const Tensor& grid_base, const Tensor& scale,
                             const Tensor& zero_point, int64_t quant_min, int64_t quant_max,
                             std::optional<int64_t> axis, double reg_lambda, double beta, double lr,
                             double beta1, double beta2, double eps, int64_t step) {
  c10::cuda::CUDAGuard guard(v.device());
  const StepArgs args = check_step_args(v, exp_avg, exp_avg_sq, soft_weight, grad, grid_base, scale,
                                        zero_point, quant_min, quant_max, axis, lr, beta1, beta2, eps, step);
  const StepSchedule sched{reg_lambda, beta, args.adam.bias_correction1, args.adam.bias_correction2_sqrt};
  launch_step(v, exp_avg, exp_avg_sq, soft_weight, grad, grid_base, args.grid, args.adam, ScheduleArgument{sched});
}

}  // namespace

void adam_rounding_step_scheduled_(Tensor& v, Tensor& exp_avg, Tensor& exp_avg_sq, Tensor& soft_weight,
                                   const Tensor& grad_soft_weight, const Tensor& grid_base, const QuantGrid& grid,
                                   const Tensor& schedule, double lr, double beta1, double beta2, double eps) {
  c10::cuda::CUDAGuard guard(v.device());
  TORCH_CHECK(v.is_cuda() && schedule.device() == v.device() && schedule.scalar_type() == at::kDouble &&
                  schedule.is_contiguous() && schedule.numel() == 4,
              "schedule must be a contiguous float64 tensor of 4 values on v's device, got ", schedule.sizes(), " ",
              schedule.scalar_type(), " on ", schedule.device());
  check_step_state(v, exp_avg, exp_avg_sq, soft_weight, grad_soft_weight, grid_base);
  // The bias corrections of these constants are replaced by the schedule's.
  const AdamStep constants = adam_step_constants(lr, beta1, beta2, eps, /*step=*/1);
  launch_step(v, exp_avg, exp_avg_sq, soft_weight, grad_soft_weight, grid_base, grid, constants,
              ScheduleInMemory{schedule.const_data_ptr<double>()});
}

TORCH_LIBRARY_IMPL(adaround, CUDA, m) {
  m.impl("reconstruction_grad", &reconstruction_grad_cuda);
  m.impl("adam_rounding_step_", &adam_rounding_step_cuda);
}

}  // namespace adaround::cuda
