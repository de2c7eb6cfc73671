// The scalar formulas of AdaRound, written once.
//
// Every kernel (CPU scalar, CPU vectorized, CUDA) evaluates these templates, so the
// numerics have one source of truth. `T` is the compute type (float or double, or
// at::vec::Vectorized<float> on the CPU); `Ops` supplies the few primitives whose
// spelling differs between scalars and SIMD vectors.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace adaround {

// Stretch of the rectified sigmoid, the paper's values (docs/algorithm.md#soft-rounding).
constexpr double kZeta = 1.1;
constexpr double kGamma = -0.1;

// Primitives for plain scalars; usable on host and device.
template <typename T>
struct ScalarOps {
  using Mask = bool;
  static C10_HOST_DEVICE T exp(T x) { return std::exp(x); }
  static C10_HOST_DEVICE T log(T x) { return std::log(x); }
  static C10_HOST_DEVICE T abs(T x) { return std::abs(x); }
  static C10_HOST_DEVICE T sqrt(T x) { return std::sqrt(x); }
  static C10_HOST_DEVICE T floor(T x) { return std::floor(x); }
  static C10_HOST_DEVICE T nearest(T x) { return std::nearbyint(x); }  // half to even, as torch.round
  static C10_HOST_DEVICE T pow(T x, T y) { return std::pow(x, y); }
  static C10_HOST_DEVICE T to_float32(T x) { return T(static_cast<float>(x)); }  // rounded to float32 precision
  // A NaN first argument comes back (as from at::vec::minimum/maximum on the SIMD path): a NaN V
  // or weight shows in the result instead of being clipped to a bound.
  static C10_HOST_DEVICE T min(T a, T b) { return b < a ? b : a; }
  static C10_HOST_DEVICE T max(T a, T b) { return a < b ? b : a; }
  static C10_HOST_DEVICE T select(Mask m, T if_true, T if_false) { return m ? if_true : if_false; }
  static C10_HOST_DEVICE Mask both(Mask a, Mask b) { return a && b; }
  static C10_HOST_DEVICE Mask either(Mask a, Mask b) { return a || b; }
  static C10_HOST_DEVICE bool all(Mask m) { return m; }
};

template <typename T, typename Ops>
C10_HOST_DEVICE inline T clamp(T x, T lo, T hi) {
  return Ops::min(Ops::max(x, lo), hi);
}

template <typename T, typename Ops = ScalarOps<T>>
C10_HOST_DEVICE inline T sigmoid(T v) {
  return T(1) / (T(1) + Ops::exp(-v));
}

// h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)
template <typename T, typename Ops = ScalarOps<T>>
C10_HOST_DEVICE inline T rectified_sigmoid(T v) {
  const T stretched = sigmoid<T, Ops>(v) * T(kZeta - kGamma) + T(kGamma);
  return clamp<T, Ops>(stretched, T(0), T(1));
}

// h(V) and dh/dV from one sigmoid; dh/dV is zero where the clip is active (boundaries pass the
// gradient, as torch.clamp does).
template <typename T, typename Ops = ScalarOps<T>>
C10_HOST_DEVICE inline void rectified_sigmoid_and_grad(T v, T& h, T& dh_dv) {
  const T s = sigmoid<T, Ops>(v);
  const T stretched = s * T(kZeta - kGamma) + T(kGamma);
  const auto inside = Ops::both(stretched >= T(0), stretched <= T(1));
  h = clamp<T, Ops>(stretched, T(0), T(1));
  dh_dv = Ops::select(inside, T(kZeta - kGamma) * s * (T(1) - s), T(0));
}

// dh/dV alone.
template <typename T, typename Ops = ScalarOps<T>>
C10_HOST_DEVICE inline T rectified_sigmoid_grad(T v) {
  T h, dh_dv;
  rectified_sigmoid_and_grad<T, Ops>(v, h, dh_dv);
  return dh_dv;
}

// |V| beyond which the clip of h(V) is active with room to spare: sigmoid(V) * 1.2 - 0.1 leaves
// [0, 1] at |V| = ln 11, and 1e-3 further on it is ~1e-4 outside, far above float rounding. There
// h is exactly 0 or 1 and dh/dV exactly 0.
constexpr double kSaturatedV = 2.3978952727983707 + 1e-3;

template <typename T, typename Ops = ScalarOps<T>>
C10_HOST_DEVICE inline auto is_saturated(T v) {
  return Ops::either(v >= T(kSaturatedV), v <= T(-kSaturatedV));
}

