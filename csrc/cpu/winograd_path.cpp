// CPU path for 3x3 stride-1 convolutions on larger maps: Winograd F(m x m, 3x3) over caches
// transformed once (winograd.h), with fewer multiply-adds per iteration than the direct convolution.
#include "cpu/winograd.h"
#include "loop/execution_path.h"
#include "step_ops.h"

namespace adaround::loop {
namespace {

using at::Tensor;

class WinogradPath final : public ExecutionPath {
 public:
  WinogradPath(const PathInputs& in, int64_t tile)
      : in_(in),
        cache_(cpu::winograd_cache(in.inputs.to(in.weight.scalar_type()), in.targets.to(in.weight.scalar_type()),
                                   in.layer.padding, tile)) {}

  Tensor gradient(const Tensor& w_soft, const Tensor& rows, Tensor* loss) override {
    const int64_t tile_rows = rows.size(0) * cache_.tiles;
    const Tensor x = cpu::gather_samples(cache_.inputs, rows).view({cache_.inputs.size(0), tile_rows, -1});
    const Tensor y = cpu::gather_samples(cache_.targets, rows).view({cache_.targets.size(0), tile_rows, -1});
    const Tensor pre = cpu::winograd_forward(x, cpu::winograd_weights(w_soft, cache_.tile), in_.bias);
    if (loss != nullptr) *loss = minibatch_loss(in_.activation, pre, y, in_.norm);
    return cpu::winograd_weight_grad(ops::reconstruction_grad(pre, y, in_.activation_name, in_.norm), x);
  }

 private:
  PathInputs in_;
  cpu::WinogradCache cache_;
};

}  // namespace

std::unique_ptr<ExecutionPath> make_winograd_path(const PathInputs& in, int64_t tile) {
  const int64_t tiles = in.layer.positions / cpu::winograd_outputs(tile);
  if (cpu::winograd_points(tile) * in.inputs.size(0) * tiles * in.inputs.size(1) > kMaxRelaidElements) return nullptr;
  return std::make_unique<WinogradPath>(in, tile);
}

}  // namespace adaround::loop
