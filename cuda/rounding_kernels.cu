// CUDA kernels of the rounding ops (schemas in csrc/rounding_ops.cpp).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <cub/block/block_reduce.cuh>
#include <torch/library.h>

#include "../csrc/grid.h"
#include "../csrc/rounding_math.h"
#include "cuda_loops.cuh"

namespace adaround::cuda {
namespace {

using at::Tensor;

template <typename scalar_t>
using opmath_t = at::opmath_type<scalar_t>;

Tensor soft_quantize_cuda(const Tensor& weight, const Tensor& v, const Tensor& scale,
                          const std::optional<Tensor>& zero_point, int64_t quant_min,
                          int64_t quant_max, std::optional<int64_t> axis) {
  c10::cuda::CUDAGuard guard(weight.device());
  const QuantGrid grid = make_grid(weight, scale, zero_point, quant_min, quant_max, axis);
  check_rounding_variable(weight, v, "v");
  const Tensor w = weight.contiguous();
  const Tensor vc = v.contiguous();
  Tensor out = at::empty_like(w);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "soft_quantize_cuda", [&] {
    using T = opmath_t<scalar_t>;
    const scalar_t* w_ptr = w.const_data_ptr<scalar_t>();
    const T* v_ptr = vc.const_data_ptr<T>();
    scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
    const T* s_ptr = grid.scale.const_data_ptr<T>();
    const T* z_ptr = grid.zero_point.const_data_ptr<T>();
    const T qmin = T(grid.qmin), qmax = T(grid.qmax);
    const int64_t inner = grid.inner, channels = grid.channels;
    launch_elementwise(w.numel(), [=] __device__(int64_t i) {
      const int64_t c = (i / inner) % channels;
      const T s = s_ptr[c], z = z_ptr[c];
      const T base = std::floor(T(w_ptr[i]) / s) + z;
      out_ptr[i] = scalar_t(soft_quantize<T>(base, rectified_sigmoid<T>(v_ptr[i]), s, z, qmin, qmax));
    });
  });
  return out;
}

Tensor soft_quantize_backward_cuda(const Tensor& grad_output, const Tensor& weight, const Tensor& v,
                                   const Tensor& scale, const std::optional<Tensor>& zero_point,
                                   int64_t quant_min, int64_t quant_max, std::optional<int64_t> axis) {
  c10::cuda::CUDAGuard guard(weight.device());
  const QuantGrid grid = make_grid(weight, scale, zero_point, quant_min, quant_max, axis);
  check_rounding_variable(weight, v, "v");
  TORCH_CHECK(grad_output.sizes() == weight.sizes(), "grad_output must have the shape of weight ",
              weight.sizes(), ", got ", grad_output.sizes());
  TORCH_CHECK(grad_output.device() == weight.device(), "grad_output is on ", grad_output.device(),
              " but weight is on ", weight.device());
  const Tensor w = weight.contiguous();
  const Tensor vc = v.contiguous();
  const Tensor g = grad_output.to(w.scalar_type()).contiguous();
  Tensor grad_v = at::empty_like(vc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "soft_quantize_backward_cuda", [&] {
    using T = opmath_t<scalar_t>;
    const scalar_t* w_ptr = w.const_data_ptr<scalar_t>();
    const scalar_t* g_ptr = g.const_data_ptr<scalar_t>();
    const T* v_ptr = vc.const_data_ptr<T>();
    T* out_ptr = grad_v.mutable_data_ptr<T>();
    const T* s_ptr = grid.scale.const_data_ptr<T>();
    const T* z_ptr = grid.zero_point.const_data_ptr<T>();
    const T qmin = T(grid.qmin), qmax = T(grid.qmax);
    const int64_t inner = grid.inner, channels = grid.channels;
    launch_elementwise(w.numel(), [=] __device__(int64_t i) {
      const int64_t c = (i / inner) % channels;
      const T s = s_ptr[c], z = z_ptr[c];
      const T base = std::floor(T(w_ptr[i]) / s) + z;
      const T vi = v_ptr[i];
      out_ptr[i] = T(g_ptr[i]) * soft_quantize_grad<T>(base, rectified_sigmoid<T>(vi),
                                                       rectified_sigmoid_grad<T>(vi), s, qmin, qmax);
    });
  });
  return grad_v;
}

// Each block writes one partial sum; the partials are added by at::sum (deterministic).
template <typename T>
__global__ void regularizer_partials_kernel(const T* v, int64_t numel, T beta, double* partials) {
  using BlockReduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename BlockReduce::TempStorage temp;
  double local = 0.0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < numel;
       i += int64_t(blockDim.x) * gridDim.x) {
    local += regularizer_term<T>(rectified_sigmoid<T>(v[i]), beta);
  }
  const double block_sum = BlockReduce(temp).Sum(local);
  if (threadIdx.x == 0) partials[blockIdx.x] = block_sum;
}

