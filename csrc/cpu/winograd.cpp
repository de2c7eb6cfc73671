// Winograd F(2x2, 3x3) and F(4x4, 3x3) for optimize_layer's CPU loop (see winograd.h).
#include "winograd.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdlib>
#include <algorithm>
#include <cstring>
#include <type_traits>

namespace adaround::cpu {
namespace {

using at::Tensor;

// The 1-D maps of F(m, 3), applied along both axes of a tile. Input: B^T d; kernel: G g and its
// transpose; output: A^T m and its transpose. Maps<m> holds them for one tile side.
template <int kTile>
struct Maps;

template <>
struct Maps<2> {
  struct Input {
    template <typename T>
    void operator()(const T* d, T* out) const {
      out[0] = d[0] - d[2];
      out[1] = d[1] + d[2];
      out[2] = d[2] - d[1];
      out[3] = d[1] - d[3];
    }
  };
  struct Kernel {
    template <typename T>
    void operator()(const T* g, T* out) const {
      out[0] = g[0];
      out[1] = T(0.5) * (g[0] + g[1] + g[2]);
      out[2] = T(0.5) * (g[0] - g[1] + g[2]);
      out[3] = g[2];
    }
  };
  struct KernelTransposed {
    template <typename T>
    void operator()(const T* u, T* out) const {
      out[0] = u[0] + T(0.5) * (u[1] + u[2]);
      out[1] = T(0.5) * (u[1] - u[2]);
      out[2] = T(0.5) * (u[1] + u[2]) + u[3];
    }
  };
  struct Output {
    template <typename T>
    void operator()(const T* m, T* out) const {
      out[0] = m[0] + m[1] + m[2];
      out[1] = m[1] - m[2] - m[3];
    }
  };
  struct OutputTransposed {
    template <typename T>
    void operator()(const T* y, T* out) const {
      out[0] = y[0];
      out[1] = y[0] + y[1];
      out[2] = y[0] - y[1];
      out[3] = T(0) - y[1];
    }
  };
};

// Interpolation points 0, 1, -1, 2, -2 and infinity.
template <>
struct Maps<4> {
  struct Input {
    template <typename T>
    void operator()(const T* d, T* out) const {
      out[0] = T(4) * d[0] - T(5) * d[2] + d[4];
      out[1] = d[3] + d[4] - T(4) * (d[1] + d[2]);
      out[2] = d[4] - d[3] + T(4) * (d[1] - d[2]);
      out[3] = d[4] - d[2] + T(2) * (d[3] - d[1]);
      out[4] = d[4] - d[2] + T(2) * (d[1] - d[3]);
      out[5] = T(4) * d[1] - T(5) * d[3] + d[5];
    }
  };
  struct Kernel {
    template <typename T>
    void operator()(const T* g, T* out) const {
      const T even = g[0] + g[2], quarter = T(0.25) * g[0] + g[2];
      out[0] = T(0.25) * g[0];
      out[1] = T(-1.0 / 6) * (even + g[1]);
      out[2] = T(-1.0 / 6) * (even - g[1]);
      out[3] = T(1.0 / 6) * (quarter + T(0.5) * g[1]);
      out[4] = T(1.0 / 6) * (quarter - T(0.5) * g[1]);
      out[5] = g[2];
    }
  };
  struct KernelTransposed {
    template <typename T>
    void operator()(const T* u, T* out) const {
      const T s12 = u[1] + u[2], d12 = u[2] - u[1], s34 = u[3] + u[4], d34 = u[3] - u[4];
      out[0] = T(0.25) * u[0] - T(1.0 / 6) * s12 + T(1.0 / 24) * s34;
      out[1] = T(1.0 / 6) * d12 + T(1.0 / 12) * d34;
      out[2] = T(1.0 / 6) * (s34 - s12) + u[5];
    }
  };
  struct Output {
    template <typename T>
    void operator()(const T* m, T* out) const {
      const T s12 = m[1] + m[2], d12 = m[1] - m[2], s34 = m[3] + m[4], d34 = m[3] - m[4];
      out[0] = m[0] + s12 + s34;
      out[1] = d12 + T(2) * d34;
      out[2] = s12 + T(4) * s34;
      out[3] = d12 + T(8) * d34 + m[5];
    }
  };
  struct OutputTransposed {
    template <typename T>
    void operator()(const T* y, T* out) const {
      out[0] = y[0];
      out[1] = y[0] + y[1] + y[2] + y[3];
      out[2] = y[0] - y[1] + y[2] - y[3];
      out[3] = y[0] + T(2) * y[1] + T(4) * y[2] + T(8) * y[3];
      out[4] = y[0] - T(2) * y[1] + T(4) * y[2] - T(8) * y[3];
      out[5] = y[3];
    }
  };
};

// Calls f(std::integral_constant<int, m>) for a tile side m of 2 or 4.
template <typename F>
auto with_tile(int64_t tile, const F& f) {
  TORCH_CHECK(tile == kWinogradSmallTile || tile == kWinogradLargeTile, "Winograd tile side must be 2 or 4, got ",
              tile);
  return tile == kWinogradLargeTile ? f(std::integral_constant<int, 4>{}) : f(std::integral_constant<int, 2>{});
}

// The tile side m of a [(m+2)^2, ...] transformed tensor or a [m^2, ...] output-domain one.
int64_t tile_of_points(int64_t points) {
  TORCH_CHECK(points == winograd_points(2) || points == winograd_points(4), "Winograd: ", points,
              " transformed points per tile, expected 16 or 36");
  return points == winograd_points(2) ? 2 : 4;
}
int64_t tile_of_outputs(int64_t outputs) {
  TORCH_CHECK(outputs == winograd_outputs(2) || outputs == winograd_outputs(4), "Winograd: ", outputs,
              " outputs per tile, expected 4 or 16");
  return outputs == winograd_outputs(2) ? 2 : 4;
}

// out = map(in) along rows, then along columns, of one N x N block; V is a scalar or a SIMD vector
// (then the lanes are consecutive blocks). load(k) and store(k, value) address value k of the block.
template <int N, int M, typename V, typename Map, typename Load, typename Store>
inline void map_block(const Map& map, const Load& load, const Store& store) {
  V block[N][N], half[N][M], column[N], mapped[M];
  for (int r = 0; r < N; ++r)
    for (int c = 0; c < N; ++c) block[r][c] = load(r * N + c);
  for (int r = 0; r < N; ++r) map(block[r], half[r]);
  for (int c = 0; c < M; ++c) {
    for (int r = 0; r < N; ++r) column[r] = half[r][c];
    map(column, mapped);
    for (int r = 0; r < M; ++r) store(r * M + c, mapped[r]);
  }
}

// The map on every block of a planar [N*N, count] tensor into a planar [M*M, count] one: value k of
// block p at [k, p]. SIMD vectors over consecutive blocks, scalars on the tail.
template <int N, int M, typename Map>
Tensor transform_planes(const Tensor& src, const Map& map) {
  const Tensor s = src.contiguous();
  const int64_t count = s.numel() / (N * N);
  std::vector<int64_t> shape(s.sizes().begin(), s.sizes().end());
  shape[0] = M * M;
  Tensor dst = at::empty(shape, s.options());
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "winograd_transform", [&] {
    using Vec = at::vec::Vectorized<scalar_t>;
    const scalar_t* in = s.const_data_ptr<scalar_t>();
    scalar_t* out = dst.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, count, 4096, [&](int64_t begin, int64_t end) {
      int64_t p = begin;
      for (; p + Vec::size() <= end; p += Vec::size()) {
        map_block<N, M, Vec>(map, [&](int k) { return Vec::loadu(in + k * count + p); },
                             [&](int k, const Vec& v) { v.store(out + k * count + p); });
      }
      for (; p < end; ++p) {
        map_block<N, M, scalar_t>(map, [&](int k) { return in[k * count + p]; },
                                  [&](int k, scalar_t v) { out[k * count + p] = v; });
      }
    });
  });
  return dst;
}

