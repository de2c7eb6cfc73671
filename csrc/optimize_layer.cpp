// The AdaRound loop for one layer (SPEC section 2), without an autograd graph: forward with
// at::convolution/at::linear (on the CPU: Winograd F(2x2, 3x3) or F(4x4, 3x3) for 3x3 stride-1
// convolutions, GEMMs over the unfolded cache for small maps), the weight gradient only, and two
// fused passes per iteration (reconstruction_grad and adam_rounding_step_, CPU and CUDA kernels).
#include "optimize_layer.h"
#include "progress.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <array>
#include <cmath>

#include "active_weights.h"
#include "cpu/winograd.h"
#include "device/emulation.h"
#include "grid.h"
#include "iteration_graph.h"
#include "rounding_ops.h"
#include "schedule.h"
#include "step_checks.h"
#include "step_ops.h"

namespace adaround {
namespace {

using at::Tensor;

// Rows of unfolded input per chunk when accumulating the Gram matrices or full-cache errors.
constexpr int64_t kChunkElements = int64_t(1) << 24;
// Output positions per sample up to which a CPU layer runs as GEMMs over the unfolded cache. On the
// 2-core machine, forward + weight gradient of a batch of 32: 1.75x / 1.23x faster than oneDNN's
// convolutions on ResNet layer2's 4x4 maps (16 positions), 0.93x on layer1's 8x8 (64 positions).
constexpr int64_t kGemmMaxPositions = 16;
// Output positions up to which the weight gradient alone is an im2col GEMM per iteration (where the
// cache is not unfolded); from 4x4 outputs on oneDNN wins.
constexpr int64_t kIm2colGradMaxPositions = 8;
// Iterations between checks for weights to pack out of the step (ActiveWeights::repack).
constexpr int64_t kRepackEvery = 200;
// Largest cache, in elements, unfolded once for the GEMM path (1 GiB in float32).
constexpr int64_t kMaxUnfoldedElements = int64_t(1) << 28;
// A CPU Conv2d with at least this many input channels and at most this many output positions runs on
// channels-last (NHWC) copies of its caches. oneDNN's forward + weight gradient of a batch of 32 on the
// 2-core machine: 22 % less time on ResNet layer1's 64 channels at 8x8 (about 10 % of the whole
// iteration in optimize_layer), 40 % less on 16 channels at 16x16; no gain at 56x56, and a loss with
// conv1's 3 input channels.
constexpr int64_t kChannelsLastMinChannels = 16;
constexpr int64_t kChannelsLastMaxPositions = 256;
// A CPU 3x3 stride-1 convolution with at least this many input channels and output positions per
// sample runs as Winograd F(2x2, 3x3), or F(4x4, 3x3) (below) (see winograd_cache). Whole iterations on the 2-core
// machine, batch 32, against the path the layer had before: 1.47-1.61x on ResNet layer1's 64
// channels at 8x8 (oneDNN, channels-last), 1.35-1.38x on layer2's 128 at 4x4 (unfolded GEMMs), but
// 0.76x on layer3's 256 at 2x2, where one tile per sample leaves the transformed weights' memory
// traffic to dominate.
constexpr int64_t kWinogradMinChannels = 16;
constexpr int64_t kWinogradMinPositions = 16;
// Output positions per sample from which a layer whose outputs are multiples of 4 takes F(4x4, 3x3)
// instead (4x fewer multiply-adds than direct, against 2.25x, for larger transforms per weight).
// Whole iterations on the 2-core machine, batch 32: 1.05-1.5x faster than F(2x2, 3x3) on ResNet
// layer1's 64 channels at 8x8 (five same-process comparisons); on layer2's 4x4 maps (one tile per
// sample) 1.00x.
constexpr int64_t kWinogradLargeTileMinPositions = 64;

// A layer whose arguments passed every check, with geometry expanded to the spatial rank.
struct Layer {
  int64_t spatial = 0;  // 0 for Linear
  std::vector<int64_t> stride, padding, dilation, output_padding;
  int64_t groups = 1;
  bool transposed = false;  // ConvTranspose: weight [in, out / groups, kernel...]
  int64_t out_channels = 1;
  int64_t positions = 1;  // output positions per sample (1 for Linear)
  // Whether the CPU's own execution paths (Winograd, unfolded GEMMs, channels-last, im2col weight
  // gradients, packing) may run; off on a GPU and while the CPU emulates one (device/emulation.h),
  // where the loop takes the form it has on the GPU.
  bool cpu_paths = false;
};

std::vector<int64_t> expand_arg(const std::vector<int64_t>& values, int64_t spatial, const char* name) {
  TORCH_CHECK(values.size() == 1 || int64_t(values.size()) == spatial, name, " must have 1 or ", spatial,
              " entries for a ", spatial, "-d convolution, got ", values.size());
  return values.size() == 1 ? std::vector<int64_t>(spatial, values[0]) : values;
}

void check_finite(const Tensor& t, const char* name) {
  TORCH_CHECK(at::isfinite(t).all().item<bool>(), name, " contains NaN or Inf");
}

// A run whose loss or V turned non-finite (finite inputs that overflow the working dtype, an extreme
// reg_lambda) learned nothing: it stops with what happened instead of returning floor rounding.
void check_finite_loss(double loss, int64_t t) {
  TORCH_CHECK(std::isfinite(loss), "the loss became ", loss, " at iteration ", t, " (inputs, targets or weights "
              "that overflow the working dtype, or a reg_lambda too large for it)");
}

// The same after the loop, for a device where reading the loss each time would stall it: one read.
void check_finite_run(const Tensor& loss_curve, const Tensor& v, int64_t log_every) {
  const Tensor bad = at::logical_not(at::isfinite(loss_curve)).nonzero();
  if (bad.numel() > 0) {
    const int64_t first = bad[0][0].item<int64_t>();
    check_finite_loss(loss_curve[first].item<double>(), first * log_every);
  }
  TORCH_CHECK(at::isfinite(v).all().item<bool>(), "the rounding variables V became NaN or Inf");
}

Layer check_layer(const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& inputs,
                  const Tensor& targets, const LayerGeometry& geo) {
  TORCH_CHECK(weight.dim() >= 2 && weight.dim() <= 4,
              "weight must be 2-D (Linear), 3-D (Conv1d) or 4-D (Conv2d), got shape ", weight.sizes());
  TORCH_CHECK(weight.is_floating_point(), "weight must be floating point, got ", weight.scalar_type());
  TORCH_CHECK(weight.numel() > 0, "weight of shape ", weight.sizes(), " has no elements: there is nothing to round");
  // Caches live with the weight, or in (pinned) host memory for a CUDA weight: then they are streamed.
  TORCH_CHECK(inputs.device() == targets.device(), "inputs are on ", inputs.device(), " but targets are on ",
              targets.device(), "; both caches must be on the same device");
  const bool streamed = inputs.is_cpu() && weight.is_cuda();
  for (const auto& [t, name] : {std::pair<const Tensor*, const char*>{&inputs, "inputs"}, {&targets, "targets"}}) {
    TORCH_CHECK(t->device() == weight.device() || (streamed && t->is_cpu()), name, " is on ", t->device(),
                " but weight is on ", weight.device(), " (caches go on the weight's device, or both on the CPU "
                "for a CUDA weight)");
    TORCH_CHECK(t->is_floating_point(), name, " must be floating point, got ", t->scalar_type());
    TORCH_CHECK(t->dim() == weight.dim(), name, " must be ", weight.dim(), "-D for a weight of shape ",
                weight.sizes(), ", got shape ", t->sizes());
  }
  TORCH_CHECK(inputs.size(0) == targets.size(0), "inputs hold ", inputs.size(0), " samples but targets hold ",
              targets.size(0));
  TORCH_CHECK(inputs.size(0) > 0, "inputs hold no samples");
  Layer layer;
  layer.spatial = weight.dim() - 2;
  layer.groups = geo.groups;
  layer.transposed = geo.transposed;
  TORCH_CHECK(geo.groups >= 1, "groups must be >= 1, got ", geo.groups);
  TORCH_CHECK(!geo.transposed || layer.spatial > 0, "transposed applies to convolutions only, not to a 2-D "
                                                    "(Linear) weight");
  const bool no_output_padding =
      std::all_of(geo.output_padding.begin(), geo.output_padding.end(), [](int64_t p) { return p == 0; });
  TORCH_CHECK(geo.transposed || no_output_padding, "output_padding applies to transposed convolutions only");
  // A transposed weight is [in, out / groups, kernel...]; a plain one [out, in / groups, kernel...].
  layer.out_channels = geo.transposed ? weight.size(1) * geo.groups : weight.size(0);
  if (layer.spatial == 0) {
    const bool defaults = geo.groups == 1 &&
                          std::all_of(geo.stride.begin(), geo.stride.end(), [](int64_t s) { return s == 1; }) &&
                          std::all_of(geo.padding.begin(), geo.padding.end(), [](int64_t p) { return p == 0; }) &&
                          std::all_of(geo.dilation.begin(), geo.dilation.end(), [](int64_t d) { return d == 1; });
    TORCH_CHECK(defaults, "stride, padding, dilation and groups apply to convolutions only; a 2-D (Linear) "
                          "weight takes their defaults");
    TORCH_CHECK(inputs.size(1) == weight.size(1), "inputs have ", inputs.size(1),
                " features but weight expects ", weight.size(1));
  } else {
    layer.stride = expand_arg(geo.stride, layer.spatial, "stride");
    layer.padding = expand_arg(geo.padding, layer.spatial, "padding");
    layer.dilation = expand_arg(geo.dilation, layer.spatial, "dilation");
    layer.output_padding = expand_arg(geo.output_padding, layer.spatial, "output_padding");
    TORCH_CHECK(weight.size(0) % geo.groups == 0, "groups (", geo.groups, ") must divide the ", weight.size(0),
                geo.transposed ? " input channels" : " output channels");
    const int64_t in_channels = geo.transposed ? weight.size(0) : weight.size(1) * geo.groups;
    TORCH_CHECK(inputs.size(1) == in_channels, "inputs have ", inputs.size(1), " channels but weight of shape ",
                weight.sizes(), " with groups=", geo.groups, " expects ", in_channels);
    for (int64_t d = 0; d < layer.spatial; ++d) {
      TORCH_CHECK(layer.stride[d] >= 1, "stride must be >= 1, got ", layer.stride[d]);
      TORCH_CHECK(layer.dilation[d] >= 1, "dilation must be >= 1, got ", layer.dilation[d]);
      TORCH_CHECK(layer.padding[d] >= 0, "padding must be >= 0, got ", layer.padding[d]);
      const int64_t op = layer.output_padding[d];
      TORCH_CHECK(op >= 0 && (op < layer.stride[d] || op < layer.dilation[d]),
                  "output_padding must be >= 0 and smaller than stride or dilation, got ", op);
    }
  }
  std::vector<int64_t> expected{inputs.size(0), layer.out_channels};
  for (int64_t d = 0; d < layer.spatial; ++d) {
    const int64_t span = layer.dilation[d] * (weight.size(2 + d) - 1);
    int64_t size = 0;
    if (layer.transposed) {
      size = (inputs.size(2 + d) - 1) * layer.stride[d] - 2 * layer.padding[d] + span + layer.output_padding[d] + 1;
      TORCH_CHECK(size > 0, "padding ", layer.padding[d], " leaves no output for inputs of shape ", inputs.sizes());
    } else {
      const int64_t extent = inputs.size(2 + d) + 2 * layer.padding[d] - span - 1;
      TORCH_CHECK(extent >= 0, "inputs of shape ", inputs.sizes(), " are smaller than the kernel");
      size = extent / layer.stride[d] + 1;
    }
    expected.push_back(size);
    layer.positions *= size;
  }
  TORCH_CHECK(targets.sizes() == at::IntArrayRef(expected), "targets must have shape ", at::IntArrayRef(expected),
              " (the layer's output for these inputs), got ", targets.sizes());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == layer.out_channels, "bias must have shape [",
                layer.out_channels, "], got ", bias->sizes());
    TORCH_CHECK(bias->device() == weight.device(), "bias is on ", bias->device(), " but weight is on ",
                weight.device());
  }
  return layer;
}

