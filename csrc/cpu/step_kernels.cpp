// CPU kernels of the optimisation-step ops (schemas in csrc/step_ops.cpp).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../grid.h"
#include "../rounding_math.h"
#include "../step_checks.h"
#include "cpu_loops.h"

namespace adaround::cpu {
namespace {

using at::Tensor;

Tensor reconstruction_grad_cpu(const Tensor& pre, const Tensor& target, c10::string_view activation,
                               double norm) {
  const Activation act = parse_activation(std::string(activation));
  check_reconstruction_args(pre, target);
  const Tensor p = pre.contiguous();
  const Tensor t = target.contiguous();
  Tensor grad = at::empty_like(p);
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "reconstruction_grad_cpu", [&] {
    const scalar_t* p_ptr = p.const_data_ptr<scalar_t>();
    const scalar_t* t_ptr = t.const_data_ptr<scalar_t>();
    scalar_t* g_ptr = grad.mutable_data_ptr<scalar_t>();
    const scalar_t n = scalar_t(norm);
    at::parallel_for(0, p.numel(), kGrainSize, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) g_ptr[i] = reconstruction_grad<scalar_t>(act, p_ptr[i], t_ptr[i], n);
    });
  });
  return grad;
}

void adam_rounding_step_cpu(Tensor& v, Tensor& exp_avg, Tensor& exp_avg_sq, Tensor& soft_weight,
                            const Tensor& grad, const Tensor& grid_base, const Tensor& scale,
                            const Tensor& zero_point, int64_t quant_min, int64_t quant_max,
                            std::optional<int64_t> axis, double reg_lambda, double beta, double lr,
                            double beta1, double beta2, double eps, int64_t step) {
  const StepArgs args = check_step_args(v, exp_avg, exp_avg_sq, soft_weight, grad, grid_base, scale,
                                        zero_point, quant_min, quant_max, axis, lr, beta1, beta2, eps, step);
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "adam_rounding_step_cpu", [&] {
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
    const AdamStep adam = args.adam;  // a local copy: the stores cannot alias it, so its constants stay hoisted
    const bool regularize = lam != T(0);
    for_each_channel_run(v.numel(), args.grid.inner, args.grid.channels, [&](int64_t begin, int64_t end, int64_t c) {
      const T s = s_ptr[c], z = z_ptr[c];
      auto full_step = [&](int64_t i) {
        if constexpr (std::is_same_v<T, float>) {
          using V = FloatVec;
          V vi = V::loadu(v_ptr + i), m = V::loadu(m_ptr + i), m2 = V::loadu(m2_ptr + i);
          const V w = rounding_step_full<V, VecOps>(vi, m, m2, V::loadu(g_ptr + i), V::loadu(base_ptr + i), V(s), V(z),
                                                    V(qmin), V(qmax), V(lam), V(b), regularize, adam);
          vi.store(v_ptr + i);
          m.store(m_ptr + i);
          m2.store(m2_ptr + i);
          w.store(w_ptr + i);
        }
      };
      auto saturated_step = [&](int64_t i) {
        if constexpr (std::is_same_v<T, float>) {
          using V = FloatVec;
          V vi = V::loadu(v_ptr + i), m = V::loadu(m_ptr + i), m2 = V::loadu(m2_ptr + i);
          if (!rounding_step_saturated<V, VecOps>(vi, m, m2, adam)) {
            soft_quantize<V, VecOps>(V::loadu(base_ptr + i), rectified_sigmoid<V, VecOps>(vi), V(s), V(z), V(qmin),
                                     V(qmax))
                .store(w_ptr + i);
          }
          vi.store(v_ptr + i);
          m.store(m_ptr + i);
          m2.store(m2_ptr + i);
        }
      };
      vectorized_run<T>(
          begin, end,
          [&](int64_t i) {
            if (all_saturated(v_ptr + i)) {
              saturated_step(i);
            } else {
              full_step(i);
            }
          },
          [&](int64_t i) {
            rounding_step<T>(v_ptr[i], m_ptr[i], m2_ptr[i], w_ptr[i], [&] { return g_ptr[i]; },
                             [&] { return base_ptr[i]; }, s, z, qmin, qmax, lam, b, regularize, adam);
          });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(adaround, CPU, m) {
  m.impl("reconstruction_grad", &reconstruction_grad_cpu);
  m.impl("adam_rounding_step_", &adam_rounding_step_cpu);
}

}  // namespace adaround::cpu
