// optimize_layer's iteration graph on CUDA (interface in csrc/iteration_graph.h): one iteration
// captured in a CUDA graph and replayed; on small layers an iteration is a handful of short kernels,
// and launching them one by one costs more than running them.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <optional>

#include "../csrc/iteration_graph.h"

namespace adaround::cuda {
namespace {

class CudaIterationGraph final : public IterationGraph {
 public:
  // From here until destruction the calling thread's iterations run on a side stream of the current
  // device, after the work enqueued so far: a capture needs a stream other than the legacy default
  // one, and libraries that set up a workspace per stream on first use (cuBLAS, cuDNN) then do so in
  // the eager first iteration instead of inside the capture, where it would land in the graph's pool.
  explicit CudaIterationGraph(c10::DeviceIndex device)
      : caller_(at::cuda::getCurrentCUDAStream(device)), side_(at::cuda::getStreamFromPool(false, device)) {
    at::cuda::CUDAEvent enqueued;
    enqueued.record(caller_);
    enqueued.block(side_);
    on_side_.emplace(side_);
  }

  // The caller's stream goes on after the iterations; on_side_ then restores it as current.
  ~CudaIterationGraph() override {
    try {
      at::cuda::CUDAEvent done;
      done.record(side_);
      done.block(caller_);
    } catch (const c10::Error& e) {
      TORCH_WARN("optimize_layer: could not order the caller's stream after the iterations: ",
                 e.what_without_backtrace());
    }
  }

  bool capture(const std::function<void()>& iteration) override {
    graph_ = std::make_unique<at::cuda::CUDAGraph>(/*keep_graph=*/true);
    try {
      // Thread-local mode: another thread's CUDA calls neither break this capture nor get caught in it.
      graph_->capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
      try {
        iteration();
      } catch (...) {
        try {
          graph_->capture_end();  // leaves capture mode; throws because the capture was invalidated
        } catch (...) {
        }
        throw;
      }
      graph_->capture_end();
      // Work enqueued on another device or stream is not captured; an empty graph would make every
      // replay a silent no-op.
      size_t nodes = 0;
      C10_CUDA_CHECK(cudaGraphGetNodes(graph_->raw_cuda_graph(), nullptr, &nodes));
      TORCH_CHECK(nodes > 0, "the capture recorded no work on stream ", side_, " of ", side_.device());
      graph_->instantiate();
    } catch (const std::exception& e) {
      // Any failure (a CUDA error, a library's own exception, a Python one from a test) means eager.
      const auto* c10_error = dynamic_cast<const c10::Error*>(&e);
      return abandon(c10_error != nullptr ? c10_error->what_without_backtrace() : e.what());
    } catch (...) {
      return abandon("unknown exception");
    }
    return true;
  }

  void replay() override {
    TORCH_CHECK(graph_ != nullptr, "IterationGraph::replay before a successful capture");
    graph_->replay();
  }

 private:
  bool abandon(const char* reason) {
    (void)cudaGetLastError();  // the capture's error must not surface in a later, unrelated check
    graph_.reset();
    TORCH_WARN("optimize_layer: could not capture an iteration in a CUDA graph, running eagerly: ", reason);
    return false;
  }

  at::cuda::CUDAStream caller_;
  at::cuda::CUDAStream side_;
  std::optional<c10::cuda::CUDAStreamGuard> on_side_;
  std::unique_ptr<at::cuda::CUDAGraph> graph_;
};

const bool registered = [] {
  register_iteration_graph(c10::DeviceType::CUDA, [](c10::Device device) {
    return std::unique_ptr<IterationGraph>(
        new CudaIterationGraph(device.has_index() ? device.index() : c10::cuda::current_device()));
  });
  return true;
}();

}  // namespace
}  // namespace adaround::cuda
