// CPU kernels of the activation ops (schemas in csrc/activation_ops.cpp): the fake quantization and
// the per-channel clip, one vectorised pass each way over the activation, the formulas of
// rounding_math.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

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

// QDropDraw::keeps for the FloatVec::size() elements from i, as a VecOps mask (all-ones lanes where
// kept): mix32 on AVX2 integer lanes, the scalar draw elsewhere.
FloatVec keep_lanes(const QDropDraw& drop, int64_t i) {
  if (drop.threshold == 0) return FloatVec(0.0f);
  if (drop.threshold > 0xffffffffULL) return FloatVec(0.0f) == FloatVec(0.0f);
#if defined(CPU_CAPABILITY_AVX2)
  const auto shift_xor = [](__m256i x, int bits) { return _mm256_xor_si256(x, _mm256_srli_epi32(x, bits)); };
  __m256i x = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(i))),
                               _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  x = _mm256_xor_si256(x, _mm256_set1_epi32(static_cast<int32_t>(drop.key)));
  x = _mm256_mullo_epi32(shift_xor(x, 16), _mm256_set1_epi32(static_cast<int32_t>(0x7feb352dU)));
  x = _mm256_mullo_epi32(shift_xor(x, 15), _mm256_set1_epi32(static_cast<int32_t>(0x846ca68bU)));
  x = shift_xor(x, 16);
  // Unsigned x < threshold as a signed comparison, both sides offset by 2^31.
  const __m256i offset = _mm256_set1_epi32(std::numeric_limits<int32_t>::min());
  const __m256i threshold = _mm256_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(drop.threshold)));
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_xor_si256(threshold, offset), _mm256_xor_si256(x, offset)));
#else
  float lanes[FloatVec::size()];
  for (int64_t k = 0; k < FloatVec::size(); ++k) lanes[k] = drop.keeps(i + k) ? 1.0f : 0.0f;
  return FloatVec::loadu(lanes) != FloatVec(0.0f);
#endif
}

Tensor fake_quantize_activation_cpu(const Tensor& input, const Tensor& scale, const Tensor& zero_point,
                                    int64_t quant_min, int64_t quant_max, std::optional<double> clamp_min,
                                    std::optional<double> clamp_max, double drop_probability, int64_t drop_seed) {
  const ActivationQuantCall call = prepare_activation_quant(input, scale, zero_point, quant_min, quant_max, clamp_min,
                                                            clamp_max, drop_probability, drop_seed);
  Tensor out = at::empty_like(call.input);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.input.scalar_type(), "fake_quantize_activation_cpu",
                                  [&] {
    using T = opmath_t<scalar_t>;
    const ActivationGrid<T> grid = call.grid_on_host<T>();
    const ActivationGrid<FloatVec> grid_vec = broadcast(grid);
    const scalar_t* x = call.input.const_data_ptr<scalar_t>();
    const QDropDraw drop = call.drop;
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, call.input.numel(), kGrainSize, [&](int64_t begin, int64_t end) {
      vectorized_run<scalar_t>(
          begin, end,
          [&](int64_t i) {
            if constexpr (std::is_same_v<scalar_t, float>) {
              fake_quantize_activation<FloatVec, VecOps>(FloatVec::loadu(x + i), keep_lanes(drop, i), grid_vec)
                  .store(y + i);
            }
          },
          [&](int64_t i) {
            y[i] = scalar_t(fake_quantize_activation<T>(T(x[i]), drop.keeps(i), grid));
          });
    });
  });
  return out;
}

std::tuple<Tensor, Tensor> fake_quantize_activation_backward_cpu(
    const Tensor& grad_output, const Tensor& input, const Tensor& scale, const Tensor& zero_point, int64_t quant_min,
    int64_t quant_max, std::optional<double> clamp_min, std::optional<double> clamp_max, double drop_probability,
    int64_t drop_seed, bool scale_grad) {
  const ActivationQuantCall call = prepare_activation_quant(input, scale, zero_point, quant_min, quant_max, clamp_min,
                                                            clamp_max, drop_probability, drop_seed, grad_output);
  Tensor grad_input = at::empty_like(call.input);
  double total = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, call.input.scalar_type(), "fake_quantize_activation_backward_cpu", [&] {
        using T = opmath_t<scalar_t>;
        const ActivationGrid<T> grid = call.grid_on_host<T>();
        const ActivationGrid<FloatVec> grid_vec = broadcast(grid);
        const scalar_t* g = call.grad_output.const_data_ptr<scalar_t>();
        const scalar_t* x = call.input.const_data_ptr<scalar_t>();
        const QDropDraw drop = call.drop;
        scalar_t* gx = grad_input.mutable_data_ptr<scalar_t>();
        // The step's gradient: the same sum on any number of threads.
        total = sum_over_fixed_chunks(call.input.numel(), [&](int64_t begin, int64_t end) {
          double local = 0.0;
          vectorized_run<scalar_t>(
              begin, end,
              [&](int64_t i) {
                if constexpr (std::is_same_v<scalar_t, float>) {
                  FloatVec d_input, d_scale;
                  fake_quantize_activation_grad<FloatVec, VecOps>(FloatVec::loadu(x + i), keep_lanes(drop, i),
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
                fake_quantize_activation_grad<T>(T(x[i]), drop.keeps(i), grid, d_input, d_scale);
                gx[i] = scalar_t(T(g[i]) * d_input);
                if (scale_grad) local += double(T(g[i]) * d_scale);
              });
          return local;
        });
      });
  return {grad_input, at::full_like(scale, scale_grad ? total : 0.0)};
}

// Calls body(begin, end, bound, bound_step) over the elements [0, numel) of a clip's input in
// parallel, in runs whose element i has the bound bound[(i - begin) * bound_step]: along a row of
// channels where they are innermost in memory (bound_step 1), else inside one channel (0).
template <typename T, typename Body>
void for_each_clip_run(const ChannelClipCall& call, const T* upper, const Body& body) {
  const int64_t numel = call.input.numel(), channels = call.channels;
  if (call.channel_stride != 1 || channels == 1) {
    for_each_channel_run(numel, channels == 1 ? std::max<int64_t>(numel, 1) : call.channel_stride, channels,
                         [&](int64_t begin, int64_t end, int64_t c) { body(begin, end, upper + c, 0); });
    return;
  }
  at::parallel_for(0, numel, kGrainSize, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      const int64_t c = i % channels;
      const int64_t run_end = std::min(end, i + channels - c);
      body(i, run_end, upper + c, 1);
      i = run_end;
    }
  });
}

