// CPU compositing of binned 3D Gaussians: forward and backward, OpenMP over tiles.
//
// The math is that of gen3d/ops/_raster_torch.py [Kerbl et al. 2023, "3D Gaussian Splatting"]. For a
// pixel p and the depth-sorted list of its tile:
//
//   power_i = -(p - mu_i)^T conic_i (p - mu_i) / 2,  alpha_i = min(0.99, o_i exp(power_i)), skipped if <= 1/255
//   T_0 = 1,  T_{i+1} = T_i (1 - alpha_i),  out = sum_i alpha_i T_i f_i,  T_final = T_n
//
// and, as in the 3DGS CUDA rasterizer, the pixel stops before the first Gaussian that would take its
// transmittance below t_stop (that Gaussian is not added). The forward records per pixel the number
// of list entries up to the last one added (`n_contrib`), so that the backward walks back to front
// from T_final and recovers T_i = T_{i+1} / (1 - alpha_i) instead of storing it:
//
//   dL/df_i     = alpha_i T_i g
//   dL/dalpha_i = T_i (f_i . g) - (sum_{j>i} alpha_j T_j (f_j . g) + T_final g_T) / (1 - alpha_i)
//
// with g = dL/dout and g_T = dL/dT_final of the pixel; a clamped alpha passes no gradient on to
// (mu, conic, o).
//
// Loop order: each tile gathers its list into contiguous buffers and keeps the state of its pixels
// (T, accumulated features, ...) in small arrays; the outer loop runs over the list (front to back,
// or back to front in the backward) and the inner one over the pixels of the Gaussian's
// alpha >= 1/255 ellipse only, row by row, in closed form. Each pixel still sees its Gaussians in
// depth order, so this is the per-pixel algorithm above, without visiting the pixels a Gaussian
// cannot reach (most of them for small Gaussians) and with the per-Gaussian gradient sums held in
// registers. Each (tile, Gaussian) pair writes its gradient to its own row of a [pairs, 6 + F]
// buffer, which is then summed per Gaussian in pair order: no atomics, and the result does not
// depend on the number of threads or on which thread ran which tile.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

constexpr double kAlphaMin = 1.0 / 255.0;  // gen3d.ops._projection.ALPHA_MIN
constexpr double kAlphaMax = 0.99;         // gen3d.ops._projection.ALPHA_MAX
constexpr int kGeo = 7;                    // per listed Gaussian: mx, my, a, b, c, o, skip_below

struct Grid {
  int64_t tiles_x, tiles_y, tile_size, width, height;
};

struct Bins {  // the TileBins tensors of _raster_torch.bin_gaussians
  const int64_t* flat_ids;
  const int64_t* tile_start;
  const int64_t* tile_count;
  int64_t num_tiles;  // C * tiles_x * tiles_y
};

// One tile's list, gathered front to back: geometry [L, kGeo] and features [L, F].
template <typename scalar_t>
struct TileList {
  std::vector<scalar_t> geo, feat;
  int64_t length = 0;

  void gather(const Bins& bins, int64_t tile, const scalar_t* means, const scalar_t* conics,
              const scalar_t* opacities, const scalar_t* feats, int64_t F) {
    length = bins.tile_count[tile];
    geo.resize(length * kGeo);
    feat.resize(length * F);
    const int64_t* ids = bins.flat_ids + bins.tile_start[tile];
    for (int64_t i = 0; i < length; ++i) {
      const int64_t g = ids[i];
      scalar_t* row = geo.data() + i * kGeo;
      row[0] = means[2 * g];
      row[1] = means[2 * g + 1];
      row[2] = conics[3 * g];
      row[3] = conics[3 * g + 1];
      row[4] = conics[3 * g + 2];
      row[5] = opacities[g];
      // Below this power, o exp(power) < 1/255 by a margin far above rounding: skip without the exp.
      row[6] = static_cast<scalar_t>(std::log(kAlphaMin / static_cast<double>(opacities[g])) - 1e-3);
      std::copy(feats + g * F, feats + (g + 1) * F, feat.data() + i * F);
    }
  }
};

