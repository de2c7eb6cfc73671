// CPU building blocks: the SIMD primitives for rounding_math.h and a parallel walk over a
// weight in runs of constant channel.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include "../rounding_math.h"

namespace adaround::cpu {

using FloatVec = at::vec::Vectorized<float>;

// rounding_math.h primitives on SIMD vectors. exp is ATen's polynomial exp_u20 (within 20 ulp,
// about 1e-6 relative, far below what 4-bit rounding can see) instead of SLEEF's slower u10.
struct VecOps {
  using Mask = FloatVec;
  static FloatVec exp(FloatVec x) { return x.exp_u20(); }
  static FloatVec log(FloatVec x) { return x.log(); }
  static FloatVec abs(FloatVec x) { return x.abs(); }
  static FloatVec sqrt(FloatVec x) { return x.sqrt(); }
  static FloatVec floor(FloatVec x) { return x.floor(); }
  static FloatVec nearest(FloatVec x) { return x.round(); }
  // x^y for x >= 0 (the only use): exp(y log x) is several times faster than SLEEF's powf and
  // within a few ulp; x = 0 gives exp(-inf) = 0 for y > 0.
  static FloatVec pow(FloatVec x, FloatVec y) { return (y * x.log()).exp(); }
  static FloatVec min(FloatVec a, FloatVec b) { return at::vec::minimum(a, b); }
  static FloatVec max(FloatVec a, FloatVec b) { return at::vec::maximum(a, b); }
  static FloatVec select(Mask m, FloatVec if_true, FloatVec if_false) {
    return FloatVec::blendv(if_false, if_true, m);
  }
  static Mask both(Mask a, Mask b) { return a & b; }
};

constexpr int64_t kGrainSize = 16384;

// Calls body(begin, end, channel) over [0, numel) in parallel, each call covering elements of
// one channel only (channel = (index / inner) % channels).
template <typename Body>
void for_each_channel_run(int64_t numel, int64_t inner, int64_t channels, const Body& body) {
  at::parallel_for(0, numel, kGrainSize, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    while (i < end) {
      const int64_t run = i / inner;
      const int64_t run_end = std::min(end, (run + 1) * inner);
      body(i, run_end, run % channels);
      i = run_end;
    }
  });
}

// Applies a formula element-wise over [begin, end): vec_fn on full SIMD vectors when the compute
// type is float, scalar_fn on the rest. Both are the same rounding_math.h template.
template <typename T, typename VecFn, typename ScalarFn>
void vectorized_run(int64_t begin, int64_t end, const VecFn& vec_fn, const ScalarFn& scalar_fn) {
  int64_t i = begin;
  if constexpr (std::is_same_v<T, float>) {
    for (; i + FloatVec::size() <= end; i += FloatVec::size()) vec_fn(i);
  }
  for (; i < end; ++i) scalar_fn(i);
}

}  // namespace adaround::cpu