// Where the (m+2) x (m+2) input tiles of a 3x3 stride-1 convolution sit: tile t (row-major over the
// output's tiles) at stride m over the padded input; value k of a tile (row-major) at input position
// (y, x), outside the input where it reads padding.
struct TileGeometry {
  int64_t height, width, pad_h, pad_w, tile, side, tiles_w, tiles;

  TileGeometry(at::IntArrayRef input_sizes, at::IntArrayRef padding, int64_t tile)
      : height(input_sizes[2]), width(input_sizes[3]), pad_h(padding[0]), pad_w(padding[1]), tile(tile),
        side(tile + 2), tiles_w((width + 2 * pad_w - 2) / tile), tiles((height + 2 * pad_h - 2) / tile * tiles_w) {}

  // The offset of (sample b, position of value k of tile t) in NHWC memory of `channels`, or -1 in padding.
  int64_t offset(int64_t b, int64_t k, int64_t t, int64_t channels) const {
    const int64_t y = (t / tiles_w) * tile + k / side - pad_h, x = (t % tiles_w) * tile + k % side - pad_w;
    if (y < 0 || y >= height || x < 0 || x >= width) return -1;
    return ((b * height + y) * width + x) * channels;
  }
};

// Planar [side^2, n, tiles, C] input tiles: each a C-vector copied from NHWC memory (zeros in padding).
Tensor planar_input_tiles(const Tensor& inputs, const TileGeometry& geo) {
  const Tensor x = inputs.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t n = x.size(0), c = x.size(1), points = geo.side * geo.side;
  Tensor planar = at::empty({points, n, geo.tiles, c}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "winograd_input_tiles", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* dst = planar.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, points * n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t kb = begin; kb < end; ++kb) {  // value k of every tile of sample b
        for (int64_t t = 0; t < geo.tiles; ++t) {
          scalar_t* to = dst + (kb * geo.tiles + t) * c;
          const int64_t from = geo.offset(kb % n, kb / n, t, c);
          if (from < 0) {
            std::fill(to, to + c, scalar_t(0));
          } else {
            std::memcpy(to, src + from, c * sizeof(scalar_t));
          }
        }
      }
    });
  });
  return planar;
}

}  // namespace

