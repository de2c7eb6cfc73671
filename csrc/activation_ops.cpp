// Schemas of the activation fake-quantization ops and their C++ entry points (activation_ops.h):
// block reconstruction's per-tensor input quantizers, with an optional clamp fused in front (a ReLU
// or ReLU6), QDrop (each element keeps its float value with drop_probability, drawn from drop_seed
// and its position in memory: the backward given the same seed redraws the same elements), the
// straight-through gradient for the input and the LSQ gradient for the step; and the per-channel clip
// to [0, upper_c] that cross-layer equalization makes of a ReLU6 (equalize.ChannelClip), one pass
// each way where PyTorch's ops take two forward and three backward.
#include "activation_ops.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(adaround, m) {
  m.def("fake_quantize_activation(Tensor input, Tensor scale, Tensor zero_point, int quant_min, "
        "int quant_max, float? clamp_min=None, float? clamp_max=None, float drop_probability=0.0, "
        "int drop_seed=0) -> Tensor");
  m.def("fake_quantize_activation_backward(Tensor grad_output, Tensor input, Tensor scale, Tensor zero_point, "
        "int quant_min, int quant_max, float? clamp_min=None, float? clamp_max=None, float drop_probability=0.0, "
        "int drop_seed=0, bool scale_grad=True) -> (Tensor, Tensor)");
  m.def("channel_clip(Tensor input, Tensor upper, int dim=1) -> Tensor");
  m.def("channel_clip_backward(Tensor grad_output, Tensor input, Tensor upper, int dim=1) -> Tensor");
}

namespace adaround::ops {

at::Tensor fake_quantize_activation(const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point,
                                    int64_t quant_min, int64_t quant_max, std::optional<double> clamp_min,
                                    std::optional<double> clamp_max, double drop_probability, int64_t drop_seed) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("adaround::fake_quantize_activation", "")
                       .typed<decltype(fake_quantize_activation)>();
  return op.call(input, scale, zero_point, quant_min, quant_max, clamp_min, clamp_max, drop_probability, drop_seed);
}

std::tuple<at::Tensor, at::Tensor> fake_quantize_activation_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point,
    int64_t quant_min, int64_t quant_max, std::optional<double> clamp_min, std::optional<double> clamp_max,
    double drop_probability, int64_t drop_seed, bool scale_grad) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("adaround::fake_quantize_activation_backward", "")
                       .typed<decltype(fake_quantize_activation_backward)>();
  return op.call(grad_output, input, scale, zero_point, quant_min, quant_max, clamp_min, clamp_max, drop_probability,
                 drop_seed, scale_grad);
}

at::Tensor channel_clip(const at::Tensor& input, const at::Tensor& upper, int64_t dim) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("adaround::channel_clip", "")
                       .typed<decltype(channel_clip)>();
  return op.call(input, upper, dim);
}

at::Tensor channel_clip_backward(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& upper,
                                 int64_t dim) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("adaround::channel_clip_backward", "")
                       .typed<decltype(channel_clip_backward)>();
  return op.call(grad_output, input, upper, dim);
}

}  // namespace adaround::ops
