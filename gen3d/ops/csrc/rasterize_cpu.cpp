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
#include <cstring>
#include <limits>
#include <type_traits>
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

// --- binning ---------------------------------------------------------------------------------------
//
// The pairs of _raster_torch.bin_gaussians, with the same floating-point operations in the same order
// and in the inputs' precision, so that exactly the same pairs are kept: per camera, the visible
// Gaussians sorted front to back (stable), each paired with the tiles of every tile row of its screen
// box that its alpha >= 1/255 ellipse reaches (`EllipseRows` is _ellipse_row_span), then a counting
// sort by tile that keeps the depth order within each tile. OpenMP over cameras.

// torch.maximum / torch.minimum: NaN if either is NaN.
template <typename T>
inline T nan_max(T a, T b) { return (a != a || b != b) ? std::numeric_limits<T>::quiet_NaN() : std::max(a, b); }
template <typename T>
inline T nan_min(T a, T b) { return (a != a || b != b) ? std::numeric_limits<T>::quiet_NaN() : std::min(a, b); }

// x / tile_size as torch computes it, by a multiplication when tile_size is a power of two (then exact: same result).
template <typename scalar_t>
struct TileDivider {
  scalar_t size, inverse;
  bool power_of_two;
  explicit TileDivider(int64_t tile_size)
      : size(scalar_t(tile_size)), inverse(scalar_t(1) / scalar_t(tile_size)),
        power_of_two((tile_size & (tile_size - 1)) == 0) {}
  scalar_t operator()(scalar_t x) const { return power_of_two ? x * inverse : x / size; }
};

// The ellipse q = d^T conic d <= reach of one Gaussian, row by row of tiles: _ellipse_row_span and the
// column formulas of bin_gaussians after it, operation by operation (the per-Gaussian terms hoisted).
template <typename scalar_t>
class EllipseRows {
 public:
  // `reach` is 2 log(o / ALPHA_MIN), before the slack.
  EllipseRows(const scalar_t* mean, const scalar_t* conic, scalar_t reach, const Grid& grid)
      : mx_(mean[0]), my_(mean[1]), a_(conic[0]), b_(conic[1]), ts_(grid.tile_size), tiles_x_(grid.tiles_x),
        per_tile_(grid.tile_size) {
    reach_ = reach * scalar_t(1 + 1e-4) + scalar_t(1e-4);
    det_ = a_ * conic[2] - b_ * b_;
    dy_max_ = std::sqrt(reach_ * a_ / det_);
    dy_right_ = -b_ * std::sqrt(reach_ / (conic[2] * det_));
  }

  // Inclusive tile columns [tx0, tx1] whose pixel centers meet the ellipse within tile row `row`; false if none.
  bool columns(int64_t row, int64_t& tx0, int64_t& tx1) const {
    const scalar_t lo = nan_max(scalar_t(row * ts_ + 0.5) - my_, -dy_max_);  // row * ts + 0.5 is exact (< 2^23)
    const scalar_t hi = nan_min(scalar_t(row * ts_ + ts_ - 0.5) - my_, dy_max_);
    if (lo > hi) return false;  // the ellipse does not reach this tile row
    const scalar_t x_hi = edge(nan_min(nan_max(dy_right_, lo), hi), scalar_t(1));
    const scalar_t x_lo = edge(nan_min(nan_max(-dy_right_, lo), hi), scalar_t(-1));
    const scalar_t col0 = std::ceil(per_tile_(x_lo + scalar_t(0.5)) - scalar_t(1));
    const scalar_t col1 = std::floor(per_tile_(x_hi - scalar_t(0.5)));
    if (col0 != col0 || col1 != col1) return false;  // NaN (a degenerate conic): torch would make invalid tile ids
    tx0 = static_cast<int64_t>(std::min(std::max(col0, scalar_t(0)), scalar_t(tiles_x_)));
    tx1 = static_cast<int64_t>(std::min(std::max(col1, scalar_t(-1)), scalar_t(tiles_x_ - 1)));
    return tx0 <= tx1;
  }

 private:
  scalar_t edge(scalar_t dy, scalar_t sign) const {  // x of the ellipse's right (+1) or left (-1) edge at dy
    return mx_ - b_ * dy / a_ + sign * std::sqrt(nan_max(a_ * reach_ - det_ * dy * dy, scalar_t(0))) / a_;
  }

  scalar_t mx_, my_, a_, b_, reach_, det_, dy_max_, dy_right_;
  int64_t ts_, tiles_x_;
  TileDivider<scalar_t> per_tile_;
};

