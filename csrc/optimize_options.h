// The options of optimize_layer listed once: the schema of torch.ops.adaround.optimize_layer (with
// OptimizeOptions' defaults), the op's argument handling and the Python-side check are generated
// from this list, and Python's QuantConfig reads its defaults from the schema.
#pragma once

#include <string>

#include "optimize_layer.h"

// X(type, name) for each option, in the schema's order.
#define ADAROUND_OPTIMIZE_OPTIONS(X) \
  X(int64_t, iterations)             \
  X(int64_t, batch_size)             \
  X(double, lr)                      \
  X(double, reg_lambda)              \
  X(double, beta_start)              \
  X(double, beta_end)                \
  X(double, warm_start)              \
  X(std::string, schedule)           \
  X(std::string, activation)         \
  X(std::string, mode)               \
  X(int64_t, seed)                   \
  X(int64_t, log_every)              \
  X(bool, allow_tf32)                \
  X(bool, cuda_graph)

namespace adaround {

// "int iterations=10000, int batch_size=32, ...": the options with their defaults, schema syntax.
std::string optimize_options_schema();

}  // namespace adaround
