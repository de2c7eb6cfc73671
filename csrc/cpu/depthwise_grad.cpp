#include "depthwise_grad.h"

#include "device/emulation.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <vector>

namespace adaround::cpu {
namespace {

using at::Tensor;

// [n, H, W, C] with C contiguous: the channels a thread owns are one contiguous run of each row.
Tensor channels_innermost(const Tensor& t) { return t.permute({0, 2, 3, 1}).contiguous(); }

template <typename scalar_t>
void accumulate(const scalar_t* grad, const scalar_t* x, scalar_t* out, int64_t n, int64_t in_height,
                int64_t in_width, int64_t channels, int64_t out_height, int64_t out_width, int64_t out_channels,
                const int64_t kernel[2], const int64_t stride[2], const int64_t padding[2], const int64_t dilation[2]) {
  const int64_t multiplier = out_channels / channels, taps = kernel[0] * kernel[1];
  // Each thread owns a run of output channels and sums over every sample and position for them, so
  // no two threads write the same element and the sums' order does not depend on the thread count.
  const int64_t grain = std::max<int64_t>(16, out_channels / (4 * at::get_num_threads()));
  at::parallel_for(0, out_channels, grain, [&](int64_t begin, int64_t end) {
    const int64_t width = end - begin;
    std::vector<scalar_t> sums(taps * width, scalar_t(0));  // [tap, channel]
    std::vector<scalar_t> inputs(width);
    for (int64_t s = 0; s < n; ++s) {
      for (int64_t oh = 0; oh < out_height; ++oh) {
        for (int64_t ow = 0; ow < out_width; ++ow) {
          const scalar_t* g = grad + ((s * out_height + oh) * out_width + ow) * out_channels + begin;
          for (int64_t kh = 0; kh < kernel[0]; ++kh) {
            const int64_t ih = oh * stride[0] - padding[0] + kh * dilation[0];
            if (ih < 0 || ih >= in_height) continue;  // a padded zero
            for (int64_t kw = 0; kw < kernel[1]; ++kw) {
              const int64_t iw = ow * stride[1] - padding[1] + kw * dilation[1];
              if (iw < 0 || iw >= in_width) continue;
              const scalar_t* row = x + ((s * in_height + ih) * in_width + iw) * channels;
              scalar_t* sum = sums.data() + (kh * kernel[1] + kw) * width;
              if (multiplier == 1) {
                const scalar_t* in = row + begin;
                for (int64_t c = 0; c < width; ++c) sum[c] += g[c] * in[c];
              } else {
                for (int64_t c = 0; c < width; ++c) sum[c] += g[c] * row[(begin + c) / multiplier];
              }
            }
          }
        }
      }
    }
    for (int64_t c = 0; c < width; ++c) {
      for (int64_t t = 0; t < taps; ++t) out[(begin + c) * taps + t] = sums[t * width + c];
    }
  });
}

}  // namespace

bool direct_depthwise_grad_applies(const Tensor& grad_out, const Tensor& x, int64_t groups) {
  // A CPU-only path: off while the CUDA kernels are emulated, where the loops run as on a GPU.
  return !emulation::enabled() && x.dim() == 4 && grad_out.dim() == 4 && x.is_cpu() && grad_out.is_cpu() && groups > 1 &&
         x.size(1) == groups && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble) &&
         grad_out.scalar_type() == x.scalar_type() && grad_out.size(2) * grad_out.size(3) <= kDirectDepthwiseMaxPositions;
}

Tensor depthwise_weight_grad(const Tensor& grad_out, const Tensor& x, at::IntArrayRef kernel_size,
                             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(x.dim() == 4 && grad_out.dim() == 4, "depthwise_weight_grad: x and grad_out must be 4-D, got ",
              x.sizes(), " and ", grad_out.sizes());
  TORCH_CHECK(x.is_cpu() && grad_out.is_cpu(), "depthwise_weight_grad: x and grad_out must be CPU tensors");
  TORCH_CHECK(x.scalar_type() == grad_out.scalar_type(), "depthwise_weight_grad: x is ", x.scalar_type(),
              " but grad_out is ", grad_out.scalar_type());
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "depthwise_weight_grad: kernel_size, stride, padding and dilation must have two entries each");
  const int64_t channels = x.size(1), out_channels = grad_out.size(1);
  TORCH_CHECK(grad_out.size(0) == x.size(0), "depthwise_weight_grad: grad_out has ", grad_out.size(0),
              " samples but x has ", x.size(0));
  TORCH_CHECK(channels > 0 && out_channels % channels == 0, "depthwise_weight_grad: grad_out's ", out_channels,
              " channels are not a multiple of x's ", channels);
  for (int64_t d = 0; d < 2; ++d) {
    TORCH_CHECK(kernel_size[d] >= 1 && stride[d] >= 1 && dilation[d] >= 1 && padding[d] >= 0,
                "depthwise_weight_grad: kernel_size, stride and dilation must be positive and padding non-negative, "
                "got kernel_size ", kernel_size, ", stride ", stride, ", padding ", padding, ", dilation ", dilation);
    const int64_t extent = x.size(2 + d) + 2 * padding[d] - dilation[d] * (kernel_size[d] - 1) - 1;
    TORCH_CHECK(extent >= 0 && grad_out.size(2 + d) == extent / stride[d] + 1, "depthwise_weight_grad: grad_out ",
                grad_out.sizes(), " does not match the output of x ", x.sizes(), " under this geometry");
  }
  Tensor out = at::empty({out_channels, 1, kernel_size[0], kernel_size[1]}, x.options());
  const Tensor g = channels_innermost(grad_out), xi = channels_innermost(x);
  const int64_t kernel[2] = {kernel_size[0], kernel_size[1]}, strides[2] = {stride[0], stride[1]},
                pads[2] = {padding[0], padding[1]}, dilations[2] = {dilation[0], dilation[1]};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "depthwise_weight_grad", [&] {
    accumulate<scalar_t>(g.data_ptr<scalar_t>(), xi.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), x.size(0),
                         x.size(2), x.size(3), channels, g.size(1), g.size(2), out_channels, kernel, strides, pads,
                         dilations);
  });
  return out;
}

}  // namespace adaround::cpu
