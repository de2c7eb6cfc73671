// The host emulation's iteration graph: capture keeps the iteration and runs nothing; a replay runs
// it. Where the iteration reads everything that changes from memory, as the loop guarantees for a
// CUDA graph, a replay does what a CUDA graph's replay does. Only used while emulation is on.
#include <c10/util/Exception.h>

#include "../iteration_graph.h"
#include "emulation.h"

namespace adaround::emulation {
namespace {

class HostIterationGraph final : public IterationGraph {
 public:
  bool capture(const std::function<void()>& iteration) override {
    iteration_ = iteration;
    return true;
  }
  void replay() override {
    TORCH_CHECK(iteration_ != nullptr, "IterationGraph::replay before a successful capture");
    iteration_();
  }

 private:
  std::function<void()> iteration_;
};

const bool registered = [] {
  register_iteration_graph(c10::DeviceType::CPU, [](c10::Device) {
    return enabled() ? std::unique_ptr<IterationGraph>(new HostIterationGraph) : nullptr;
  });
  return true;
}();

}  // namespace
}  // namespace adaround::emulation
