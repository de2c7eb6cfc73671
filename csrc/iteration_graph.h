// One optimize_layer iteration recorded once and replayed, for a device where launching an
// iteration's kernels one by one costs more than running them (a CUDA graph; cuda/iteration_graph.cu).
// Back ends register a factory for their device type; the loop asks for one by the weight's device.
#pragma once

#include <c10/core/Device.h>

#include <functional>
#include <memory>

namespace adaround {

class IterationGraph {
 public:
  virtual ~IterationGraph() = default;

  // Records `iteration` (the same work every time, no host synchronisation, everything that
  // changes read from device memory) without running it. Returns false, after a warning, when
  // the capture failed or recorded nothing; the caller then runs its iterations eagerly.
  virtual bool capture(const std::function<void()>& iteration) = 0;

  // Runs the recorded iteration once, after the work enqueued before it.
  virtual void replay() = 0;
};

using IterationGraphFactory = std::unique_ptr<IterationGraph> (*)(c10::Device);

// For back ends, at static initialisation.
void register_iteration_graph(c10::DeviceType type, IterationGraphFactory factory);

// A new graph for `device`, or nullptr where no back end records graphs. Creating it may switch the
// calling thread to the stream the iterations must run on (CUDA: a side stream of `device`, which
// captures need), until it is destroyed: create it before the first iteration and destroy it after
// the last.
std::unique_ptr<IterationGraph> make_iteration_graph(c10::Device device);

}  // namespace adaround