Tensor forward(const Layer& layer, const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias) {
  if (layer.spatial == 0) return at::linear(x, w, bias);
  return at::convolution(x, w, bias, layer.stride, layer.padding, layer.dilation, layer.transposed,
                         layer.output_padding, layer.groups);
}

Tensor activate(Activation act, const Tensor& x) {
  if (act == Activation::kRelu) return at::relu(x);
  if (act == Activation::kRelu6) return at::clamp(x, 0, 6);
  return x;
}

int64_t chunk_samples(const Tensor& t) {
  const int64_t per_sample = std::max<int64_t>(1, t.numel() / t.size(0));
  return std::max<int64_t>(1, kChunkElements / per_sample);
}

// mean over samples and positions of the squared error summed over channels, on the whole cache.
double reconstruction_error(const Layer& layer, Activation act, const Tensor& w, const std::optional<Tensor>& bias,
                            const Tensor& inputs, const Tensor& targets) {
  const int64_t n = inputs.size(0), step = chunk_samples(inputs);
  Tensor total = at::zeros({}, w.options().dtype(at::kDouble));
  for (int64_t start = 0; start < n; start += step) {
    const int64_t len = std::min(step, n - start);
    const Tensor x = inputs.narrow(0, start, len).to(w.device(), w.scalar_type());
    const Tensor t = targets.narrow(0, start, len).to(w.device(), w.scalar_type());
    total += (activate(act, forward(layer, x, w, bias)) - t).pow(2).sum(at::kDouble);
  }
  return total.item<double>() / double(n * layer.positions);
}

