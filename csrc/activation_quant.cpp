#include "activation_quant.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/core/WrapDimMinimal.h>

#include <cmath>
#include <limits>

#include "grid.h"

namespace adaround {

namespace {

void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& input) {
  TORCH_CHECK(t.device() == input.device(), name, " is on ", t.device(), " but input is on ", input.device());
}

// `t` with the strides of `like` (a dense tensor of the same shape): as given when they match.
at::Tensor laid_out_as(const at::Tensor& t, const at::Tensor& like) {
  if (t.strides() == like.strides()) return t;
  return at::empty_like(like, t.options()).copy_(t);
}

void check_grad_output(const at::Tensor& grad_output, const at::Tensor& input) {
  TORCH_CHECK(grad_output.sizes() == input.sizes(), "grad_output must have the shape of input ", input.sizes(),
              ", got ", grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), "grad_output must be ", input.scalar_type(),
              " as input, got ", grad_output.scalar_type());
  check_same_device(grad_output, "grad_output", input);
}

// The input as the kernels read it: as given when its memory is dense in some stride order.
at::Tensor dense(const at::Tensor& input) {
  return input.is_non_overlapping_and_dense() ? input : input.contiguous();
}

}  // namespace

ActivationQuantCall prepare_activation_quant(const at::Tensor& input, const at::Tensor& scale,
                                             const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
                                             std::optional<double> clamp_min, std::optional<double> clamp_max,
                                             double drop_probability, int64_t drop_seed,
                                             const std::optional<at::Tensor>& grad_output) {
  TORCH_CHECK(input.is_floating_point(), "input must be a floating-point tensor, got ", input.scalar_type());
  TORCH_CHECK(scale.is_floating_point(), "scale must be a floating-point tensor, got ", scale.scalar_type());
  TORCH_CHECK(scale.numel() == 1, "scale must have one element (a per-tensor grid), got shape ", scale.sizes());
  TORCH_CHECK(zero_point.numel() == 1, "zero_point must have one element, got shape ", zero_point.sizes());
  TORCH_CHECK(!zero_point.is_complex() && zero_point.scalar_type() != at::kBool,
              "zero_point must be a real number, got ", zero_point.scalar_type());
  check_same_device(scale, "scale", input);
  check_same_device(zero_point, "zero_point", input);
  check_quant_range(quant_min, quant_max);
  const double lower = clamp_min.value_or(-std::numeric_limits<double>::infinity());
  const double upper = clamp_max.value_or(std::numeric_limits<double>::infinity());
  TORCH_CHECK(!std::isnan(lower) && !std::isnan(upper), "clamp_min and clamp_max must not be NaN");
  TORCH_CHECK(lower < upper, "clamp_min (", lower, ") must be smaller than clamp_max (", upper, ")");
  TORCH_CHECK(drop_probability >= 0.0 && drop_probability <= 1.0, "drop_probability must lie in [0, 1], got ",
              drop_probability);
  TORCH_CHECK(drop_probability == 0.0 || input.numel() <= (int64_t(1) << 32),
              "drop_probability > 0 draws over at most 2^32 elements, input has ", input.numel());
  if (grad_output.has_value()) check_grad_output(*grad_output, input);
  ActivationQuantCall call;
  call.scale = scale.to(at::kFloat).reshape({1}).contiguous();
  call.zero_point = zero_point.to(at::kFloat).reshape({1}).contiguous();
  if (input.is_cpu()) {  // reading GPU memory would synchronise every call
    const float s = call.host_scale = call.scale.item<float>();
    const float z = call.host_zero_point = call.zero_point.item<float>();
    TORCH_CHECK(std::isfinite(s) && s > 0, "scale must be positive and finite, got ", s);
    TORCH_CHECK(z == std::nearbyint(z) && z >= quant_min && z <= quant_max,
                "zero_point must be an integer inside [quant_min, quant_max] = [", quant_min, ", ", quant_max,
                "], got ", z);
  }
  call.input = dense(input);
  if (grad_output.has_value()) call.grad_output = laid_out_as(*grad_output, call.input);
  call.qmin = quant_min;
  call.qmax = quant_max;
  // The bounds in the compute type (float for half inputs), as hardtanh's backward compares them.
  call.lower = lower;
  call.upper = upper;
  const uint64_t seed = static_cast<uint64_t>(drop_seed);
  call.drop.key = mix32(uint32_t(seed) ^ mix32(uint32_t(seed >> 32)));
  call.drop.threshold = static_cast<uint64_t>(std::llround(drop_probability * 4294967296.0));
  return call;
}

ChannelClipCall prepare_channel_clip(const at::Tensor& input, const at::Tensor& upper, int64_t dim,
                                     const std::optional<at::Tensor>& grad_output) {
  TORCH_CHECK(input.is_floating_point(), "input must be a floating-point tensor, got ", input.scalar_type());
  TORCH_CHECK(input.dim() >= 1, "input must have a channel dimension, got a 0-dim tensor");
  TORCH_CHECK(dim >= -input.dim() && dim < input.dim(), "dim ", dim, " is out of range for input of ", input.dim(),
              " dimensions");
  dim = c10::maybe_wrap_dim(dim, input.dim());
  TORCH_CHECK(upper.is_floating_point(), "upper must be a floating-point tensor, got ", upper.scalar_type());
  TORCH_CHECK(upper.numel() == input.size(dim), "upper must hold one bound per channel (", input.size(dim),
              " along dim ", dim, " of input), got shape ", upper.sizes());
  check_same_device(upper, "upper", input);
  if (grad_output.has_value()) check_grad_output(*grad_output, input);
  ChannelClipCall call;
  call.input = dense(input);
  call.upper = upper.to(at::toOpMathType(input.scalar_type())).reshape({-1}).contiguous();
  if (input.is_cpu()) {  // a loop over the bounds: a few tensor ops would cost more than a small clip
    AT_DISPATCH_FLOATING_TYPES(call.upper.scalar_type(), "prepare_channel_clip", [&] {
      const scalar_t* bound = call.upper.const_data_ptr<scalar_t>();
      for (int64_t c = 0; c < call.upper.numel(); ++c) {
        TORCH_CHECK(bound[c] >= 0, "upper must hold no NaN and no negative bound, got ", bound[c], " for channel ",
                    c);
      }
    });
  }
  if (grad_output.has_value()) call.grad_output = laid_out_as(*grad_output, call.input);
  call.channels = input.size(dim);
  call.channel_stride = call.channels > 1 ? call.input.stride(dim) : 1;
  return call;
}

}  // namespace adaround
