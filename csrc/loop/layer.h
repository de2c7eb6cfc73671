// One layer inside optimize_layer: its checked arguments, and the computations every execution path
// shares (forward, loss, im2col of its rows, weight gradient, error on the whole cache).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <utility>
#include <vector>

#include "grid.h"
#include "optimize_layer.h"

namespace adaround::loop {

// Elements of unfolded input per chunk when accumulating over the whole cache.
constexpr int64_t kChunkElements = int64_t(1) << 24;

// A layer whose arguments passed every check, with geometry expanded to the spatial rank.
struct Layer {
  int64_t spatial = 0;  // 0 for Linear
  std::vector<int64_t> stride, padding, dilation, output_padding;
  int64_t groups = 1;
  bool transposed = false;  // ConvTranspose: weight [in, out / groups, kernel...]
  int64_t out_channels = 1;
  int64_t positions = 1;  // output positions per sample (1 for Linear)
};

// Checks the weight, bias and caches against each other and the geometry; every message names the
// argument.
Layer check_layer(const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& inputs,
                  const at::Tensor& targets, const LayerGeometry& geometry);

at::Tensor forward(const Layer& layer, const at::Tensor& x, const at::Tensor& w,
                   const std::optional<at::Tensor>& bias);
at::Tensor activate(Activation act, const at::Tensor& x);
// The minibatch loss: norm * sum (f_a(pre) - y)^2, a 0-dim tensor on pre's device.
at::Tensor minibatch_loss(Activation act, const at::Tensor& pre, const at::Tensor& y, double norm);

// [groups, rows, K] unfolded inputs (im2col) of a chunk and [groups, rows, out / groups] matching
// targets; a Linear's rows are its samples.
std::pair<at::Tensor, at::Tensor> unfold_chunk(const Layer& layer, const at::Tensor& w, const at::Tensor& x,
                                               const at::Tensor& target);

// dL/dW from dL/d(output) without the input gradient: directly for a depthwise convolution on a small
// CPU map (cpu/depthwise_grad.h); else with `im2col` as one GEMM over unfolded rows (a plain
// convolution only), or the library's.
at::Tensor weight_grad(const Layer& layer, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w,
                       bool im2col);

// Mean over samples and positions of the squared error summed over channels, on the whole cache.
double reconstruction_error(const Layer& layer, Activation act, const at::Tensor& w,
                            const std::optional<at::Tensor>& bias, const at::Tensor& inputs,
                            const at::Tensor& targets);

}  // namespace adaround::loop
