// The CUDA back end of the device kernels' launch helper: the element bodies of
// csrc/device/element_kernels.h as grid-stride kernels on the current stream, and sums added in
// the order of csrc/device/grid_stride.h. csrc/device/host_launch.h is its host twin.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "../csrc/device/grid_stride.h"

namespace adaround::cuda {

template <typename Fn>
__global__ void elementwise_kernel(int64_t numel, Fn fn) {
  device::for_each_grid_stride(numel, blockIdx.x, threadIdx.x, gridDim.x, fn);
}

template <typename Term>
__global__ void block_sums_kernel(int64_t numel, Term term, double* block_sums) {
  __shared__ double sums[device::kThreadsPerBlock];
  sums[threadIdx.x] = device::thread_sum(term, numel, blockIdx.x, threadIdx.x, gridDim.x);
  for (int64_t stride = device::kThreadsPerBlock / 2; stride > 0; stride /= 2) {
    __syncthreads();
    device::tree_level(sums, threadIdx.x, stride);
  }
  if (threadIdx.x == 0) block_sums[blockIdx.x] = sums[0];
}

template <typename Sum>
__global__ void sum_blocks_kernel(const Sum* block_sums, int64_t blocks, Sum* total) {
  *total = device::sum_in_block_order(block_sums, blocks);
}

struct CudaLaunch {
  static constexpr c10::DeviceType kDeviceType = c10::DeviceType::CUDA;
  using Guard = c10::cuda::CUDAGuard;

  static int64_t blocks_for(int64_t numel) {
    return device::blocks_for(numel, at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  }

  template <typename Fn>
  static void elementwise(int64_t numel, const Fn& fn) {
    if (numel == 0) return;
    elementwise_kernel<<<blocks_for(numel), device::kThreadsPerBlock, 0, at::cuda::getCurrentCUDAStream()>>>(numel,
                                                                                                            fn);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // A 0-dim float64 tensor on the current device; no host synchronisation.
  template <typename Term>
  static at::Tensor sum(int64_t numel, const Term& term, const at::TensorOptions& options) {
    const int64_t blocks = blocks_for(numel);
    at::Tensor block_sums = at::empty({blocks}, options.dtype(at::kDouble));
    at::Tensor total = at::empty({}, options.dtype(at::kDouble));
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    block_sums_kernel<<<blocks, device::kThreadsPerBlock, 0, stream>>>(numel, term,
                                                                       block_sums.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sum_blocks_kernel<double><<<1, 1, 0, stream>>>(block_sums.const_data_ptr<double>(), blocks,
                                           total.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return total;
  }
};

}  // namespace adaround::cuda