// The one place alpha is computed, shared by both passes so that they skip the same pairs.
// Returns false for a skipped pair; else sets dx, dy (mu - p), the unclamped o exp(power) and alpha.
template <typename scalar_t>
inline bool pair_alpha(const scalar_t* row, scalar_t px, scalar_t py, scalar_t& dx, scalar_t& dy,
                       scalar_t& raw, scalar_t& alpha) {
  dx = row[0] - px;
  dy = row[1] - py;
  const scalar_t power = scalar_t(-0.5) * (row[2] * dx * dx + row[4] * dy * dy) - row[3] * dx * dy;
  if (power < row[6]) return false;
  raw = row[5] * std::exp(power);
  if (raw <= scalar_t(kAlphaMin)) return false;
  alpha = std::min(raw, scalar_t(kAlphaMax));
  return true;
}

// Pixel rectangle [x0, x1) x [y0, y1) of a tile inside the image, and its camera.
struct TileRect {
  int64_t cam, x0, x1, y0, y1;
  TileRect(const Grid& grid, int64_t tile) {
    const int64_t per_cam = grid.tiles_x * grid.tiles_y;
    cam = tile / per_cam;
    const int64_t local = tile % per_cam;
    x0 = (local % grid.tiles_x) * grid.tile_size;
    y0 = (local / grid.tiles_x) * grid.tile_size;
    x1 = std::min(x0 + grid.tile_size, grid.width);  // padding pixels outside the image are ignored
    y1 = std::min(y0 + grid.tile_size, grid.height);
  }
  int64_t pixel(const Grid& grid, int64_t x, int64_t y) const { return (cam * grid.height + y) * grid.width + x; }
};

// The pixels of a rect where power >= skip_below (row[6]), i.e. every pixel `pair_alpha` may keep: the
// ellipse q = (p - mu)^T conic (p - mu) <= R = -2 skip_below, whose rows span |v| <= sqrt(R a / det)
// and, at row offset v = py - my, u = px - mx in (-b v -+ sqrt(a R - det v^2)) / a. Computed in double;
// NaN or infinite bounds (degenerate conics) fall back to the whole rect, which is merely slower.
class Footprint {
 public:
  template <typename scalar_t>
  Footprint(const scalar_t* row, const TileRect& rect)
      : rect_(rect), mx_(row[0]), my_(row[1]), a_(row[2]), b_(row[3]),
        det_(double(row[2]) * row[4] - double(row[3]) * row[3]), reach_(-2.0 * double(row[6])) {
    const double half = std::sqrt(reach_ * a_ / det_);
    y_lo_ = clamp_lo(std::ceil(my_ - half - 0.5), rect.y0);
    y_hi_ = clamp_hi(std::floor(my_ + half - 0.5), rect.y1 - 1);
  }
  int64_t y_lo() const { return y_lo_; }
  int64_t y_hi() const { return y_hi_; }  // inclusive; y_lo > y_hi when no row is reached
  void row(int64_t y, int64_t& x_lo, int64_t& x_hi) const {  // inclusive columns of row y
    const double v = y + 0.5 - my_;
    const double s = std::sqrt(std::max(a_ * reach_ - det_ * v * v, 0.0));
    x_lo = clamp_lo(std::ceil(mx_ + (-b_ * v - s) / a_ - 0.5), rect_.x0);
    x_hi = clamp_hi(std::floor(mx_ + (-b_ * v + s) / a_ - 0.5), rect_.x1 - 1);
  }

 private:
  // std::max / std::min return their first argument when the second is NaN.
  static int64_t clamp_lo(double value, int64_t lo) { return static_cast<int64_t>(std::max(double(lo), value)); }
  static int64_t clamp_hi(double value, int64_t hi) { return static_cast<int64_t>(std::min(double(hi), value)); }

  const TileRect& rect_;
  double mx_, my_, a_, b_, det_, reach_;
  int64_t y_lo_, y_hi_;
};

