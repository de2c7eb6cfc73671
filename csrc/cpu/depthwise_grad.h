// The weight gradient of a depthwise 2-D convolution (groups == input channels) computed directly on
// the CPU. On small maps the convolution library's depthwise weight gradient pays a per-call setup
// that a few positions per sample never amortise, and it dominates a step of every optimisation loop
// that learns such a layer (MobileNetV2's blocks past the first few downsamplings); the direct sum
// is one pass over the gradient and the input.
#pragma once

#include <ATen/ATen.h>

namespace adaround::cpu {

// Output positions per sample up to which the direct sum beats the library's weight gradient; on
// larger maps the library's blocked kernels win.
constexpr int64_t kDirectDepthwiseMaxPositions = 16;

// Whether depthwise_weight_grad is the faster way to the weight gradient of a (non-transposed) 2-D
// convolution with `groups` groups of x [n, C, H, W] (CPU, float or double, groups == C) giving
// grad_out, outside CUDA emulation. The caller excludes transposed convolutions.
bool direct_depthwise_grad_applies(const at::Tensor& grad_out, const at::Tensor& x, int64_t groups);

// dL/dW [O, 1, kh, kw] of the convolution of x [n, C, H, W] with a weight of O = C * multiplier
// output channels (output channel o reads input channel o / multiplier), given dL/d(output)
// [n, O, H_out, W_out]. Any memory format; float or double; the sums are over samples and output
// positions in the inputs' dtype.
at::Tensor depthwise_weight_grad(const at::Tensor& grad_out, const at::Tensor& x, at::IntArrayRef kernel_size,
                                 at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation);

}  // namespace adaround::cpu
