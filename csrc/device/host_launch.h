// The host back end of the device kernels' launch helper: runs the element bodies of
// element_kernels.h on the CPU, block by block and thread by thread in the grid-stride order of
// grid_stride.h, as the CUDA back end (cuda/cuda_launch.cuh) runs them on the GPU. Tests use it to
// execute the CUDA kernels' code (element bodies, index arithmetic, reduction order, and the op
// glue in rounding_ops_impl.h / step_ops_impl.h) on a machine without a GPU.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

#include "grid_stride.h"

namespace adaround::device {

struct HostLaunch {
  // The device whose memory the kernels read: tensors handed to a launch must live there.
  static constexpr c10::DeviceType kDeviceType = c10::DeviceType::CPU;
  // Multiprocessors of the emulated device (an H200's, whole), which set the grid size and with it
  // the order of a reduction's additions; another GPU (or a MIG slice) adds in another order.
  static constexpr int64_t kMultiprocessors = 132;

  // Stands where the CUDA back end sets the current device: as CUDAGuard does for a non-CUDA
  // device, it refuses a device the back end does not run on.
  class Guard {
   public:
    explicit Guard(c10::Device device) {
      TORCH_INTERNAL_ASSERT(device.type() == kDeviceType, "host launch guard asked for device ", device);
    }
  };

  // Runs fn(i) for every i in [0, numel) as a grid of blocks_for(numel) blocks would.
  template <typename Fn>
  static void elementwise(int64_t numel, const Fn& fn) {
    if (numel == 0) return;
    const int64_t blocks = blocks_for(numel, kMultiprocessors);
    // Blocks are independent: any order, and several at a time, gives the result of the device.
    at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
      for (int64_t block = first; block < last; ++block) {
        for (int64_t thread = 0; thread < kThreadsPerBlock; ++thread) {
          for_each_grid_stride(numel, block, thread, blocks, fn);
        }
      }
    });
  }

  // sum over i in [0, numel) of term(i), added in the device's order, as a 0-dim float64 tensor.
  template <typename Term>
  static at::Tensor sum(int64_t numel, const Term& term, const at::TensorOptions& options) {
    const int64_t blocks = blocks_for(numel, kMultiprocessors);
    std::vector<double> block_sums(blocks);
    at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
      double sums[kThreadsPerBlock];
      for (int64_t block = first; block < last; ++block) {
        for (int64_t thread = 0; thread < kThreadsPerBlock; ++thread) {
          sums[thread] = thread_sum(term, numel, block, thread, blocks);
        }
        for (int64_t stride = kThreadsPerBlock / 2; stride > 0; stride /= 2) {
          for (int64_t thread = 0; thread < kThreadsPerBlock; ++thread) tree_level(sums, thread, stride);
        }
        block_sums[block] = sums[0];
      }
    });
    return at::scalar_tensor(sum_in_block_order(block_sums.data(), blocks), options.dtype(at::kDouble));
  }
};

}  // namespace adaround::device
