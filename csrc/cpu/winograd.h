// Winograd F(2x2, 3x3) and F(4x4, 3x3) convolution for optimize_layer's CPU loop (Lavin & Gray, 2016).
//
// A 3x3 stride-1 convolution computes each m x m block of outputs from an (m+2) x (m+2) tile of its
// input with (m+2)^2 products per (input, output) channel pair instead of 9 m^2: the input tile d,
// the kernel g and the outputs are carried into and out of the transformed domain by fixed linear
// maps,
//   Y = A^T [ (G g G^T) (.) (B^T d B) ] A,
// and summed over input channels the (m+2)^2 products become that many GEMMs. The loop's input cache
// never changes, so its tiles are transformed once; each iteration transforms the soft weights (a
// few adds per kernel), runs the GEMMs for the output and for the weight gradient: 2.25x fewer
// multiply-adds than the direct convolution and its weight gradient with m = 2, 4x with m = 4. The
// weight gradient is the exact gradient of this forward pass (the transposed linear maps), which
// equals the convolution's up to float rounding (m = 4's maps have larger coefficients, so its
// float32 rounding error is the larger of the two).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace adaround::cpu {

// Output tile sides m that are implemented.
constexpr int64_t kWinogradSmallTile = 2;
constexpr int64_t kWinogradLargeTile = 4;

constexpr int64_t winograd_points(int64_t tile) { return (tile + 2) * (tile + 2); }  // products per tile
constexpr int64_t winograd_outputs(int64_t tile) { return tile * tile; }            // outputs per tile

// Whether ADAROUND_WINOGRAD=0 leaves the Winograd path off (to measure against the direct one).
bool winograd_enabled();
// The tile side ADAROUND_WINOGRAD=2 or =4 asks for; 0 when unset (the caller chooses).
int64_t winograd_forced_tile();

// The caches in the transformed domain: inputs [(m+2)^2, n, tiles, C] (B^T d B of every input tile)
// and targets [m^2, n, tiles, O] (each output tile's values). Both gather minibatch rows on dim 1.
struct WinogradCache {
  at::Tensor inputs;
  at::Tensor targets;
  int64_t tiles = 0;  // per sample
  int64_t tile = 0;   // m
};

// inputs [n, C, H, W] and targets [n, O, H + 2p - 2, W + 2p - 2] of a 3x3, stride-1 convolution with
// padding p; the output height and width must be multiples of `tile` (2 or 4).
WinogradCache winograd_cache(const at::Tensor& inputs, const at::Tensor& targets, at::IntArrayRef padding,
                             int64_t tile = kWinogradSmallTile);
// Its two halves: B^T d B of every input tile, [(m+2)^2, n, tiles, C] (any memory format in) ...
at::Tensor winograd_input_tiles(const at::Tensor& inputs, at::IntArrayRef padding, int64_t tile);
// ... and outputs [n, O, H_out, W_out] in tile layout, [m^2, n, tiles, O] (winograd_untile's inverse).
at::Tensor winograd_tile_outputs(const at::Tensor& outputs, int64_t tile);

// cache[:, rows] for a [planes, n, ...] cache: one copy per plane and row (index_select on dim 1 is
// several times slower).
at::Tensor gather_samples(const at::Tensor& cache, const at::Tensor& rows);

// G g G^T of every kernel: [O, C, 3, 3] -> [(m+2)^2, C, O].
at::Tensor winograd_weights(const at::Tensor& weight, int64_t tile = kWinogradSmallTile);
// The transposed map: dL/dU [(m+2)^2, C, O] -> dL/dg [O, C, 3, 3] (m from the size).
at::Tensor winograd_weights_grad(const at::Tensor& grad_u);

// One minibatch: tiles [(m+2)^2, rows, C] (rows = samples x tiles) and the transformed weights
// [(m+2)^2, C, O] give the pre-activation [m^2, rows, O] (bias added) ...
at::Tensor winograd_forward(const at::Tensor& tiles, const at::Tensor& weights_u, const std::optional<at::Tensor>& bias);
// ... and dL/d(pre) [m^2, rows, O] gives dL/dW [O, C, 3, 3].
at::Tensor winograd_weight_grad(const at::Tensor& grad_pre, const at::Tensor& tiles);

// [m^2, n, tiles, O] in tile layout -> [n, O, H_out, W_out], NHWC in memory (for tests and checks).
at::Tensor winograd_untile(const at::Tensor& tiled, int64_t out_height, int64_t out_width);

}  // namespace adaround::cpu
