// Winograd F(2x2, 3x3) convolution for optimize_layer's CPU loop (Lavin & Gray, 2016).
//
// A 3x3 stride-1 convolution computes each 2x2 block of outputs from a 4x4 tile of its input with
// 16 products per (input, output) channel pair instead of 36: the input tile d, the kernel g and
// the outputs are carried into and out of the transformed domain by fixed linear maps,
//   Y = A^T [ (G g G^T) (.) (B^T d B) ] A,
// and summed over input channels the 16 products become 16 GEMMs. The loop's input cache never
// changes, so its tiles are transformed once; each iteration transforms the soft weights (a few
// adds per kernel), runs the 16 GEMMs for the output and 16 for the weight gradient, 2.25x fewer
// multiply-adds than the direct convolution and its weight gradient. The weight gradient is the
// exact gradient of this forward pass (the transposed linear maps), which equals the convolution's
// up to float rounding.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace adaround::cpu {

constexpr int64_t kWinogradOutputTile = 2;                                       // outputs per tile side
constexpr int64_t kWinogradInputTile = kWinogradOutputTile + 3 - 1;              // 4x4 input tiles
constexpr int64_t kWinogradPoints = kWinogradInputTile * kWinogradInputTile;     // 16 products per tile
constexpr int64_t kWinogradOutputs = kWinogradOutputTile * kWinogradOutputTile;  // 4 outputs per tile

// Whether ADAROUND_WINOGRAD=0 leaves the Winograd path off (to measure against the direct one).
bool winograd_enabled();

// The caches in the transformed domain: inputs [16, n, tiles, C] (B^T d B of every input tile) and
// targets [4, n, tiles, O] (each output tile's 2x2 values). Both gather minibatch rows on dim 1.
struct WinogradCache {
  at::Tensor inputs;
  at::Tensor targets;
  int64_t tiles = 0;  // per sample
};

// inputs [n, C, H, W] and targets [n, O, H + 2p - 2, W + 2p - 2] of a 3x3, stride-1 convolution with
// padding p; the output height and width must be even.
WinogradCache winograd_cache(const at::Tensor& inputs, const at::Tensor& targets, at::IntArrayRef padding);

// cache[:, rows] for a [planes, n, ...] cache: one copy per plane and row (index_select on dim 1 is
// several times slower).
at::Tensor gather_samples(const at::Tensor& cache, const at::Tensor& rows);

// G g G^T of every kernel: [O, C, 3, 3] -> [16, C, O].
at::Tensor winograd_weights(const at::Tensor& weight);
// The transposed map: dL/dU [16, C, O] -> dL/dg [O, C, 3, 3].
at::Tensor winograd_weights_grad(const at::Tensor& grad_u);

// One minibatch: tiles [16, rows, C] (rows = samples x tiles) and the transformed weights [16, C, O]
// give the pre-activation [4, rows, O] (bias added) ...
at::Tensor winograd_forward(const at::Tensor& tiles, const at::Tensor& weights_u, const std::optional<at::Tensor>& bias);
// ... and dL/d(pre) [4, rows, O] gives dL/dW [O, C, 3, 3].
at::Tensor winograd_weight_grad(const at::Tensor& grad_pre, const at::Tensor& tiles);

// [4, n, tiles, O] in tile layout -> [n, O, H_out, W_out] (for tests and checks).
at::Tensor winograd_untile(const at::Tensor& tiled, int64_t out_height, int64_t out_width);

}  // namespace adaround::cpu