template <typename scalar_t>
void forward_kernel(const scalar_t* means, const scalar_t* conics, const scalar_t* opacities, const scalar_t* feats,
                    int64_t F, Bins bins, Grid grid, scalar_t t_stop, int num_threads,
                    scalar_t* out, scalar_t* t_final, int32_t* n_contrib) {
  const int64_t ts = grid.tile_size;
#pragma omp parallel num_threads(num_threads)
  {
    TileList<scalar_t> list;
    std::vector<scalar_t> T, acc;   // per tile pixel: transmittance, accumulated features [P, F]
    std::vector<int32_t> last;      // per tile pixel: list entries up to the last one added
    std::vector<uint8_t> done;      // per tile pixel: stopped early
#pragma omp for schedule(dynamic)
    for (int64_t tile = 0; tile < bins.num_tiles; ++tile) {
      if (bins.tile_count[tile] == 0) continue;  // outputs are preset to an empty pixel
      list.gather(bins, tile, means, conics, opacities, feats, F);
      const TileRect rect(grid, tile);
      const int64_t live_pixels = (rect.x1 - rect.x0) * (rect.y1 - rect.y0);
      T.assign(ts * ts, scalar_t(1));
      acc.assign(ts * ts * F, scalar_t(0));
      last.assign(ts * ts, 0);
      done.assign(ts * ts, 0);
      int64_t stopped = 0;
      for (int64_t i = 0; i < list.length && stopped < live_pixels; ++i) {
        const scalar_t* row = list.geo.data() + i * kGeo;
        const scalar_t* f = list.feat.data() + i * F;
        const Footprint fp(row, rect);
        for (int64_t y = fp.y_lo(); y <= fp.y_hi(); ++y) {
          int64_t x_lo, x_hi;
          fp.row(y, x_lo, x_hi);
          const scalar_t py = scalar_t(y) + scalar_t(0.5);
          for (int64_t x = x_lo; x <= x_hi; ++x) {
            const int64_t q = (y - rect.y0) * ts + (x - rect.x0);
            if (done[q]) continue;
            scalar_t dx, dy, raw, alpha;
            if (!pair_alpha(row, scalar_t(x) + scalar_t(0.5), py, dx, dy, raw, alpha)) continue;
            const scalar_t t_next = T[q] * (scalar_t(1) - alpha);
            if (t_next < t_stop) {  // 3DGS early termination: this Gaussian is not added
              done[q] = 1;
              ++stopped;
              continue;
            }
            const scalar_t w = alpha * T[q];
            scalar_t* a = acc.data() + q * F;
            for (int64_t k = 0; k < F; ++k) a[k] += w * f[k];
            T[q] = t_next;
            last[q] = static_cast<int32_t>(i + 1);
          }
        }
      }
      for (int64_t y = rect.y0; y < rect.y1; ++y) {
        for (int64_t x = rect.x0; x < rect.x1; ++x) {
          const int64_t q = (y - rect.y0) * ts + (x - rect.x0), p = rect.pixel(grid, x, y);
          std::copy(acc.data() + q * F, acc.data() + (q + 1) * F, out + p * F);
          t_final[p] = T[q];
          n_contrib[p] = last[q];
        }
      }
    }
  }
}

// Per-Gaussian gradient row: mean (2), conic (3), opacity (1), features (F).
constexpr int kGradGeo = 6;

