// CPU kernels of the optimisation-step ops (schemas in csrc/step_ops.cpp).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../device/emulation.h"
#include "../grid.h"
#include "../rounding_math.h"
#include "../step_checks.h"
#include "cpu_loops.h"
#include "loop/execution_path.h"

namespace adaround::cpu {
namespace {

using at::Tensor;

Tensor reconstruction_grad_cpu(const Tensor& pre, const Tensor& target, c10::string_view activation,
                               double norm) {
  const Activation act = parse_activation(std::string(activation));
  check_reconstruction_args(pre, target);
  const std::pair<Tensor, Tensor> operands = elementwise_operands(pre, target);
  const Tensor& p = operands.first;
  const Tensor& t = operands.second;
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

// Pointers of one step: V, the Adam moments and the grid base at packed positions; dL/dW~ and W~
// in the full tensors, at index[i] (at i when index is null).
template <typename T>
struct StepPointers {
  T* v;
  T* exp_avg;
  T* exp_avg_sq;
  const T* grid_base;
  const T* grad;
  T* soft_weight;
  const int64_t* index;
};

template <typename T>
struct StepScalars {
  T qmin, qmax, reg_lambda, beta;
  bool regularize;
  AdamStep adam;
};

// One SIMD vector of the step at packed position i. A run's last `count` < 8 elements go through
// zero-padded buffers (zero V, moments and gradient are a harmless full step), so every float
// element gets the same vector arithmetic wherever it sits.
template <bool kWhole>
void step_vector(const StepPointers<float>& p, int64_t i, int64_t count, float s, float z,
                 const StepScalars<float>& k) {
  using V = FloatVec;
  constexpr int64_t kLanes = V::size();
  auto load = [&](const float* src) {
    if constexpr (kWhole) {
      return V::loadu(src + i);
    } else {
      alignas(32) float buf[kLanes] = {};
      std::copy_n(src + i, count, buf);
      return V::loadu(buf);
    }
  };
  auto store = [&](const V& x, float* dst) {
    if constexpr (kWhole) {
      x.store(dst + i);
    } else {
      alignas(32) float buf[kLanes];
      x.store(buf);
      std::copy_n(buf, count, dst + i);
    }
  };
  auto load_grad = [&] {
    if (p.index == nullptr) return load(p.grad);
    alignas(32) float buf[kLanes] = {};
    for (int64_t j = 0; j < count; ++j) buf[j] = p.grad[p.index[i + j]];
    return V::loadu(buf);
  };
  auto store_soft_weight = [&](const V& w) {
    if (p.index == nullptr) return store(w, p.soft_weight);
    alignas(32) float buf[kLanes];
    w.store(buf);
    for (int64_t j = 0; j < count; ++j) p.soft_weight[p.index[i + j]] = buf[j];
  };
  V v = load(p.v), m = load(p.exp_avg), m2 = load(p.exp_avg_sq);
  if (VecOps::all(is_saturated<V, VecOps>(v))) {
    if (!rounding_step_saturated<V, VecOps>(v, m, m2, k.adam)) {
      store_soft_weight(soft_quantize<V, VecOps>(load(p.grid_base), rectified_sigmoid<V, VecOps>(v), V(s), V(z),
                                                 V(k.qmin), V(k.qmax)));
    }
  } else {
    store_soft_weight(rounding_step_full<V, VecOps>(v, m, m2, load_grad(), load(p.grid_base), V(s), V(z), V(k.qmin),
                                                    V(k.qmax), V(k.reg_lambda), V(k.beta), k.regularize, k.adam));
  }
  store(v, p.v);
  store(m, p.exp_avg);
  store(m2, p.exp_avg_sq);
}

// The step over packed positions [begin, end) of one channel (grid values s, z). `k` by value: a
// local copy that the stores cannot alias, so its constants stay in registers.
template <typename T>
void step_run(const StepPointers<T>& p, int64_t begin, int64_t end, T s, T z, const StepScalars<T> k) {
  if constexpr (std::is_same_v<T, float>) {
    constexpr int64_t kLanes = FloatVec::size();
    int64_t i = begin;
    for (; i + kLanes <= end; i += kLanes) step_vector<true>(p, i, kLanes, s, z, k);
    if (i < end) step_vector<false>(p, i, end - i, s, z, k);
  } else {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t full = p.index == nullptr ? i : p.index[i];
      rounding_step<T>(p.v[i], p.exp_avg[i], p.exp_avg_sq[i], p.soft_weight[full], [&] { return p.grad[full]; },
                       [&] { return p.grid_base[i]; }, s, z, k.qmin, k.qmax, k.reg_lambda, k.beta, k.regularize,
                       k.adam);
    }
  }
}

// Runs step_run over a weight (or a packed subset of it) in parallel: walk(body) calls
// body(begin, end, channel) on runs of one channel.
template <typename Walk>
void step_all(Tensor& v, Tensor& exp_avg, Tensor& exp_avg_sq, const Tensor& grid_base, Tensor& soft_weight,
              const Tensor& grad, const int64_t* index, const QuantGrid& grid, double reg_lambda, double beta,
              const AdamStep& adam, const Walk& walk) {
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "adam_rounding_step_cpu", [&] {
    using T = scalar_t;
    const StepPointers<T> p{v.data_ptr<T>(),         exp_avg.data_ptr<T>(),         exp_avg_sq.data_ptr<T>(),
                            grid_base.const_data_ptr<T>(), grad.const_data_ptr<T>(), soft_weight.data_ptr<T>(),
                            index};
    const StepScalars<T> k{T(grid.qmin), T(grid.qmax), T(reg_lambda), T(beta), reg_lambda != 0, adam};
    const T* s_ptr = grid.scale.const_data_ptr<T>();
    const T* z_ptr = grid.zero_point.const_data_ptr<T>();
    walk([&](int64_t begin, int64_t end, int64_t c) { step_run<T>(p, begin, end, s_ptr[c], z_ptr[c], k); });
  });
}

void adam_rounding_step_cpu(Tensor& v, Tensor& exp_avg, Tensor& exp_avg_sq, Tensor& soft_weight,
                            const Tensor& grad, const Tensor& grid_base, const Tensor& scale,
                            const Tensor& zero_point, int64_t quant_min, int64_t quant_max,
                            std::optional<int64_t> axis, double reg_lambda, double beta, double lr,
                            double beta1, double beta2, double eps, int64_t step) {
  const StepArgs args = check_step_args(v, exp_avg, exp_avg_sq, soft_weight, grad, grid_base, scale,
                                        zero_point, quant_min, quant_max, axis, lr, beta1, beta2, eps, step);
  check_step_regularizer(reg_lambda, beta);
  step_all(v, exp_avg, exp_avg_sq, grid_base, soft_weight, grad, nullptr, args.grid, reg_lambda, beta, args.adam,
           [&](const auto& body) { for_each_channel_run(v.numel(), args.grid.inner, args.grid.channels, body); });
}

// The step with this iteration's reg_lambda, beta and bias corrections read from `schedule` (on the
// CPU reading it costs nothing; the form exists for the loop that runs as on a GPU).
void adam_rounding_step_scheduled_cpu(Tensor& v, Tensor& exp_avg, Tensor& exp_avg_sq, Tensor& soft_weight,
                                      const Tensor& grad, const Tensor& grid_base, const Tensor& scale,
                                      const Tensor& zero_point, int64_t quant_min, int64_t quant_max,
                                      std::optional<int64_t> axis, const Tensor& schedule, double lr, double beta1,
                                      double beta2, double eps) {
  const StepArgs args = check_step_args(v, exp_avg, exp_avg_sq, soft_weight, grad, grid_base, scale, zero_point,
                                        quant_min, quant_max, axis, lr, beta1, beta2, eps, /*step=*/1);
  check_schedule(schedule, v);
  const double* values = schedule.const_data_ptr<double>();
  AdamStep adam = args.adam;
  adam.bias_correction1 = values[2];
  adam.bias_correction2_sqrt = values[3];
  step_all(v, exp_avg, exp_avg_sq, grid_base, soft_weight, grad, nullptr, args.grid, values[0], values[1], adam,
           [&](const auto& body) { for_each_channel_run(v.numel(), args.grid.inner, args.grid.channels, body); });
}

}  // namespace

