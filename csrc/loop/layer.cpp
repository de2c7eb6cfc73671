// The checks and shared computations of one layer inside optimize_layer (see layer.h).
#include "loop/layer.h"

#include "cpu/depthwise_grad.h"

#include <algorithm>

namespace adaround::loop {

using at::Tensor;

namespace {

std::vector<int64_t> expand_arg(const std::vector<int64_t>& values, int64_t spatial, const char* name) {
  TORCH_CHECK(values.size() == 1 || int64_t(values.size()) == spatial, name, " must have 1 or ", spatial,
              " entries for a ", spatial, "-d convolution, got ", values.size());
  return values.size() == 1 ? std::vector<int64_t>(spatial, values[0]) : values;
}

int64_t chunk_samples(const Tensor& t) {
  const int64_t per_sample = std::max<int64_t>(1, t.numel() / t.size(0));
  return std::max<int64_t>(1, kChunkElements / per_sample);
}

}  // namespace

Layer check_layer(const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& inputs,
                  const Tensor& targets, const LayerGeometry& geo) {
  TORCH_CHECK(weight.dim() >= 2 && weight.dim() <= 4,
              "weight must be 2-D (Linear), 3-D (Conv1d) or 4-D (Conv2d), got shape ", weight.sizes());
  TORCH_CHECK(weight.is_floating_point(), "weight must be floating point, got ", weight.scalar_type());
  TORCH_CHECK(weight.numel() > 0, "weight of shape ", weight.sizes(), " has no elements: there is nothing to round");
  // Caches live with the weight, or in (pinned) host memory for an accelerator weight: then they are
  // streamed.
  TORCH_CHECK(inputs.device() == targets.device(), "inputs are on ", inputs.device(), " but targets are on ",
              targets.device(), "; both caches must be on the same device");
  const bool streamed = inputs.is_cpu() && !weight.is_cpu();
  for (const auto& [t, name] : {std::pair<const Tensor*, const char*>{&inputs, "inputs"}, {&targets, "targets"}}) {
    TORCH_CHECK(t->device() == weight.device() || (streamed && t->is_cpu()), name, " is on ", t->device(),
                " but weight is on ", weight.device(), " (caches go on the weight's device, or both on the CPU "
                "for a weight on an accelerator)");
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

Tensor minibatch_loss(Activation act, const Tensor& pre, const Tensor& y, double norm) {
  return (activate(act, pre) - y).pow(2).sum() * norm;
}

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

Tensor weight_grad(const Layer& layer, const Tensor& grad_out, const Tensor& x, const Tensor& w, bool im2col) {
  if (layer.spatial == 0) return grad_out.t().mm(x);
  if (!layer.transposed && cpu::direct_depthwise_grad_applies(grad_out, x, layer.groups)) {
    const std::vector<int64_t> kernel(w.sizes().begin() + 2, w.sizes().end());
    return cpu::depthwise_weight_grad(grad_out, x, kernel, layer.stride, layer.padding, layer.dilation);
  }
  if (im2col) {
    auto [cols, grad_rows] = unfold_chunk(layer, w, x, grad_out);  // [g, rows, K], [g, rows, out_g]
    return at::bmm(grad_rows.transpose(1, 2), cols).view(w.sizes());
  }
  return std::get<1>(at::convolution_backward(grad_out, x, w, std::nullopt, layer.stride, layer.padding,
                                              layer.dilation, layer.transposed, layer.output_padding, layer.groups,
                                              {false, true, false}))
      .contiguous();
}

// Mean over samples and positions of the squared error summed over channels, on the whole cache.
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

}  // namespace adaround::loop
