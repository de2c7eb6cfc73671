// Autograd of fake_quantize_activation and channel_clip (schemas in activation_ops.cpp), in C++ as
// torchvision's ops/autograd: block reconstruction differentiates through them for every layer at
// every iteration, often on activations of a few KiB, where a Python autograd formula's per-call
// overhead exceeds the kernel's own time. The gradients are the backward ops': for the quantizer
// straight through the rounding for the input, LSQ's for the step (the zero point, grid, clamp and
// draws are constants); for the clip the input's, its bounds constants.
#include <ATen/core/grad_mode.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "activation_ops.h"

namespace adaround {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The op's kernel for the tensors' device, skipping this autograd kernel.
Tensor fake_quantize_activation_below_autograd(const Tensor& input, const Tensor& scale, const Tensor& zero_point,
                                               int64_t quant_min, int64_t quant_max, std::optional<double> clamp_min,
                                               std::optional<double> clamp_max, double drop_probability,
                                               int64_t drop_seed) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return ops::fake_quantize_activation(input, scale, zero_point, quant_min, quant_max, clamp_min, clamp_max,
                                       drop_probability, drop_seed);
}

class FakeQuantizeActivationFunction : public torch::autograd::Function<FakeQuantizeActivationFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const Tensor& scale, const Tensor& zero_point,
                        int64_t quant_min, int64_t quant_max, std::optional<double> clamp_min,
                        std::optional<double> clamp_max, double drop_probability, int64_t drop_seed) {
    ctx->save_for_backward({input, scale, zero_point});
    ctx->saved_data["quant_min"] = quant_min;
    ctx->saved_data["quant_max"] = quant_max;
    ctx->saved_data["clamp_min"] = clamp_min;
    ctx->saved_data["clamp_max"] = clamp_max;
    ctx->saved_data["drop_probability"] = drop_probability;
    ctx->saved_data["drop_seed"] = drop_seed;  // the backward redraws the forward's kept elements
    return fake_quantize_activation_below_autograd(input, scale, zero_point, quant_min, quant_max, clamp_min,
                                                   clamp_max, drop_probability, drop_seed);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const bool need_input = ctx->needs_input_grad(0), need_scale = ctx->needs_input_grad(1);
    Tensor grad_input, grad_scale;
    if (need_input || need_scale) {
      const variable_list saved = ctx->get_saved_variables();
      const auto& data = ctx->saved_data;
      std::tie(grad_input, grad_scale) = ops::fake_quantize_activation_backward(
          grad_outputs[0], saved[0], saved[1], saved[2], data.at("quant_min").toInt(), data.at("quant_max").toInt(),
          data.at("clamp_min").toOptional<double>(), data.at("clamp_max").toOptional<double>(),
          data.at("drop_probability").toDouble(), data.at("drop_seed").toInt(), need_scale);
    }
    // One entry per forward argument: none for the zero point, the grid, the clamp and the draw.
    return {need_input ? grad_input : Tensor(), need_scale ? grad_scale : Tensor(), Tensor(), Tensor(), Tensor(),
            Tensor(),   Tensor(),   Tensor(),   Tensor()};
  }
};

Tensor fake_quantize_activation_autograd(const Tensor& input, const Tensor& scale, const Tensor& zero_point,
                                         int64_t quant_min, int64_t quant_max, std::optional<double> clamp_min,
                                         std::optional<double> clamp_max, double drop_probability,
                                         int64_t drop_seed) {
  if (!at::GradMode::is_enabled() || !(input.requires_grad() || scale.requires_grad())) {  // no graph to record
    return fake_quantize_activation_below_autograd(input, scale, zero_point, quant_min, quant_max, clamp_min,
                                                   clamp_max, drop_probability, drop_seed);
  }
  return FakeQuantizeActivationFunction::apply(input, scale, zero_point, quant_min, quant_max, clamp_min, clamp_max,
                                               drop_probability, drop_seed);
}

// channel_clip's: the input's gradient from channel_clip_backward; the bounds are constants.
class ChannelClipFunction : public torch::autograd::Function<ChannelClipFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const Tensor& upper, int64_t dim) {
    ctx->save_for_backward({input, upper});
    ctx->saved_data["dim"] = dim;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return ops::channel_clip(input, upper, dim);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    Tensor grad_input;
    if (ctx->needs_input_grad(0)) {
      grad_input = ops::channel_clip_backward(grad_outputs[0], saved[0], saved[1], ctx->saved_data.at("dim").toInt());
    }
    return {grad_input, Tensor(), Tensor()};
  }
};

Tensor channel_clip_autograd(const Tensor& input, const Tensor& upper, int64_t dim) {
  TORCH_CHECK(!(at::GradMode::is_enabled() && upper.requires_grad()),
              "upper must not require grad: channel_clip's bounds are constants");
  if (!at::GradMode::is_enabled() || !input.requires_grad()) {  // no graph to record
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return ops::channel_clip(input, upper, dim);
  }
  return ChannelClipFunction::apply(input, upper, dim);
}

}  // namespace

TORCH_LIBRARY_IMPL(adaround, Autograd, m) {
  m.impl("fake_quantize_activation", &fake_quantize_activation_autograd);
  m.impl("channel_clip", &channel_clip_autograd);
}

}  // namespace adaround