// Full-data second moments for the identity-activation objective (SPEC "exact mode"):
// loss(W~) = (tr(W~ G W~^T) - 2 tr(W~ C) + rr) / M per group, with G = X^T X, C = X^T R,
// R = targets - bias, X the unfolded inputs (im2col), M the number of rows.
struct GramSystem {
  Tensor gram;          // [groups, K, K] float64
  Tensor cross_t;       // [groups, out_g, K] float64 (C transposed)
  double residual_sq = 0;
  double rows = 0;
  Tensor gram_work;     // the same in the working dtype, for the per-iteration gradient
  Tensor cross_t_work;
};

// [groups, rows, K] unfolded inputs of a chunk; [groups, rows, out_g] matching targets.
std::pair<Tensor, Tensor> unfold_chunk(const Layer& layer, const Tensor& w, const Tensor& x, const Tensor& target) {
  const int64_t g = layer.groups, out = w.size(0);
  if (layer.spatial == 0) return {x.unsqueeze(0), target.unsqueeze(0)};
  Tensor x4 = x, t4 = target;
  std::vector<int64_t> kernel(w.sizes().begin() + 2, w.sizes().end());
  std::vector<int64_t> stride = layer.stride, padding = layer.padding, dilation = layer.dilation;
  if (layer.spatial == 1) {  // a Conv1d is a Conv2d of height 1
    x4 = x.unsqueeze(2);
    t4 = target.unsqueeze(2);
    kernel.insert(kernel.begin(), 1);
    stride.insert(stride.begin(), 1);
    padding.insert(padding.begin(), 0);
    dilation.insert(dilation.begin(), 1);
  }
  const int64_t n = x.size(0);
  const Tensor cols = at::im2col(x4, kernel, dilation, padding, stride);  // [n, Cin*k, L]
  const int64_t positions = cols.size(2), k_per_group = cols.size(1) / g;
  Tensor xg = cols.view({n, g, k_per_group, positions}).permute({1, 0, 3, 2}).reshape({g, n * positions, k_per_group});
  Tensor tg = t4.reshape({n, g, out / g, positions}).permute({1, 0, 3, 2}).reshape({g, n * positions, out / g});
  return {xg, tg};
}

// The rows `idx` of a host cache, gathered into pinned memory and copied asynchronously to w's device.
// The caching host allocator keeps each staging block alive until its copy has finished.
Tensor gather_to_device(const Tensor& cache, const Tensor& idx, const Tensor& w) {
  std::vector<int64_t> shape(cache.sizes().begin(), cache.sizes().end());
  shape[0] = idx.size(0);
  Tensor staging = at::empty(shape, cache.options().pinned_memory(cache.is_pinned()));
  at::index_select_out(staging, cache, 0, idx);
  return staging.to(w.device(), w.scalar_type(), /*non_blocking=*/true);
}