template <typename scalar_t>
void backward_kernel(const scalar_t* means, const scalar_t* conics, const scalar_t* opacities, const scalar_t* feats,
                     int64_t F, Bins bins, Grid grid, const scalar_t* t_final, const int32_t* n_contrib,
                     const scalar_t* grad_out, const scalar_t* grad_t, int num_threads,
                     scalar_t* partials /* [pairs, 6 + F] */) {
  const int64_t G = kGradGeo + F, ts = grid.tile_size;
#pragma omp parallel num_threads(num_threads)
  {
    TileList<scalar_t> list;
    std::vector<scalar_t> T, rest, g;  // per tile pixel: T_{i+1}, sum_{j>i} w_j (f_j . g) + T_final g_T, dL/dout
    std::vector<int32_t> n;            // per tile pixel: n_contrib
    std::vector<scalar_t> d(G);        // gradient sums of the current Gaussian
#pragma omp for schedule(dynamic)
    for (int64_t tile = 0; tile < bins.num_tiles; ++tile) {
      if (bins.tile_count[tile] == 0) continue;
      list.gather(bins, tile, means, conics, opacities, feats, F);
      const TileRect rect(grid, tile);
      T.assign(ts * ts, scalar_t(0));
      rest.assign(ts * ts, scalar_t(0));
      g.assign(ts * ts * F, scalar_t(0));
      n.assign(ts * ts, 0);
      int32_t n_max = 0;
      for (int64_t y = rect.y0; y < rect.y1; ++y) {
        for (int64_t x = rect.x0; x < rect.x1; ++x) {
          const int64_t q = (y - rect.y0) * ts + (x - rect.x0), p = rect.pixel(grid, x, y);
          T[q] = t_final[p];
          rest[q] = t_final[p] * grad_t[p];
          std::copy(grad_out + p * F, grad_out + (p + 1) * F, g.data() + q * F);
          n[q] = n_contrib[p];
          n_max = std::max(n_max, n[q]);
        }
      }
      scalar_t* pair_rows = partials + bins.tile_start[tile] * G;  // [L, G]
      std::fill(pair_rows + n_max * G, pair_rows + list.length * G, scalar_t(0));  // reached by no pixel
      for (int64_t i = n_max - 1; i >= 0; --i) {
        const scalar_t* row = list.geo.data() + i * kGeo;
        const scalar_t* f = list.feat.data() + i * F;
        std::fill(d.begin(), d.end(), scalar_t(0));
        const Footprint fp(row, rect);
        for (int64_t y = fp.y_lo(); y <= fp.y_hi(); ++y) {
          int64_t x_lo, x_hi;
          fp.row(y, x_lo, x_hi);
          const scalar_t py = scalar_t(y) + scalar_t(0.5);
          for (int64_t x = x_lo; x <= x_hi; ++x) {
            const int64_t q = (y - rect.y0) * ts + (x - rect.x0);
            if (i >= n[q]) continue;  // the pixel stopped before this Gaussian
            scalar_t dx, dy, raw, alpha;
            if (!pair_alpha(row, scalar_t(x) + scalar_t(0.5), py, dx, dy, raw, alpha)) continue;
            const scalar_t one_minus = scalar_t(1) - alpha;
            const scalar_t T_i = T[q] / one_minus;
            const scalar_t w = alpha * T_i;
            const scalar_t* gq = g.data() + q * F;
            scalar_t fg = 0;
            for (int64_t k = 0; k < F; ++k) {
              fg += f[k] * gq[k];
              d[kGradGeo + k] += w * gq[k];
            }
            const scalar_t d_alpha = T_i * fg - rest[q] / one_minus;
            rest[q] += w * fg;
            T[q] = T_i;
            if (raw > scalar_t(kAlphaMax)) continue;  // clamped: no gradient to mean, conic, opacity
            const scalar_t d_power = alpha * d_alpha;  // alpha = o exp(power)
            d[0] -= d_power * (row[2] * dx + row[3] * dy);
            d[1] -= d_power * (row[3] * dx + row[4] * dy);
            d[2] -= d_power * scalar_t(0.5) * dx * dx;
            d[3] -= d_power * dx * dy;
            d[4] -= d_power * scalar_t(0.5) * dy * dy;
            d[5] += d_alpha * (raw / row[5]);  // dalpha/do = exp(power)
          }
        }
        std::copy(d.begin(), d.end(), pair_rows + i * G);
      }
    }
  }
}

