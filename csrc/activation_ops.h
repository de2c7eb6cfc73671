// C++ entry points of the activation ops (schemas in activation_ops.cpp). Each
// goes through the dispatcher, as torch.ops.adaround.* does from Python.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace adaround::ops {

at::Tensor fake_quantize_activation(const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point,
                                    int64_t quant_min, int64_t quant_max, std::optional<double> clamp_min,
                                    std::optional<double> clamp_max, double drop_probability, int64_t drop_seed);

// (grad_input, grad_scale); the same drop_seed redraws the forward's kept elements.
std::tuple<at::Tensor, at::Tensor> fake_quantize_activation_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point,
    int64_t quant_min, int64_t quant_max, std::optional<double> clamp_min, std::optional<double> clamp_max,
    double drop_probability, int64_t drop_seed, bool scale_grad);

// min(max(input, 0), upper[c]) for the channel c of each element along `dim`.
at::Tensor channel_clip(const at::Tensor& input, const at::Tensor& upper, int64_t dim);

// grad_output where 0 < input < upper[c], else 0.
at::Tensor channel_clip_backward(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& upper,
                                 int64_t dim);

}  // namespace adaround::ops
