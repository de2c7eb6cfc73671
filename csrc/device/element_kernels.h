// The per-element bodies of the device kernels (CUDA, and its host emulation), written once.
//
// Each functor holds raw pointers and scalars and computes element i; a launch back end
// (cuda/cuda_launch.cuh on the GPU, host_launch.h on the CPU) calls it for every i. The formulas
// come from rounding_math.h, so these bodies, the CPU kernels and the tests share one source of
// truth; what is written here is only the part particular to the device kernels: where each
// element's operands live (index arithmetic, per-channel grid) and in which compute type.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

#include "../rounding_math.h"

namespace adaround::device {

// Channel of element i of a weight seen as [outer, channels, inner] (QuantGrid's layout).
struct ChannelOf {
  int64_t inner = 1;
  int64_t channels = 1;
  C10_HOST_DEVICE int64_t operator()(int64_t i) const { return (i / inner) % channels; }
};

// The grid at one weight: its channel's scale and zero point, and floor(W/s) + z.
template <typename T>
struct GridPoint {
  T scale, zero_point, base;
};

// A quantization grid as the kernels read it: one scale and zero point per channel.
template <typename T>
struct GridView {
  const T* scale;
  const T* zero_point;
  T qmin, qmax;
  ChannelOf channel;
  C10_HOST_DEVICE GridPoint<T> at(int64_t i, T weight) const {
    const int64_t c = channel(i);
    return {scale[c], zero_point[c], ScalarOps<T>::floor(weight / scale[c]) + zero_point[c]};
  }
};

// W~ = s * (clip(floor(W/s) + z + h(V), n, p) - z). `scalar_t` is the weight's dtype, T the compute type.
template <typename scalar_t, typename T>
struct SoftQuantizeElement {
  const scalar_t* weight;
  const T* v;
  scalar_t* out;
  GridView<T> grid;
  C10_HOST_DEVICE void operator()(int64_t i) const {
    const GridPoint<T> g = grid.at(i, T(weight[i]));
    const T h = rectified_sigmoid<T>(v[i]);
    out[i] = scalar_t(soft_quantize<T>(g.base, h, g.scale, g.zero_point, grid.qmin, grid.qmax));
  }
};

// dL/dV = dL/dW~ * dW~/dV.
template <typename scalar_t, typename T>
struct SoftQuantizeBackwardElement {
  const scalar_t* grad_output;
  const scalar_t* weight;
  const T* v;
  T* grad_v;
  GridView<T> grid;
  C10_HOST_DEVICE void operator()(int64_t i) const {
    const GridPoint<T> g = grid.at(i, T(weight[i]));
    T h, dh;
    rectified_sigmoid_and_grad<T>(v[i], h, dh);
    grad_v[i] = T(grad_output[i]) * soft_quantize_grad<T>(g.base, h, dh, g.scale, grid.qmin, grid.qmax);
  }
};

// One term of the regulariser sum, in double (the reductions add in double).
template <typename T>
struct RegularizerTerm {
  const T* v;
  T beta;
  C10_HOST_DEVICE double operator()(int64_t i) const {
    return double(regularizer_term<T>(rectified_sigmoid<T>(v[i]), beta));
  }
};

// d/dV of grad_output * regulariser; grad_output is one value in memory (no host sync to read it).
template <typename T>
struct RegularizerGradElement {
  const T* v;
  const T* grad_output;
  T* grad_v;
  T beta;
  C10_HOST_DEVICE void operator()(int64_t i) const {
    T h, dh;
    rectified_sigmoid_and_grad<T>(v[i], h, dh);
    grad_v[i] = grad_output[0] * regularizer_grad<T>(h, dh, beta);
  }
};

// Integer code and dequantized weight. `aux` is V (adaptive), the noise (stochastic) or null.
template <typename weight_t, typename T, typename code_t>
struct HardQuantizeElement {
  const weight_t* weight;
  const T* aux;
  code_t* codes;
  weight_t* dequantized;
  GridView<T> grid;
  RoundingMode mode;
  C10_HOST_DEVICE void operator()(int64_t i) const {
    const int64_t c = grid.channel(i);
    const T s = grid.scale[c], z = grid.zero_point[c];
    const T code = hard_code<T>(mode, T(weight[i]) / s, aux != nullptr ? aux[i] : T(0), z, grid.qmin, grid.qmax);
    codes[i] = static_cast<code_t>(code);
    dequantized[i] = weight_t(dequantize<T>(code, s, z));
  }
};

// V with h(V) = frac(W/s).
template <typename scalar_t, typename T>
struct InitVElement {
  const scalar_t* weight;
  T* v;
  const T* scale;
  ChannelOf channel;
  C10_HOST_DEVICE void operator()(int64_t i) const {
    const T x = T(weight[i]) / scale[channel(i)];
    v[i] = inverse_rectified_sigmoid<T>(x - ScalarOps<T>::floor(x));
  }
};

// An activation quantizer's grid whose step and zero point are read from device memory, so that a
// learned step needs no host synchronisation.
template <typename T>
struct ActivationGridRef {
  const float* scale;
  const float* zero_point;
  T qmin, qmax, lower, upper;
  C10_HOST_DEVICE ActivationGrid<T> get() const {
    return activation_grid<T>(*scale, *zero_point, qmin, qmax, lower, upper);
  }
};

// The fake-quantized activation.
template <typename scalar_t, typename T>
struct FakeQuantizeActivationElement {
  const scalar_t* input;
  QDropDraw drop;
  scalar_t* out;
  ActivationGridRef<T> grid;
  C10_HOST_DEVICE void operator()(int64_t i) const {
    const bool keep = drop.keeps(i);
    out[i] = scalar_t(fake_quantize_activation<T>(T(input[i]), keep, grid.get()));
  }
};

// Its input gradient: dL/dx = dL/dy * dy/dx.
template <typename scalar_t, typename T>
struct FakeQuantizeActivationGradElement {
  const scalar_t* grad_output;
  const scalar_t* input;
  QDropDraw drop;
  scalar_t* grad_input;
  ActivationGridRef<T> grid;
  C10_HOST_DEVICE void operator()(int64_t i) const {
    T d_input, d_scale;
    fake_quantize_activation_grad<T>(T(input[i]), drop.keeps(i), grid.get(), d_input,
                                     d_scale);
    grad_input[i] = scalar_t(T(grad_output[i]) * d_input);
  }
};

// One term of its step gradient dL/ds = sum_i dL/dy_i * dy_i/ds, in double (the reductions add in double).
template <typename scalar_t, typename T>
struct ActivationScaleGradTerm {
  const scalar_t* grad_output;
  const scalar_t* input;
  QDropDraw drop;
  ActivationGridRef<T> grid;
  C10_HOST_DEVICE double operator()(int64_t i) const {
    T d_input, d_scale;
    fake_quantize_activation_grad<T>(T(input[i]), drop.keeps(i), grid.get(), d_input,
                                     d_scale);
    return double(T(grad_output[i]) * d_scale);
  }
};

// The per-channel clip of an activation whose element i belongs to channel `channel(i)`.
template <typename scalar_t, typename T>
struct ChannelClipElement {
  const scalar_t* input;
  const T* upper;
  ChannelOf channel;
  scalar_t* out;
  C10_HOST_DEVICE void operator()(int64_t i) const {
    out[i] = scalar_t(channel_clip<T>(T(input[i]), upper[channel(i)]));
  }
};

// Its input gradient.
template <typename scalar_t, typename T>
struct ChannelClipBackwardElement {
  const scalar_t* grad_output;
  const scalar_t* input;
  const T* upper;
  ChannelOf channel;
  scalar_t* grad_input;
  C10_HOST_DEVICE void operator()(int64_t i) const {
    grad_input[i] = scalar_t(channel_clip_backward<T>(T(grad_output[i]), T(input[i]), upper[channel(i)]));
  }
};

// d/d(pre) of norm * (f_a(pre) - target)^2.
template <typename T>
struct ReconstructionGradElement {
  const T* pre;
  const T* target;
  T* grad;
  T norm;
  Activation activation;
  C10_HOST_DEVICE void operator()(int64_t i) const {
    grad[i] = reconstruction_grad<T>(activation, pre[i], target[i], norm);
  }
};

// The scalars of one optimisation step that change from iteration to iteration.
struct StepSchedule {
  double reg_lambda, beta, bias_correction1, bias_correction2_sqrt;
};

// Where a step finds its schedule: in its launch arguments ...
struct ScheduleArgument {
  StepSchedule schedule;
  C10_HOST_DEVICE StepSchedule operator()() const { return schedule; }
};

// ... or in memory (a CUDA graph replay cannot pass new host arguments): four float64 values
// reg_lambda, beta, 1 - beta1^t, sqrt(1 - beta2^t), laid out as StepSchedule.
struct ScheduleInMemory {
  const double* values;
  C10_HOST_DEVICE StepSchedule operator()() const { return {values[0], values[1], values[2], values[3]}; }
};

// One element of adam_rounding_step_: the Adam update of V from dL/dW~ and the regulariser, and W~
// of the new V (stored only where it can have changed; see rounding_step).
template <typename T, typename GetSchedule>
struct RoundingStepElement {
  T* v;
  T* exp_avg;
  T* exp_avg_sq;
  T* soft_weight;
  const T* grad;
  const T* grid_base;
  GridView<T> grid;
  AdamStep adam_constants;  // lr, betas, eps; the bias corrections come from the schedule
  GetSchedule get_schedule;
  C10_HOST_DEVICE void operator()(int64_t i) const {
    const StepSchedule schedule = get_schedule();
    AdamStep adam = adam_constants;
    adam.bias_correction1 = schedule.bias_correction1;
    adam.bias_correction2_sqrt = schedule.bias_correction2_sqrt;
    const T lambda = T(schedule.reg_lambda);
    const int64_t c = grid.channel(i);
    T vi = v[i], m = exp_avg[i], m2 = exp_avg_sq[i], w;
    const bool w_set = rounding_step<T>(
        vi, m, m2, w, [&] { return grad[i]; }, [&] { return grid_base[i]; }, grid.scale[c], grid.zero_point[c],
        grid.qmin, grid.qmax, lambda, T(schedule.beta), lambda != T(0), adam);
    v[i] = vi;
    exp_avg[i] = m;
    exp_avg_sq[i] = m2;
    if (w_set) soft_weight[i] = w;
  }
};

}  // namespace adaround::device