Tensor round_regularizer_cuda(const Tensor& v, double beta) {
  c10::cuda::CUDAGuard guard(v.device());
  check_regularizer_args(v, beta);
  const Tensor vc = v.contiguous();
  const int blocks = blocks_for(std::max<int64_t>(vc.numel(), 1));
  Tensor partials = at::zeros({blocks}, vc.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(vc.scalar_type(), "round_regularizer_cuda", [&] {
    regularizer_partials_kernel<scalar_t><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        vc.const_data_ptr<scalar_t>(), vc.numel(), scalar_t(beta), partials.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return partials.sum().to(vc.scalar_type());
}

Tensor round_regularizer_backward_cuda(const Tensor& grad_output, const Tensor& v, double beta) {
  c10::cuda::CUDAGuard guard(v.device());
  check_regularizer_args(v, beta);
  TORCH_CHECK(grad_output.numel() == 1, "grad_output must be a scalar, got shape ", grad_output.sizes());
  const Tensor vc = v.contiguous();
  const Tensor g = grad_output.to(vc.scalar_type()).reshape({1}).contiguous();
  Tensor grad_v = at::empty_like(vc);
  AT_DISPATCH_FLOATING_TYPES(vc.scalar_type(), "round_regularizer_backward_cuda", [&] {
    using T = scalar_t;
    const T* v_ptr = vc.const_data_ptr<T>();
    const T* g_ptr = g.const_data_ptr<T>();  // read on the device: no host sync
    T* out_ptr = grad_v.mutable_data_ptr<T>();
    const T b = T(beta);
    launch_elementwise(vc.numel(), [=] __device__(int64_t i) {
      const T vi = v_ptr[i];
      out_ptr[i] = g_ptr[0] * regularizer_grad<T>(rectified_sigmoid<T>(vi), rectified_sigmoid_grad<T>(vi), b);
    });
  });
  return grad_v;
}

std::tuple<Tensor, Tensor> hard_quantize_cuda(const Tensor& weight, const Tensor& scale,
                                              const std::optional<Tensor>& zero_point, int64_t quant_min,
                                              int64_t quant_max, std::optional<int64_t> axis,
                                              c10::string_view mode_name, const std::optional<Tensor>& v,
                                              const std::optional<Tensor>& noise) {
  c10::cuda::CUDAGuard guard(weight.device());
  const QuantGrid grid = make_grid(weight, scale, zero_point, quant_min, quant_max, axis);
  const RoundingMode mode = parse_rounding_mode(std::string(mode_name));
  const Tensor w = weight.contiguous();
  const Tensor aux = rounding_aux(mode, weight, v, noise);
  Tensor codes = at::empty(w.sizes(), w.options().dtype(code_dtype(quant_min, quant_max)));
  Tensor dequant = at::empty_like(w);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "hard_quantize_cuda", [&] {
    using T = opmath_t<scalar_t>;
    using weight_t = scalar_t;
    const weight_t* w_ptr = w.const_data_ptr<weight_t>();
    const T* aux_ptr = aux.defined() ? aux.const_data_ptr<T>() : nullptr;
    weight_t* dq_ptr = dequant.mutable_data_ptr<weight_t>();
    const T* s_ptr = grid.scale.const_data_ptr<T>();
    const T* z_ptr = grid.zero_point.const_data_ptr<T>();
    const T qmin = T(grid.qmin), qmax = T(grid.qmax);
    const int64_t inner = grid.inner, channels = grid.channels;
    AT_DISPATCH_INTEGRAL_TYPES(codes.scalar_type(), "hard_quantize_cuda_codes", [&] {
      using code_t = scalar_t;
      code_t* code_ptr = codes.mutable_data_ptr<code_t>();
      launch_elementwise(w.numel(), [=] __device__(int64_t i) {
        const int64_t c = (i / inner) % channels;
        const T s = s_ptr[c], z = z_ptr[c];
        const T code = hard_code<T>(mode, T(w_ptr[i]) / s, aux_ptr ? aux_ptr[i] : T(0), z, qmin, qmax);
        code_ptr[i] = static_cast<code_t>(code);
        dq_ptr[i] = weight_t(dequantize<T>(code, s, z));
      });
    });
  });
  return {codes, dequant};
}

Tensor init_v_cuda(const Tensor& weight, const Tensor& scale, std::optional<int64_t> axis) {
  c10::cuda::CUDAGuard guard(weight.device());
  const QuantGrid grid = make_grid(weight, scale, std::nullopt, 0, 255, axis);
  const Tensor w = weight.contiguous();
  Tensor v = at::empty(w.sizes(), w.options().dtype(compute_dtype(w.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "init_v_cuda", [&] {
    using T = opmath_t<scalar_t>;
    const scalar_t* w_ptr = w.const_data_ptr<scalar_t>();
    T* v_ptr = v.mutable_data_ptr<T>();
    const T* s_ptr = grid.scale.const_data_ptr<T>();
    const int64_t inner = grid.inner, channels = grid.channels;
    launch_elementwise(w.numel(), [=] __device__(int64_t i) {
      const T x = T(w_ptr[i]) / s_ptr[(i / inner) % channels];
      v_ptr[i] = inverse_rectified_sigmoid<T>(x - std::floor(x));
    });
  });
  return v;
}

}  // namespace

TORCH_LIBRARY_IMPL(adaround, CUDA, m) {
  m.impl("soft_quantize", &soft_quantize_cuda);
  m.impl("soft_quantize_backward", &soft_quantize_backward_cuda);
  m.impl("round_regularizer", &round_regularizer_cuda);
  m.impl("round_regularizer_backward", &round_regularizer_backward_cuda);
  m.impl("hard_quantize", &hard_quantize_cuda);
  m.impl("init_v", &init_v_cuda);
}

}  // namespace adaround::cuda