void adam_rounding_step_packed_(Tensor& v, Tensor& exp_avg, Tensor& exp_avg_sq, const Tensor& grid_base,
                                Tensor& soft_weight, const Tensor& grad_soft_weight, const PackedLayout& layout,
                                const QuantGrid& grid, double reg_lambda, double beta, const AdamStep& adam) {
  TORCH_CHECK(layout.index.scalar_type() == at::kLong && layout.offsets.scalar_type() == at::kLong &&
                  layout.index.is_contiguous() && layout.offsets.numel() == grid.channels + 1,
              "packed layout: int64 index and channels + 1 offsets expected");
  const int64_t* offsets = layout.offsets.const_data_ptr<int64_t>();
  step_all(v, exp_avg, exp_avg_sq, grid_base, soft_weight, grad_soft_weight, layout.index.const_data_ptr<int64_t>(),
           grid, reg_lambda, beta, adam,
           [&](const auto& body) { for_each_listed_run(offsets, grid.channels, body); });
}

// Each op routes to the host emulation of its CUDA kernel while that is on (device/emulation.h).
TORCH_LIBRARY_IMPL(adaround, CPU, m) {
  using emulation::Route;
  using emulation::Step;
  m.impl("reconstruction_grad", &Route<&reconstruction_grad_cpu, &Step::reconstruction_grad>::call);
  m.impl("adam_rounding_step_", &Route<&adam_rounding_step_cpu, &Step::adam_rounding_step_>::call);
  m.impl("adam_rounding_step_scheduled_",
         &Route<&adam_rounding_step_scheduled_cpu, &Step::adam_rounding_step_scheduled_>::call);
}

}  // namespace adaround::cpu
