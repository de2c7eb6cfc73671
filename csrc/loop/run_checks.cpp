#include "loop/run_checks.h"

#include <cmath>

#include "grid.h"

namespace adaround::loop {

void check_options(const OptimizeOptions& opt) {
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
  parse_activation(opt.activation);
  TORCH_CHECK(opt.mode == "minibatch" || opt.mode == "exact" || opt.mode == "auto",
              "mode must be one of minibatch, exact, auto; got '", opt.mode, "'");
}

void check_finite(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isfinite(t).all().item<bool>(), name, " contains NaN or Inf");
}

void check_finite_loss(double loss, int64_t iteration) {
  TORCH_CHECK(std::isfinite(loss), "the loss became ", loss, " at iteration ", iteration, " (inputs, targets or "
              "weights that overflow the working dtype, or a reg_lambda too large for it)");
}

void check_finite_run(const at::Tensor& loss_curve, const at::Tensor& v, int64_t log_every) {
  const at::Tensor bad = at::logical_not(at::isfinite(loss_curve)).nonzero();
  if (bad.numel() > 0) {
    const int64_t first = bad[0][0].item<int64_t>();
    check_finite_loss(loss_curve[first].item<double>(), first * log_every);
  }
  TORCH_CHECK(at::isfinite(v).all().item<bool>(), "the rounding variables V became NaN or Inf");
}

}  // namespace adaround::loop