// dL/dW from dL/d(output) without the input gradient.
Tensor weight_grad(const Layer& layer, const Tensor& grad_out, const Tensor& x, const Tensor& w) {
  if (layer.spatial == 0) return grad_out.t().mm(x);
  if (layer.cpu_paths && !layer.transposed && layer.positions <= kIm2colGradMaxPositions) {
    // On the CPU oneDNN's weight gradient is slow for tiny feature maps (50 ms against 2 ms for
    // 512x512x3x3 at 1x1); an im2col GEMM is not.
    auto [cols, grad_rows] = unfold_chunk(layer, w, x, grad_out);  // [g, rows, K], [g, rows, out_g]
    return at::bmm(grad_rows.transpose(1, 2), cols).view(w.sizes());
  }
  return std::get<1>(at::convolution_backward(grad_out, x, w, std::nullopt, layer.stride, layer.padding,
                                              layer.dilation, layer.transposed, layer.output_padding, layer.groups,
                                              {false, true, false}))
      .contiguous();
}

// Small feature maps on the CPU (ResNet layer2-4 at 32x32 inputs): oneDNN's convolution and
// weight gradient take milliseconds there for microseconds of arithmetic. The cache is unfolded once
// (im2col) and every iteration is two GEMMs over the weight columns that see data: a 3x3 kernel on a
// 1x1 map has 8 of 9 taps that only ever see padding. Their reconstruction gradient is exactly 0, so
// the loop learns the live columns only and rounds the dead ones to nearest.
struct UnfoldedCache {
  Tensor inputs;       // [n, positions * live columns]
  Tensor targets;      // [n, positions * out]
  Tensor live;         // indices of the columns of the [out, K] weight matrix that see nonzero input
  bool all_live = true;
  int64_t rows_per_sample = 1;
};

std::optional<UnfoldedCache> unfold_cache(const Layer& layer, const Tensor& w, const Tensor& inputs,
                                          const Tensor& targets, std::optional<int64_t> axis) {
  const int64_t n = inputs.size(0), k = w.numel() / w.size(0), out = w.size(0);
  if (!layer.cpu_paths || layer.spatial == 0 || layer.groups != 1 || layer.transposed ||
      layer.positions > kGemmMaxPositions || n * layer.positions * k > kMaxUnfoldedElements) {
    return std::nullopt;
  }
  auto [cols, rows] = unfold_chunk(layer, w, inputs.to(w.scalar_type()), targets.to(w.scalar_type()));
  const Tensor x = cols.squeeze(0);  // [n * positions, K]
  UnfoldedCache uc;
  // Dropping columns keeps the per-channel grid's rows only when its axis is the output channel.
  const bool rows_are_channels = !axis.has_value() || at::maybe_wrap_dim(*axis, w.dim()) == 0;
  uc.live = rows_are_channels ? at::ne(x, 0).any(0).nonzero().squeeze(1) : at::arange(k, x.options().dtype(at::kLong));
  uc.all_live = uc.live.size(0) == k;
  const Tensor live_cols = uc.all_live ? x : x.index_select(1, uc.live);
  uc.inputs = live_cols.reshape({n, -1});
  uc.targets = rows.squeeze(0).reshape({n, layer.positions * out});
  uc.rows_per_sample = layer.positions;
  return uc;
}

// The caches as [n, H, W, C] contiguous copies, for the layers described at kChannelsLastMinChannels.
struct ChannelsLastCache {
  Tensor inputs, targets;
};

std::optional<ChannelsLastCache> channels_last_cache(const Layer& layer, const Tensor& w, const Tensor& inputs,
                                                     const Tensor& targets) {
  if (!layer.cpu_paths || w.scalar_type() != at::kFloat || layer.spatial != 2 ||
      layer.transposed || layer.groups != 1 || inputs.size(1) < kChannelsLastMinChannels ||
      layer.positions > kChannelsLastMaxPositions || inputs.numel() + targets.numel() > kMaxUnfoldedElements) {
    return std::nullopt;
  }
  const auto nhwc = [](const Tensor& t) { return t.to(at::kFloat).permute({0, 2, 3, 1}).contiguous(); };
  return ChannelsLastCache{nhwc(inputs), nhwc(targets)};
}

// The caches in Winograd's transformed domain (csrc/cpu/winograd.h), for a CPU Conv2d with a 3x3
// kernel, stride 1, no dilation or groups, even output sizes and enough input channels, where the
// transformed inputs fit. Forward and weight gradient then take 2.25x (F(2x2, 3x3)) or 4x (F(4x4, 3x3),
// outputs in multiples of 4) fewer multiply-adds.
std::optional<cpu::WinogradCache> winograd_cache(const Layer& layer, const Tensor& w, const Tensor& inputs,
                                                 const Tensor& targets) {
  if (!layer.cpu_paths || layer.spatial != 2 || layer.transposed || layer.groups != 1 ||
      w.size(2) != 3 || w.size(3) != 3 || inputs.size(1) < kWinogradMinChannels ||
      layer.positions < kWinogradMinPositions || !cpu::winograd_enabled()) {
    return std::nullopt;
  }
  for (int64_t d = 0; d < 2; ++d) {
    if (layer.stride[d] != 1 || layer.dilation[d] != 1) return std::nullopt;
  }
  const auto fits = [&](int64_t tile) { return targets.size(2) % tile == 0 && targets.size(3) % tile == 0; };
  const int64_t forced = cpu::winograd_forced_tile();  // ADAROUND_WINOGRAD=2 or 4, where the outputs allow
  int64_t tile = 0;
  if (forced != 0 && fits(forced)) {
    tile = forced;
  } else if (fits(cpu::kWinogradLargeTile) && layer.positions >= kWinogradLargeTileMinPositions) {
    tile = cpu::kWinogradLargeTile;
  } else if (fits(cpu::kWinogradSmallTile)) {
    tile = cpu::kWinogradSmallTile;
  } else {
    return std::nullopt;
  }
  const int64_t tiles = layer.positions / cpu::winograd_outputs(tile);
  if (cpu::winograd_points(tile) * inputs.size(0) * tiles * inputs.size(1) > kMaxUnfoldedElements) {
    return std::nullopt;
  }
  return cpu::winograd_cache(inputs.to(w.scalar_type()), targets.to(w.scalar_type()), layer.padding, tile);
}

