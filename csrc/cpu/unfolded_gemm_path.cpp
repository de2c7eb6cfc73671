// CPU path for small feature maps: the cache is unfolded (im2col) once and every iteration is two
// GEMMs, where a convolution library spends more time on setup than on arithmetic. Only the weight
// columns that ever see data are learned: a 3x3 kernel on a 1x1 map has 8 of 9 taps that see only
// padding; their reconstruction gradient is exactly 0, and the loop rounds them to nearest.
#include "loop/execution_path.h"
#include "step_ops.h"

namespace adaround::loop {
namespace {

using at::Tensor;

class UnfoldedGemmPath final : public ExecutionPath {
 public:
  explicit UnfoldedGemmPath(const PathInputs& in) : in_(in) {
    const Tensor& w = in.weight;
    const int64_t n = in.inputs.size(0), k = w.numel() / w.size(0), out = w.size(0);
    auto [cols, rows] = unfold_chunk(in.layer, w, in.inputs.to(w.scalar_type()), in.targets.to(w.scalar_type()));
    const Tensor x = cols.squeeze(0);  // [n * positions, K]
    // Dropping columns keeps the per-channel grid's rows only when its axis is the output channel.
    const bool rows_are_channels = !in.axis.has_value() || at::maybe_wrap_dim(*in.axis, w.dim()) == 0;
    if (rows_are_channels) {
      const Tensor live = at::ne(x, 0).any(0).nonzero().squeeze(1);
      if (live.size(0) != k) live_ = live;
    }
    inputs_ = (live_.defined() ? x.index_select(1, live_) : x).reshape({n, -1});  // [n, positions * live]
    targets_ = rows.squeeze(0).reshape({n, in.layer.positions * out});
  }

  Tensor live_columns() const override { return live_; }

  Tensor gradient(const Tensor& w_soft, const Tensor& rows, Tensor* loss) override {
    const Tensor x = inputs_.index_select(0, rows).view({rows.size(0) * in_.layer.positions, -1});
    const Tensor y = targets_.index_select(0, rows).view({x.size(0), -1});
    const Tensor w_rows = w_soft.view({in_.weight.size(0), -1});
    const Tensor pre = in_.bias.has_value() ? at::addmm(*in_.bias, x, w_rows.t()) : x.mm(w_rows.t());
    if (loss != nullptr) *loss = minibatch_loss(in_.activation, pre, y, in_.norm);
    return ops::reconstruction_grad(pre, y, in_.activation_name, in_.norm).t().mm(x).view(w_soft.sizes());
  }

 private:
  PathInputs in_;
  Tensor inputs_;   // [n, positions * live columns]
  Tensor targets_;  // [n, positions * out]
  Tensor live_;     // undefined: every column sees data
};

}  // namespace

std::unique_ptr<ExecutionPath> make_unfolded_gemm_path(const PathInputs& in) {
  return std::make_unique<UnfoldedGemmPath>(in);
}

}  // namespace adaround::loop
