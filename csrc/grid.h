// Argument checking and layout of a quantization grid, shared by every backend.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "rounding_math.h"

namespace adaround {

// A validated grid: scale and zero point as contiguous compute-type vectors with one entry per
// channel (one entry in all for per-tensor), and the weight seen as [outer, channels, inner].
struct QuantGrid {
  at::Tensor scale;       // [channels], compute dtype
  at::Tensor zero_point;  // [channels], compute dtype
  int64_t qmin = 0;
  int64_t qmax = 0;
  int64_t channels = 1;
  int64_t inner = 1;  // elements per channel run in contiguous memory
};

// Checks an integer grid [quant_min, quant_max]: 4 to 256 levels inside the int8 or uint8 range.
void check_quant_range(int64_t quant_min, int64_t quant_max);

// Compute dtype for a weight dtype: float for float/half/bfloat16, double for double.
at::ScalarType compute_dtype(at::ScalarType weight_dtype);

// Whether make_grid reads the grid's values (scale positive and finite, zero point integral and in
// range). Reading memory of a GPU is a host synchronisation: it would stall every op call and keep
// the ops out of CUDA graphs, so an op checks values where they are in CPU memory, and
// optimize_layer checks them once per layer wherever they are.
enum class GridValueCheck { kWhereFree, kAlways, kNever };

// Checks every grid argument against `weight` and returns the grid laid out for the kernels.
// Errors name the offending argument.
QuantGrid make_grid(const at::Tensor& weight, const at::Tensor& scale,
                    const std::optional<at::Tensor>& zero_point, int64_t quant_min,
                    int64_t quant_max, std::optional<int64_t> axis,
                    GridValueCheck check_values = GridValueCheck::kWhereFree);

// Checks that `v` can hold the rounding variables of `weight` (same shape, device, compute dtype).
void check_rounding_variable(const at::Tensor& weight, const at::Tensor& v, const char* name);

// Checks soft_quantize_backward's arguments beyond the grid: v as check_rounding_variable, and
// grad_output shaped like weight and on its device.
void check_soft_quantize_backward_args(const at::Tensor& grad_output, const at::Tensor& weight, const at::Tensor& v);

// soft_quantize_backward's operands after its checks (and after the caller's own last one, the device
// glue's guard): weight, V and dL/dW~ (in the weight's dtype) contiguous, dL/dV allocated like V.
struct SoftQuantizeBackwardOperands {
  at::Tensor weight, v, grad_output, grad_v;
};
SoftQuantizeBackwardOperands soft_quantize_backward_operands(const at::Tensor& grad_output, const at::Tensor& weight,
                                                             const at::Tensor& v);

// Checks the round_regularizer arguments: V float32/float64, beta finite and >= 1.
void check_regularizer_args(const at::Tensor& v, double beta);

// The per-element input hard_quantize needs for `mode`: V (adaptive), the uniform noise
// (stochastic), or an undefined tensor; checked against `weight` (and, in CPU memory, V for NaN and
// the noise for [0, 1)) and made contiguous.
at::Tensor rounding_aux(RoundingMode mode, const at::Tensor& weight, const std::optional<at::Tensor>& v,
                        const std::optional<at::Tensor>& noise);

// hard_quantize once its arguments passed every check: where the CPU kernel and the device glue both
// start. allocate() then makes the weight contiguous and allocates the outputs, after the caller's
// own last check (the device glue's device check and guard): a bad call copies nothing.
struct HardQuantizeCall {
  QuantGrid grid;
  RoundingMode mode;
  at::Tensor aux;          // V, the noise, or undefined (rounding_aux)
  at::Tensor weight;       // as given; after allocate(): contiguous
  at::Tensor codes;        // after allocate(): code_dtype, the weight's shape
  at::Tensor dequantized;  // after allocate(): the weight's dtype and shape
  void allocate();
};
HardQuantizeCall prepare_hard_quantize(const at::Tensor& weight, const at::Tensor& scale,
                                       const std::optional<at::Tensor>& zero_point, int64_t quant_min,
                                       int64_t quant_max, std::optional<int64_t> axis, const std::string& mode,
                                       const std::optional<at::Tensor>& v, const std::optional<at::Tensor>& noise);

// Parses the `mode` argument of hard_quantize.
RoundingMode parse_rounding_mode(const std::string& mode);

// Parses the activation used in the reconstruction loss: "none", "relu" or "relu6".
Activation parse_activation(const std::string& activation);

// Smallest integer dtype holding every code in [quant_min, quant_max] (int8 or uint8).
at::ScalarType code_dtype(int64_t quant_min, int64_t quant_max);

}  // namespace adaround
