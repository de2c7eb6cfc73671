// CPU kernels of the rounding ops (schemas in csrc/rounding_ops.cpp).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../device/emulation.h"
#include "../grid.h"
#include "../rounding_math.h"
#include "cpu_loops.h"

namespace adaround::cpu {
namespace {

using at::Tensor;

template <typename scalar_t>
using opmath_t = at::opmath_type<scalar_t>;

// body(begin, end, s, z) over the runs of elements that share one channel's scale s and zero point z.
template <typename T, typename Body>
void for_each_grid_run(int64_t numel, const QuantGrid& grid, const Body& body) {
  const T* s_ptr = grid.scale.const_data_ptr<T>();
  const T* z_ptr = grid.zero_point.const_data_ptr<T>();
  for_each_channel_run(numel, grid.inner, grid.channels,
                       [&](int64_t b, int64_t e, int64_t c) { body(b, e, s_ptr[c], z_ptr[c]); });
}

// Every element of a weight in its channel's grid, with base = floor(W / s) + z: vec(i, base, s, z)
// on FloatVec::size() float weights at a time (float weights only), scalar(i, base, s, z) on the
// rest. The callers hold the formulas. (vec is compiled for every dtype, called for float only.)
template <typename scalar_t, typename T, typename VecFn, typename ScalarFn>
void for_each_grid_element(const scalar_t* w, int64_t numel, const QuantGrid& grid, const VecFn& vec,
                           const ScalarFn& scalar) {
  for_each_grid_run<T>(numel, grid, [&](int64_t b, int64_t e, T s, T z) {
    vectorized_run<scalar_t>(
        b, e,
        [&](int64_t i) {
          if constexpr (std::is_same_v<scalar_t, float>) {
            const FloatVec sv(s), zv(z);
            vec(i, (FloatVec::loadu(w + i) / sv).floor() + zv, sv, zv);
          }
        },
        [&](int64_t i) { scalar(i, std::floor(T(w[i]) / s) + z, s, z); });
  });
}

Tensor soft_quantize_cpu(const Tensor& weight, const Tensor& v, const Tensor& scale,
                         const std::optional<Tensor>& zero_point, int64_t quant_min,
                         int64_t quant_max, std::optional<int64_t> axis) {
  const QuantGrid grid = make_grid(weight, scale, zero_point, quant_min, quant_max, axis);
  check_rounding_variable(weight, v, "v");
  const Tensor w = weight.contiguous();
  const Tensor vc = v.contiguous();
  Tensor out = at::empty_like(w);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "soft_quantize_cpu", [&] {
    using T = opmath_t<scalar_t>;
    const scalar_t* w_ptr = w.const_data_ptr<scalar_t>();
    const T* v_ptr = vc.const_data_ptr<T>();
    scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
    const T qmin = T(grid.qmin), qmax = T(grid.qmax);
    for_each_grid_element<scalar_t, T>(
        w_ptr, w.numel(), grid,
        [&](int64_t i, const FloatVec& base, const FloatVec& s, const FloatVec& z) {
          const FloatVec h = rectified_sigmoid<FloatVec, VecOps>(FloatVec::loadu(v_ptr + i));
          soft_quantize<FloatVec, VecOps>(base, h, s, z, FloatVec(qmin), FloatVec(qmax)).store(out_ptr + i);
        },
        [&](int64_t i, T base, T s, T z) {
          out_ptr[i] = scalar_t(soft_quantize<T>(base, rectified_sigmoid<T>(v_ptr[i]), s, z, qmin, qmax));
        });
  });
  return out;
}

Tensor soft_quantize_backward_cpu(const Tensor& grad_output, const Tensor& weight, const Tensor& v,
                                  const Tensor& scale, const std::optional<Tensor>& zero_point,
                                  int64_t quant_min, int64_t quant_max, std::optional<int64_t> axis) {
  const QuantGrid grid = make_grid(weight, scale, zero_point, quant_min, quant_max, axis);
  check_soft_quantize_backward_args(grad_output, weight, v);
  const auto [w, vc, g, grad_v] = soft_quantize_backward_operands(grad_output, weight, v);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "soft_quantize_backward_cpu", [&] {
    using T = opmath_t<scalar_t>;
    const scalar_t* w_ptr = w.const_data_ptr<scalar_t>();
    const scalar_t* g_ptr = g.const_data_ptr<scalar_t>();
    const T* v_ptr = vc.const_data_ptr<T>();
    T* out_ptr = grad_v.mutable_data_ptr<T>();
    const T qmin = T(grid.qmin), qmax = T(grid.qmax);
    for_each_grid_element<scalar_t, T>(
        w_ptr, w.numel(), grid,
        [&](int64_t i, const FloatVec& base, const FloatVec& s, const FloatVec&) {
          const FloatVec vv = FloatVec::loadu(v_ptr + i);
          const FloatVec h = rectified_sigmoid<FloatVec, VecOps>(vv);
          const FloatVec dh = rectified_sigmoid_grad<FloatVec, VecOps>(vv);
          (FloatVec::loadu(g_ptr + i) * soft_quantize_grad<FloatVec, VecOps>(base, h, dh, s, FloatVec(qmin),
                                                                            FloatVec(qmax)))
              .store(out_ptr + i);
        },
        [&](int64_t i, T base, T s, T) {
          const T vi = v_ptr[i];
          out_ptr[i] = T(g_ptr[i]) * soft_quantize_grad<T>(base, rectified_sigmoid<T>(vi),
                                                           rectified_sigmoid_grad<T>(vi), s, qmin, qmax);
        });
  });
  return grad_v;
}

