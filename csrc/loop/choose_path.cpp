// choose_path(): every device and shape condition that picks a layer's execution path. The CPU
// thresholds are where one path measured faster than the next on ResNet layers (the figures are in
// benchmarks/README.md); they change speed only, never the result beyond float rounding.
#include "cpu/winograd.h"
#include "device/emulation.h"
#include "loop/execution_path.h"

namespace adaround::loop {
namespace {

// 3x3 stride-1 convolutions with at least this many input channels and output positions per sample
// run as Winograd: below, transforming the weights each iteration outweighs the saved products.
constexpr int64_t kWinogradMinChannels = 16;
constexpr int64_t kWinogradMinPositions = 16;
// Output positions per sample from which outputs in multiples of 4 take F(4x4, 3x3): fewer
// multiply-adds than F(2x2, 3x3), larger transforms per weight.
constexpr int64_t kLargeTileMinPositions = 64;
// Up to this many output positions the weight gradient alone is one im2col GEMM per iteration
// (the library's weight gradient is slow on tiny maps).
constexpr int64_t kIm2colGradMaxPositions = 8;
// Conv2d layers with at least this many input channels and at most this many output positions run
// on channels-last copies of the caches; few channels (a first layer) or large maps gain nothing.
constexpr int64_t kChannelsLastMinChannels = 16;
constexpr int64_t kChannelsLastMaxPositions = 256;

bool choose_exact(const PathInputs& in, const OptimizeOptions& opt) {
  const Layer& layer = in.layer;
  if (opt.mode == "minibatch") return false;
  if (opt.mode == "exact") {
    TORCH_CHECK(in.activation == Activation::kNone,
                "mode='exact' needs activation='none' (the loss must be quadratic)");
    TORCH_CHECK(!layer.transposed, "mode='exact' is not available for transposed convolutions; use minibatch");
    return true;
  }
  if (in.activation != Activation::kNone || layer.transposed) return false;
  // Auto: exact where one [out, K] x [K, K] product per iteration plus building the Gram matrices
  // once costs fewer multiply-adds than forward + weight gradient of every minibatch.
  const at::Tensor& w = in.weight;
  const double k = double(w.numel() / w.size(0)), out = double(w.size(0)), pos = double(layer.positions);
  const double minibatch = 2.0 * double(opt.batch_size) * pos * out * k * double(opt.iterations);
  const double exact =
      out * k * k * double(opt.iterations) + double(in.inputs.size(0)) * pos * k * k * double(layer.groups);
  return exact < minibatch;
}

bool plain_conv2d(const Layer& layer) { return layer.spatial == 2 && !layer.transposed && layer.groups == 1; }

bool winograd_shape(const PathInputs& in) {
  const Layer& layer = in.layer;
  if (!plain_conv2d(layer) || in.weight.size(2) != 3 || in.weight.size(3) != 3) return false;
  for (int64_t d = 0; d < 2; ++d) {
    if (layer.stride[d] != 1 || layer.dilation[d] != 1) return false;
  }
  return true;
}

bool unfolded_gemm_shape(const PathInputs& in) {
  const Layer& layer = in.layer;
  const int64_t k = in.weight.numel() / in.weight.size(0);
  return layer.spatial > 0 && layer.groups == 1 && !layer.transposed && layer.positions <= kGemmMaxPositions &&
         in.inputs.size(0) * layer.positions * k <= kMaxRelaidElements;
}

bool channels_last_shape(const PathInputs& in) {
  return plain_conv2d(in.layer) && in.weight.scalar_type() == at::kFloat &&
         in.inputs.size(1) >= kChannelsLastMinChannels && in.layer.positions <= kChannelsLastMaxPositions &&
         in.inputs.numel() + in.targets.numel() <= kMaxRelaidElements;
}

}  // namespace

int64_t winograd_tile(int64_t in_channels, int64_t out_height, int64_t out_width) {
  if (!cpu::winograd_enabled()) return 0;  // ADAROUND_WINOGRAD=0: measure the path it replaces
  const int64_t positions = out_height * out_width;
  if (in_channels < kWinogradMinChannels || positions < kWinogradMinPositions) return 0;
  const auto fits = [&](int64_t tile) { return out_height % tile == 0 && out_width % tile == 0; };
  const int64_t forced = cpu::winograd_forced_tile();
  if (forced != 0 && fits(forced)) return forced;
  if (fits(cpu::kWinogradLargeTile) && positions >= kLargeTileMinPositions) return cpu::kWinogradLargeTile;
  return fits(cpu::kWinogradSmallTile) ? cpu::kWinogradSmallTile : 0;
}

bool cpu_paths_allowed(const at::Tensor& weight) { return weight.is_cpu() && !emulation::enabled(); }

std::unique_ptr<ExecutionPath> choose_path(const PathInputs& in, const OptimizeOptions& opt, bool cpu_paths) {
  if (choose_exact(in, opt)) return make_exact_gram_path(in);
  TORCH_CHECK(opt.batch_size <= in.inputs.size(0), "batch_size (", opt.batch_size, ") is larger than the cache (",
              in.inputs.size(0), " samples)");
  const bool im2col_weight_grad =
      cpu_paths && in.layer.spatial > 0 && !in.layer.transposed && in.layer.positions <= kIm2colGradMaxPositions;
  if (cpu_paths) {
    const int64_t tile = winograd_shape(in) ? winograd_tile(in.inputs.size(1), in.targets.size(2), in.targets.size(3)) : 0;
    if (tile != 0) {
      if (auto path = make_winograd_path(in, tile)) return path;
    }
    if (unfolded_gemm_shape(in)) return make_unfolded_gemm_path(in);
    if (channels_last_shape(in)) return make_channels_last_path(in, im2col_weight_grad);
  }
  return make_eager_path(in, im2col_weight_grad);
}

}  // namespace adaround::loop
