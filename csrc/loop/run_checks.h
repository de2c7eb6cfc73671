// The checks optimize_layer makes of its options and its values, before and after the loop.
#pragma once

#include <ATen/ATen.h>

#include "optimize_layer.h"

namespace adaround::loop {

// Every option's range; each message names the option.
void check_options(const OptimizeOptions& options);

// A tensor argument holds only finite values (a host read).
void check_finite(const at::Tensor& t, const char* name);

// A run whose loss or V turned non-finite (finite inputs that overflow the working dtype, an extreme
// reg_lambda) learned nothing: it stops naming the iteration instead of returning floor rounding.
void check_finite_loss(double loss, int64_t iteration);

// The same after the loop, for a device where reading the loss each iteration would stall it: one
// read of the sampled loss curve (taken every log_every iterations) and of V.
void check_finite_run(const at::Tensor& loss_curve, const at::Tensor& v, int64_t log_every);

}  // namespace adaround::loop
