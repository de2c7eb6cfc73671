// Where the loop meets the back ends beyond dispatcher ops. How one iteration of optimize_layer
// computes dL/dW~: the execution paths, and choose_path(), the one place that decides which runs for
// a layer (device, shapes, sizes); and the CPU's packed rounding step (ActiveWeights). Every path computes the
// gradient of the same loss on the same rows; they differ in how the caches are laid out and which
// kernels do the work (docs/design.md#execution-paths).
//
// Adding a path: one file that implements ExecutionPath and its make_* function (declared below),
// plus its condition in choose_path(). CPU-only paths live in csrc/cpu/, the others here.
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <optional>
#include <string>

#include "loop/layer.h"
#include "optimize_layer.h"

namespace adaround::loop {

// Largest cache, in elements, that a path copies into another layout (unfolded, channels-last,
// Winograd-transformed); larger layers take the eager path, which reads the caches as they are.
constexpr int64_t kMaxRelaidElements = int64_t(1) << 28;
// Up to this many output positions per sample the unfolded cache's two GEMMs beat the convolution
// library, whose setup dominates on tiny maps (block reconstruction's 1x1 convolutions follow it).
constexpr int64_t kGemmMaxPositions = 16;

// What every path is built from, filled once by the loop. References live as long as the loop.
struct PathInputs {
  const Layer& layer;
  const at::Tensor& weight;  // working dtype, contiguous, on the loop's device
  const std::optional<at::Tensor>& bias;
  const at::Tensor& inputs;   // x^, on the weight's device or (streamed) in host memory
  const at::Tensor& targets;  // f_a(W x + b) of the float layer
  std::optional<int64_t> axis;
  Activation activation;
  const std::string& activation_name;
  int64_t batch_size;
  double norm;  // 1 / (rows per minibatch x output positions): the loss is a mean
};

class ExecutionPath {
 public:
  virtual ~ExecutionPath() = default;
  // Whether the path works on the whole cache (then it reads no minibatch rows).
  virtual bool full_data() const { return false; }
  // The columns of the [out, K] weight matrix the path learns; undefined: all of them. The loop
  // learns only these, and rounds the others (which never see data) to nearest.
  virtual at::Tensor live_columns() const { return {}; }
  // dL/dW~ at w_soft (shaped like the learned weight) over the minibatch `rows` (int64 [batch],
  // unused for full data). With `loss`, also the sampled loss: a 0-dim tensor, read by no one here.
  virtual at::Tensor gradient(const at::Tensor& w_soft, const at::Tensor& rows, at::Tensor* loss) = 0;
};

// Whether the CPU's own paths and weight packing may run for this weight: on a CPU that does not
// emulate a GPU (device/emulation.h); otherwise the loop takes the form it has on the GPU.
bool cpu_paths_allowed(const at::Tensor& weight);

// The path for this layer. `cpu_paths`: cpu_paths_allowed(weight). Also checks that a minibatch fits
// in the cache.
std::unique_ptr<ExecutionPath> choose_path(const PathInputs& in, const OptimizeOptions& options, bool cpu_paths);

// The Winograd tile side m (cpu/winograd.h) a CPU 3x3, stride-1, undilated, ungrouped convolution
// with these input channels and outputs runs with; 0: none (the direct computation). The rule of
// choose_path, which block reconstruction's convolutions follow too.
int64_t winograd_tile(int64_t in_channels, int64_t out_height, int64_t out_width);

// ---- the paths (each make_* in its own file) --------------------------------------------------
// Full-data Gram form of the identity-activation loss (exact_gram_path.cpp).
std::unique_ptr<ExecutionPath> make_exact_gram_path(const PathInputs& in);
// at::linear / at::convolution on the gathered rows, any device, caches also streamed from host
// memory; `im2col_weight_grad`: the weight gradient as one GEMM (eager_path.cpp).
std::unique_ptr<ExecutionPath> make_eager_path(const PathInputs& in, bool im2col_weight_grad);
// CPU: the cache unfolded once, two GEMMs per iteration over the live columns
// (cpu/unfolded_gemm_path.cpp).
std::unique_ptr<ExecutionPath> make_unfolded_gemm_path(const PathInputs& in);
// CPU: the eager computation on channels-last copies of the caches (cpu/channels_last_path.cpp).
std::unique_ptr<ExecutionPath> make_channels_last_path(const PathInputs& in, bool im2col_weight_grad);
// CPU: Winograd F(tile x tile, 3x3) over caches transformed once; nullptr where the transformed
// caches would not fit (cpu/winograd_path.cpp).
std::unique_ptr<ExecutionPath> make_winograd_path(const PathInputs& in, int64_t tile);

}  // namespace adaround::loop

namespace adaround::cpu {

// ---- the CPU's packed rounding step (cpu/step_kernels.cpp), for ActiveWeights ------------------
// Packed element i is element index[i] of the full (contiguous) weight-shaped tensors; channel c of
// the grid owns packed elements [offsets[c], offsets[c + 1]). Both int64, index ascending.
struct PackedLayout {
  at::Tensor index;    // [active]
  at::Tensor offsets;  // [channels + 1]
};

// adam_rounding_step_ on packed V, Adam moments and grid base (1-D, contiguous), reading dL/dW~
// from and writing W~ into the full tensors through layout.index. Per element the arithmetic is
// exactly that of adam_rounding_step_, wherever the element sits in its SIMD vector.
void adam_rounding_step_packed_(at::Tensor& v, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                                const at::Tensor& grid_base, at::Tensor& soft_weight,
                                const at::Tensor& grad_soft_weight, const PackedLayout& layout,
                                const QuantGrid& grid, double reg_lambda, double beta, const AdamStep& adam);

}  // namespace adaround::cpu
