// Host emulation of the CUDA back end: the device kernels' op implementations
// (rounding_ops_impl.h, step_ops_impl.h, activation_ops_impl.h) instantiated with HostLaunch. While
// emulation is on, the CPU registrations of the adaround ops route to these, and optimize_layer runs its iterations in
// the form it takes on a GPU (no CPU-only execution paths, the schedule read from memory, captured
// iterations replayed), so the code a GPU would run is exercised on a machine without one.
#pragma once

#include "activation_ops_impl.h"
#include "host_launch.h"
#include "rounding_ops_impl.h"
#include "step_ops_impl.h"

namespace adaround::emulation {

// Process-wide switch; off by default.
bool enabled();
void set_enabled(bool on);

using Rounding = device::RoundingKernels<device::HostLaunch>;
using Step = device::StepKernels<device::HostLaunch>;
using ActivationQuant = device::ActivationQuantKernels<device::HostLaunch>;

// Registers `kCpu` for the CPU and routes to `kEmulated` while emulation is on.
template <auto kCpu, auto kEmulated>
struct Route;
template <typename R, typename... Args, R (*kCpu)(Args...), R (*kEmulated)(Args...)>
struct Route<kCpu, kEmulated> {
  static R call(Args... args) { return enabled() ? kEmulated(args...) : kCpu(args...); }
};

}  // namespace adaround::emulation

// Compiled once, in emulation.cpp.
extern template struct adaround::device::RoundingKernels<adaround::device::HostLaunch>;
extern template struct adaround::device::StepKernels<adaround::device::HostLaunch>;
extern template struct adaround::device::ActivationQuantKernels<adaround::device::HostLaunch>;
