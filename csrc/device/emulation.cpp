#include "emulation.h"

#include <atomic>

template struct adaround::device::RoundingKernels<adaround::device::HostLaunch>;
template struct adaround::device::StepKernels<adaround::device::HostLaunch>;
template struct adaround::device::ActivationQuantKernels<adaround::device::HostLaunch>;

namespace adaround::emulation {

namespace {
std::atomic<bool> emulating{false};
}  // namespace

bool enabled() { return emulating.load(std::memory_order_relaxed); }
void set_enabled(bool on) { emulating.store(on, std::memory_order_relaxed); }

}  // namespace adaround::emulation