Tensor round_regularizer_cpu(const Tensor& v, double beta) {
  check_regularizer_args(v, beta);
  const Tensor vc = v.contiguous();
  Tensor total;
  AT_DISPATCH_FLOATING_TYPES(vc.scalar_type(), "round_regularizer_cpu", [&] {
    using T = scalar_t;
    const T* v_ptr = vc.const_data_ptr<T>();
    const T b = T(beta);
    // Summed in double per chunk, then over the chunks in order: the same value on any thread count.
    const double sum = sum_over_fixed_chunks(vc.numel(), [&](int64_t begin, int64_t end) {
      double local = 0.0;
      vectorized_run<T>(
          begin, end,
          [&](int64_t i) {
            if constexpr (std::is_same_v<T, float>) {
              const FloatVec h = rectified_sigmoid<FloatVec, VecOps>(FloatVec::loadu(v_ptr + i));
              float lanes[FloatVec::size()];
              regularizer_term<FloatVec, VecOps>(h, FloatVec(b)).store(lanes);
              for (float x : lanes) local += x;
            }
          },
          [&](int64_t i) { local += regularizer_term<T>(rectified_sigmoid<T>(v_ptr[i]), b); });
      return local;
    });
    total = at::scalar_tensor(sum, vc.options());
  });
  return total;
}

Tensor round_regularizer_backward_cpu(const Tensor& grad_output, const Tensor& v, double beta) {
  check_regularizer_args(v, beta);
  TORCH_CHECK(grad_output.numel() == 1, "grad_output must be a scalar, got shape ", grad_output.sizes());
  const Tensor vc = v.contiguous();
  Tensor grad_v = at::empty_like(vc);
  AT_DISPATCH_FLOATING_TYPES(vc.scalar_type(), "round_regularizer_backward_cpu", [&] {
    using T = scalar_t;
    const T* v_ptr = vc.const_data_ptr<T>();
    T* out_ptr = grad_v.mutable_data_ptr<T>();
    const T g = grad_output.item<T>();
    const T b = T(beta);
    at::parallel_for(0, vc.numel(), kGrainSize, [&](int64_t begin, int64_t end) {
      vectorized_run<T>(
          begin, end,
          [&](int64_t i) {
            if constexpr (std::is_same_v<T, float>) {
              const FloatVec vv = FloatVec::loadu(v_ptr + i);
              const FloatVec h = rectified_sigmoid<FloatVec, VecOps>(vv);
              const FloatVec dh = rectified_sigmoid_grad<FloatVec, VecOps>(vv);
              (FloatVec(g) * regularizer_grad<FloatVec, VecOps>(h, dh, FloatVec(b))).store(out_ptr + i);
            }
          },
          [&](int64_t i) {
            const T vi = v_ptr[i];
            out_ptr[i] = g * regularizer_grad<T>(rectified_sigmoid<T>(vi), rectified_sigmoid_grad<T>(vi), b);
          });
    });
  });
  return grad_v;
}

