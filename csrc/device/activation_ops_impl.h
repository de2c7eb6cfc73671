// The activation ops (fake quantization, per-channel clip) of a device back end (schemas in csrc/activation_ops.cpp):
// checks and layouts from activation_quant.h, dtype dispatch, and the element bodies of
// element_kernels.h, instantiated with CudaLaunch (cuda/activation_kernels.cu) on the GPU and
// HostLaunch (emulation.cpp) on the CPU for tests.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <optional>
#include <tuple>

#include "../activation_quant.h"
#include "element_kernels.h"
#include "rounding_ops_impl.h"

namespace adaround::device {

template <typename T>
ActivationGridRef<T> activation_grid_ref(const ActivationQuantCall& call) {
  return {call.scale.const_data_ptr<float>(), call.zero_point.const_data_ptr<float>(), T(call.qmin), T(call.qmax),
          T(call.lower), T(call.upper)};
}

template <typename Launch>
struct ActivationQuantKernels {
  using Tensor = at::Tensor;
  template <typename scalar_t>
  using opmath_t = at::opmath_type<scalar_t>;

  static Tensor fake_quantize_activation(const Tensor& input, const Tensor& scale, const Tensor& zero_point,
                                         int64_t quant_min, int64_t quant_max, std::optional<double> clamp_min,
                                         std::optional<double> clamp_max, double drop_probability,
                                         int64_t drop_seed) {
    const ActivationQuantCall call = prepare_activation_quant(input, scale, zero_point, quant_min, quant_max, clamp_min,
                                                              clamp_max, drop_probability, drop_seed);
    [[maybe_unused]] const auto guard = on_device_of<Launch>(call.input, "input");
    Tensor out = at::empty_like(call.input);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.input.scalar_type(), "fake_quantize_activation", [&] {
      using T = opmath_t<scalar_t>;
      Launch::elementwise(call.input.numel(), FakeQuantizeActivationElement<scalar_t, T>{
                                                  call.input.const_data_ptr<scalar_t>(), call.drop,
                                                  out.mutable_data_ptr<scalar_t>(), activation_grid_ref<T>(call)});
    });
    return out;
  }

  static std::tuple<Tensor, Tensor> fake_quantize_activation_backward(
      const Tensor& grad_output, const Tensor& input, const Tensor& scale, const Tensor& zero_point,
      int64_t quant_min, int64_t quant_max, std::optional<double> clamp_min, std::optional<double> clamp_max,
      double drop_probability, int64_t drop_seed, bool scale_grad) {
    const ActivationQuantCall call = prepare_activation_quant(input, scale, zero_point, quant_min, quant_max,
                                                              clamp_min, clamp_max, drop_probability, drop_seed,
                                                              grad_output);
    [[maybe_unused]] const auto guard = on_device_of<Launch>(call.input, "input");
    Tensor grad_input = at::empty_like(call.input);
    Tensor grad_scale = at::zeros_like(scale);
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, call.input.scalar_type(), "fake_quantize_activation_backward", [&] {
          using T = opmath_t<scalar_t>;
          const scalar_t* g = call.grad_output.const_data_ptr<scalar_t>();
          const scalar_t* x = call.input.const_data_ptr<scalar_t>();
          Launch::elementwise(call.input.numel(), FakeQuantizeActivationGradElement<scalar_t, T>{
                                                      g, x, call.drop, grad_input.mutable_data_ptr<scalar_t>(),
                                                      activation_grid_ref<T>(call)});
          if (scale_grad) {
            const Tensor total = Launch::sum(
                call.input.numel(),
                ActivationScaleGradTerm<scalar_t, T>{g, x, call.drop, activation_grid_ref<T>(call)},
                call.input.options());
            grad_scale.copy_(total.reshape(grad_scale.sizes()));  // on the device: no synchronisation
          }
        });
    return {grad_input, grad_scale};
  }

  static Tensor channel_clip(const Tensor& input, const Tensor& upper, int64_t dim) {
    const ChannelClipCall call = prepare_channel_clip(input, upper, dim);
    [[maybe_unused]] const auto guard = on_device_of<Launch>(call.input, "input");
    Tensor out = at::empty_like(call.input);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.input.scalar_type(), "channel_clip", [&] {
      using T = opmath_t<scalar_t>;
      Launch::elementwise(call.input.numel(), ChannelClipElement<scalar_t, T>{
                                                  call.input.const_data_ptr<scalar_t>(), call.upper.const_data_ptr<T>(),
                                                  channel_of(call), out.mutable_data_ptr<scalar_t>()});
    });
    return out;
  }

  static Tensor channel_clip_backward(const Tensor& grad_output, const Tensor& input, const Tensor& upper,
                                      int64_t dim) {
    const ChannelClipCall call = prepare_channel_clip(input, upper, dim, grad_output);
    [[maybe_unused]] const auto guard = on_device_of<Launch>(call.input, "input");
    Tensor grad_input = at::empty_like(call.input);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.input.scalar_type(), "channel_clip_backward", [&] {
      using T = opmath_t<scalar_t>;
      Launch::elementwise(call.input.numel(), ChannelClipBackwardElement<scalar_t, T>{
                                                  call.grad_output.const_data_ptr<scalar_t>(),
                                                  call.input.const_data_ptr<scalar_t>(),
                                                  call.upper.const_data_ptr<T>(), channel_of(call),
                                                  grad_input.mutable_data_ptr<scalar_t>()});
    });
    return grad_input;
  }

 private:
  static ChannelOf channel_of(const ChannelClipCall& call) { return {call.channel_stride, call.channels}; }
};

}  // namespace adaround::device
