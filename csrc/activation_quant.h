// Argument checks and operand layout of the activation ops (schemas in csrc/activation_ops.cpp): the
// fake quantization and the per-channel clip, shared by every back end.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "rounding_math.h"

namespace adaround {

// One call once its arguments passed their checks. The input is used as given when its memory is
// dense in any stride order (channels-last activations are not copied), else made contiguous;
// grad_output (when given) is laid out as the input, so element i of each is the same element; the
// step and zero point are float32 [1] on the input's device.
struct ActivationQuantCall {
  at::Tensor input;
  at::Tensor grad_output;  // the input's dtype, or undefined
  QDropDraw drop;          // over element positions in the input's memory
  at::Tensor scale, zero_point;
  int64_t qmin = 0, qmax = 0;
  double lower = 0, upper = 0;  // the clamp, +-inf where none was given
  float host_scale = 0, host_zero_point = 0;  // scale and zero_point's values, read once (CPU tensors only)

  // The grid of the step and zero point in CPU memory (the CPU kernels only).
  template <typename T>
  ActivationGrid<T> grid_on_host() const {
    return activation_grid<T>(host_scale, host_zero_point, T(qmin), T(qmax), T(lower), T(upper));
  }
};

// Checks every argument (errors name it); the values of scale (positive, finite) and zero_point
// (an integer in [quant_min, quant_max]) only where they are in CPU memory, as make_grid does.
ActivationQuantCall prepare_activation_quant(const at::Tensor& input, const at::Tensor& scale,
                                             const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
                                             std::optional<double> clamp_min, std::optional<double> clamp_max,
                                             double drop_probability, int64_t drop_seed,
                                             const std::optional<at::Tensor>& grad_output = std::nullopt);

// A per-channel clip call once its arguments passed their checks. The input is laid out as for the
// fake quantization; the channel of element i of its memory is then (i / channel_stride) % channels
// in every dense stride order. grad_output (when given) is laid out as the input; upper is
// contiguous, in the input's compute type (float for half inputs), on the input's device.
struct ChannelClipCall {
  at::Tensor input;
  at::Tensor grad_output;  // the input's dtype, or undefined
  at::Tensor upper;
  int64_t channels = 1;
  int64_t channel_stride = 1;
};

// Checks every argument (errors name it); upper's values (no NaN, none negative) only where they are
// in CPU memory, as for the fake quantization's step.
ChannelClipCall prepare_channel_clip(const at::Tensor& input, const at::Tensor& upper, int64_t dim,
                                     const std::optional<at::Tensor>& grad_output = std::nullopt);

}  // namespace adaround
