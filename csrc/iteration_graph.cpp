#include "iteration_graph.h"

#include <array>

namespace adaround {

namespace {
std::array<IterationGraphFactory, static_cast<size_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)>& factories() {
  static std::array<IterationGraphFactory, static_cast<size_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)> table{};
  return table;
}
}  // namespace

void register_iteration_graph(c10::DeviceType type, IterationGraphFactory factory) {
  factories()[static_cast<size_t>(type)] = factory;
}

std::unique_ptr<IterationGraph> make_iteration_graph(c10::Device device) {
  const IterationGraphFactory factory = factories()[static_cast<size_t>(device.type())];
  return factory != nullptr ? factory(device) : nullptr;
}

}  // namespace adaround
