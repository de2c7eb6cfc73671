#include "loop/active_weights.h"

#include "rounding_ops.h"
#include "step_checks.h"
#include "step_ops.h"


namespace adaround {

using at::Tensor;

ActiveWeights::ActiveWeights(const Tensor& weight, const Tensor& scale, const Tensor& zero_point, int64_t qmin,
                             int64_t qmax, std::optional<int64_t> axis, bool pack)
    : axis_(axis), grid_(make_grid(weight, scale, zero_point, qmin, qmax, axis, GridValueCheck::kNever)) {
  // Packing groups the active weights by channel: the channels must be the outermost dimension.
  can_pack_ = pack && weight.is_cpu() && grid_.channels * grid_.inner == weight.numel();
  // floor(W/s) + z with the per-channel grid broadcast along its axis.
  std::vector<int64_t> channel_shape;  // empty: a 0-dim scale and zero point
  if (axis.has_value()) {
    channel_shape.assign(weight.dim(), 1);
    channel_shape[at::maybe_wrap_dim(*axis, weight.dim())] = -1;
  }
  const auto grid_view = [&](const Tensor& t) { return t.view(channel_shape); };
  grid_base_ = (at::floor(weight / grid_view(grid_.scale)) + grid_view(grid_.zero_point)).contiguous();
  v_ = ops::init_v(weight, scale, axis);
  exp_avg_ = at::zeros_like(v_);
  exp_avg_sq_ = at::zeros_like(v_);
  soft_weight_ = ops::soft_quantize(weight, v_, scale, zero_point, qmin, qmax, axis);
}

void ActiveWeights::step(const Tensor& grad, double reg_lambda, double beta, double lr, double beta1, double beta2,
                         double eps, int64_t step) {
  if (!packed_) {
    ops::adam_rounding_step_(v_, exp_avg_, exp_avg_sq_, soft_weight_, grad, grid_base_, grid_.scale,
                             grid_.zero_point, grid_.qmin, grid_.qmax, axis_, reg_lambda, beta, lr, beta1, beta2, eps,
                             step);
    return;
  }
  // The full step's checks of what the packed kernel reads through layout_.index (the state's own
  // tensors are made here and need none).
  const Tensor grad_dense = grad.contiguous();
  check_same_layout(soft_weight_, grad_dense, "grad_soft_weight");
  TORCH_CHECK(at::get_overlap_status(grad_dense, soft_weight_) == at::MemOverlapStatus::No,
              "grad_soft_weight and soft_weight share memory");
  cpu::adam_rounding_step_packed_(v_packed_, exp_avg_packed_, exp_avg_sq_packed_, grid_base_packed_, soft_weight_,
                                  grad_dense, layout_, grid_, reg_lambda, beta,
                                  adam_step_constants(lr, beta1, beta2, eps, step));
}

void ActiveWeights::step_scheduled(const Tensor& grad, const Tensor& schedule, double lr, double beta1, double beta2,
                                   double eps) {
  TORCH_CHECK(!packed_, "step_scheduled runs on weights that are never packed");
  ops::adam_rounding_step_scheduled_(v_, exp_avg_, exp_avg_sq_, soft_weight_, grad, grid_base_, grid_.scale,
                                     grid_.zero_point, grid_.qmin, grid_.qmax, axis_, schedule, lr, beta1, beta2, eps);
}

Tensor ActiveWeights::regularizer(double beta) const {
  return ops::round_regularizer(packed_ ? v_packed_ : v_, beta);
}

void ActiveWeights::unpack() {
  if (!packed_) return;
  v_.view(-1).index_copy_(0, layout_.index, v_packed_);
  exp_avg_.view(-1).index_copy_(0, layout_.index, exp_avg_packed_);
  exp_avg_sq_.view(-1).index_copy_(0, layout_.index, exp_avg_sq_packed_);
  packed_ = false;
}

void ActiveWeights::repack() {
  if (!can_pack_) return;
  const Tensor& v = packed_ ? v_packed_ : v_;
  const Tensor& m = packed_ ? exp_avg_packed_ : exp_avg_;
  const Tensor frozen = at::logical_or(at::logical_and(v >= kSaturatedV, m <= 0),
                                       at::logical_and(v <= -kSaturatedV, m >= 0));
  const int64_t newly_frozen = frozen.sum().item<int64_t>();
  if (double(newly_frozen) < kMinShrink * double(v.numel())) return;
  const Tensor keep = at::logical_not(frozen).view(-1).nonzero().squeeze(1);
  const Tensor index = packed_ ? layout_.index.index_select(0, keep) : keep;
  unpack();
  layout_.index = index;
  const Tensor per_channel = at::bincount(index.div(grid_.inner, "floor"), {}, grid_.channels);
  layout_.offsets = at::cat({at::zeros({1}, per_channel.options()), per_channel.cumsum(0)});
  v_packed_ = v_.view(-1).index_select(0, index);
  exp_avg_packed_ = exp_avg_.view(-1).index_select(0, index);
  exp_avg_sq_packed_ = exp_avg_sq_.view(-1).index_select(0, index);
  grid_base_packed_ = grid_base_.view(-1).index_select(0, index);
  packed_ = true;
}

Tensor ActiveWeights::v() const {
  if (!packed_) return v_;
  Tensor full = v_.clone();
  full.view(-1).index_copy_(0, layout_.index, v_packed_);
  return full;
}

double ActiveWeights::active_fraction() const {
  return packed_ ? double(v_packed_.numel()) / double(std::max<int64_t>(1, v_.numel())) : 1.0;
}

}  // namespace adaround
