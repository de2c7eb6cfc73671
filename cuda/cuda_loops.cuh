// CUDA building blocks: a grid-stride element-wise launch on the current stream.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

namespace adaround::cuda {

constexpr int kThreads = 256;

inline int blocks_for(int64_t numel) {
  const int64_t wanted = (numel + kThreads - 1) / kThreads;
  const int64_t cap = int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 8;
  return static_cast<int>(std::max<int64_t>(1, std::min(wanted, cap)));
}

template <typename Fn>
__global__ void elementwise_kernel(int64_t numel, Fn fn) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < numel;
       i += int64_t(blockDim.x) * gridDim.x) {
    fn(i);
  }
}

// Runs fn(i) for every i in [0, numel) on the current stream.
template <typename Fn>
void launch_elementwise(int64_t numel, Fn fn) {
  if (numel == 0) return;
  elementwise_kernel<<<blocks_for(numel), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(numel, fn);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace adaround::cuda
