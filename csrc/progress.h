// Progress of the optimize_layer call running in this process. torch.ops.adaround.optimize_layer
// reports here, so that Python can draw an iteration progress bar from another thread while the
// loop runs with the GIL released. C++ callers can pass their own OptimizeOptions::on_progress.
//
// A report also polls for an interruption (a Ctrl-C that Python has not been able to handle while
// the loop held the thread), at most every kInterruptPollSeconds, and throws when there is one.
#pragma once

#include <cstdint>
#include <utility>

namespace adaround::progress {

constexpr double kInterruptPollSeconds = 0.1;
// What the error of an interrupted run starts with.
constexpr const char* kInterruptedMessage = "optimize_layer: interrupted";

void report(int64_t done, int64_t total);
std::pair<int64_t, int64_t> current();  // (iterations done, total) of the latest report

// Installs the poll (nullptr: none); it returns true when the run must stop. The Python module
// installs one that runs pending signal handlers.
void set_interrupt_check(bool (*check)());

}  // namespace adaround::progress
