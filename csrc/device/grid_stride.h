// How a device kernel walks its elements, written once for the CUDA launch back end
// (cuda/cuda_launch.cuh) and its host emulation (host_launch.h): which elements each thread of
// each block visits, and the order in which a sum over them is added up. Both back ends run the
// same order, so an emulated reduction adds its terms in the sequence the device does for the same
// grid size. The terms themselves may differ in their last bits: the device's exp/log/pow and its
// fused multiply-adds are not the host's.
#pragma once

#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>

namespace adaround::device {

constexpr int64_t kThreadsPerBlock = 256;
// Blocks resident per multiprocessor that a launch asks for at most (grid-stride beyond that).
constexpr int64_t kBlocksPerMultiprocessor = 8;

// Blocks of a launch over `numel` elements on a device with `multiprocessors` multiprocessors.
inline int64_t blocks_for(int64_t numel, int64_t multiprocessors) {
  const int64_t wanted = (numel + kThreadsPerBlock - 1) / kThreadsPerBlock;
  return std::max<int64_t>(1, std::min(wanted, multiprocessors * kBlocksPerMultiprocessor));
}

// Calls fn(i) for the elements of thread `thread` in block `block` of a grid of `blocks` blocks:
// block * kThreadsPerBlock + thread, then every kThreadsPerBlock * blocks elements.
template <typename Fn>
C10_HOST_DEVICE inline void for_each_grid_stride(int64_t numel, int64_t block, int64_t thread, int64_t blocks,
                                                 const Fn& fn) {
  for (int64_t i = block * kThreadsPerBlock + thread; i < numel; i += kThreadsPerBlock * blocks) fn(i);
}

// One thread's share of a sum: its grid-stride elements' terms, added in order, in double.
template <typename Term>
C10_HOST_DEVICE inline double thread_sum(const Term& term, int64_t numel, int64_t block, int64_t thread,
                                         int64_t blocks) {
  double sum = 0.0;
  for_each_grid_stride(numel, block, thread, blocks, [&](int64_t i) { sum += term(i); });
  return sum;
}

// A block adds its threads' sums as a tree: for stride = kThreadsPerBlock / 2, ..., 1 (each level
// after all threads finished the previous one), thread t < stride adds sums[t + stride] into sums[t].
// sums[0] then holds the block's sum.
C10_HOST_DEVICE inline void tree_level(double* sums, int64_t thread, int64_t stride) {
  if (thread < stride) sums[thread] += sums[thread + stride];
}

// The blocks' sums, added in block order by one thread.
C10_HOST_DEVICE inline double sum_in_block_order(const double* block_sums, int64_t blocks) {
  double total = 0.0;
  for (int64_t b = 0; b < blocks; ++b) total += block_sums[b];
  return total;
}

}  // namespace adaround::device