// The visible Gaussians of one camera front to back, ties in index order (a stable argsort): an LSD radix
// sort on the depths' bits, mapped to unsigned integers of the same order.
template <typename scalar_t>
void depth_order(const scalar_t* depths, const bool* visible, int64_t N, std::vector<int64_t>& order) {
  using key_t = std::conditional_t<sizeof(scalar_t) == 4, uint32_t, uint64_t>;
  constexpr key_t sign = key_t(1) << (8 * sizeof(key_t) - 1);
  std::vector<key_t> keys, keys_tmp;
  std::vector<int64_t> order_tmp;
  order.clear();
  for (int64_t n = 0; n < N; ++n) {
    if (!visible[n]) continue;
    const scalar_t depth = depths[n] + scalar_t(0);  // -0 -> +0: they tie, as in torch
    key_t bits;
    std::memcpy(&bits, &depth, sizeof(bits));
    keys.push_back(bits & sign ? ~bits : bits | sign);
    order.push_back(n);
  }
  const int64_t V = static_cast<int64_t>(order.size());
  keys_tmp.resize(V);
  order_tmp.resize(V);
  for (int shift = 0; shift < int(8 * sizeof(key_t)); shift += 8) {
    int64_t offset[257] = {0};
    for (const key_t k : keys) ++offset[((k >> shift) & 0xff) + 1];
    if (std::any_of(offset + 1, offset + 257, [V](int64_t n) { return n == V; })) continue;  // one digit: no-op
    for (int d = 0; d < 256; ++d) offset[d + 1] += offset[d];
    for (int64_t i = 0; i < V; ++i) {
      const int64_t to = offset[(keys[i] >> shift) & 0xff]++;
      keys_tmp[to] = keys[i];
      order_tmp[to] = order[i];
    }
    keys.swap(keys_tmp);
    order.swap(order_tmp);
  }
}

// One camera's pairs before the counting sort: per (Gaussian, tile row) entry, in depth order, its Gaussian,
// tile row and inclusive tile columns.
struct RowEntry {
  int64_t gaussian;
  int32_t row, tx0, tx1;
};

template <typename scalar_t>
void bin_camera(int64_t c, int64_t N, const scalar_t* means, const scalar_t* conics, const scalar_t* reach,
                const scalar_t* extents, const scalar_t* depths, const bool* visible, const Grid& grid,
                std::vector<RowEntry>& entries, int64_t* tile_count /* [T] of this camera */) {
  const int64_t off = c * N;
  const TileDivider<scalar_t> per_tile(grid.tile_size);
  std::vector<int64_t> order;
  depth_order(depths + off, visible + off, N, order);
  entries.clear();
  for (const int64_t n : order) {
    const int64_t g = off + n;
    const scalar_t my = means[2 * g + 1], ey = extents[2 * g + 1];
    // The tile rows of the box: floor(...).long() clamped as in torch (rows out of range, where torch fails, skipped).
    const scalar_t f0 = std::floor(per_tile(my - ey)), f1 = std::floor(per_tile(my + ey));
    const int64_t y0 = f0 >= 0 ? (f0 < scalar_t(grid.tiles_y) ? static_cast<int64_t>(f0) : grid.tiles_y) : 0;
    const int64_t y1 = f1 <= scalar_t(grid.tiles_y - 1) ? (f1 >= -1 ? static_cast<int64_t>(f1) : -1) : grid.tiles_y - 1;
    const EllipseRows<scalar_t> ellipse(means + 2 * g, conics + 3 * g, reach[g], grid);
    for (int64_t row = y0; row <= y1; ++row) {
      int64_t tx0, tx1;
      if (!ellipse.columns(row, tx0, tx1)) continue;
      entries.push_back({g, static_cast<int32_t>(row), static_cast<int32_t>(tx0), static_cast<int32_t>(tx1)});
      for (int64_t tx = tx0; tx <= tx1; ++tx) ++tile_count[row * grid.tiles_x + tx];
    }
  }
}

