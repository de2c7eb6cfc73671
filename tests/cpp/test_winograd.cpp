// The Winograd F(2x2, 3x3) and F(4x4, 3x3) pieces of optimize_layer's CPU loop against ATen's direct
// convolution and its weight gradient.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "cpu/winograd.h"

namespace {

using adaround::cpu::winograd_outputs;
using adaround::cpu::winograd_points;

struct Shape {
  int64_t height, width, pad_h, pad_w, tile;
};

class WinogradMatchesConvolution : public ::testing::TestWithParam<Shape> {};

TEST_P(WinogradMatchesConvolution, ForwardAndWeightGradient) {
  const Shape s = GetParam();
  torch::manual_seed(0);
  const auto f64 = torch::dtype(torch::kFloat64);
  const torch::Tensor x = torch::randn({3, 5, s.height, s.width}, f64);
  const torch::Tensor w = torch::randn({3, 5, 3, 3}, f64);
  const torch::Tensor b = torch::randn({3}, f64);
  const std::vector<int64_t> padding{s.pad_h, s.pad_w};
  const torch::Tensor conv = at::conv2d(x, w, b, {1, 1}, padding);
  const torch::Tensor grad_out = torch::randn(conv.sizes(), f64);

  // The targets' slot of the cache puts any output-shaped tensor in tile layout.
  const auto cache = adaround::cpu::winograd_cache(x, grad_out, padding, s.tile);
  EXPECT_EQ(cache.tile, s.tile);
  const int64_t rows = x.size(0) * cache.tiles;
  const torch::Tensor tiles = cache.inputs.view({winograd_points(s.tile), rows, x.size(1)});
  const torch::Tensor pre = adaround::cpu::winograd_forward(tiles, adaround::cpu::winograd_weights(w, s.tile), b);
  const torch::Tensor untiled = adaround::cpu::winograd_untile(
      pre.view({winograd_outputs(s.tile), x.size(0), cache.tiles, -1}), conv.size(2), conv.size(3));
  EXPECT_TRUE(torch::allclose(untiled, conv, 1e-12, 1e-12));
  EXPECT_TRUE(torch::equal(adaround::cpu::winograd_untile(cache.targets, conv.size(2), conv.size(3)), grad_out));

  const torch::Tensor grad_w =
      adaround::cpu::winograd_weight_grad(cache.targets.view({winograd_outputs(s.tile), rows, -1}), tiles);
  const torch::Tensor expected = std::get<1>(at::convolution_backward(grad_out, x, w, std::nullopt, {1, 1}, padding,
                                                                      {1, 1}, false, {0, 0}, 1, {false, true, false}));
  EXPECT_TRUE(torch::allclose(grad_w, expected, 1e-12, 1e-12));

  // The input tiles do not depend on the input's memory format.
  EXPECT_TRUE(torch::equal(adaround::cpu::winograd_input_tiles(x.contiguous(at::MemoryFormat::ChannelsLast), padding,
                                                               s.tile),
                           cache.inputs));
}

// Square and not, with and without padding, one tile and many, both tile sides. 3 x 5 channels leave
// SIMD tails.
INSTANTIATE_TEST_SUITE_P(Shapes, WinogradMatchesConvolution,
                         ::testing::Values(Shape{8, 8, 1, 1, 2}, Shape{6, 10, 1, 0, 2}, Shape{4, 6, 0, 0, 2},
                                           Shape{2, 2, 1, 1, 2}, Shape{6, 8, 0, 1, 2}, Shape{8, 8, 1, 1, 4},
                                           Shape{4, 4, 1, 1, 4}, Shape{10, 4, 0, 1, 4}, Shape{6, 10, 0, 0, 4}));

TEST(Winograd, WeightTransformRoundTripsThroughItsTranspose) {
  // <G g G^T, u> == <g, G^T u G>: winograd_weights_grad is the adjoint of winograd_weights.
  torch::manual_seed(1);
  const torch::Tensor g = torch::randn({6, 3, 3, 3}, torch::kFloat64);
  for (const int64_t tile : {2, 4}) {
    const torch::Tensor u = torch::randn({winograd_points(tile), 3, 6}, torch::kFloat64);  // [P, C, O]
    const double lhs = (adaround::cpu::winograd_weights(g, tile) * u).sum().item<double>();
    const double rhs = (g * adaround::cpu::winograd_weights_grad(u)).sum().item<double>();
    EXPECT_NEAR(lhs, rhs, 1e-10 * std::abs(lhs)) << "tile " << tile;
  }
}

TEST(Winograd, GatherSamplesIsIndexSelectOnTheSampleDim) {
  const torch::Tensor cache = torch::randn({5, 9, 3, 4});
  const torch::Tensor rows = torch::tensor({8, 0, 3, 3}, torch::kLong);
  EXPECT_TRUE(torch::equal(adaround::cpu::gather_samples(cache, rows), cache.index_select(1, rows)));
  EXPECT_THROW(adaround::cpu::gather_samples(cache, torch::tensor({9}, torch::kLong)), c10::Error);
}

TEST(Winograd, CacheRejectsOddOrMismatchedOutputs) {
  const torch::Tensor x = torch::randn({2, 3, 5, 5});
  EXPECT_THROW(adaround::cpu::winograd_cache(x, torch::randn({2, 4, 5, 5}), {1, 1}), c10::Error);  // odd
  EXPECT_THROW(adaround::cpu::winograd_cache(x, torch::randn({2, 4, 4, 4}), {1, 1}), c10::Error);  // not the output
  const torch::Tensor x6 = torch::randn({2, 3, 6, 6});
  EXPECT_THROW(adaround::cpu::winograd_cache(x6, torch::randn({2, 4, 6, 6}), {1, 1}, 4), c10::Error);  // 6 % 4
  EXPECT_THROW(adaround::cpu::winograd_cache(x6, torch::randn({2, 4, 6, 6}), {1, 1}, 3), c10::Error);  // no F(3x3)
  EXPECT_THROW(adaround::cpu::winograd_weights_grad(torch::randn({25, 3, 4})), c10::Error);
}

}  // namespace