GramSystem build_gram(const Layer& layer, const Tensor& w, const std::optional<Tensor>& bias, const Tensor& inputs,
                      const Tensor& targets) {
  const int64_t g = layer.groups, out_g = w.size(0) / g, k = w.numel() / w.size(0);
  const auto f64 = w.options().dtype(at::kDouble);
  GramSystem sys;
  sys.gram = at::zeros({g, k, k}, f64);
  Tensor cross = at::zeros({g, k, out_g}, f64);
  Tensor residual_sq = at::zeros({}, f64);
  const int64_t n = inputs.size(0);
  const int64_t step = std::max<int64_t>(1, kChunkElements / std::max<int64_t>(1, layer.positions * k * g));
  for (int64_t start = 0; start < n; start += step) {
    const int64_t len = std::min(step, n - start);
    Tensor t = targets.narrow(0, start, len).to(w.device(), at::kDouble);
    if (bias.has_value()) {
      std::vector<int64_t> shape(t.dim(), 1);
      shape[1] = -1;
      t = t - bias->to(at::kDouble).view(shape);
    }
    auto [xg, rg] = unfold_chunk(layer, w, inputs.narrow(0, start, len).to(w.device(), at::kDouble), t);
    const Tensor xt = xg.transpose(1, 2);
    sys.gram.baddbmm_(xt, xg);
    cross.baddbmm_(xt, rg);
    residual_sq += rg.pow(2).sum();
  }
  sys.cross_t = cross.transpose(1, 2).contiguous();
  sys.residual_sq = residual_sq.item<double>();
  sys.rows = double(n * layer.positions);
  sys.gram_work = sys.gram.to(w.scalar_type());
  sys.cross_t_work = sys.cross_t.to(w.scalar_type());
  return sys;
}

// Full-data loss of W~ (float64, as a 0-dim tensor: no host sync).
Tensor gram_loss(const GramSystem& sys, const Tensor& w_soft) {
  const int64_t g = sys.gram.size(0);
  const Tensor wg = w_soft.to(at::kDouble).reshape({g, sys.cross_t.size(1), sys.cross_t.size(2)});
  const Tensor quad = (at::bmm(wg, sys.gram) * wg).sum();
  return (quad - 2 * (wg * sys.cross_t).sum() + sys.residual_sq) / sys.rows;
}

// dL/dW~ of the full-data loss: (2/M) (W~ G - C^T).
Tensor gram_grad(const GramSystem& sys, const Tensor& w_soft) {
  const int64_t g = sys.gram.size(0);
  const Tensor wg = w_soft.reshape({g, sys.cross_t.size(1), sys.cross_t.size(2)});
  const double a = 2.0 / sys.rows;
  return at::baddbmm(sys.cross_t_work, wg, sys.gram_work, /*beta=*/-a, /*alpha=*/a).view(w_soft.sizes());
}

bool choose_exact(const std::string& mode, Activation act, const Tensor& w, const Layer& layer, int64_t n,
                  const OptimizeOptions& opt) {
  if (mode == "minibatch") return false;
  if (mode == "exact") {
    TORCH_CHECK(act == Activation::kNone, "mode='exact' needs activation='none' (the loss must be quadratic)");
    TORCH_CHECK(!layer.transposed, "mode='exact' is not available for transposed convolutions; use minibatch");
    return true;
  }
  TORCH_CHECK(mode == "auto", "mode must be one of minibatch, exact, auto; got '", mode, "'");
  if (act != Activation::kNone || layer.transposed) return false;
  // Multiply-adds: minibatch = forward + weight gradient per iteration; exact = one W~ G per
  // iteration plus building G once.
  const double k = double(w.numel() / w.size(0)), out = double(w.size(0)), pos = double(layer.positions);
  const double minibatch = 2.0 * double(opt.batch_size) * pos * out * k * double(opt.iterations);
  const double exact = out * k * k * double(opt.iterations) + double(n) * pos * k * k * double(layer.groups);
  return exact < minibatch;
}

