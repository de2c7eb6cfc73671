#include "schedule.h"

#include <algorithm>
#include <cmath>

#include "step_checks.h"

namespace adaround {

using at::Tensor;

double lambda_at(const OptimizeOptions& opt, int64_t t) {
  return t >= int64_t(opt.warm_start * double(opt.iterations)) ? opt.reg_lambda : 0.0;
}

double beta_at(const OptimizeOptions& opt, int64_t t) {
  const double warm_end = opt.warm_start * double(opt.iterations);
  const double span = std::max(1.0, double(opt.iterations) - warm_end);
  const double progress = std::clamp((double(t) - warm_end) / span, 0.0, 1.0);
  if (opt.schedule == "linear") return opt.beta_start + (opt.beta_end - opt.beta_start) * progress;
  return opt.beta_end + 0.5 * (opt.beta_start - opt.beta_end) * (1.0 + std::cos(M_PI * progress));
}

Tensor schedule_table(const OptimizeOptions& opt) {
  Tensor table = at::empty({opt.iterations, 4}, at::dtype(at::kDouble));
  auto rows = table.accessor<double, 2>();
  for (int64_t t = 0; t < opt.iterations; ++t) {
    const AdamStep adam = adam_step_constants(opt.lr, kAdamBeta1, kAdamBeta2, kAdamEps, t + 1);
    rows[t][0] = lambda_at(opt, t);
    rows[t][1] = beta_at(opt, t);
    rows[t][2] = adam.bias_correction1;
    rows[t][3] = adam.bias_correction2_sqrt;
  }
  return table;
}

DeviceSchedule::DeviceSchedule(const OptimizeOptions& opt, int64_t samples, at::Device device) : samples_(samples) {
  table_ = schedule_table(opt).to(device);
  rows_ = at::empty({kRowChunk, opt.batch_size}, at::dtype(at::kLong).device(device));
  counter_ = at::zeros({1}, at::dtype(at::kLong).device(device));
}

void DeviceSchedule::draw_rows(int64_t t, at::Generator& cpu_generator) {
  if (t % kRowChunk == 0) rows_.copy_(at::randint(samples_, rows_.sizes(), cpu_generator, at::dtype(at::kLong)));
}

Tensor DeviceSchedule::rows() const { return rows_.index_select(0, counter_.remainder(kRowChunk)).view(-1); }

Tensor DeviceSchedule::scalars() const { return table_.index_select(0, counter_).view(-1); }

void DeviceSchedule::advance() { counter_.add_(1); }

}  // namespace adaround
