// The per-iteration scalars of optimize_layer (docs: the paper's section 3.2 schedule): reg_lambda
// (0 during the warm start), the regulariser's beta, and Adam's constants and bias corrections;
// and DeviceSchedule, the same values laid out in memory for a loop whose iterations must not take
// new host arguments (a CUDA graph replay).
#pragma once

#include <ATen/ATen.h>

#include "optimize_layer.h"

namespace adaround {

constexpr double kAdamBeta1 = 0.9;
constexpr double kAdamBeta2 = 0.999;
constexpr double kAdamEps = 1e-8;

// reg_lambda at iteration t (0-based): 0 during the warm start.
double lambda_at(const OptimizeOptions& options, int64_t t);

// Every iteration's scalars as adam_rounding_step_scheduled_ reads them: float64 [iterations, 4] in
// CPU memory, row t = (reg_lambda, beta, 1 - beta1^(t+1), sqrt(1 - beta2^(t+1))). The per-layer loop
// and the block reconstruction (python/adaround_ext/blocks.py) both step from this table.
at::Tensor schedule_table(const OptimizeOptions& options);

// What changes between iterations, in memory on the loop's device: the minibatch rows, drawn
// kRowChunk iterations at a time, and each iteration's reg_lambda, beta and Adam bias corrections,
// read at a counter that every iteration advances in memory. The iterations then enqueue the same
// work with the same arguments, which is what a CUDA graph replays.
class DeviceSchedule {
 public:
  static constexpr int64_t kRowChunk = 1024;

  DeviceSchedule(const OptimizeOptions& options, int64_t samples, at::Device device);

  // Before iteration t, on the host: the rows of the next kRowChunk iterations when t starts a chunk.
  // They are drawn from `cpu_generator` on the host, so that every device sees the rows the CPU
  // loop draws for the same seed (one draw per iteration, in sequence).
  void draw_rows(int64_t t, at::Generator& cpu_generator);
  // This iteration's rows (int64 [batch]) and scalars (float64 [4]: reg_lambda, beta,
  // 1 - beta1^t, sqrt(1 - beta2^t)), as views computed on the device from the counter.
  at::Tensor rows() const;
  at::Tensor scalars() const;
  void advance();  // the counter, in memory

 private:
  int64_t samples_;
  at::Tensor table_;    // [iterations, 4]
  at::Tensor rows_;     // [kRowChunk, batch]
  at::Tensor counter_;  // [1]: iterations done
};

}  // namespace adaround