// Sets cuDNN determinism and the float32 precision of cuBLAS matmuls and cuDNN convolutions (TF32
// or full IEEE) for the loop, and restores what the caller had on scope exit. Through the per-op
// precision API only: PyTorch refuses to read the legacy allow_tf32 flags once a program has set
// the per-op ones.
class BackendFlagsGuard {
 public:
  explicit BackendFlagsGuard(bool allow_tf32) : deterministic_(ctx().deterministicCuDNN()) {
    const auto precision = allow_tf32 ? at::Float32Precision::TF32 : at::Float32Precision::IEEE;
    for (size_t k = 0; k < kOps.size(); ++k) {
      saved_[k] = ctx().float32Precision(at::Float32Backend::CUDA, kOps[k]);
      ctx().setFloat32Precision(at::Float32Backend::CUDA, kOps[k], precision);
    }
    ctx().setDeterministicCuDNN(true);  // same seed + same device -> same result
  }
  ~BackendFlagsGuard() {
    ctx().setDeterministicCuDNN(deterministic_);
    for (size_t k = 0; k < kOps.size(); ++k) ctx().setFloat32Precision(at::Float32Backend::CUDA, kOps[k], saved_[k]);
  }

 private:
  static constexpr std::array<at::Float32Op, 2> kOps{at::Float32Op::MATMUL, at::Float32Op::CONV};
  static at::Context& ctx() { return at::globalContext(); }
  bool deterministic_;
  std::array<at::Float32Precision, 2> saved_{};
};

}  // namespace