template <typename scalar_t>
void bin_cameras(int64_t C, int64_t N, const scalar_t* means, const scalar_t* conics, const scalar_t* reach,
                 const scalar_t* extents, const scalar_t* depths, const bool* visible, const Grid& grid,
                 int num_threads, std::vector<std::vector<RowEntry>>& entries, int64_t* tile_count /* [C * T] */) {
  const int64_t T = grid.tiles_x * grid.tiles_y;
#pragma omp parallel for schedule(dynamic) num_threads(num_threads)
  for (int64_t c = 0; c < C; ++c) {
    bin_camera(c, N, means, conics, reach, extents, depths, visible, grid, entries[c], tile_count + c * T);
  }
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

// -> flat_ids [M] (c * N + n), tile_start [C * T], tile_count [C * T]: _raster_torch.bin_gaussians' TileBins
std::vector<torch::Tensor> bin_tiles(torch::Tensor means2d, torch::Tensor conics, torch::Tensor opacities,
                                     torch::Tensor extents, torch::Tensor depths, torch::Tensor visible,
                                     int64_t width, int64_t height, int64_t tile_size) {
  TORCH_CHECK(depths.dim() == 2, "depths must be [C, N]");
  const auto C = depths.size(0), N = depths.size(1);
  TORCH_CHECK(means2d.sizes() == torch::IntArrayRef({C, N, 2}) && extents.sizes() == means2d.sizes(),
              "means2d and extents must be [C, N, 2]");
  TORCH_CHECK(conics.sizes() == torch::IntArrayRef({C, N, 3}), "conics must be [C, N, 3]");
  TORCH_CHECK(opacities.sizes() == depths.sizes() && visible.sizes() == depths.sizes(),
              "opacities and visible must be [C, N]");
  for (const auto* t : {&means2d, &conics, &opacities, &extents, &depths}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == depths.scalar_type(),
                "means2d, conics, opacities, extents and depths must be CPU tensors of one dtype");
  }
  TORCH_CHECK(visible.device().is_cpu() && visible.scalar_type() == torch::kBool, "visible must be a CPU bool tensor");
  TORCH_CHECK(width > 0 && height > 0 && tile_size > 0, "width, height and tile_size must be positive");
  const Grid grid{(width + tile_size - 1) / tile_size, (height + tile_size - 1) / tile_size, tile_size, width, height};
  TORCH_CHECK(grid.tiles_y * tile_size + tile_size < (int64_t(1) << 23), "the image is too tall to bin exactly");
  const int64_t T = grid.tiles_x * grid.tiles_y;
  auto means = means2d.contiguous(), conic = conics.contiguous(), ext = extents.contiguous();
  auto depth = depths.contiguous(), vis = visible.contiguous();
  // torch's own log, as in bin_gaussians: its vectorized one (MKL or Sleef) can differ from std::log by an ulp.
  auto reach = (2.0 * at::log(opacities.contiguous() / kAlphaMin)).contiguous();
  auto tile_count = torch::zeros({C * T}, depths.options().dtype(torch::kInt64));
  int64_t* count = tile_count.data_ptr<int64_t>();
  std::vector<std::vector<RowEntry>> entries(C);
  AT_DISPATCH_FLOATING_TYPES(depths.scalar_type(), "bin_tiles", [&] {
    bin_cameras<scalar_t>(C, N, means.data_ptr<scalar_t>(), conic.data_ptr<scalar_t>(), reach.data_ptr<scalar_t>(),
                          ext.data_ptr<scalar_t>(), depth.data_ptr<scalar_t>(), vis.data_ptr<bool>(), grid,
                          at::get_num_threads(), entries, count);
  });
  auto tile_start = torch::empty_like(tile_count);
  int64_t* start = tile_start.data_ptr<int64_t>();
  int64_t pairs = 0;
  for (int64_t t = 0; t < C * T; ++t) {
    start[t] = pairs;
    pairs += count[t];
  }
  auto flat_ids = torch::empty({pairs}, tile_count.options());
  int64_t* ids = flat_ids.data_ptr<int64_t>();
#pragma omp parallel for schedule(dynamic) num_threads(at::get_num_threads())
  for (int64_t c = 0; c < C; ++c) {  // counting sort: entries are in depth order, so each tile's list is too
    std::vector<int64_t> cursor(start + c * T, start + (c + 1) * T);
    for (const RowEntry& e : entries[c]) {
      for (int64_t tx = e.tx0; tx <= e.tx1; ++tx) ids[cursor[e.row * grid.tiles_x + tx]++] = e.gaussian;
    }
  }
  return {flat_ids, tile_start, tile_count};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CPU compositing of binned 3D Gaussians (gen3d.ops._raster_cpp)";
  m.def("forward", &rasterize_forward, "Composite tile lists: out [C,H,W,F], t_final [C,H,W], n_contrib [C,H,W]");
  m.def("backward", &rasterize_backward, "Gradients w.r.t. means2d, conics, opacities, feats");
  m.def("bin_tiles", &bin_tiles, "Tile lists of visible Gaussians: flat_ids [M], tile_start [C*T], tile_count [C*T]");
}