// V such that h(V) equals `fraction` in [0, 1): the inverse of the stretched sigmoid.
template <typename T, typename Ops = ScalarOps<T>>
C10_HOST_DEVICE inline T inverse_rectified_sigmoid(T fraction) {
  const T p = (fraction - T(kGamma)) / T(kZeta - kGamma);
  return Ops::log(p / (T(1) - p));
}

// `grid_base` is floor(W/s) + z, fixed during AdaRound. Returns s * (clip(base + h, n, p) - z).
template <typename T, typename Ops = ScalarOps<T>>
C10_HOST_DEVICE inline T soft_quantize(T grid_base, T h, T scale, T zero_point, T qmin, T qmax) {
  return scale * (clamp<T, Ops>(grid_base + h, qmin, qmax) - zero_point);
}

// dW~/dV for the same arguments, with dh/dV given.
template <typename T, typename Ops = ScalarOps<T>>
C10_HOST_DEVICE inline T soft_quantize_grad(T grid_base, T h, T dh_dv, T scale, T qmin, T qmax) {
  const T q = grid_base + h;
  const auto inside = Ops::both(q >= qmin, q <= qmax);
  return Ops::select(inside, scale * dh_dv, T(0));
}

// One element of f_reg(V) = sum(1 - |2h(V) - 1|^beta).
template <typename T, typename Ops = ScalarOps<T>>
C10_HOST_DEVICE inline T regularizer_term(T h, T beta) {
  return T(1) - Ops::pow(Ops::abs(T(2) * h - T(1)), beta);
}

// d/dV of one regularizer element, with h and dh/dV given:
// -beta * |2h-1|^(beta-1) * sign(2h-1) * 2 * dh/dV.
template <typename T, typename Ops = ScalarOps<T>>
C10_HOST_DEVICE inline T regularizer_grad(T h, T dh_dv, T beta) {
  const T d = T(2) * h - T(1);
  const T magnitude = Ops::pow(Ops::abs(d), beta - T(1));
  const T signed_mag = Ops::select(d >= T(0), magnitude, -magnitude);
  return T(-2) * beta * signed_mag * dh_dv;
}

// Rounding functions of hard_quantize; each returns the integer grid value before clipping.
enum class RoundingMode : int { kNearest = 0, kFloor = 1, kCeil = 2, kStochastic = 3, kAdaptive = 4 };

template <typename T, typename Ops = ScalarOps<T>>
C10_HOST_DEVICE inline T dequantize(T code, T scale, T zero_point) {
  return scale * (code - zero_point);
}

// `aux` is the uniform noise in [0,1) for stochastic rounding and V for adaptive rounding.
template <typename T>
C10_HOST_DEVICE inline T hard_code(RoundingMode mode, T w_over_s, T aux, T zero_point, T qmin, T qmax) {
  using Ops = ScalarOps<T>;
  const T lower = Ops::floor(w_over_s);
  T rounded;
  switch (mode) {
    case RoundingMode::kNearest: rounded = Ops::nearest(w_over_s); break;
    case RoundingMode::kFloor: rounded = lower; break;
    case RoundingMode::kCeil: rounded = std::ceil(w_over_s); break;
    case RoundingMode::kStochastic: rounded = lower + ((aux < w_over_s - lower) ? T(1) : T(0)); break;
    default: rounded = lower + ((rectified_sigmoid<T>(aux) >= T(0.5)) ? T(1) : T(0)); break;
  }
  return clamp<T, Ops>(rounded + zero_point, qmin, qmax);
}

// Adam (as torch.optim.Adam with amsgrad=False, weight_decay=0) on one element.
struct AdamStep {
  double lr;
  double beta1;
  double beta2;
  double eps;
  double bias_correction1;       // 1 - beta1^t
  double bias_correction2_sqrt;  // sqrt(1 - beta2^t)
};

template <typename T, typename Ops = ScalarOps<T>>
C10_HOST_DEVICE inline T adam_update(T param, T grad, T& exp_avg, T& exp_avg_sq, const AdamStep& a) {
  exp_avg = exp_avg + T(1 - a.beta1) * (grad - exp_avg);
  exp_avg_sq = T(a.beta2) * exp_avg_sq + T(1 - a.beta2) * grad * grad;
  const T denom = Ops::sqrt(exp_avg_sq) / T(a.bias_correction2_sqrt) + T(a.eps);
  return param - T(a.lr / a.bias_correction1) * exp_avg / denom;
}

