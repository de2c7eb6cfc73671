// C++ entry points of the rounding ops. Each goes through the dispatcher, so it runs the CPU or
// CUDA kernel by the device of its tensors, exactly as torch.ops.adaround.* does from Python.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

namespace adaround::ops {

// W~ = s * (clip(floor(W/s) + h(V) + z, quant_min, quant_max) - z); axis=nullopt: per tensor.
at::Tensor soft_quantize(const at::Tensor& weight, const at::Tensor& v, const at::Tensor& scale,
                         const std::optional<at::Tensor>& zero_point, int64_t quant_min,
                         int64_t quant_max, std::optional<int64_t> axis);

// dL/dV given dL/dW~ (zero where the grid clips).
at::Tensor soft_quantize_backward(const at::Tensor& grad_output, const at::Tensor& weight,
                                  const at::Tensor& v, const at::Tensor& scale,
                                  const std::optional<at::Tensor>& zero_point, int64_t quant_min,
                                  int64_t quant_max, std::optional<int64_t> axis);

// sum(1 - |2h(V) - 1|^beta), a 0-dim tensor of V's dtype.
at::Tensor round_regularizer(const at::Tensor& v, double beta);
at::Tensor round_regularizer_backward(const at::Tensor& grad_output, const at::Tensor& v, double beta);

// (integer codes, dequantized weights). mode: nearest, floor, ceil, stochastic (needs noise,
// uniform in [0, 1)), adaptive (needs v: floor + [h(V) >= 0.5]).
std::tuple<at::Tensor, at::Tensor> hard_quantize(const at::Tensor& weight, const at::Tensor& scale,
                                                 const std::optional<at::Tensor>& zero_point,
                                                 int64_t quant_min, int64_t quant_max,
                                                 std::optional<int64_t> axis, const std::string& mode,
                                                 const std::optional<at::Tensor>& v = std::nullopt,
                                                 const std::optional<at::Tensor>& noise = std::nullopt);

// V with h(V) equal to the fractional part of W/s, so that W~ == W inside the grid.
at::Tensor init_v(const at::Tensor& weight, const at::Tensor& scale, std::optional<int64_t> axis);

}  // namespace adaround::ops
