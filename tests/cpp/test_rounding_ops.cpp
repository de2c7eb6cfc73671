// The rounding ops from C++ against LibTorch formulas of the same math.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "rounding_ops.h"

namespace {

using adaround::ops::hard_quantize;
using adaround::ops::init_v;
using adaround::ops::round_regularizer;
using adaround::ops::round_regularizer_backward;
using adaround::ops::soft_quantize;
using adaround::ops::soft_quantize_backward;

torch::Tensor h_ref(const torch::Tensor& v) {
  return torch::clamp(torch::sigmoid(v) * 1.2 - 0.1, 0, 1);
}

torch::Tensor soft_ref(const torch::Tensor& w, const torch::Tensor& v, const torch::Tensor& s,
                       const torch::Tensor& z, int64_t n, int64_t p) {
  return s * (torch::clamp(torch::floor(w / s) + h_ref(v) + z, n, p) - z);
}

TEST(SoftQuantize, MatchesFormulaPerChannelAsymmetric) {
  torch::manual_seed(0);
  const auto w = torch::randn({6, 4, 3, 3});
  const auto s = torch::rand({6}) * 0.2 + 0.05;
  const auto z = torch::tensor({0.f, 3.f, 7.f, 8.f, 15.f, 1.f});
  const auto v = torch::randn({6, 4, 3, 3}) * 3;
  const auto out = soft_quantize(w, v, s, z, 0, 15, 0);
  const auto expected = soft_ref(w, v, s.view({6, 1, 1, 1}), z.view({6, 1, 1, 1}), 0, 15);
  EXPECT_TRUE(torch::allclose(out, expected, 1e-5, 1e-6));
}

TEST(SoftQuantize, GridClippingZeroesTheGradient) {
  // W/s = 9.5 on a [-8, 7] grid clips whatever h is; W/s = 2.5 stays inside.
  const auto w = torch::tensor({9.5f, 2.5f});
  const auto v = torch::zeros({2});
  const auto s = torch::tensor(1.0f);
  const auto out = soft_quantize(w, v, s, std::nullopt, -8, 7, std::nullopt);
  EXPECT_FLOAT_EQ(out[0].item<float>(), 7.0f);
  EXPECT_FLOAT_EQ(out[1].item<float>(), 2.5f);
  const auto grad = soft_quantize_backward(torch::ones({2}), w, v, s, std::nullopt, -8, 7, std::nullopt);
  EXPECT_EQ(grad[0].item<float>(), 0.0f);
  EXPECT_NEAR(grad[1].item<float>(), 1.2f * 0.25f, 1e-6);  // (zeta - gamma) * sigmoid'(0)
}

TEST(SoftQuantize, RectifiedSigmoidSaturates) {
  // |V| beyond log(11) puts h at exactly 0 or 1, with zero gradient.
  const auto w = torch::tensor({0.5f, 0.5f});
  const auto v = torch::tensor({-5.0f, 5.0f});
  const auto s = torch::tensor(1.0f);
  const auto out = soft_quantize(w, v, s, std::nullopt, -8, 7, std::nullopt);
  EXPECT_FLOAT_EQ(out[0].item<float>(), 0.0f);
  EXPECT_FLOAT_EQ(out[1].item<float>(), 1.0f);
  const auto grad = soft_quantize_backward(torch::ones({2}), w, v, s, std::nullopt, -8, 7, std::nullopt);
  EXPECT_TRUE(torch::equal(grad, torch::zeros({2})));
}

TEST(Regularizer, ValueAndGradientMatchAutograd) {
  torch::manual_seed(1);
  const auto v = (torch::randn({4099}) * 2).requires_grad_(true);  // not a multiple of the SIMD width
  for (double beta : {2.0, 5.5, 20.0}) {
    const auto expected = (1 - (2 * h_ref(v) - 1).abs().pow(beta)).sum();
    const auto grad_expected = torch::autograd::grad({expected}, {v})[0];
    const auto value = round_regularizer(v.detach(), beta);
    EXPECT_NEAR(value.item<double>(), expected.item<double>(), 1e-3) << "beta=" << beta;
    const auto grad = round_regularizer_backward(torch::tensor(1.0f), v.detach(), beta);
    EXPECT_TRUE(torch::allclose(grad, grad_expected, 1e-4, 1e-6)) << "beta=" << beta;
  }
}

TEST(HardQuantize, ModesMatchFormulas) {
  const auto w = torch::tensor({-9.3f, -1.5f, -0.2f, 0.5f, 1.5f, 2.7f, 7.6f});
  const auto s = torch::tensor(1.0f);
  auto codes_of = [&](const std::string& mode) {
    return std::get<0>(hard_quantize(w, s, std::nullopt, -8, 7, std::nullopt, mode)).to(torch::kFloat);
  };
  EXPECT_TRUE(torch::equal(codes_of("nearest"), torch::clamp(torch::round(w), -8, 7)));
  EXPECT_TRUE(torch::equal(codes_of("floor"), torch::clamp(torch::floor(w), -8, 7)));
  EXPECT_TRUE(torch::equal(codes_of("ceil"), torch::clamp(torch::ceil(w), -8, 7)));
  const auto [codes, deq] = hard_quantize(w * 0.1, s * 0.1, std::nullopt, -8, 7, std::nullopt, "nearest");
  EXPECT_EQ(codes.scalar_type(), torch::kChar);
  EXPECT_TRUE(torch::allclose(deq, codes.to(torch::kFloat) * 0.1));
}

TEST(HardQuantize, AdaptiveRoundsUpAtTheTie) {
  const auto w = torch::tensor({0.3f, 0.3f, 0.3f});
  const auto v = torch::tensor({-0.01f, 0.0f, 0.01f});  // h = just below, exactly, just above 0.5
  const auto codes = std::get<0>(hard_quantize(w, torch::tensor(1.0f), std::nullopt, -8, 7, std::nullopt,
                                               "adaptive", v));
  EXPECT_EQ(codes[0].item<int>(), 0);
  EXPECT_EQ(codes[1].item<int>(), 1);
  EXPECT_EQ(codes[2].item<int>(), 1);
}

TEST(HardQuantize, StochasticFrequencyFollowsTheFraction) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(11);
  const auto w = torch::full({40000}, 2.25f);
  const auto noise = at::rand({40000}, gen);
  const auto codes = std::get<0>(hard_quantize(w, torch::tensor(1.0f), std::nullopt, -8, 7, std::nullopt,
                                               "stochastic", std::nullopt, noise));
  EXPECT_NEAR(codes.to(torch::kDouble).mean().item<double>(), 2.25, 0.01);
}