// The FloatVec::size() bounds of the elements from `offset` of a run (see for_each_clip_run); T is
// float wherever it runs (compiled for every dtype the dispatch names).
template <typename T>
FloatVec bounds_at(const T* bound, int64_t bound_step, int64_t offset) {
  return bound_step ? FloatVec::loadu(bound + offset) : FloatVec(float(bound[0]));
}

// Calls vec_fn(i, bounds) on the full float vectors of a clip's input and scalar_fn(i, bound) on
// the rest, each element with its channel's bound.
template <typename scalar_t, typename T, typename VecFn, typename ScalarFn>
void for_each_clip_element(const ChannelClipCall& call, const VecFn& vec_fn, const ScalarFn& scalar_fn) {
  for_each_clip_run(call, call.upper.const_data_ptr<T>(), [&](int64_t begin, int64_t end, const T* bound,
                                                             int64_t step) {
    vectorized_run<scalar_t>(
        begin, end,
        [&](int64_t i) {
          if constexpr (std::is_same_v<scalar_t, float>) vec_fn(i, bounds_at(bound, step, i - begin));
        },
        [&](int64_t i) { scalar_fn(i, bound[(i - begin) * step]); });
  });
}

Tensor channel_clip_cpu(const Tensor& input, const Tensor& upper, int64_t dim) {
  const ChannelClipCall call = prepare_channel_clip(input, upper, dim);
  Tensor out = at::empty_like(call.input);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.input.scalar_type(), "channel_clip_cpu", [&] {
    using T = opmath_t<scalar_t>;
    const scalar_t* x = call.input.const_data_ptr<scalar_t>();
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    for_each_clip_element<scalar_t, T>(
        call, [&](int64_t i, FloatVec u) { channel_clip<FloatVec, VecOps>(FloatVec::loadu(x + i), u).store(y + i); },
        [&](int64_t i, T u) { y[i] = scalar_t(channel_clip<T>(T(x[i]), u)); });
  });
  return out;
}

Tensor channel_clip_backward_cpu(const Tensor& grad_output, const Tensor& input, const Tensor& upper, int64_t dim) {
  const ChannelClipCall call = prepare_channel_clip(input, upper, dim, grad_output);
  Tensor grad_input = at::empty_like(call.input);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.input.scalar_type(), "channel_clip_backward_cpu",
                                  [&] {
    using T = opmath_t<scalar_t>;
    const scalar_t* g = call.grad_output.const_data_ptr<scalar_t>();
    const scalar_t* x = call.input.const_data_ptr<scalar_t>();
    scalar_t* gx = grad_input.mutable_data_ptr<scalar_t>();
    for_each_clip_element<scalar_t, T>(
        call,
        [&](int64_t i, FloatVec u) {
          channel_clip_backward<FloatVec, VecOps>(FloatVec::loadu(g + i), FloatVec::loadu(x + i), u).store(gx + i);
        },
        [&](int64_t i, T u) { gx[i] = scalar_t(channel_clip_backward<T>(T(g[i]), T(x[i]), u)); });
  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(adaround, CPU, m) {
  using emulation::ActivationQuant;
  using emulation::Route;
  m.impl("fake_quantize_activation",
         &Route<&fake_quantize_activation_cpu, &ActivationQuant::fake_quantize_activation>::call);
  m.impl("fake_quantize_activation_backward",
         &Route<&fake_quantize_activation_backward_cpu, &ActivationQuant::fake_quantize_activation_backward>::call);
  m.impl("channel_clip", &Route<&channel_clip_cpu, &ActivationQuant::channel_clip>::call);
  m.impl("channel_clip_backward", &Route<&channel_clip_backward_cpu, &ActivationQuant::channel_clip_backward>::call);
}

}  // namespace adaround::cpu
