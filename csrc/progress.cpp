#include "progress.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <chrono>

namespace adaround::progress {
namespace {
std::atomic<int64_t> g_done{0};
std::atomic<int64_t> g_total{0};
std::atomic<bool (*)()> g_interrupt_check{nullptr};
}  // namespace

void report(int64_t done, int64_t total) {
  g_total.store(total, std::memory_order_relaxed);
  g_done.store(done, std::memory_order_relaxed);
  bool (*check)() = g_interrupt_check.load(std::memory_order_relaxed);
  if (check == nullptr) return;
  using Clock = std::chrono::steady_clock;
  thread_local Clock::time_point last_poll = Clock::now();
  const Clock::time_point now = Clock::now();
  if (std::chrono::duration<double>(now - last_poll).count() < kInterruptPollSeconds) return;
  last_poll = now;
  TORCH_CHECK(!check(), kInterruptedMessage, " after ", done, " of ", total, " iterations");
}

std::pair<int64_t, int64_t> current() {
  return {g_done.load(std::memory_order_relaxed), g_total.load(std::memory_order_relaxed)};
}

void set_interrupt_check(bool (*check)()) { g_interrupt_check.store(check, std::memory_order_relaxed); }

}  // namespace adaround::progress