void check_inputs(const torch::Tensor& means2d, const torch::Tensor& conics, const torch::Tensor& opacities,
                  const torch::Tensor& feats, const torch::Tensor& flat_ids, const torch::Tensor& tile_start,
                  const torch::Tensor& tile_count, const Grid& grid) {
  TORCH_CHECK(feats.dim() == 3, "feats must be [C, N, F]");
  const auto C = feats.size(0), N = feats.size(1);
  TORCH_CHECK(means2d.sizes() == torch::IntArrayRef({C, N, 2}), "means2d must be [C, N, 2]");
  TORCH_CHECK(conics.sizes() == torch::IntArrayRef({C, N, 3}), "conics must be [C, N, 3]");
  TORCH_CHECK(opacities.sizes() == torch::IntArrayRef({C, N}), "opacities must be [C, N]");
  for (const auto* t : {&means2d, &conics, &opacities, &feats}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->scalar_type() == feats.scalar_type(),
                "means2d, conics, opacities and feats must be contiguous CPU tensors of one dtype");
  }
  for (const auto* t : {&flat_ids, &tile_start, &tile_count}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->scalar_type() == torch::kInt64,
                "flat_ids, tile_start and tile_count must be contiguous int64 CPU tensors");
  }
  TORCH_CHECK(tile_start.numel() == C * grid.tiles_x * grid.tiles_y && tile_count.numel() == tile_start.numel(),
              "tile_start and tile_count must hold C * tiles_x * tiles_y entries");
  const int64_t pairs = flat_ids.numel();
  TORCH_CHECK(pairs == 0 || (flat_ids.min().item<int64_t>() >= 0 && flat_ids.max().item<int64_t>() < C * N),
              "flat_ids must index the C * N Gaussians");
  const int64_t* start = tile_start.data_ptr<int64_t>();
  const int64_t* count = tile_count.data_ptr<int64_t>();
  for (int64_t t = 0; t < tile_count.numel(); ++t) {
    TORCH_CHECK(start[t] >= 0 && count[t] >= 0 && start[t] + count[t] <= pairs, "tile lists must lie in flat_ids");
  }
  TORCH_CHECK(grid.tile_size > 0 && grid.tiles_x * grid.tile_size >= grid.width &&
                  grid.tiles_y * grid.tile_size >= grid.height,
              "the tile grid must cover the image");
}

Bins make_bins(const torch::Tensor& flat_ids, const torch::Tensor& tile_start, const torch::Tensor& tile_count) {
  return {flat_ids.data_ptr<int64_t>(), tile_start.data_ptr<int64_t>(), tile_count.data_ptr<int64_t>(),
          tile_count.numel()};
}

}  // namespace

// -> out [C, H, W, F], t_final [C, H, W], n_contrib [C, H, W] int32
std::vector<torch::Tensor> rasterize_forward(torch::Tensor means2d, torch::Tensor conics, torch::Tensor opacities,
                                             torch::Tensor feats, torch::Tensor flat_ids, torch::Tensor tile_start,
                                             torch::Tensor tile_count, int64_t tiles_x, int64_t tiles_y,
                                             int64_t tile_size, int64_t width, int64_t height, double t_min) {
  const Grid grid{tiles_x, tiles_y, tile_size, width, height};
  check_inputs(means2d, conics, opacities, feats, flat_ids, tile_start, tile_count, grid);
  const auto C = feats.size(0), F = feats.size(2);
  auto out = torch::zeros({C, height, width, F}, feats.options());
  auto t_final = torch::ones({C, height, width}, feats.options());
  auto n_contrib = torch::zeros({C, height, width}, feats.options().dtype(torch::kInt32));
  const Bins bins = make_bins(flat_ids, tile_start, tile_count);
  const int threads = at::get_num_threads();
  AT_DISPATCH_FLOATING_TYPES(feats.scalar_type(), "rasterize_forward", [&] {
    // T never goes below the smallest normal number, so that the backward's divisions stay exact.
    const scalar_t t_stop = std::max(static_cast<scalar_t>(t_min), std::numeric_limits<scalar_t>::min());
    forward_kernel<scalar_t>(means2d.data_ptr<scalar_t>(), conics.data_ptr<scalar_t>(),
                             opacities.data_ptr<scalar_t>(), feats.data_ptr<scalar_t>(), F, bins, grid, t_stop,
                             threads, out.data_ptr<scalar_t>(), t_final.data_ptr<scalar_t>(),
                             n_contrib.data_ptr<int32_t>());
  });
  return {out, t_final, n_contrib};
}

