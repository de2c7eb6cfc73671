// CUDA kernels of the optimisation-step ops (schemas in csrc/step_ops.cpp).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../csrc/grid.h"
#include "../csrc/rounding_math.h"
#include "../csrc/step_checks.h"
#include "cuda_loops.cuh"

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

void adam_rounding_step_cuda(Tensor& v, Tensor& exp_avg, Tensor& exp_avg_sq, Tensor& soft_weight,
                             const Tensor& grad, const Tensor& grid_base, const Tensor& scale,
                             const Tensor& zero_point, int64_t quant_min, int64_t quant_max,
                             std::optional<int64_t> axis, double reg_lambda, double beta, double lr,
                             double beta1, double beta2, double eps, int64_t step) {
  c10::cuda::CUDAGuard guard(v.device());
  const StepArgs args = check_step_args(v, exp_avg, exp_avg_sq, soft_weight, grad, grid_base, scale,
                                        zero_point, quant_min, quant_max, axis, lr, beta1, beta2, eps, step);
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "adam_rounding_step_cuda", [&] {
    using T = scalar_t;
    T* v_ptr = v.mutable_data_ptr<T>();
    T* m_ptr = exp_avg.mutable_data_ptr<T>();
    T* m2_ptr = exp_avg_sq.mutable_data_ptr<T>();
    T* w_ptr = soft_weight.mutable_data_ptr<T>();
    const T* g_ptr = grad.const_data_ptr<T>();
    const T* base_ptr = grid_base.const_data_ptr<T>();
    const T* s_ptr = args.grid.scale.const_data_ptr<T>();
    const T* z_ptr = args.grid.zero_point.const_data_ptr<T>();
    const T qmin = T(quant_min), qmax = T(quant_max), lam = T(reg_lambda), b = T(beta);
    const AdamStep adam = args.adam;
    const int64_t inner = args.grid.inner, channels = args.grid.channels;
    const bool regularize = lam != T(0);
    launch_elementwise(v.numel(), [=] __device__(int64_t i) {
      const int64_t c = (i / inner) % channels;
      T vi = v_ptr[i], m = m_ptr[i], m2 = m2_ptr[i], w;
      const bool w_set = rounding_step<T>(
          vi, m, m2, w, [&] { return g_ptr[i]; }, [&] { return base_ptr[i]; }, s_ptr[c], z_ptr[c], qmin, qmax,
          lam, b, regularize, adam);
      v_ptr[i] = vi;
      m_ptr[i] = m;
      m2_ptr[i] = m2;
      if (w_set) w_ptr[i] = w;
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(adaround, CUDA, m) {
  m.impl("reconstruction_grad", &reconstruction_grad_cuda);
  m.impl("adam_rounding_step_", &adam_rounding_step_cuda);
}

}  // namespace adaround::cuda
