// One optimize_layer iteration captured in a CUDA graph and replayed: on small layers an iteration
// is a handful of short kernels, and launching them one by one costs more than running them.
#pragma once

#include <functional>
#include <memory>

namespace at::cuda {
struct CUDAGraph;
}

namespace adaround::cuda {

class IterationGraph {
 public:
  IterationGraph();
  ~IterationGraph();

  // Records `iteration` (the same kernels every time, no host synchronisation, everything that
  // changes read from device memory) without running it. Returns false, after a warning, when the
  // capture failed; nothing is recorded then and the caller runs its iterations eagerly.
  bool capture(const std::function<void()>& iteration);

  // Runs the recorded iteration once on the current stream.
  void replay();

 private:
  std::unique_ptr<at::cuda::CUDAGraph> graph_;
};

}  // namespace adaround::cuda
