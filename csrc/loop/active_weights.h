// The rounding state of one layer (V, Adam moments, W~), stepped by adam_rounding_step_: inside
// optimize_layer, and for each layer of a block in block reconstruction (_C.RoundingState). On the
// CPU, weights whose rounding can no longer change are packed out of the step: V saturated (h(V)
// exactly 0 or 1, so the gradient is exactly 0) with Adam's momentum pointing further out. Such a V
// only moves outward from then on, so h(V), W~ and every other weight's trajectory are exactly what
// the full step gives; only the frozen V stop drifting.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "grid.h"
#include "loop/execution_path.h"

namespace adaround {

class ActiveWeights {
 public:
  // Iterations between calls to repack in the loops that use it (optimize_layer, block reconstruction).
  static constexpr int64_t kRepackEvery = 200;

  // `weight` is the layer's weight in the compute dtype; `pack` allows packing (CPU only).
  ActiveWeights(const at::Tensor& weight, const at::Tensor& scale, const at::Tensor& zero_point, int64_t qmin,
                int64_t qmax, std::optional<int64_t> axis, bool pack);

  // The soft weights W~ of the current V, shaped like the weight.
  const at::Tensor& soft_weight() const { return soft_weight_; }

  // One Adam step (step counts from 1) from dL/dW~; updates V and W~.
  void step(const at::Tensor& grad_soft_weight, double reg_lambda, double beta, double lr, double beta1,
            double beta2, double eps, int64_t step);

  // The same step with reg_lambda, beta and Adam's bias corrections read from `schedule`, a
  // float64 [4] tensor on the weights' device (ops::adam_rounding_step_scheduled_): the form a
  // CUDA graph replays. Not for packed weights.
  void step_scheduled(const at::Tensor& grad_soft_weight, const at::Tensor& schedule, double lr, double beta1,
                      double beta2, double eps);

  // The regulariser sum over all weights (frozen ones contribute exactly 0), as a 0-dim tensor.
  at::Tensor regularizer(double beta) const;

  // Packs the frozen weights out when that shrinks the step by at least kMinShrink; host sync.
  void repack();

  // V of every weight (frozen ones as they were when packed out).
  at::Tensor v() const;

  // Share of the weights still stepped.
  double active_fraction() const;

  // Whether repack may pack (the CPU, with the channels outermost); step_scheduled is for the others.
  bool can_pack() const { return can_pack_; }

 private:
  static constexpr double kMinShrink = 0.1;
  void unpack();  // writes the packed state back into the full tensors

  std::optional<int64_t> axis_;
  QuantGrid grid_;  // scale and zero point in the compute dtype, qmin/qmax, layout
  bool can_pack_;
  at::Tensor v_, exp_avg_, exp_avg_sq_, soft_weight_, grid_base_;  // full, weight-shaped
  // Packed state: the active weights' V, moments and grid base; layout_.index into the full tensors.
  bool packed_ = false;
  cpu::PackedLayout layout_;
  at::Tensor v_packed_, exp_avg_packed_, exp_avg_sq_packed_, grid_base_packed_;
};

}  // namespace adaround
