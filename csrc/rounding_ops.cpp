// Schemas of the rounding op family and their C++ entry points.
#include "rounding_ops.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace adaround::ops {

namespace {
template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}
}  // namespace

at::Tensor soft_quantize(const at::Tensor& weight, const at::Tensor& v, const at::Tensor& scale,
                         const std::optional<at::Tensor>& zero_point, int64_t quant_min,
                         int64_t quant_max, std::optional<int64_t> axis) {
  static auto op = find_op<decltype(soft_quantize)>("adaround::soft_quantize");
  return op.call(weight, v, scale, zero_point, quant_min, quant_max, axis);
}

at::Tensor soft_quantize_backward(const at::Tensor& grad_output, const at::Tensor& weight,
                                  const at::Tensor& v, const at::Tensor& scale,
                                  const std::optional<at::Tensor>& zero_point, int64_t quant_min,
                                  int64_t quant_max, std::optional<int64_t> axis) {
  static auto op = find_op<decltype(soft_quantize_backward)>("adaround::soft_quantize_backward");
  return op.call(grad_output, weight, v, scale, zero_point, quant_min, quant_max, axis);
}

at::Tensor round_regularizer(const at::Tensor& v, double beta) {
  static auto op = find_op<decltype(round_regularizer)>("adaround::round_regularizer");
  return op.call(v, beta);
}

at::Tensor round_regularizer_backward(const at::Tensor& grad_output, const at::Tensor& v, double beta) {
  static auto op = find_op<decltype(round_regularizer_backward)>("adaround::round_regularizer_backward");
  return op.call(grad_output, v, beta);
}

std::tuple<at::Tensor, at::Tensor> hard_quantize(const at::Tensor& weight, const at::Tensor& scale,
                                                 const std::optional<at::Tensor>& zero_point,
                                                 int64_t quant_min, int64_t quant_max,
                                                 std::optional<int64_t> axis, const std::string& mode,
                                                 const std::optional<at::Tensor>& v,
                                                 const std::optional<at::Tensor>& noise) {
  using Signature = std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t, int64_t,
      std::optional<int64_t>, c10::string_view, const std::optional<at::Tensor>&,
      const std::optional<at::Tensor>&);
  static auto op = find_op<Signature>("adaround::hard_quantize");
  return op.call(weight, scale, zero_point, quant_min, quant_max, axis, mode, v, noise);
}

at::Tensor init_v(const at::Tensor& weight, const at::Tensor& scale, std::optional<int64_t> axis) {
  static auto op = find_op<decltype(init_v)>("adaround::init_v");
  return op.call(weight, scale, axis);
}

}  // namespace adaround::ops

TORCH_LIBRARY(adaround, m) {
  m.def("soft_quantize(Tensor weight, Tensor v, Tensor scale, Tensor? zero_point, int quant_min, "
        "int quant_max, int? axis=None) -> Tensor");
  m.def("soft_quantize_backward(Tensor grad_output, Tensor weight, Tensor v, Tensor scale, "
        "Tensor? zero_point, int quant_min, int quant_max, int? axis=None) -> Tensor");
  m.def("round_regularizer(Tensor v, float beta) -> Tensor");
  m.def("round_regularizer_backward(Tensor grad_output, Tensor v, float beta) -> Tensor");
  m.def("hard_quantize(Tensor weight, Tensor scale, Tensor? zero_point, int quant_min, int quant_max, "
        "int? axis=None, str mode='nearest', Tensor? v=None, Tensor? noise=None) -> (Tensor, Tensor)");
  m.def("init_v(Tensor weight, Tensor scale, int? axis=None) -> Tensor");
}