// One element (or SIMD vector) of adam_rounding_step_: dL/dV from dL/dW~ and the regularizer, the
// Adam update of V, and the new soft weight W~.
template <typename T, typename Ops>
C10_HOST_DEVICE inline T rounding_step_full(T& v, T& exp_avg, T& exp_avg_sq, T grad, T grid_base, T scale,
                                            T zero_point, T qmin, T qmax, T reg_lambda, T beta, bool regularize,
                                            const AdamStep& adam) {
  T h, dh;
  rectified_sigmoid_and_grad<T, Ops>(v, h, dh);
  T g = grad * soft_quantize_grad<T, Ops>(grid_base, h, dh, scale, qmin, qmax);
  if (regularize) g = g + reg_lambda * regularizer_grad<T, Ops>(h, dh, beta);
  v = adam_update<T, Ops>(v, g, exp_avg, exp_avg_sq, adam);
  return soft_quantize<T, Ops>(grid_base, rectified_sigmoid<T, Ops>(v), scale, zero_point, qmin, qmax);
}

// The same step where V is saturated (is_saturated): h(V) is exactly 0 or 1 and the gradient exactly
// 0, so only Adam's momentum moves V. Returns whether V is still saturated on the same side, where h
// and W~ cannot have changed; otherwise the caller computes W~ with soft_quantize. Bit for bit what
// rounding_step_full gives, without the loads of dL/dW~ and the grid, the transcendental math and
// the W~ store.
template <typename T, typename Ops>
C10_HOST_DEVICE inline bool rounding_step_saturated(T& v, T& exp_avg, T& exp_avg_sq, const AdamStep& adam) {
  const T v_old = v;
  v = adam_update<T, Ops>(v_old, T(0), exp_avg, exp_avg_sq, adam);
  return Ops::all(Ops::either(Ops::both(v_old > T(0), v >= T(kSaturatedV)),
                              Ops::both(v_old < T(0), v <= T(-kSaturatedV))));
}

// One scalar element of adam_rounding_step_: the saturated shortcut where it applies, the full step
// otherwise. `grad` and `grid_base` are loaders, called only when needed. Returns whether W~ was set.
template <typename T, typename LoadGrad, typename LoadBase>
C10_HOST_DEVICE inline bool rounding_step(T& v, T& exp_avg, T& exp_avg_sq, T& soft_weight, LoadGrad grad,
                                          LoadBase grid_base, T scale, T zero_point, T qmin, T qmax, T reg_lambda,
                                          T beta, bool regularize, const AdamStep& adam) {
  if (is_saturated<T>(v)) {
    if (rounding_step_saturated<T, ScalarOps<T>>(v, exp_avg, exp_avg_sq, adam)) return false;
    soft_weight = soft_quantize<T>(grid_base(), rectified_sigmoid<T>(v), scale, zero_point, qmin, qmax);
    return true;
  }
  soft_weight = rounding_step_full<T, ScalarOps<T>>(v, exp_avg, exp_avg_sq, grad(), grid_base(), scale, zero_point,
                                                    qmin, qmax, reg_lambda, beta, regularize, adam);
  return true;
}

// ---- Activation fake quantization (per tensor), as block reconstruction trains it ----------
// The grid of one activation quantizer and an optional clamp [lower, upper] applied first (a
// ReLU/ReLU6 fused into the quantizer; +-inf when there is none).
template <typename T>
struct ActivationGrid {
  T scale, inv_scale, zero_point, qmin, qmax, lower, upper;
};

// The grid from its stored float32 step and zero point. 1/s is taken once, in float32, the code is
// nearest(x * (1/s)) + z and the value (code - z) * s is rounded to float32, as
// torch.fake_quantize_per_tensor_affine computes them for every input dtype: its values bit for bit.
template <typename T>
C10_HOST_DEVICE inline ActivationGrid<T> activation_grid(float scale, float zero_point, T qmin, T qmax, T lower,
                                                         T upper) {
  return {T(scale), T(1.0f / scale), T(zero_point), qmin, qmax, lower, upper};
}

// QDrop's draws (which elements keep their float value) are counter-based: a hash of the element's
// position in memory and the call's key. Every back end draws the same elements, and the backward
// redraws the forward's without a stored mask. The hash is lowbias32 (C. Wellons' integer-hash
// search): every input bit flips every output bit with probability close to 1/2.
C10_HOST_DEVICE inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

