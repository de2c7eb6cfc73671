// The backend settings optimize_layer runs under, restored when it returns.
#pragma once

#include <ATen/Context.h>

#include <array>

namespace adaround::loop {

// Sets cuDNN determinism and the float32 precision of cuBLAS matmuls and cuDNN convolutions (TF32
// or full IEEE) for the loop, and restores what the caller had on scope exit. Through the per-op
// precision API only: PyTorch refuses to read the legacy allow_tf32 flags once a program has set
// the per-op ones.
class BackendFlagsGuard {
 public:
  explicit BackendFlagsGuard(bool allow_tf32) : deterministic_(ctx().deterministicCuDNN()) {
    const auto precision = allow_tf32 ? at::Float32Precision::TF32 : at::Float32Precision::IEEE;
    for (size_t k = 0; k < kOps.size(); ++k) {
      saved_[k] = ctx().float32Precision(at::Float32Backend::CUDA, kOps[k]);
      ctx().setFloat32Precision(at::Float32Backend::CUDA, kOps[k], precision);
    }
    ctx().setDeterministicCuDNN(true);  // same seed + same device -> same result
  }
  ~BackendFlagsGuard() {
    ctx().setDeterministicCuDNN(deterministic_);
    for (size_t k = 0; k < kOps.size(); ++k) ctx().setFloat32Precision(at::Float32Backend::CUDA, kOps[k], saved_[k]);
  }

 private:
  static constexpr std::array<at::Float32Op, 2> kOps{at::Float32Op::MATMUL, at::Float32Op::CONV};
  static at::Context& ctx() { return at::globalContext(); }
  bool deterministic_;
  std::array<at::Float32Precision, 2> saved_{};
};

}  // namespace adaround::loop
