// The exact mode: the identity-activation loss over the whole cache in its Gram form, so that an
// iteration costs one [out, K] x [K, K] product however many samples the cache holds.
#include <ATen/ATen.h>

#include "loop/execution_path.h"

namespace adaround::loop {
namespace {

using at::Tensor;

// Full-data second moments for the identity-activation objective (docs/algorithm.md#exact-mode):
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

GramSystem build_gram(const PathInputs& in) {
  const Layer& layer = in.layer;
  const Tensor &w = in.weight, &inputs = in.inputs, &targets = in.targets;
  const std::optional<Tensor>& bias = in.bias;
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

class ExactGramPath final : public ExecutionPath {
 public:
  explicit ExactGramPath(const PathInputs& in) : sys_(build_gram(in)) {}

  bool full_data() const override { return true; }

  Tensor gradient(const Tensor& w_soft, const Tensor& /*rows*/, Tensor* loss) override {
    if (loss != nullptr) *loss = gram_loss(sys_, w_soft);
    return gram_grad(sys_, w_soft);
  }

 private:
  GramSystem sys_;
};

}  // namespace

std::unique_ptr<ExecutionPath> make_exact_gram_path(const PathInputs& in) {
  return std::make_unique<ExactGramPath>(in);
}

}  // namespace adaround::loop