TEST(HardQuantize, UnsignedGridUsesUint8Codes) {
  const auto w = torch::rand({100}) * 25.5;
  const auto [codes, deq] = hard_quantize(w, torch::tensor(0.1f), torch::tensor(0.0f), 0, 255, std::nullopt, "nearest");
  EXPECT_EQ(codes.scalar_type(), torch::kByte);
  EXPECT_TRUE(torch::allclose(deq, torch::clamp(torch::round(w / 0.1), 0, 255) * 0.1, 1e-5, 1e-5));
}

TEST(InitV, ReproducesTheFractionalPart) {
  torch::manual_seed(2);
  const auto w = torch::randn({5, 7});
  const auto s = torch::rand({5}) * 0.3 + 0.1;
  const auto v = init_v(w, s, 0);
  const auto x = w / s.view({5, 1});
  EXPECT_TRUE(torch::allclose(h_ref(v), x - torch::floor(x), 0, 1e-5));
}

TEST(BadInput, ErrorsNameTheArgument) {
  const auto w = torch::randn({4, 3});
  const auto v = torch::zeros({4, 3});
  auto message = [](auto&& fn) {
    try {
      fn();
    } catch (const c10::Error& e) {
      return std::string(e.what_without_backtrace());
    }
    return std::string("no error");
  };
  EXPECT_NE(message([&] { soft_quantize(w, v, torch::ones({3}), std::nullopt, -8, 7, 0); }).find("scale must have shape [4]"),
            std::string::npos);
  EXPECT_NE(message([&] { soft_quantize(w, v, torch::ones({4}), std::nullopt, 3, 3, 0); }).find("quant_min"),
            std::string::npos);
  EXPECT_NE(message([&] { soft_quantize(w, v, -torch::ones({4}), std::nullopt, -8, 7, 0); }).find("scale must be positive"),
            std::string::npos);
  EXPECT_NE(message([&] { soft_quantize(w.to(torch::kInt), v, torch::ones({4}), std::nullopt, -8, 7, 0); })
                .find("weight must be a floating-point"),
            std::string::npos);
  EXPECT_NE(message([&] { round_regularizer(v, std::nan("")); }).find("beta"), std::string::npos);
}

}  // namespace
