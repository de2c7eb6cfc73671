#include "progress.h"

#include <atomic>

namespace adaround::progress {
namespace {
std::atomic<int64_t> g_done{0};
std::atomic<int64_t> g_total{0};
}  // namespace

void report(int64_t done, int64_t total) {
  g_total.store(total, std::memory_order_relaxed);
  g_done.store(done, std::memory_order_relaxed);
}

std::pair<int64_t, int64_t> current() {
  return {g_done.load(std::memory_order_relaxed), g_total.load(std::memory_order_relaxed)};
}

}  // namespace adaround::progress