Tensor gather_samples(const Tensor& cache, const Tensor& rows) {
  TORCH_CHECK(cache.is_contiguous() && cache.dim() >= 2 && rows.scalar_type() == at::kLong,
              "gather_samples: contiguous cache and int64 rows expected");
  const Tensor idx = rows.contiguous();
  std::vector<int64_t> shape(cache.sizes().begin(), cache.sizes().end());
  shape[1] = idx.numel();
  Tensor out = at::empty(shape, cache.options());
  const int64_t planes = cache.size(0), n = cache.size(1), batch = idx.numel();
  const int64_t bytes = cache.numel() / (planes * n) * cache.element_size();
  const int64_t* row = idx.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(row[b] >= 0 && row[b] < n, "gather_samples: row ", row[b], " out of range for ", n, " samples");
  }
  const char* src = static_cast<const char*>(cache.const_data_ptr());
  char* dst = static_cast<char*>(out.mutable_data_ptr());
  at::parallel_for(0, planes * batch, 8, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t plane = i / batch, b = i % batch;
      std::memcpy(dst + i * bytes, src + (plane * n + row[b]) * bytes, bytes);
    }
  });
  return out;
}

bool winograd_enabled() {
  const char* value = std::getenv("ADAROUND_WINOGRAD");
  return value == nullptr || std::strcmp(value, "0") != 0;
}

int64_t winograd_forced_tile() {
  const char* value = std::getenv("ADAROUND_WINOGRAD");
  if (value == nullptr) return 0;
  if (std::strcmp(value, "2") == 0) return kWinogradSmallTile;
  if (std::strcmp(value, "4") == 0) return kWinogradLargeTile;
  return 0;
}

Tensor winograd_input_tiles(const Tensor& inputs, at::IntArrayRef padding, int64_t tile) {
  TORCH_CHECK(inputs.dim() == 4 && padding.size() == 2, "winograd_input_tiles: NCHW inputs and 2 paddings expected");
  const int64_t out_h = inputs.size(2) + 2 * padding[0] - 2, out_w = inputs.size(3) + 2 * padding[1] - 2;
  TORCH_CHECK(tile == kWinogradSmallTile || tile == kWinogradLargeTile, "Winograd tile side must be 2 or 4, got ",
              tile);
  TORCH_CHECK(out_h > 0 && out_w > 0 && out_h % tile == 0 && out_w % tile == 0, "Winograd: the 3x3 outputs (", out_h,
              "x", out_w, ") of inputs ", inputs.sizes(), " with padding ", padding, " are not multiples of ", tile);
  // overlapping tiles -> planar [(m+2)^2, n, tiles, C], then B^T d B of each.
  const Tensor planar = planar_input_tiles(inputs, TileGeometry(inputs.sizes(), padding, tile));
  return with_tile(tile, [&](auto m) {
    constexpr int M = decltype(m)::value;
    return transform_planes<M + 2, M + 2>(planar, typename Maps<M>::Input{});
  });
}

Tensor winograd_tile_outputs(const Tensor& outputs, int64_t tile) {
  TORCH_CHECK(outputs.dim() == 4 && outputs.size(2) % tile == 0 && outputs.size(3) % tile == 0,
              "winograd_tile_outputs: [n, O, H, W] outputs in multiples of ", tile, " expected, got ", outputs.sizes());
  const int64_t n = outputs.size(0), o = outputs.size(1), tiles_h = outputs.size(2) / tile;
  const int64_t tiles_w = outputs.size(3) / tile;
  // [n, O, th, m, tw, m] -> [m, m, n, th, tw, O]
  return outputs.reshape({n, o, tiles_h, tile, tiles_w, tile})
      .permute({3, 5, 0, 2, 4, 1})
      .reshape({tile * tile, n, tiles_h * tiles_w, o})
      .contiguous();  // minibatch gathers and the gradient pass read it densely
}

