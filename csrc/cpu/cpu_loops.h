// CPU building blocks: the SIMD primitives for rounding_math.h and a parallel walk over a
// weight in runs of constant channel.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "../rounding_math.h"

namespace adaround::cpu {

using FloatVec = at::vec::Vectorized<float>;

#if defined(CPU_CAPABILITY_AVX2)
// Natural log for x >= 0 (x normal or 0; 0 gives -inf): exponent from the float's bits and a
// degree-8 polynomial on the mantissa in [sqrt(1/2), sqrt(2)), within ~2 ulp (1.2e-7 relative
// measured); about twice as fast as SLEEF's u10 log, which the regulariser calls on every weight.
inline FloatVec log_positive(FloatVec x) {
  const __m256 v = x;
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256i bits = _mm256_castps_si256(v);
  // x = mantissa * 2^e with mantissa in [0.5, 1).
  __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(126)));
  __m256 m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007fffff)),
                                                 _mm256_set1_epi32(0x3f000000)));
  const __m256 small = _mm256_cmp_ps(m, _mm256_set1_ps(0.70710678f), _CMP_LT_OQ);
  e = _mm256_sub_ps(e, _mm256_and_ps(one, small));
  m = _mm256_sub_ps(_mm256_add_ps(m, _mm256_and_ps(m, small)), one);  // m - 1, or 2m - 1 when small
  // log(1 + m) = m - m^2/2 + m^3 P(m)
  __m256 p = _mm256_set1_ps(7.0376836292e-2f);
  for (const float c : {-1.1514610310e-1f, 1.1676998740e-1f, -1.2420140846e-1f, 1.4249322787e-1f,
                        -1.6668057665e-1f, 2.0000714765e-1f, -2.4999993993e-1f, 3.3333331174e-1f}) {
    p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(c));
  }
  const __m256 m2 = _mm256_mul_ps(m, m);
  __m256 r = _mm256_mul_ps(_mm256_mul_ps(p, m2), m);
  r = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), r);
  r = _mm256_fnmadd_ps(_mm256_set1_ps(0.5f), m2, r);
  r = _mm256_add_ps(m, r);
  r = _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), r);
  const __m256 zero = _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_EQ_OQ);
  return _mm256_blendv_ps(r, _mm256_set1_ps(-std::numeric_limits<float>::infinity()), zero);
}
#else
inline FloatVec log_positive(FloatVec x) { return x.log(); }
#endif

// rounding_math.h primitives on SIMD vectors. exp is ATen's polynomial exp_u20 (within 20 ulp,
// about 1e-6 relative, far below what 4-bit rounding can see) instead of SLEEF's slower u10.
struct VecOps {
  using Mask = FloatVec;
  static FloatVec exp(FloatVec x) { return x.exp_u20(); }
  static FloatVec log(FloatVec x) { return log_positive(x); }
  static FloatVec abs(FloatVec x) { return x.abs(); }
  static FloatVec sqrt(FloatVec x) { return x.sqrt(); }
  static FloatVec floor(FloatVec x) { return x.floor(); }
  static FloatVec nearest(FloatVec x) { return x.round(); }
  static FloatVec to_float32(FloatVec x) { return x; }
  // x^y for x >= 0 (the only use): exp(y log x) is several times faster than SLEEF's powf and
  // within a few ulp; x = 0 gives exp(-inf) = 0 for y > 0.
  static FloatVec pow(FloatVec x, FloatVec y) { return (y * log_positive(x)).exp_u20(); }
  static FloatVec min(FloatVec a, FloatVec b) { return at::vec::minimum(a, b); }
  static FloatVec max(FloatVec a, FloatVec b) { return at::vec::maximum(a, b); }
  static FloatVec select(Mask m, FloatVec if_true, FloatVec if_false) {
    return FloatVec::blendv(if_false, if_true, m);
  }
  static Mask both(Mask a, Mask b) { return a & b; }
  static Mask either(Mask a, Mask b) { return a | b; }
  // Comparison masks are all-ones lanes (NaN as floats), so no lane compares equal to zero.
  static bool all(Mask m) { return m.zero_mask() == 0; }
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

// The same over packed elements [0, offsets[channels]) where channel c owns [offsets[c], offsets[c + 1]).
template <typename Body>
void for_each_listed_run(const int64_t* offsets, int64_t channels, const Body& body) {
  at::parallel_for(0, offsets[channels], kGrainSize, [&](int64_t begin, int64_t end) {
    int64_t c = std::upper_bound(offsets, offsets + channels + 1, begin) - offsets - 1;
    for (int64_t i = begin; i < end; ++c) {
      const int64_t run_end = std::min(end, offsets[c + 1]);
      if (run_end > i) body(i, run_end, c);
      i = std::max(i, run_end);
    }
  });
}

// The sum over [0, numel) of chunk_sum(begin, end) (a double) over fixed chunks of kGrainSize
// elements, added in chunk order: the same value on any number of threads, where
// at::parallel_reduce splits the range per thread and so rounds differently with each thread count.
template <typename ChunkSum>
double sum_over_fixed_chunks(int64_t numel, const ChunkSum& chunk_sum) {
  std::vector<double> sums(std::max<int64_t>(1, (numel + kGrainSize - 1) / kGrainSize), 0.0);
  at::parallel_for(0, int64_t(sums.size()), 1, [&](int64_t first, int64_t last) {
    for (int64_t chunk = first; chunk < last; ++chunk) {
      const int64_t begin = chunk * kGrainSize;
      sums[chunk] = chunk_sum(begin, std::min(numel, begin + kGrainSize));
    }
  });
  double total = 0.0;
  for (const double sum : sums) total += sum;
  return total;
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