// -> gradients w.r.t. means2d [C, N, 2], conics [C, N, 3], opacities [C, N], feats [C, N, F]
std::vector<torch::Tensor> rasterize_backward(torch::Tensor means2d, torch::Tensor conics, torch::Tensor opacities,
                                              torch::Tensor feats, torch::Tensor flat_ids, torch::Tensor tile_start,
                                              torch::Tensor tile_count, int64_t tiles_x, int64_t tiles_y,
                                              int64_t tile_size, int64_t width, int64_t height,
                                              torch::Tensor t_final, torch::Tensor n_contrib, torch::Tensor grad_out,
                                              torch::Tensor grad_t_final) {
  const Grid grid{tiles_x, tiles_y, tile_size, width, height};
  check_inputs(means2d, conics, opacities, feats, flat_ids, tile_start, tile_count, grid);
  const auto C = feats.size(0), N = feats.size(1), F = feats.size(2);
  TORCH_CHECK(grad_out.sizes() == torch::IntArrayRef({C, height, width, F}) && grad_out.is_contiguous() &&
                  grad_out.scalar_type() == feats.scalar_type(),
              "grad_out must be a contiguous [C, H, W, F] tensor of the feats dtype");
  TORCH_CHECK(grad_t_final.sizes() == torch::IntArrayRef({C, height, width}) && grad_t_final.is_contiguous() &&
                  grad_t_final.scalar_type() == feats.scalar_type(),
              "grad_t_final must be a contiguous [C, H, W] tensor of the feats dtype");
  TORCH_CHECK(t_final.sizes() == grad_t_final.sizes() && t_final.is_contiguous() &&
                  n_contrib.sizes() == grad_t_final.sizes() && n_contrib.scalar_type() == torch::kInt32 &&
                  n_contrib.is_contiguous(),
              "t_final and n_contrib must be the forward's outputs");
  const int threads = at::get_num_threads();
  auto partials = torch::empty({flat_ids.numel(), kGradGeo + F}, feats.options());
  auto total = torch::zeros({C, N, kGradGeo + F}, feats.options());
  const Bins bins = make_bins(flat_ids, tile_start, tile_count);
  AT_DISPATCH_FLOATING_TYPES(feats.scalar_type(), "rasterize_backward", [&] {
    backward_kernel<scalar_t>(means2d.data_ptr<scalar_t>(), conics.data_ptr<scalar_t>(),
                              opacities.data_ptr<scalar_t>(), feats.data_ptr<scalar_t>(), F, bins, grid,
                              t_final.data_ptr<scalar_t>(), n_contrib.data_ptr<int32_t>(),
                              grad_out.data_ptr<scalar_t>(), grad_t_final.data_ptr<scalar_t>(), threads,
                              partials.data_ptr<scalar_t>());
    // Sum the pairs' rows per Gaussian, serially in pair order: deterministic for any thread count.
    const int64_t G = kGradGeo + F;
    const scalar_t* src = partials.data_ptr<scalar_t>();
    scalar_t* dst = total.data_ptr<scalar_t>();
    for (int64_t m = 0; m < flat_ids.numel(); ++m) {
      scalar_t* row = dst + bins.flat_ids[m] * G;
      for (int64_t k = 0; k < G; ++k) row[k] += src[m * G + k];
    }
  });
  return {total.slice(2, 0, 2).contiguous(), total.slice(2, 2, 5).contiguous(), total.select(2, 5).contiguous(),
          total.slice(2, kGradGeo).contiguous()};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CPU compositing of binned 3D Gaussians (gen3d.ops._raster_cpp)";
  m.def("forward", &rasterize_forward, "Composite tile lists: out [C,H,W,F], t_final [C,H,W], n_contrib [C,H,W]");
  m.def("backward", &rasterize_backward, "Gradients w.r.t. means2d, conics, opacities, feats");
}