std::tuple<Tensor, Tensor> hard_quantize_cpu(const Tensor& weight, const Tensor& scale,
                                             const std::optional<Tensor>& zero_point, int64_t quant_min,
                                             int64_t quant_max, std::optional<int64_t> axis,
                                             c10::string_view mode_name, const std::optional<Tensor>& v,
                                             const std::optional<Tensor>& noise) {
  HardQuantizeCall call = prepare_hard_quantize(weight, scale, zero_point, quant_min, quant_max, axis,
                                                std::string(mode_name), v, noise);
  call.allocate();
  const QuantGrid& grid = call.grid;
  const RoundingMode mode = call.mode;
  const Tensor &w = call.weight, &aux = call.aux, &codes = call.codes, &dequant = call.dequantized;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "hard_quantize_cpu", [&] {
    using T = opmath_t<scalar_t>;
    const scalar_t* w_ptr = w.const_data_ptr<scalar_t>();
    const T* aux_ptr = aux.defined() ? aux.const_data_ptr<T>() : nullptr;
    scalar_t* dq_ptr = dequant.mutable_data_ptr<scalar_t>();
    const T qmin = T(grid.qmin), qmax = T(grid.qmax);
    AT_DISPATCH_INTEGRAL_TYPES(codes.scalar_type(), "hard_quantize_cpu_codes", [&] {
      scalar_t* code_ptr = codes.mutable_data_ptr<scalar_t>();
      for_each_grid_run<T>(w.numel(), grid, [&](int64_t b, int64_t e, T s, T z) {
        for (int64_t i = b; i < e; ++i) {
          const T code = hard_code<T>(mode, T(w_ptr[i]) / s, aux_ptr ? aux_ptr[i] : T(0), z, qmin, qmax);
          code_ptr[i] = static_cast<scalar_t>(code);
          dq_ptr[i] = dequantize<T>(code, s, z);
        }
      });
    });
  });
  return {call.codes, call.dequantized};
}

Tensor init_v_cpu(const Tensor& weight, const Tensor& scale, std::optional<int64_t> axis) {
  // The grid range does not matter for the fractional part; any valid range passes the checks.
  const QuantGrid grid = make_grid(weight, scale, std::nullopt, 0, 255, axis);
  const Tensor w = weight.contiguous();
  Tensor v = at::empty(w.sizes(), w.options().dtype(compute_dtype(w.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "init_v_cpu", [&] {
    using T = opmath_t<scalar_t>;
    const scalar_t* w_ptr = w.const_data_ptr<scalar_t>();
    T* v_ptr = v.mutable_data_ptr<T>();
    const T* s_ptr = grid.scale.const_data_ptr<T>();
    for_each_channel_run(w.numel(), grid.inner, grid.channels, [&](int64_t b, int64_t e, int64_t c) {
      const T s = s_ptr[c];
      for (int64_t i = b; i < e; ++i) {
        const T x = T(w_ptr[i]) / s;
        v_ptr[i] = inverse_rectified_sigmoid<T>(x - std::floor(x));
      }
    });
  });
  return v;
}

}  // namespace

// Each op routes to the host emulation of its CUDA kernel while that is on (device/emulation.h).
TORCH_LIBRARY_IMPL(adaround, CPU, m) {
  using emulation::Rounding;
  using emulation::Route;
  m.impl("soft_quantize", &Route<&soft_quantize_cpu, &Rounding::soft_quantize>::call);
  m.impl("soft_quantize_backward", &Route<&soft_quantize_backward_cpu, &Rounding::soft_quantize_backward>::call);
  m.impl("round_regularizer", &Route<&round_regularizer_cpu, &Rounding::round_regularizer>::call);
  m.impl("round_regularizer_backward",
         &Route<&round_regularizer_backward_cpu, &Rounding::round_regularizer_backward>::call);
  m.impl("hard_quantize", &Route<&hard_quantize_cpu, &Rounding::hard_quantize>::call);
  m.impl("init_v", &Route<&init_v_cpu, &Rounding::init_v>::call);
}

}  // namespace adaround::cpu
