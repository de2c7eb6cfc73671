// The rounding ops of a device back end (schemas in csrc/rounding_ops.cpp): argument checks,
// layouts and dtype dispatch around the element bodies of element_kernels.h, written once and
// instantiated with a launch back end: CudaLaunch (cuda/rounding_kernels.cu) on the GPU, HostLaunch
// (emulation.cpp) on the CPU for tests.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <optional>
#include <string>

#include "../grid.h"
#include "element_kernels.h"

namespace adaround::device {

template <typename T>
GridView<T> grid_view(const QuantGrid& grid) {
  return {grid.scale.const_data_ptr<T>(), grid.zero_point.const_data_ptr<T>(), T(grid.qmin), T(grid.qmax),
          ChannelOf{grid.inner, grid.channels}};
}

// Called once the arguments passed their checks, whose messages name a mismatched argument: the
// tensor that says where the kernels run must be on a device of the back end; from here to the end
// of the scope that device is the current one (the CUDA back end's streams and allocations are
// per device).
template <typename Launch>
typename Launch::Guard on_device_of(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().type() == Launch::kDeviceType, name, " is on ", t.device(), "; these kernels run on ",
              c10::DeviceTypeName(Launch::kDeviceType, /*lower_case=*/true), " tensors");
  return typename Launch::Guard(t.device());
}

template <typename Launch>
struct RoundingKernels {
  using Tensor = at::Tensor;
  template <typename scalar_t>
  using opmath_t = at::opmath_type<scalar_t>;

