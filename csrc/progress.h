// Progress of the optimize_layer call running in this process. torch.ops.adaround.optimize_layer
// reports here, so that Python can draw an iteration progress bar from another thread while the
// loop runs with the GIL released. C++ callers can pass their own OptimizeOptions::on_progress.
#pragma once

#include <cstdint>
#include <utility>

namespace adaround::progress {

void report(int64_t done, int64_t total);
std::pair<int64_t, int64_t> current();  // (iterations done, total) of the latest report

}  // namespace adaround::progress