WinogradCache winograd_cache(const Tensor& inputs, const Tensor& targets, at::IntArrayRef padding, int64_t tile) {
  TORCH_CHECK(inputs.dim() == 4 && targets.dim() == 4 && padding.size() == 2, "winograd_cache: NCHW caches expected");
  TORCH_CHECK(targets.size(0) == inputs.size(0) && targets.size(2) == inputs.size(2) + 2 * padding[0] - 2 &&
                  targets.size(3) == inputs.size(3) + 2 * padding[1] - 2,
              "winograd_cache: targets ", targets.sizes(), " are not the 3x3 stride-1 outputs of inputs ",
              inputs.sizes(), " with padding ", padding);
  WinogradCache cache;
  cache.tile = tile;
  cache.inputs = winograd_input_tiles(inputs, padding, tile);
  cache.tiles = cache.inputs.size(2);
  cache.targets = winograd_tile_outputs(targets, tile);
  return cache;
}

Tensor winograd_weights(const Tensor& weight, int64_t tile) {
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3,
              "winograd_weights: [O, C, 3, 3] expected, got ", weight.sizes());
  // [O, C, 3, 3] -> planar [9, C, O] -> [(m+2)^2, C, O]: the forward GEMMs' right operand as it is.
  // In the loop, on layer1's shapes, those GEMMs took 1.8x longer with it transposed.
  const Tensor planar = weight.permute({2, 3, 1, 0}).reshape({9, weight.size(1), weight.size(0)});
  return with_tile(tile, [&](auto m) {
    constexpr int M = decltype(m)::value;
    return transform_planes<3, M + 2>(planar, typename Maps<M>::Kernel{});
  });
}

Tensor winograd_weights_grad(const Tensor& grad_u) {
  // [(m+2)^2, C, O] -> planar [9, C, O] -> [O, C, 3, 3]
  const Tensor planar = with_tile(tile_of_points(grad_u.size(0)), [&](auto m) {
    constexpr int M = decltype(m)::value;
    return transform_planes<M + 2, 3>(grad_u, typename Maps<M>::KernelTransposed{});
  });
  return planar.view({3, 3, grad_u.size(1), grad_u.size(2)}).permute({3, 2, 0, 1}).contiguous();
}

Tensor winograd_forward(const Tensor& tiles, const Tensor& weights_u, const std::optional<Tensor>& bias) {
  const Tensor products = at::bmm(tiles, weights_u);  // [(m+2)^2, rows, O]
  Tensor pre = with_tile(tile_of_points(tiles.size(0)), [&](auto m) {
    constexpr int M = decltype(m)::value;
    return transform_planes<M + 2, M>(products, typename Maps<M>::Output{});
  });
  if (bias.has_value()) pre.add_(*bias);  // broadcast over the last dim, O
  return pre;
}

namespace {

// dL/d(pre) [m^2, rows, O] -> dL/d(products) [(m+2)^2, rows, O]: the output map transposed.
Tensor products_grad(const Tensor& grad_pre) {
  return with_tile(tile_of_outputs(grad_pre.size(0)), [&](auto m) {
    constexpr int M = decltype(m)::value;
    return transform_planes<M, M + 2>(grad_pre, typename Maps<M>::OutputTransposed{});
  });
}

}  // namespace

Tensor winograd_weight_grad(const Tensor& grad_pre, const Tensor& tiles) {
  return winograd_weights_grad(at::bmm(tiles.transpose(1, 2), products_grad(grad_pre)));  // [P, C, O] -> [O, C, 3, 3]
}

Tensor winograd_untile(const Tensor& tiled, int64_t out_height, int64_t out_width) {
  const int64_t tile = tile_of_outputs(tiled.size(0)), n = tiled.size(1), o = tiled.size(-1);
  // [m, m, n, th, tw, O] -> [n, th, m, tw, m, O] = NHWC memory
  return tiled.reshape({tile, tile, n, out_height / tile, out_width / tile, o})
      .permute({2, 3, 0, 4, 1, 5})
      .reshape({n, out_height, out_width, o})
      .permute({0, 3, 1, 2});
}

}  // namespace adaround::cpu
