// The eager path: each iteration gathers its rows and runs at::linear / at::convolution and the weight
// gradient on them. It runs on any device and for any layer; caches in host memory (streamed) are
// gathered into pinned memory and copied to the weight's device a minibatch at a time.
#include "loop/execution_path.h"
#include "step_ops.h"

namespace adaround::loop {
namespace {

using at::Tensor;

// The rows `idx` of a host cache, gathered into pinned memory and copied asynchronously to w's device.
// The caching host allocator keeps each staging block alive until its copy has finished.
Tensor gather_to_device(const Tensor& cache, const Tensor& idx, const Tensor& w) {
  std::vector<int64_t> shape(cache.sizes().begin(), cache.sizes().end());
  shape[0] = idx.size(0);
  Tensor staging = at::empty(shape, cache.options().pinned_memory(cache.is_pinned()));
  at::index_select_out(staging, cache, 0, idx);
  return staging.to(w.device(), w.scalar_type(), /*non_blocking=*/true);
}

class EagerPath final : public ExecutionPath {
 public:
  EagerPath(const PathInputs& in, bool im2col_weight_grad)
      : in_(in), streamed_(in.inputs.device() != in.weight.device()), im2col_(im2col_weight_grad) {}

  Tensor gradient(const Tensor& w_soft, const Tensor& rows, Tensor* loss) override {
    const Tensor x = gather(in_.inputs, rows), y = gather(in_.targets, rows);
    const Tensor pre = forward(in_.layer, x, w_soft, in_.bias);
    if (loss != nullptr) *loss = minibatch_loss(in_.activation, pre, y, in_.norm);
    const Tensor grad_pre = ops::reconstruction_grad(pre, y, in_.activation_name, in_.norm);
    return weight_grad(in_.layer, grad_pre, x, w_soft, im2col_);
  }

 private:
  Tensor gather(const Tensor& cache, const Tensor& rows) const {
    return streamed_ ? gather_to_device(cache, rows, in_.weight)
                     : cache.index_select(0, rows).to(in_.weight.scalar_type());
  }

  PathInputs in_;
  bool streamed_;
  bool im2col_;
};

}  // namespace

std::unique_ptr<ExecutionPath> make_eager_path(const PathInputs& in, bool im2col_weight_grad) {
  return std::make_unique<EagerPath>(in, im2col_weight_grad);
}

}  // namespace adaround::loop
