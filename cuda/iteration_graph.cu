#include "iteration_graph.h"

#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>

namespace adaround::cuda {

IterationGraph::IterationGraph() = default;
IterationGraph::~IterationGraph() = default;

bool IterationGraph::capture(const std::function<void()>& iteration) {
  // Capture needs a stream other than the legacy default one; it starts after the work enqueued so far.
  const at::cuda::CUDAStream current = at::cuda::getCurrentCUDAStream();
  const at::cuda::CUDAStream side = at::cuda::getStreamFromPool();
  at::cuda::CUDAEvent enqueued;
  enqueued.record(current);
  enqueued.block(side);
  graph_ = std::make_unique<at::cuda::CUDAGraph>();
  try {
    const c10::cuda::CUDAStreamGuard on_side(side);
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
  } catch (const c10::Error& e) {
    (void)cudaGetLastError();  // the capture's error must not surface in a later, unrelated check
    graph_.reset();
    TORCH_WARN("optimize_layer: could not capture an iteration in a CUDA graph, running eagerly: ",
               e.what_without_backtrace());
    return false;
  }
  // Replays go on the current stream, after whatever it holds; the side stream ran nothing.
  return true;
}

void IterationGraph::replay() {
  TORCH_CHECK(graph_ != nullptr, "IterationGraph::replay before a successful capture");
  graph_->replay();
}

}  // namespace adaround::cuda