OptimizeResult optimize_layer(const Tensor& weight, const std::optional<Tensor>& bias, const LayerGrid& grid_args,
                              const Tensor& inputs, const Tensor& targets, const LayerGeometry& geometry,
                              const OptimizeOptions& opt) {
  TORCH_CHECK(opt.iterations > 0, "iterations must be > 0, got ", opt.iterations);
  TORCH_CHECK(opt.batch_size > 0, "batch_size must be > 0, got ", opt.batch_size);
  TORCH_CHECK(opt.lr > 0 && std::isfinite(opt.lr), "lr must be positive and finite, got ", opt.lr);
  TORCH_CHECK(opt.reg_lambda >= 0 && std::isfinite(opt.reg_lambda), "reg_lambda must be >= 0, got ", opt.reg_lambda);
  TORCH_CHECK(opt.beta_start >= 1 && opt.beta_end >= 1 && std::isfinite(opt.beta_start) && std::isfinite(opt.beta_end),
              "beta_start and beta_end must be finite and >= 1, got ", opt.beta_start, " and ", opt.beta_end);
  TORCH_CHECK(opt.warm_start >= 0 && opt.warm_start < 1, "warm_start must be in [0, 1), got ", opt.warm_start);
  TORCH_CHECK(opt.schedule == "cosine" || opt.schedule == "linear", "schedule must be cosine or linear, got '",
              opt.schedule, "'");
  TORCH_CHECK(opt.log_every >= 0, "log_every must be >= 0, got ", opt.log_every);
  const Activation act = parse_activation(opt.activation);
  Layer layer = check_layer(weight, bias, inputs, targets, geometry);
  const int64_t n = inputs.size(0);
  // Kernels go to the current device's streams: make that the weight's device (which need not be the
  // current one) for the whole loop.
  const c10::OptionalDeviceGuard on_weight_device(weight.device());
  layer.cpu_paths = weight.is_cpu() && !emulation::enabled();
  const QuantGrid grid = make_grid(weight, grid_args.scale, grid_args.zero_point, grid_args.quant_min,
                                   grid_args.quant_max, grid_args.axis, GridValueCheck::kAlways);
  check_finite(inputs, "inputs");
  check_finite(targets, "targets");
  check_finite(weight, "weight");
  if (bias.has_value()) check_finite(*bias, "bias");

  BackendFlagsGuard flags(opt.allow_tf32);
  const auto work_dtype = compute_dtype(weight.scalar_type());
  const Tensor w = weight.to(work_dtype).contiguous();
  const std::optional<Tensor> b = bias.has_value() ? std::optional<Tensor>(bias->to(work_dtype)) : std::nullopt;

  const bool exact = choose_exact(opt.mode, act, w, layer, n, opt);
  TORCH_CHECK(exact || opt.batch_size <= n, "batch_size (", opt.batch_size, ") is larger than the cache (", n,
              " samples)");
  GramSystem gram;
  if (exact) gram = build_gram(layer, w, b, inputs, targets);
  const std::optional<cpu::WinogradCache> winograd =
      exact ? std::nullopt : winograd_cache(layer, w, inputs, targets);
  const std::optional<UnfoldedCache> unfolded =
      exact || winograd.has_value() ? std::nullopt : unfold_cache(layer, w, inputs, targets, grid_args.axis);
  const std::optional<ChannelsLastCache> nhwc = exact || winograd.has_value() || unfolded.has_value()
                                                    ? std::nullopt
                                                    : channels_last_cache(layer, w, inputs, targets);
  // With the unfolded cache only the live columns of the [out, K] weight are learned (see UnfoldedCache).
  const bool live_only = unfolded.has_value() && !unfolded->all_live;
  // ActiveWeights packs by channel, which must then be the outermost dimension: a transposed
  // convolution's per-channel grid is on axis 1, so its rounding is learned with axes 0 and 1 swapped.
  const bool swapped =
      layer.transposed && grid_args.axis.has_value() && at::maybe_wrap_dim(*grid_args.axis, w.dim()) == 1;
  const Tensor w_learned = live_only ? w.view({w.size(0), -1}).index_select(1, unfolded->live).contiguous()
                           : swapped ? w.transpose(0, 1).contiguous()
                                     : w;
  ActiveWeights state(w_learned, grid.scale, grid.zero_point, grid.qmin, grid.qmax,
                      swapped ? std::optional<int64_t>(0) : grid_args.axis, opt.pack_frozen && layer.cpu_paths);

  const int64_t log_every = opt.log_every > 0 ? opt.log_every : std::max<int64_t>(1, opt.iterations / 100);
  Tensor loss_curve = at::zeros({(opt.iterations + log_every - 1) / log_every}, w.options().dtype(at::kFloat));
  const double norm = 1.0 / double(opt.batch_size * layer.positions);

  // Minibatch rows come from a CPU generator on every device, so a seed picks the same rows
  // everywhere; a device loop copies them over kRowChunk iterations at a time (DeviceSchedule).
  at::Generator gen = at::detail::getDefaultCPUGenerator().clone();
  gen.set_current_seed(uint64_t(opt.seed));
  const auto index_options = inputs.options().dtype(at::kLong);
  const bool streamed = inputs.device() != w.device();
  // Caches on the loop's device, outside the CPU paths: iterations read their rows and scalars from
  // memory (what a CUDA graph needs).
  std::optional<DeviceSchedule> device_schedule;
  if (!layer.cpu_paths && !streamed) device_schedule.emplace(opt, n, w.device());

  // One iteration: dL/dW~ (minibatch or full data), the sampled loss when log_now, and the step.
  auto iterate = [&](int64_t t, bool log_now) {
    const double lambda = lambda_at(opt, t);
    const double beta = beta_at(opt, t);
    auto minibatch_rows = [&] {
      return device_schedule ? device_schedule->rows() : at::randint(n, {opt.batch_size}, gen, index_options);
    };
    const Tensor w_soft = swapped ? state.soft_weight().transpose(0, 1) : state.soft_weight();
    Tensor grad_w, loss;
    if (exact) {
      grad_w = gram_grad(gram, w_soft);
      if (log_now) loss = gram_loss(gram, w_soft);
    } else if (winograd.has_value()) {
      const Tensor idx = minibatch_rows();
      const int64_t rows = opt.batch_size * winograd->tiles;
      const Tensor x = cpu::gather_samples(winograd->inputs, idx).view({winograd->inputs.size(0), rows, -1});
      const Tensor y = cpu::gather_samples(winograd->targets, idx).view({winograd->targets.size(0), rows, -1});
      const Tensor pre = cpu::winograd_forward(x, cpu::winograd_weights(w_soft, winograd->tile), b);
      grad_w = cpu::winograd_weight_grad(ops::reconstruction_grad(pre, y, opt.activation, norm), x);
      if (log_now) loss = (activate(act, pre) - y).pow(2).sum() * norm;
    } else if (unfolded.has_value()) {
      const UnfoldedCache& uc = *unfolded;
      const Tensor idx = minibatch_rows();
      const Tensor x = uc.inputs.index_select(0, idx).view({opt.batch_size * uc.rows_per_sample, -1});
      const Tensor y = uc.targets.index_select(0, idx).view({x.size(0), -1});
      const Tensor w_rows = w_soft.view({w.size(0), -1});
      const Tensor pre = b.has_value() ? at::addmm(*b, x, w_rows.t()) : x.mm(w_rows.t());
      grad_w = ops::reconstruction_grad(pre, y, opt.activation, norm).t().mm(x).view(w_soft.sizes());
      if (log_now) loss = (activate(act, pre) - y).pow(2).sum() * norm;
    } else {
      const Tensor idx = minibatch_rows();
      Tensor x, y;
      if (nhwc.has_value()) {  // NCHW views of channels-last rows
        x = nhwc->inputs.index_select(0, idx).permute({0, 3, 1, 2});
        y = nhwc->targets.index_select(0, idx).permute({0, 3, 1, 2});
      } else {
        x = streamed ? gather_to_device(inputs, idx, w) : inputs.index_select(0, idx).to(work_dtype);
        y = streamed ? gather_to_device(targets, idx, w) : targets.index_select(0, idx).to(work_dtype);
      }
      // Channels-last rows: the weight converted once for both convolutions, not by each of them.
      const Tensor w_conv = nhwc.has_value() ? w_soft.contiguous(at::MemoryFormat::ChannelsLast) : w_soft;
      const Tensor pre = forward(layer, x, w_conv, b);
      grad_w = weight_grad(layer, ops::reconstruction_grad(pre, y, opt.activation, norm), x, w_conv);
      if (log_now) loss = (activate(act, pre) - y).pow(2).sum() * norm;
    }
    if (log_now) {
      if (lambda > 0) loss = loss + lambda * state.regularizer(beta);
      loss_curve.select(0, t / log_every).copy_(loss);  // device-side copy: no host sync
      // In CPU memory the sampled loss is free to read: stop at the first non-finite one.
      if (loss.is_cpu()) check_finite_loss(loss.item<double>(), t);
    }
    if (swapped) grad_w = grad_w.transpose(0, 1).contiguous();
    if (device_schedule) {
      state.step_scheduled(grad_w, device_schedule->scalars(), opt.lr, kAdamBeta1, kAdamBeta2, kAdamEps);
      device_schedule->advance();
    } else {
      state.step(grad_w, lambda, beta, opt.lr, kAdamBeta1, kAdamBeta2, kAdamEps, t + 1);
    }
  };

  // Iterations that log run eagerly; the others replay one captured iteration. The graph exists
  // from before the first iteration to after the last (see make_iteration_graph).
  std::unique_ptr<IterationGraph> graph =
      opt.cuda_graph && device_schedule.has_value() ? make_iteration_graph(w.device()) : nullptr;
  bool captured = false;
  if (opt.on_progress) opt.on_progress(0, opt.iterations);
  for (int64_t t = 0; t < opt.iterations; ++t) {
    const bool log_now = t % log_every == 0;
    if (t > 0 && t % kRepackEvery == 0) state.repack();
    if (device_schedule && !exact) device_schedule->draw_rows(t, gen);
    if (graph && !log_now && !captured) {
      // The captured iteration takes everything that changes from memory; it is given no real t, so
      // that a use of t would show as a difference from the eager loop (also in the emulation, whose
      // replays run this closure again).
      captured = graph->capture([&] { iterate(/*t=*/-1, false); });
      if (!captured) graph.reset();
    }
    if (captured && !log_now) {
      graph->replay();
    } else {
      iterate(t, log_now);
    }
    if (opt.on_progress) opt.on_progress(t + 1, opt.iterations);
  }
  graph.reset();  // the caller's stream goes on after the iterations
  check_finite_run(loss_curve, state.v(), log_every);

  Tensor v = swapped ? state.v().transpose(0, 1).contiguous() : state.v();
  if (live_only) {
    // Dead columns have no reconstruction gradient; the regulariser alone only pushes h(V) away from
    // 1/2, so their rounding is nearest (ties up). Return them decided on that side.
    Tensor dead_side =
        at::full_like(w, kSaturatedV).masked_fill_(ops::init_v(w, grid.scale, grid_args.axis) < 0, -kSaturatedV);
    dead_side.view({w.size(0), -1}).index_copy_(1, unfolded->live, v);
    v = dead_side;
  }
  OptimizeResult result;
  result.v = v;
  result.loss_curve = loss_curve;
  result.exact_mode = exact;
  auto [codes, quantized] = ops::hard_quantize(weight, grid.scale, grid.zero_point, grid.qmin, grid.qmax,
                                               grid_args.axis, "adaptive", v.to(work_dtype));
  result.codes = codes;
  result.quantized_weight = quantized;
  const Tensor nearest = std::get<1>(ops::hard_quantize(weight, grid.scale, grid.zero_point, grid.qmin,
                                                        grid.qmax, grid_args.axis, "nearest"));
  result.nearest_error = reconstruction_error(layer, act, nearest.to(work_dtype), b, inputs, targets);
  result.adaround_error = reconstruction_error(layer, act, quantized.to(work_dtype), b, inputs, targets);
  const Tensor stretched = at::sigmoid(v) * (kZeta - kGamma) + kGamma;
  result.undecided_fraction =
      v.numel() == 0 ? 0.0 : at::logical_and(stretched > 0, stretched < 1).to(at::kDouble).mean().item<double>();
  return result;
}

