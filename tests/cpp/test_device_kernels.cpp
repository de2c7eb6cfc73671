// The device kernels' shared implementation (csrc/device/) on its host launch back end: argument
// checks before the device guard, arguments from another device, no value reads where they cost a
// host sync, and the in-memory schedule of a GPU loop against the host's.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>

#include "device/emulation.h"
#include "grid.h"
#include "schedule.h"

namespace {

using adaround::emulation::Rounding;
using adaround::emulation::Step;

// Runs fn, which must throw a c10::Error whose message contains `expected`.
template <typename Fn>
void expect_error_naming(Fn fn, const std::string& expected) {
  try {
    fn();
  } catch (const c10::Error& e) {
    const std::string message = e.what_without_backtrace();
    EXPECT_NE(message.find(expected), std::string::npos) << message;
    EXPECT_EQ(message.find("INTERNAL ASSERT"), std::string::npos) << message;
    return;
  }
  ADD_FAILURE() << "no error; expected one containing '" << expected << "'";
}

// An argument on another device than the weight gets the check's message, not the device guard's
// internal assert (on CUDA: a CPU weight with a CUDA v).
TEST(DeviceKernels, ChecksComeBeforeTheDeviceGuard) {
  const auto meta = torch::TensorOptions().device(torch::kMeta);
  const torch::Tensor w_meta = torch::randn({4, 3}, meta), v = torch::zeros({4, 3}), scale = torch::ones({4});
  expect_error_naming([&] { Rounding::soft_quantize(w_meta, v, scale, std::nullopt, -8, 7, 0); },
                      "scale is on cpu but weight is on meta");
  expect_error_naming([&] { Rounding::soft_quantize(torch::randn({4, 3}), v.to(torch::kMeta), scale, std::nullopt,
                                                    -8, 7, 0); },
                      "v is on meta but weight is on cpu");
  expect_error_naming([&] { Rounding::soft_quantize_backward(torch::zeros({4, 3}), w_meta, v, scale, std::nullopt,
                                                             -8, 7, 0); },
                      "scale is on cpu but weight is on meta");
  expect_error_naming([&] { Rounding::hard_quantize(w_meta, scale, std::nullopt, -8, 7, 0, "nearest", std::nullopt,
                                                    std::nullopt); },
                      "scale is on cpu but weight is on meta");
  expect_error_naming([&] { Rounding::init_v(w_meta, scale, 0); }, "scale is on cpu but weight is on meta");
  expect_error_naming([&] { Step::reconstruction_grad(w_meta, v, "relu", 1.0); },
                      "target is on cpu but pre_activation is on meta");
  torch::Tensor v_meta = torch::zeros({4, 3}, meta), m = torch::zeros({4, 3}), m2 = torch::zeros({4, 3}),
                soft = torch::zeros({4, 3});
  expect_error_naming([&] { Step::adam_rounding_step_(v_meta, m, m2, soft, v, v, scale, scale, -8, 7, 0, 0.0, 2.0,
                                                      1e-3, 0.9, 0.999, 1e-8, 1); },
                      "exp_avg is on cpu but v is on meta");
}

// A kernel reads grad_output through a device pointer: one from another device is moved (a CPU
// scalar) or named, never dereferenced where it is not.
TEST(DeviceKernels, RegularizerBackwardTakesGradOutputFromAnotherDevice) {
  const torch::Tensor v = torch::randn({300}) * 3;
  const torch::Tensor on_meta = torch::ones({}, torch::TensorOptions().device(torch::kMeta));
  expect_error_naming([&] { Rounding::round_regularizer_backward(on_meta, v, 2.0); },
                      "grad_output is on meta but v is on cpu");
  const torch::Tensor expected = Rounding::round_regularizer_backward(torch::full({}, 0.5), v, 2.0);
  const torch::Tensor from_double = Rounding::round_regularizer_backward(torch::full({1}, 0.5, torch::kDouble), v, 2.0);
  EXPECT_TRUE(torch::equal(expected, from_double));
}

// Grid values (positive scale, integral zero point) are checked where reading them is free (CPU
// memory) and not read elsewhere: on a GPU each read is a host sync, which would stall every op call
// and make the ops impossible to capture in a CUDA graph.
TEST(DeviceKernels, GridValuesAreReadOnlyWhereThatIsFree) {
  const auto meta = torch::TensorOptions().device(torch::kMeta);
  EXPECT_NO_THROW(adaround::make_grid(torch::randn({4, 3}, meta), torch::ones({4}, meta), torch::zeros({4}, meta),
                                      -8, 7, 0));
  expect_error_naming([] { adaround::make_grid(torch::randn({4, 3}), torch::zeros({4}), std::nullopt, -8, 7, 0); },
                      "scale must be positive and finite");
  expect_error_naming(
      [] { adaround::make_grid(torch::randn({4, 3}), torch::ones({4}), torch::full({4}, 0.5), -8, 7, 0); },
      "zero_point must hold integers");
}

// The loop of a GPU reads each iteration's reg_lambda, beta and bias corrections from memory
// (DeviceSchedule) and steps with adam_rounding_step_scheduled_; over a whole run with a warm start
// and the beta decay, that must be the host-scheduled step bit for bit, in both compute types. Its
// rows must be the CPU loop's: one draw of `batch` per iteration from the seeded CPU generator.
template <typename T>
void scheduled_run_matches_host_run() {
  adaround::OptimizeOptions opt;
  opt.iterations = 150;
  opt.batch_size = 5;
  opt.lr = 2e-2;
  opt.reg_lambda = 0.05;
  opt.warm_start = 0.2;
  const auto dtype = c10::CppTypeToScalarType<T>::value;
  torch::manual_seed(3);
  const torch::Tensor w = torch::randn({6, 40}, dtype) * 0.3;
  const torch::Tensor scale = std::get<0>(w.abs().max(1)) / 7.4, zp = torch::zeros({6}, dtype);
  const torch::Tensor base = torch::floor(w / scale.unsqueeze(1));
  torch::Tensor v0 = Rounding::init_v(w, scale, 0);
  torch::Tensor soft0 = Rounding::soft_quantize(w, v0, scale, zp, -8, 7, 0);
  std::vector<torch::Tensor> scheduled{v0.clone(), torch::zeros_like(v0), torch::zeros_like(v0), soft0.clone()};
  std::vector<torch::Tensor> host{v0.clone(), torch::zeros_like(v0), torch::zeros_like(v0), soft0.clone()};

  adaround::DeviceSchedule schedule(opt, /*samples=*/37, torch::kCPU);
  at::Generator gen = at::detail::createCPUGenerator(11), gen_host = at::detail::createCPUGenerator(11);
  for (int64_t t = 0; t < opt.iterations; ++t) {
    schedule.draw_rows(t, gen);
    ASSERT_TRUE(torch::equal(schedule.rows(), at::randint(37, {opt.batch_size}, gen_host, at::dtype(at::kLong))));
    const torch::Tensor grad = torch::randn({6, 40}, dtype) * 0.1;
    Step::adam_rounding_step_scheduled_(scheduled[0], scheduled[1], scheduled[2], scheduled[3], grad, base, scale, zp,
                                        -8, 7, 0, schedule.scalars(), opt.lr, adaround::kAdamBeta1,
                                        adaround::kAdamBeta2, adaround::kAdamEps);
    schedule.advance();
    Step::adam_rounding_step_(host[0], host[1], host[2], host[3], grad, base, scale, zp, -8, 7, 0,
                              adaround::lambda_at(opt, t), adaround::beta_at(opt, t), opt.lr, adaround::kAdamBeta1,
                              adaround::kAdamBeta2, adaround::kAdamEps, t + 1);
    for (size_t k = 0; k < host.size(); ++k) {
      ASSERT_TRUE(torch::equal(scheduled[k], host[k])) << "t=" << t << " k=" << k;
    }
  }
  // The run decided some weights and crossed the warm start: the comparison covered both.
  EXPECT_TRUE((host[0].abs() >= adaround::kSaturatedV).any().item<bool>());
}

TEST(DeviceSchedule, ScheduledRunIsTheHostRunBitForBitFloat) { scheduled_run_matches_host_run<float>(); }
TEST(DeviceSchedule, ScheduledRunIsTheHostRunBitForBitDouble) { scheduled_run_matches_host_run<double>(); }

}  // namespace
