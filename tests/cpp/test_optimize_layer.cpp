// optimize_layer called as a plain C++ function.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "optimize_layer.h"
#include "rounding_math.h"
#include "rounding_ops.h"

namespace {

struct ConvCase {
  torch::Tensor weight, bias, inputs, targets, scale;
};

ConvCase make_case() {
  torch::manual_seed(0);
  ConvCase c;
  c.weight = torch::randn({8, 4, 3, 3}) * 0.3;
  c.bias = torch::randn({8}) * 0.1;
  c.inputs = torch::randn({128, 4, 6, 6}) * 0.3;
  c.targets = torch::relu(torch::conv2d(c.inputs, c.weight, c.bias, 1, 1));
  c.scale = std::get<0>(c.weight.abs().flatten(1).max(1)) / 3;
  return c;
}

// The case as a 3-bit per-channel 3x3 conv (stride 1, padding 1).
adaround::OptimizeResult run_case(const ConvCase& c, const adaround::OptimizeOptions& opt) {
  return adaround::optimize_layer(c.weight, c.bias, adaround::LayerGrid{c.scale, std::nullopt, -4, 3, 0}, c.inputs,
                                  c.targets, adaround::LayerGeometry{{1}, {1}, {1}, 1}, opt);
}

// Long enough at lr 1e-2 for every h(V) of make_case() to decide.
adaround::OptimizeOptions full_schedule() {
  adaround::OptimizeOptions opt;
  opt.iterations = 1500;
  opt.lr = 1e-2;
  opt.activation = "relu";
  return opt;
}

TEST(OptimizeLayer, LearnsBetterThanNearestAndDecides) {
  const auto c = make_case();
  const auto r = run_case(c, full_schedule());
  EXPECT_LT(r.adaround_error, r.nearest_error);
  EXPECT_LT(r.undecided_fraction, 0.01);
  EXPECT_FALSE(r.exact_mode);
  EXPECT_EQ(r.loss_curve.size(0), 100);
  // The returned weights are the dequantized codes.
  EXPECT_TRUE(torch::allclose(r.quantized_weight, r.codes.to(torch::kFloat) * c.scale.view({8, 1, 1, 1})));
  EXPECT_GE(r.codes.min().item<int>(), -4);
  EXPECT_LE(r.codes.max().item<int>(), 3);
}

// Packing frozen weights out of the step (CPU) must not change any rounding or any other weight's
// trajectory: in float32 the packed step does the same vector arithmetic per element, so the two runs
// agree bit for bit except in the V that were frozen.
TEST(OptimizeLayer, PackingFrozenWeightsChangesNoRounding) {
  const auto c = make_case();
  adaround::OptimizeOptions opt = full_schedule();
  const auto packed = run_case(c, opt);
  opt.pack_frozen = false;
  const auto full = run_case(c, opt);
  EXPECT_TRUE(torch::equal(packed.codes, full.codes));
  EXPECT_TRUE(torch::allclose(packed.loss_curve, full.loss_curve, 1e-5, 1e-7));
  const auto frozen = packed.v.abs() >= adaround::kSaturatedV;
  EXPECT_TRUE(torch::equal(packed.v.masked_select(frozen.logical_not()), full.v.masked_select(frozen.logical_not())));
  EXPECT_TRUE(torch::equal(packed.v.sign(), full.v.sign()));
  EXPECT_TRUE((full.v.abs() >= packed.v.abs()).all().item<bool>());
  EXPECT_TRUE((full.v.abs() > packed.v.abs()).any().item<bool>());  // some V were packed out
}

TEST(OptimizeLayer, SameSeedSameResult) {
  const auto c = make_case();
  adaround::OptimizeOptions opt;
  opt.iterations = 40;
  opt.activation = "relu";
  const auto a = run_case(c, opt);
  const auto b = run_case(c, opt);
  EXPECT_TRUE(torch::equal(a.v, b.v));
}

TEST(OptimizeLayer, ReportsProgressEveryIteration) {
  const auto c = make_case();
  adaround::OptimizeOptions opt;
  opt.iterations = 25;
  std::vector<std::pair<int64_t, int64_t>> calls;
  opt.on_progress = [&calls](int64_t done, int64_t total) { calls.emplace_back(done, total); };
  run_case(c, opt);
  ASSERT_EQ(calls.size(), 26u);
  for (int64_t i = 0; i <= 25; ++i) EXPECT_EQ(calls[i], std::make_pair(i, int64_t(25)));
}

TEST(OptimizeLayer, BetaScheduleEndpoints) {
  adaround::OptimizeOptions opt;
  opt.iterations = 1000;
  EXPECT_DOUBLE_EQ(adaround::beta_at(opt, 0), 20.0);
  EXPECT_DOUBLE_EQ(adaround::beta_at(opt, 200), 20.0);
  EXPECT_NEAR(adaround::beta_at(opt, 600), 11.0, 1e-9);  // cosine midpoint
  EXPECT_DOUBLE_EQ(adaround::beta_at(opt, 1000), 2.0);
  opt.schedule = "linear";
  EXPECT_NEAR(adaround::beta_at(opt, 400), 15.5, 1e-9);
}

// A strided ConvTranspose2d (weight [in, out, kh, kw]) with its per-channel grid on the output
// channels, axis 1: learned with the axes swapped so that frozen weights can be packed out.
TEST(OptimizeLayer, TransposedConvolutionLearnsAndPacks) {
  torch::manual_seed(1);
  const auto weight = torch::randn({6, 4, 3, 3}) * 0.3;
  const auto inputs = torch::randn({96, 6, 5, 5}) * 0.5;
  const auto targets = torch::relu(torch::conv_transpose2d(inputs, weight, {}, 2, 1, 1));
  const auto scale = std::get<0>(weight.abs().transpose(0, 1).flatten(1).max(1)) / 3;
  const adaround::LayerGeometry up{{2}, {1}, {1}, 1, /*transposed=*/true, /*output_padding=*/{1}};
  adaround::OptimizeOptions opt = full_schedule();
  auto run = [&](bool pack) {
    opt.pack_frozen = pack;
    return adaround::optimize_layer(weight, std::nullopt, adaround::LayerGrid{scale, std::nullopt, -4, 3, 1}, inputs,
                                    targets, up, opt);
  };
  const auto packed = run(true);
  const auto full = run(false);
  EXPECT_LT(packed.adaround_error, packed.nearest_error);
  EXPECT_LT(packed.undecided_fraction, 0.01);
  EXPECT_TRUE(torch::equal(packed.codes, full.codes));
  EXPECT_TRUE((full.v.abs() > packed.v.abs()).any().item<bool>());  // some V were packed out
  EXPECT_TRUE(torch::allclose(packed.quantized_weight, packed.codes.to(torch::kFloat) * scale.view({1, 4, 1, 1})));
  opt.mode = "exact";
  opt.activation = "none";
  EXPECT_THROW(run(true), c10::Error);  // no Gram form for a transposed convolution
}

TEST(OptimizeLayer, RejectsBadInput) {
  const auto c = make_case();
  const adaround::LayerGrid grid{c.scale, std::nullopt, -4, 3, 0};
  const adaround::LayerGeometry conv{{1}, {1}, {1}, 1};
  auto error_of = [&](const torch::Tensor& inputs, const torch::Tensor& targets, adaround::OptimizeOptions opt) {
    try {
      adaround::optimize_layer(c.weight, c.bias, grid, inputs, targets, conv, opt);
    } catch (const c10::Error& e) {
      return std::string(e.what_without_backtrace());
    }
    return std::string("no error");
  };
  adaround::OptimizeOptions opt;
  opt.iterations = 2;
  auto nan_inputs = c.inputs.clone();
  nan_inputs[3][1][2][2] = std::nanf("");
  EXPECT_NE(error_of(nan_inputs, c.targets, opt).find("inputs contains NaN or Inf"), std::string::npos);
  EXPECT_NE(error_of(c.inputs, c.targets.narrow(0, 0, 10), opt).find("targets hold 10"), std::string::npos);
  EXPECT_NE(error_of(c.inputs, c.targets.narrow(2, 0, 5), opt).find("targets must have shape"), std::string::npos);
  auto zero_iterations = opt;
  zero_iterations.iterations = 0;
  EXPECT_NE(error_of(c.inputs, c.targets, zero_iterations).find("iterations must be > 0"), std::string::npos);
  auto big_batch = opt;
  big_batch.batch_size = 129;
  big_batch.mode = "minibatch";
  EXPECT_NE(error_of(c.inputs, c.targets, big_batch).find("batch_size (129) is larger"), std::string::npos);
}

}  // namespace
