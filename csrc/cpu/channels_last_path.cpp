// CPU path for Conv2d layers with many input channels on mid-sized maps: the eager computation on
// [n, H, W, C] copies of the caches, the layout oneDNN's convolutions run fastest in there.
#include "loop/execution_path.h"
#include "step_ops.h"

namespace adaround::loop {
namespace {

using at::Tensor;

Tensor to_nhwc(const Tensor& t) { return t.to(at::kFloat).permute({0, 2, 3, 1}).contiguous(); }

class ChannelsLastPath final : public ExecutionPath {
 public:
  ChannelsLastPath(const PathInputs& in, bool im2col_weight_grad)
      : in_(in), inputs_(to_nhwc(in.inputs)), targets_(to_nhwc(in.targets)), im2col_(im2col_weight_grad) {}

  Tensor gradient(const Tensor& w_soft, const Tensor& rows, Tensor* loss) override {
    // NCHW views of channels-last rows, and the weight converted once for both convolutions.
    const Tensor x = inputs_.index_select(0, rows).permute({0, 3, 1, 2});
    const Tensor y = targets_.index_select(0, rows).permute({0, 3, 1, 2});
    const Tensor w_conv = w_soft.contiguous(at::MemoryFormat::ChannelsLast);
    const Tensor pre = forward(in_.layer, x, w_conv, in_.bias);
    if (loss != nullptr) *loss = minibatch_loss(in_.activation, pre, y, in_.norm);
    const Tensor grad_pre = ops::reconstruction_grad(pre, y, in_.activation_name, in_.norm);
    return weight_grad(in_.layer, grad_pre, x, w_conv, im2col_);
  }

 private:
  PathInputs in_;
  Tensor inputs_, targets_;  // [n, H, W, C] float32
  bool im2col_;
};

}  // namespace

std::unique_ptr<ExecutionPath> make_channels_last_path(const PathInputs& in, bool im2col_weight_grad) {
  return std::make_unique<ChannelsLastPath>(in, im2col_weight_grad);
}

}  // namespace adaround::loop