struct QDropDraw {
  uint32_t key = 0;
  uint64_t threshold = 0;  // round(p * 2^32): 0 keeps no element, 2^32 keeps every one
  // Whether element `index` (< 2^32) keeps its float value.
  C10_HOST_DEVICE bool keeps(int64_t index) const {
    return uint64_t(mix32(uint32_t(index) ^ key)) < threshold;
  }
};

// y = x clamped to [lower, upper], then s * (clip(nearest(y / s) + z, qmin, qmax) - z); where
// `keep_float` holds (QDrop), y itself. A NaN input stays NaN.
template <typename T, typename Ops = ScalarOps<T>>
C10_HOST_DEVICE inline T fake_quantize_activation(T x, typename Ops::Mask keep_float, const ActivationGrid<T>& g) {
  const T y = clamp<T, Ops>(x, g.lower, g.upper);
  const T code = clamp<T, Ops>(Ops::nearest(y * g.inv_scale) + g.zero_point, g.qmin, g.qmax);
  return Ops::select(keep_float, y, Ops::to_float32((code - g.zero_point) * g.scale));
}

// The straight-through gradients of fake_quantize_activation at x:
// d/dx: 1 where the clamp passes x (lower < x < upper, as hardtanh's backward) and either x is kept
// in float or its code lies inside [qmin, qmax]; else 0.
// d/ds (LSQ, Esser et al. 2020; torch's learnable fake quantization): inside the grid
// (code - z) - y / s, the rounding offset; outside it the clipped level minus z; 0 where kept.
template <typename T, typename Ops = ScalarOps<T>>
C10_HOST_DEVICE inline void fake_quantize_activation_grad(T x, typename Ops::Mask keep_float,
                                                          const ActivationGrid<T>& g, T& d_input, T& d_scale) {
  const T y = clamp<T, Ops>(x, g.lower, g.upper);
  const T code = Ops::nearest(y * g.inv_scale) + g.zero_point;
  const auto inside = Ops::both(code >= g.qmin, code <= g.qmax);
  const auto passes = Ops::both(x > g.lower, x < g.upper);
  const T level = clamp<T, Ops>(code, g.qmin, g.qmax) - g.zero_point;
  d_input = Ops::select(Ops::both(passes, Ops::either(keep_float, inside)), T(1), T(0));
  d_scale = Ops::select(keep_float, T(0), Ops::select(inside, level - y * g.inv_scale, level));
}

// ---- Per-channel clip to [0, upper_c] (a ReLU6 after cross-layer equalization) ----------------
// The value min(max(x, 0), upper), as torch.minimum(x.clamp(min=0), upper) computes it; a NaN x
// stays NaN.
template <typename T, typename Ops = ScalarOps<T>>
C10_HOST_DEVICE inline T channel_clip(T x, T upper) {
  return clamp<T, Ops>(x, T(0), upper);
}

// Its input gradient: grad where the clip passes x (0 < x < upper, as two threshold masks), else 0
// (a select, so that an infinite grad does not turn into NaN); ties with a bound pass nothing.
template <typename T, typename Ops = ScalarOps<T>>
C10_HOST_DEVICE inline T channel_clip_backward(T grad, T x, T upper) {
  return Ops::select(Ops::both(x > T(0), x < upper), grad, T(0));
}

// Activation in the reconstruction loss.
enum class Activation : int { kNone = 0, kRelu = 1, kRelu6 = 2 };

template <typename T>
C10_HOST_DEVICE inline T apply_activation(Activation act, T x) {
  if (act == Activation::kRelu) return x > T(0) ? x : T(0);
  if (act == Activation::kRelu6) return x > T(0) ? (x < T(6) ? x : T(6)) : T(0);
  return x;
}

// d f_a(x) / dx, with the same boundary convention as torch's relu/hardtanh backward.
template <typename T>
C10_HOST_DEVICE inline T activation_grad(Activation act, T x) {
  if (act == Activation::kRelu) return x > T(0) ? T(1) : T(0);
  if (act == Activation::kRelu6) return (x > T(0) && x < T(6)) ? T(1) : T(0);
  return T(1);
}

// Gradient of norm * (f_a(pre) - target)^2 with respect to pre.
template <typename T>
C10_HOST_DEVICE inline T reconstruction_grad(Activation act, T pre, T target, T norm) {
  return T(2) * norm * (apply_activation(act, pre) - target) * activation_grad(act, pre);
}

}  // namespace adaround