  static Tensor soft_quantize(const Tensor& weight, const Tensor& v, const Tensor& scale,
                              const std::optional<Tensor>& zero_point, int64_t quant_min, int64_t quant_max,
                              std::optional<int64_t> axis) {
    const QuantGrid grid = make_grid(weight, scale, zero_point, quant_min, quant_max, axis);
    check_rounding_variable(weight, v, "v");
    [[maybe_unused]] const auto guard = on_device_of<Launch>(weight, "weight");
    const Tensor w = weight.contiguous();
    const Tensor vc = v.contiguous();
    Tensor out = at::empty_like(w);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "soft_quantize", [&] {
      using T = opmath_t<scalar_t>;
      Launch::elementwise(w.numel(),
                          SoftQuantizeElement<scalar_t, T>{w.const_data_ptr<scalar_t>(), vc.const_data_ptr<T>(),
                                                           out.mutable_data_ptr<scalar_t>(), grid_view<T>(grid)});
    });
    return out;
  }

  static Tensor soft_quantize_backward(const Tensor& grad_output, const Tensor& weight, const Tensor& v,
                                       const Tensor& scale, const std::optional<Tensor>& zero_point,
                                       int64_t quant_min, int64_t quant_max, std::optional<int64_t> axis) {
    const QuantGrid grid = make_grid(weight, scale, zero_point, quant_min, quant_max, axis);
    check_soft_quantize_backward_args(grad_output, weight, v);
    [[maybe_unused]] const auto guard = on_device_of<Launch>(weight, "weight");
    const auto [w, vc, g, grad_v] = soft_quantize_backward_operands(grad_output, weight, v);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "soft_quantize_backward", [&] {
      using T = opmath_t<scalar_t>;
      Launch::elementwise(w.numel(), SoftQuantizeBackwardElement<scalar_t, T>{
                                         g.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                                         vc.const_data_ptr<T>(), grad_v.mutable_data_ptr<T>(), grid_view<T>(grid)});
    });
    return grad_v;
  }

  static Tensor round_regularizer(const Tensor& v, double beta) {
    check_regularizer_args(v, beta);
    [[maybe_unused]] const auto guard = on_device_of<Launch>(v, "v");
    const Tensor vc = v.contiguous();
    Tensor total;
    AT_DISPATCH_FLOATING_TYPES(vc.scalar_type(), "round_regularizer", [&] {
      total = Launch::sum(vc.numel(), RegularizerTerm<scalar_t>{vc.const_data_ptr<scalar_t>(), scalar_t(beta)},
                          vc.options());
    });
    return total.to(vc.scalar_type());
  }

  static Tensor round_regularizer_backward(const Tensor& grad_output, const Tensor& v, double beta) {
    check_regularizer_args(v, beta);
    TORCH_CHECK(grad_output.numel() == 1, "grad_output must be a scalar, got shape ", grad_output.sizes());
    // The kernel reads grad_output through a device pointer: a CPU scalar (what autograd may hand
    // over) is copied to v's device; any other device is named.
    TORCH_CHECK(grad_output.device() == v.device() || grad_output.is_cpu(), "grad_output is on ",
                grad_output.device(), " but v is on ", v.device());
    [[maybe_unused]] const auto guard = on_device_of<Launch>(v, "v");
    const Tensor vc = v.contiguous();
    const Tensor g = grad_output.to(vc.options()).reshape({1}).contiguous();
    Tensor grad_v = at::empty_like(vc);
    AT_DISPATCH_FLOATING_TYPES(vc.scalar_type(), "round_regularizer_backward", [&] {
      Launch::elementwise(vc.numel(), RegularizerGradElement<scalar_t>{vc.const_data_ptr<scalar_t>(),
                                                                       g.const_data_ptr<scalar_t>(),
                                                                       grad_v.mutable_data_ptr<scalar_t>(),
                                                                       scalar_t(beta)});
    });
    return grad_v;
  }

  static std::tuple<Tensor, Tensor> hard_quantize(const Tensor& weight, const Tensor& scale,
                                                  const std::optional<Tensor>& zero_point, int64_t quant_min,
                                                  int64_t quant_max, std::optional<int64_t> axis,
                                                  c10::string_view mode_name, const std::optional<Tensor>& v,
                                                  const std::optional<Tensor>& noise) {
    HardQuantizeCall call = prepare_hard_quantize(weight, scale, zero_point, quant_min, quant_max, axis,
                                                  std::string(mode_name), v, noise);
    [[maybe_unused]] const auto guard = on_device_of<Launch>(weight, "weight");
    call.allocate();
    const Tensor &w = call.weight, &aux = call.aux;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "hard_quantize", [&] {
      using T = opmath_t<scalar_t>;
      using weight_t = scalar_t;
      const T* aux_ptr = aux.defined() ? aux.const_data_ptr<T>() : nullptr;
      // code_dtype gives int8 or uint8 only; scalar_t below is the code type.
      const auto launch = [&](auto code_tag) {
        using code_t = decltype(code_tag);
        launch_hard<weight_t, T, code_t>(w, aux_ptr, call.codes, call.dequantized, call.grid, call.mode);
      };
      AT_DISPATCH_SWITCH(call.codes.scalar_type(), "hard_quantize_codes",
                         AT_DISPATCH_CASE(at::kChar, [&] { launch(scalar_t{}); })
                         AT_DISPATCH_CASE(at::kByte, [&] { launch(scalar_t{}); }));
    });
    return {call.codes, call.dequantized};
  }

  static Tensor init_v(const Tensor& weight, const Tensor& scale, std::optional<int64_t> axis) {
    // The grid range does not matter for the fractional part; any valid range passes the checks.
    const QuantGrid grid = make_grid(weight, scale, std::nullopt, 0, 255, axis);
    [[maybe_unused]] const auto guard = on_device_of<Launch>(weight, "weight");
    const Tensor w = weight.contiguous();
    Tensor v = at::empty(w.sizes(), w.options().dtype(compute_dtype(w.scalar_type())));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "init_v", [&] {
      using T = opmath_t<scalar_t>;
      Launch::elementwise(w.numel(), InitVElement<scalar_t, T>{w.const_data_ptr<scalar_t>(), v.mutable_data_ptr<T>(),
                                                               grid.scale.const_data_ptr<T>(),
                                                               ChannelOf{grid.inner, grid.channels}});
    });
    return v;
  }

 private:
  template <typename weight_t, typename T, typename code_t>
  static void launch_hard(const Tensor& w, const T* aux, Tensor& codes, Tensor& dequantized, const QuantGrid& grid,
                          RoundingMode mode) {
    Launch::elementwise(w.numel(), HardQuantizeElement<weight_t, T, code_t>{
                                       w.const_data_ptr<weight_t>(), aux, codes.mutable_data_ptr<code_t>(),
                                       dequantized.mutable_data_ptr<weight_t>(), grid_view<T>(grid), mode});
  }
};

}  // namespace adaround::device