namespace {

// torch.ops.adaround.optimize_layer: the flat-argument form of optimize_layer.
std::tuple<Tensor, Tensor, Tensor, Tensor, double, double, double, bool> optimize_layer_op(
    const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& scale,
    const std::optional<Tensor>& zero_point, int64_t quant_min, int64_t quant_max, std::optional<int64_t> axis,
    const Tensor& inputs, const Tensor& targets, std::vector<int64_t> stride, std::vector<int64_t> padding,
    std::vector<int64_t> dilation, int64_t groups, int64_t iterations, int64_t batch_size, double lr,
    double reg_lambda, double beta_start, double beta_end, double warm_start, c10::string_view schedule,
    c10::string_view activation, c10::string_view mode, int64_t seed, int64_t log_every, bool allow_tf32,
    bool cuda_graph, bool transposed, std::vector<int64_t> output_padding) {
  OptimizeOptions opt;
  opt.iterations = iterations;
  opt.batch_size = batch_size;
  opt.lr = lr;
  opt.reg_lambda = reg_lambda;
  opt.beta_start = beta_start;
  opt.beta_end = beta_end;
  opt.warm_start = warm_start;
  opt.schedule = std::string(schedule);
  opt.activation = std::string(activation);
  opt.mode = std::string(mode);
  opt.seed = seed;
  opt.log_every = log_every;
  opt.allow_tf32 = allow_tf32;
  opt.cuda_graph = cuda_graph;
  opt.on_progress = progress::report;
  const OptimizeResult r = optimize_layer(weight, bias, LayerGrid{scale, zero_point, quant_min, quant_max, axis},
                                          inputs, targets,
                                          LayerGeometry{stride, padding, dilation, groups, transposed, output_padding},
                                          opt);
  return {r.quantized_weight, r.codes, r.v,           r.loss_curve, r.nearest_error, r.adaround_error,
          r.undecided_fraction, r.exact_mode};
}

}  // namespace
}  // namespace adaround

TORCH_LIBRARY_FRAGMENT(adaround, m) {
  m.def("optimize_layer(Tensor weight, Tensor? bias, Tensor scale, Tensor? zero_point, int quant_min, "
        "int quant_max, int? axis, Tensor inputs, Tensor targets, int[] stride=[1], int[] padding=[0], "
        "int[] dilation=[1], int groups=1, int iterations=10000, int batch_size=32, float lr=0.001, "
        "float reg_lambda=0.01, float beta_start=20., float beta_end=2., float warm_start=0.2, "
        "str schedule='cosine', str activation='none', str mode='auto', int seed=0, int log_every=0, "
        "bool allow_tf32=False, bool cuda_graph=False, bool transposed=False, int[] output_padding=[0]) -> "
        "(Tensor quantized_weight, Tensor codes, Tensor v, Tensor loss_curve, "
        "float nearest_error, float adaround_error, float undecided_fraction, bool exact_mode)");
  // One implementation for every backend: the loop dispatches its pieces by device.
  m.impl("optimize_layer", torch::dispatch(c10::DispatchKey::CompositeExplicitAutograd,
                                           TORCH_FN(adaround::optimize_layer_op)));
}
