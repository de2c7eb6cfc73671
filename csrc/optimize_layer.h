// optimize_layer: learns the rounding of one Linear, Conv1d/2d or ConvTranspose1d/2d layer
// (docs/algorithm.md; the loop and its execution paths: docs/design.md#per-layer-loop).
//
//   adaround::LayerGrid grid{scale, zero_point, -8, 7, /*axis=*/0};
//   adaround::LayerGeometry conv{{2, 2}, {1, 1}, {1, 1}, /*groups=*/1};
//   adaround::OptimizeOptions options;  // the paper's defaults
//   options.activation = "relu";
//   auto result = adaround::optimize_layer(weight, bias, grid, inputs, targets, conv, options);
//
// `inputs` are the cached layer inputs x^ from the partly quantized model, `targets` the cached
// f_a(W x + b) of the float model. The loop runs on the device of the tensors. On the CPU a 3x3
// stride-1 convolution runs as Winograd F(2x2, 3x3) or F(4x4, 3x3) where that pays
// (csrc/cpu/winograd.h); the environment variable ADAROUND_WINOGRAD=0 turns that off, =2 or =4
// asks for one tile side where the outputs allow it.
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace adaround {

struct LayerGrid {
  at::Tensor scale;                       // one element (per tensor) or [weight.size(axis)]
  std::optional<at::Tensor> zero_point;   // same shape as scale; absent = 0
  int64_t quant_min = -8;
  int64_t quant_max = 7;
  std::optional<int64_t> axis;            // nullopt: per tensor
};

// Convolution arguments; a Linear layer (2-D weight) takes the defaults. A transposed convolution
// (ConvTranspose1d/2d) has its weight as [in, out / groups, kernel...] and its channel axis at 1.
struct LayerGeometry {
  std::vector<int64_t> stride{1};
  std::vector<int64_t> padding{0};
  std::vector<int64_t> dilation{1};
  int64_t groups = 1;
  bool transposed = false;
  std::vector<int64_t> output_padding{0};  // transposed only
};

// The defaults below are the op schema's and QuantConfig's too (optimize_options.h lists the options).
struct OptimizeOptions {
  int64_t iterations = 10000;
  int64_t batch_size = 32;
  double lr = 1e-3;
  double reg_lambda = 0.01;
  double beta_start = 20.0;
  double beta_end = 2.0;
  double warm_start = 0.2;          // fraction of iterations without the regulariser
  std::string schedule = "cosine";  // beta decay: cosine or linear
  std::string activation = "none";  // f_a in the loss: none, relu, relu6
  std::string mode = "auto";        // minibatch, exact (full-data Gram; activation none), auto
  int64_t seed = 0;
  int64_t log_every = 0;            // loss-curve sampling period; 0 = iterations / 100
  bool allow_tf32 = false;
  // CUDA, caches on the GPU: record one iteration in a CUDA graph and replay it (falls back to eager
  // launches, with a warning, where capture fails). The same result as without.
  bool cuda_graph = false;
  // Packs weights whose rounding can no longer change out of the step (CPU): the same h(V), W~ and
  // result, with their V frozen where the full loop would let momentum drift them further out.
  bool pack_frozen = true;
  // Called with (iterations done, total) before the first and after every iteration; on CUDA "done"
  // counts iterations enqueued, not finished. Must be cheap: it runs inside the loop.
  std::function<void(int64_t, int64_t)> on_progress;
};

struct OptimizeResult {
  at::Tensor quantized_weight;  // s * (code - z), weight's dtype
  at::Tensor codes;             // integer codes (int8 or uint8), zero point included
  // Learned rounding variables. On the CPU a V packed out as frozen keeps the value it had then
  // (saturated), and dead columns of an unfolded layer come back saturated on the nearest side.
  at::Tensor v;
  at::Tensor loss_curve;        // sampled total loss, float32 [ceil(iterations / log_every)]
  double nearest_error = 0;     // reconstruction error on the whole cache, round-to-nearest
  double adaround_error = 0;    // the same for the learned rounding
  double undecided_fraction = 0;  // share of h(V) strictly between 0 and 1
  bool exact_mode = false;        // whether the full-data (Gram) mode ran
};

OptimizeResult optimize_layer(const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const LayerGrid& grid, const at::Tensor& inputs, const at::Tensor& targets,
                              const LayerGeometry& geometry, const OptimizeOptions& options);

// beta of the regulariser at iteration t (0-based); meaningful after the warm start.
double beta_at(const OptimizeOptions& options, int64_t t);

}  // namespace adaround
