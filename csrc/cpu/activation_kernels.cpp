// CPU kernels of the activation fake-quantization ops (schemas in csrc/activation_ops.cpp): one
// vectorised pass each way over the activation, the formulas of rounding_math.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <functional>

#include "../activation_quant.h"
#include "../device/emulation.h"
#include "../rounding_math.h"
#include "cpu_loops.h"

namespace adaround::cpu {
namespace {

using at::Tensor;

template <typename scalar_t>
using opmath_t = at::opmath_type<scalar_t>;

template <typename T>
ActivationGrid<FloatVec> broadcast(const ActivationGrid<T>& g) {
  return {FloatVec(float(g.scale)),     FloatVec(float(g.inv_scale)), FloatVec(float(g.zero_point)),
          FloatVec(float(g.qmin)),      FloatVec(float(g.qmax)),      FloatVec(float(g.lower)),
          FloatVec(float(g.upper))};
}

// QDrop's mask for the FloatVec::size() elements from i, as VecOps masks (all-ones lanes where kept).
FloatVec keep_lanes(const bool* keep_float, int64_t i) {
  if (keep_float == nullptr) return FloatVec(0.0f);
  float lanes[FloatVec::size()];
  for (int64_t k = 0; k < FloatVec::size(); ++k) lanes[k] = keep_float[i + k] ? 1.0f : 0.0f;
  return FloatVec::loadu(lanes) != FloatVec(0.0f);
}

const bool* keep_pointer(const ActivationQuantCall& call) {
  return call.keep_float.defined() ? call.keep_float.const_data_ptr<bool>() : nullptr;
}

Tensor fake_quantize_activation_cpu(const Tensor& input, const Tensor& scale, const Tensor& zero_point,
                                    int64_t quant_min, int64_t quant_max, std::optional<double> clamp_min,
                                    std::optional<double> clamp_max, const std::optional<Tensor>& keep_float) {
  const ActivationQuantCall call =
      prepare_activation_quant(input, scale, zero_point, quant_min, quant_max, clamp_min, clamp_max, keep_float);
  Tensor out = at::empty_like(call.input);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.input.scalar_type(), "fake_quantize_activation_cpu",
                                  [&] {
    using T = opmath_t<scalar_t>;
    const ActivationGrid<T> grid = call.grid_on_host<T>();
    const ActivationGrid<FloatVec> grid_vec = broadcast(grid);
    const scalar_t* x = call.input.const_data_ptr<scalar_t>();
    const bool* keep = keep_pointer(call);
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, call.input.numel(), kGrainSize, [&](int64_t begin, int64_t end) {
      vectorized_run<scalar_t>(
          begin, end,
          [&](int64_t i) {
            if constexpr (std::is_same_v<scalar_t, float>) {
              fake_quantize_activation<FloatVec, VecOps>(FloatVec::loadu(x + i), keep_lanes(keep, i), grid_vec)
                  .store(y + i);
            }
          },
          [&](int64_t i) {
            y[i] = scalar_t(fake_quantize_activation<T>(T(x[i]), keep != nullptr && keep[i], grid));
          });
    });
  });
  return out;
}

std::tuple<Tensor, Tensor> fake_quantize_activation_backward_cpu(
    const Tensor& grad_output, const Tensor& input, const Tensor& scale, const Tensor& zero_point, int64_t quant_min,
    int64_t quant_max, std::optional<double> clamp_min, std::optional<double> clamp_max,
    const std::optional<Tensor>& keep_float, bool scale_grad) {
  const ActivationQuantCall call = prepare_activation_quant(input, scale, zero_point, quant_min, quant_max, clamp_min,
                                                            clamp_max, keep_float, grad_output);
  Tensor grad_input = at::empty_like(call.input);
  double total = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, call.input.scalar_type(), "fake_quantize_activation_backward_cpu", [&] {
        using T = opmath_t<scalar_t>;
        const ActivationGrid<T> grid = call.grid_on_host<T>();
        const ActivationGrid<FloatVec> grid_vec = broadcast(grid);
        const scalar_t* g = call.grad_output.const_data_ptr<scalar_t>();
        const scalar_t* x = call.input.const_data_ptr<scalar_t>();
        const bool* keep = keep_pointer(call);
        scalar_t* gx = grad_input.mutable_data_ptr<scalar_t>();
        // The step's gradient summed in double per chunk, then over chunks: independent of the thread count.
        total = at::parallel_reduce(
            0, call.input.numel(), kGrainSize, 0.0,
            [&](int64_t begin, int64_t end, double acc) {
              double local = 0.0;
              vectorized_run<scalar_t>(
                  begin, end,
                  [&](int64_t i) {
                    if constexpr (std::is_same_v<scalar_t, float>) {
                      FloatVec d_input, d_scale;
                      fake_quantize_activation_grad<FloatVec, VecOps>(FloatVec::loadu(x + i), keep_lanes(keep, i),
                                                                      grid_vec, d_input, d_scale);
                      const FloatVec gv = FloatVec::loadu(g + i);
                      (gv * d_input).store(gx + i);
                      if (scale_grad) {
                        float lanes[FloatVec::size()];
                        (gv * d_scale).store(lanes);
                        for (const float term : lanes) local += term;
                      }
                    }
                  },
                  [&](int64_t i) {
                    T d_input, d_scale;
                    fake_quantize_activation_grad<T>(T(x[i]), keep != nullptr && keep[i], grid, d_input, d_scale);
                    gx[i] = scalar_t(T(g[i]) * d_input);
                    if (scale_grad) local += double(T(g[i]) * d_scale);
                  });
              return acc + local;
            },
            std::plus<double>());
      });
  return {grad_input, at::full_like(scale, scale_grad ? total : 0.0)};
}

}  // namespace

TORCH_LIBRARY_IMPL(adaround, CPU, m) {
  using emulation::ActivationQuant;
  using emulation::Route;
  m.impl("fake_quantize_activation",
         &Route<&fake_quantize_activation_cpu, &ActivationQuant::fake_quantize_activation>::call);
  m.impl("fake_quantize_activation_backward",
         &Route<&fake_quantize_activation_backward_cpu, &ActivationQuant::fake_quantize_activation_backward>::call);
}

}  // namespace adaround::cpu
