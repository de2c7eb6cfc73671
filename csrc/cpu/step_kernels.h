// The CPU step on a packed subset of a layer's weights, for optimize_layer's active set
// (csrc/active_weights.h). The op form, adam_rounding_step_, is registered in step_kernels.cpp.
#pragma once

#include <ATen/ATen.h>

#include "../grid.h"

namespace adaround::cpu {

// Packed element i is element index[i] of the full (contiguous) weight-shaped tensors; channel c of
// the grid owns packed elements [offsets[c], offsets[c + 1]). Both int64, index ascending.
struct PackedLayout {
  at::Tensor index;    // [active]
  at::Tensor offsets;  // [channels + 1]
};

// adam_rounding_step_ on packed V, Adam moments and grid base (1-D, contiguous), reading dL/dW~
// from and writing W~ into the full tensors through layout.index. Per element the arithmetic is
// exactly that of adam_rounding_step_, wherever the element sits in its SIMD vector.
void adam_rounding_step_packed_(at::Tensor& v, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                                const at::Tensor& grid_base, at::Tensor& soft_weight,
                                const at::Tensor& grad_soft_weight, const PackedLayout& layout,
                                const QuantGrid& grid, double reg_lambda, double beta, const AdamStep& adam);

}  // namespace adaround::cpu
