// CPU multi-resolution hash encoding: forward, backward and double backward, OpenMP.
//
// The math is that of gen3d/ops/hash_encoding.py (`hash_encode_reference`) [Müller et al. 2022,
// "Instant Neural Graphics Primitives"]. For a point x in [0, 1]^3 (clamped) and level l with N_l
// cells per axis:
//
//   pos = x N_l,  c = min(floor(pos), N_l - 1),  t = pos - c
//   out[l F + f] = sum over the 8 corners v = c + (dx, dy, dz) of w_v table[l, row(v), f],
//   w_v = prod_a u_a(v),  u_a(v) = d_a ? t_a : 1 - t_a
//   row(v) = v_x + v_y (N_l + 1) + v_z (N_l + 1)^2            if (N_l + 1)^3 <= T   (dense)
//          = ((v_x * 1) ^ (v_y * 2654435761) ^ (v_z * 805459861)) mod 2^32 mod T   (hashed, uint32)
//
// Backward, with g = dL/dout of the point:
//   dL/dtable[l, row(v), f] += w_v g[l F + f]
//   dL/dx_a = sum_l sum_v (sum_f g[l F + f] table[l, row(v), f]) dw_v/dx_a,
//   dw_v/dx_a = N_l m_a (d_a ? 1 : -1) prod_{b != a} u_b(v)   (m_a = 0 where x_a was clamped, else 1)
//
// Double backward (a loss on analytic normals, which are a gradient w.r.t. x): given the gradients
// h_table and h_x of a scalar S w.r.t. the backward's outputs dL/dtable and dL/dx, and
// s_v = sum_a h_x,a dw_v/dx_a (the derivative of w_v along h_x):
//   dS/dg[l F + f]          = sum_v (w_v h_table[l, row(v), f] + s_v table[l, row(v), f])
//   dS/dtable[l, row(v), f] += s_v g[l F + f]
//   dS/dx_b                 = sum_v (sum_f g_f h_table[row(v), f]) dw_v/dx_b
//                           + sum_v (sum_f g_f table[row(v), f]) sum_{a != b} h_x,a d2w_v/dx_a dx_b,
//   d2w_v/dx_a dx_b = N_l^2 m_a m_b (d_a ? 1 : -1) (d_b ? 1 : -1) u_c(v)   (c the third axis; no a = b term).
// Third derivatives are not provided.
//
// Parallelism: the forward loops over levels and runs OpenMP over points. The backward passes run
// OpenMP over levels, each (level, point) once: every table row belongs to one level, so the table
// gradients need no atomics; the x gradients go to a per-level buffer [L, P, 3] that is summed over
// levels afterwards in a fixed order. Results do not depend on the number of threads. Levels outer,
// points inner keeps one level's table (T F numbers, 512 KB at the defaults) in cache while all
// points read it (measured ~1.3x faster than points outer at P = 2^16).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr uint32_t kPrimes[3] = {1u, 2654435761u, 805459861u};
constexpr int64_t kLocalF = 16;  // features per level kept in local arrays (registers) by the kernels

struct Level {
  int64_t n;       // cells per axis
  bool dense;      // (n + 1)^3 <= T
  int64_t offset;  // first row of this level in the flat [L * T, F] table
};

// One point at one level: the 8 corner rows (flat, level offset included), the per-axis factors
// u[a][d] (d = 0: 1 - t_a, d = 1: t_a), N_l and the clamp masks.
template <typename scalar_t>
struct Corners {
  int64_t rows[8];
  scalar_t u[3][2];
  scalar_t n;
  scalar_t mask[3];

  scalar_t weight(int k) const { return (u[0][(k >> 2) & 1] * u[1][(k >> 1) & 1]) * u[2][k & 1]; }

  // dw_k/dx_a for the 8 corners and 3 axes
  void weight_derivatives(scalar_t dw[8][3]) const {
    for (int k = 0; k < 8; ++k) {
      const int bit[3] = {(k >> 2) & 1, (k >> 1) & 1, k & 1};
      for (int a = 0; a < 3; ++a) {
        const int b = (a + 1) % 3, c = (a + 2) % 3;
        const scalar_t slope = n * mask[a] * u[b][bit[b]] * u[c][bit[c]];
        dw[k][a] = bit[a] ? slope : -slope;
      }
    }
  }
};

template <typename scalar_t>
inline Corners<scalar_t> corners(const scalar_t* x, const Level& level, int64_t T, bool power_of_two) {
  Corners<scalar_t> out;
  const scalar_t res = static_cast<scalar_t>(level.n);
  int64_t c[3];
  for (int a = 0; a < 3; ++a) {
    const scalar_t xa = x[a];
    out.mask[a] = (xa >= scalar_t(0) && xa <= scalar_t(1)) ? scalar_t(1) : scalar_t(0);  // as torch's clamp
    const scalar_t pos = (xa < scalar_t(0) ? scalar_t(0) : (xa > scalar_t(1) ? scalar_t(1) : xa)) * res;
    scalar_t lower = std::floor(pos);
    if (lower > res - scalar_t(1)) lower = res - scalar_t(1);
    c[a] = static_cast<int64_t>(lower);
    out.u[a][1] = pos - lower;
    out.u[a][0] = scalar_t(1) - out.u[a][1];
  }
  out.n = res;
  if (level.dense) {
    const int64_t s1 = level.n + 1, s2 = s1 * s1;
    for (int k = 0; k < 8; ++k) {
      out.rows[k] = level.offset + (c[0] + ((k >> 2) & 1)) + (c[1] + ((k >> 1) & 1)) * s1 + (c[2] + (k & 1)) * s2;
    }
    return out;
  }
  uint32_t h[3][2];
  for (int a = 0; a < 3; ++a) {
    h[a][0] = static_cast<uint32_t>(c[a]) * kPrimes[a];
    h[a][1] = static_cast<uint32_t>(c[a] + 1) * kPrimes[a];
  }
  for (int k = 0; k < 8; ++k) {
    const uint32_t hk = h[0][(k >> 2) & 1] ^ h[1][(k >> 1) & 1] ^ h[2][k & 1];
    out.rows[k] = level.offset + (power_of_two ? static_cast<int64_t>(hk & static_cast<uint32_t>(T - 1))
                                               : static_cast<int64_t>(hk % static_cast<uint64_t>(T)));
  }
  return out;
}

// `src[0:F]` copied to `buffer` when it fits (then returned), else `src` itself.
template <typename scalar_t>
inline const scalar_t* local_copy(const scalar_t* src, int64_t F, scalar_t* buffer) {
  if (F > kLocalF) return src;
  for (int64_t f = 0; f < F; ++f) buffer[f] = src[f];
  return buffer;
}

std::vector<Level> make_levels(const torch::Tensor& resolutions, int64_t T) {
  auto res = resolutions.accessor<int64_t, 1>();
  std::vector<Level> levels;
  for (int64_t l = 0; l < res.size(0); ++l) {
    const int64_t n = res[l];
    levels.push_back({n, (n + 1) * (n + 1) * (n + 1) <= T, l * T});
  }
  return levels;
}

void check(const torch::Tensor& x, const torch::Tensor& tables, const torch::Tensor& resolutions) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == 3 && x.is_contiguous(), "x must be contiguous [P, 3]");
  TORCH_CHECK(tables.dim() == 3 && tables.is_contiguous(), "tables must be contiguous [L, T, F]");
  TORCH_CHECK(x.scalar_type() == tables.scalar_type(), "x and tables must share a dtype");
  TORCH_CHECK(resolutions.dim() == 1 && resolutions.size(0) == tables.size(0) &&
                  resolutions.scalar_type() == torch::kInt64,
              "resolutions must be int64 [L]");
}

void check_like(const torch::Tensor& t, const torch::Tensor& like, const char* what) {
  TORCH_CHECK(t.sizes() == like.sizes() && t.is_contiguous() && t.scalar_type() == like.scalar_type(), what);
}

template <typename scalar_t>
void forward_kernel(const scalar_t* xp, const scalar_t* tab, scalar_t* op, int64_t P, int64_t L, int64_t T,
                    int64_t F, const std::vector<Level>& levels, int threads) {
  const bool power_of_two = (T & (T - 1)) == 0;
  for (int64_t l = 0; l < L; ++l) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t p = 0; p < P; ++p) {
      const auto cs = corners<scalar_t>(xp + 3 * p, levels[l], T, power_of_two);
      scalar_t* o = op + p * L * F + l * F;
      if (F <= kLocalF) {  // accumulate in locals: o may alias the table as far as the compiler knows
        scalar_t acc[kLocalF] = {};
        for (int k = 0; k < 8; ++k) {
          const scalar_t w = cs.weight(k);
          const scalar_t* row = tab + cs.rows[k] * F;
          for (int64_t f = 0; f < F; ++f) acc[f] += w * row[f];
        }
        for (int64_t f = 0; f < F; ++f) o[f] = acc[f];
        continue;
      }
      for (int64_t f = 0; f < F; ++f) o[f] = scalar_t(0);
      for (int k = 0; k < 8; ++k) {
        const scalar_t w = cs.weight(k);
        const scalar_t* row = tab + cs.rows[k] * F;
        for (int64_t f = 0; f < F; ++f) o[f] += w * row[f];
      }
    }
  }
}

// gt: dL/dtable or null; gxl: per-level dL/dx [L, P, 3] or null.
template <typename scalar_t>
void backward_kernel(const scalar_t* xp, const scalar_t* tab, const scalar_t* gp, scalar_t* gt, scalar_t* gxl,
                     int64_t P, int64_t L, int64_t T, int64_t F, const std::vector<Level>& levels, int threads) {
  const bool power_of_two = (T & (T - 1)) == 0;
#pragma omp parallel for schedule(dynamic) num_threads(threads)
  for (int64_t l = 0; l < L; ++l) {
    for (int64_t p = 0; p < P; ++p) {
      const auto cs = corners<scalar_t>(xp + 3 * p, levels[l], T, power_of_two);
      scalar_t local_g[kLocalF];  // a copy the compiler knows the table writes do not alias
      const scalar_t* g = local_copy(gp + p * L * F + l * F, F, local_g);
      scalar_t dw[8][3];
      if (gxl != nullptr) cs.weight_derivatives(dw);
      scalar_t gx[3] = {0, 0, 0};
      for (int k = 0; k < 8; ++k) {
        if (gt != nullptr) {
          const scalar_t w = cs.weight(k);
          scalar_t* grow = gt + cs.rows[k] * F;
          for (int64_t f = 0; f < F; ++f) grow[f] += w * g[f];
        }
        if (gxl != nullptr) {
          const scalar_t* row = tab + cs.rows[k] * F;
          scalar_t gf = 0;  // sum_f g_f table[row, f]
          for (int64_t f = 0; f < F; ++f) gf += g[f] * row[f];
          for (int a = 0; a < 3; ++a) gx[a] += gf * dw[k][a];
        }
      }
      if (gxl != nullptr) {
        for (int a = 0; a < 3; ++a) gxl[(l * P + p) * 3 + a] = gx[a];
      }
    }
  }
}

// htab [L T, F] and hxp [P, 3] may be null (not used); dg [P, L F], dxl [L, P, 3], dtab [L T, F] null when not wanted.
template <typename scalar_t>
void double_backward_kernel(const scalar_t* xp, const scalar_t* tab, const scalar_t* gp, const scalar_t* htab,
                            const scalar_t* hxp, scalar_t* dg, scalar_t* dxl, scalar_t* dtab, int64_t P, int64_t L,
                            int64_t T, int64_t F, const std::vector<Level>& levels, int threads) {
  const bool power_of_two = (T & (T - 1)) == 0;
  if (hxp == nullptr) dtab = nullptr;  // dS/dtable comes only through h_x
#pragma omp parallel for schedule(dynamic) num_threads(threads)
  for (int64_t l = 0; l < L; ++l) {
    for (int64_t p = 0; p < P; ++p) {
      const auto cs = corners<scalar_t>(xp + 3 * p, levels[l], T, power_of_two);
      scalar_t dw[8][3];
      cs.weight_derivatives(dw);
      scalar_t local_g[kLocalF];
      const scalar_t* g = local_copy(gp + p * L * F + l * F, F, local_g);
      const scalar_t* hx = hxp != nullptr ? hxp + 3 * p : nullptr;
      scalar_t* dgo = dg != nullptr ? dg + p * L * F + l * F : nullptr;
      scalar_t dx[3] = {0, 0, 0};
      // h_x . d2w_k/dx dx_b = N^2 sum_{a != b} h_x,a m_a m_b s_a s_b u_c: per axis pair, signs applied per corner
      scalar_t hm[3] = {0, 0, 0};
      if (hx != nullptr) {
        for (int a = 0; a < 3; ++a) hm[a] = hx[a] * cs.mask[a] * cs.n;
      }
      for (int k = 0; k < 8; ++k) {
        const int bit[3] = {(k >> 2) & 1, (k >> 1) & 1, k & 1};
        const scalar_t* row = tab + cs.rows[k] * F;
        const scalar_t* hrow = htab != nullptr ? htab + cs.rows[k] * F : nullptr;
        const scalar_t s = hx != nullptr ? hx[0] * dw[k][0] + hx[1] * dw[k][1] + hx[2] * dw[k][2] : scalar_t(0);
        if (dgo != nullptr) {
          const scalar_t w = cs.weight(k);
          for (int64_t f = 0; f < F; ++f) {
            dgo[f] += (hrow != nullptr ? w * hrow[f] : scalar_t(0)) + s * row[f];
          }
        }
        if (dtab != nullptr) {
          scalar_t* drow = dtab + cs.rows[k] * F;
          for (int64_t f = 0; f < F; ++f) drow[f] += s * g[f];
        }
        if (dxl != nullptr) {
          if (hrow != nullptr) {
            scalar_t gh = 0;
            for (int64_t f = 0; f < F; ++f) gh += g[f] * hrow[f];
            for (int b = 0; b < 3; ++b) dx[b] += gh * dw[k][b];
          }
          if (hx != nullptr) {
            scalar_t gtk = 0;
            for (int64_t f = 0; f < F; ++f) gtk += g[f] * row[f];
            for (int b = 0; b < 3; ++b) {
              scalar_t acc = 0;
              for (int a = 0; a < 3; ++a) {
                if (a == b) continue;
                const int c = 3 - a - b;
                const scalar_t term = hm[a] * cs.u[c][bit[c]];
                acc += (bit[a] == bit[b]) ? term : -term;  // s_a s_b
              }
              dx[b] += gtk * acc * cs.n * cs.mask[b];
            }
          }
        }
      }
      if (dxl != nullptr) {
        for (int b = 0; b < 3; ++b) dxl[(l * P + p) * 3 + b] = dx[b];
      }
    }
  }
}

}  // namespace

torch::Tensor hash_forward(const torch::Tensor& x, const torch::Tensor& tables, const torch::Tensor& resolutions) {
  check(x, tables, resolutions);
  const int64_t P = x.size(0), L = tables.size(0), T = tables.size(1), F = tables.size(2);
  const auto levels = make_levels(resolutions, T);
  auto out = torch::empty({P, L * F}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hash_forward", [&] {
    forward_kernel<scalar_t>(x.data_ptr<scalar_t>(), tables.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), P, L, T,
                             F, levels, at::get_num_threads());
  });
  return out;
}

// Gradients w.r.t. the tables and x (empty tensors for those not asked for).
std::vector<torch::Tensor> hash_backward(const torch::Tensor& grad_out, const torch::Tensor& x,
                                         const torch::Tensor& tables, const torch::Tensor& resolutions,
                                         bool need_tables, bool need_x) {
  check(x, tables, resolutions);
  const int64_t P = x.size(0), L = tables.size(0), T = tables.size(1), F = tables.size(2);
  TORCH_CHECK(grad_out.is_contiguous() && grad_out.size(0) == P && grad_out.size(1) == L * F &&
                  grad_out.scalar_type() == x.scalar_type(),
              "grad_out must be contiguous [P, L F] of x's dtype");
  const auto levels = make_levels(resolutions, T);
  auto grad_tables = need_tables ? torch::zeros_like(tables) : torch::empty({0}, tables.options());
  auto grad_x_levels = need_x ? torch::empty({L, P, 3}, x.options()) : torch::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hash_backward", [&] {
    backward_kernel<scalar_t>(x.data_ptr<scalar_t>(), tables.data_ptr<scalar_t>(), grad_out.data_ptr<scalar_t>(),
                              need_tables ? grad_tables.data_ptr<scalar_t>() : nullptr,
                              need_x ? grad_x_levels.data_ptr<scalar_t>() : nullptr, P, L, T, F, levels,
                              at::get_num_threads());
  });
  return {grad_tables, need_x ? grad_x_levels.sum(0) : grad_x_levels};
}

// Second derivatives: the gradients of a scalar S w.r.t. grad_out, x and tables, given S's gradients
// h_tables [L,T,F] and h_x [P,3] w.r.t. the backward's outputs (either may be empty: unused). Empty
// tensors for the outputs not asked for.
std::vector<torch::Tensor> hash_double_backward(const torch::Tensor& grad_out, const torch::Tensor& x,
                                                const torch::Tensor& tables, const torch::Tensor& resolutions,
                                                const torch::Tensor& h_tables, const torch::Tensor& h_x,
                                                bool need_grad_out, bool need_x, bool need_tables) {
  check(x, tables, resolutions);
  const int64_t P = x.size(0), L = tables.size(0), T = tables.size(1), F = tables.size(2);
  TORCH_CHECK(grad_out.is_contiguous() && grad_out.size(0) == P && grad_out.size(1) == L * F &&
                  grad_out.scalar_type() == x.scalar_type(),
              "grad_out must be contiguous [P, L F] of x's dtype");
  const bool has_ht = h_tables.numel() > 0, has_hx = h_x.numel() > 0;
  if (has_ht) check_like(h_tables, tables, "h_tables must be contiguous [L, T, F] of the tables' dtype");
  if (has_hx) check_like(h_x, x, "h_x must be contiguous [P, 3] of x's dtype");
  const auto levels = make_levels(resolutions, T);
  auto d_grad = need_grad_out ? torch::zeros_like(grad_out) : torch::empty({0}, x.options());
  auto d_x_levels = need_x ? torch::empty({L, P, 3}, x.options()) : torch::empty({0}, x.options());
  auto d_tables = need_tables ? torch::zeros_like(tables) : torch::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hash_double_backward", [&] {
    double_backward_kernel<scalar_t>(
        x.data_ptr<scalar_t>(), tables.data_ptr<scalar_t>(), grad_out.data_ptr<scalar_t>(),
        has_ht ? h_tables.data_ptr<scalar_t>() : nullptr, has_hx ? h_x.data_ptr<scalar_t>() : nullptr,
        need_grad_out ? d_grad.data_ptr<scalar_t>() : nullptr, need_x ? d_x_levels.data_ptr<scalar_t>() : nullptr,
        need_tables ? d_tables.data_ptr<scalar_t>() : nullptr, P, L, T, F, levels, at::get_num_threads());
  });
  return {d_grad, need_x ? d_x_levels.sum(0) : d_x_levels, d_tables};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CPU multi-resolution hash encoding (gen3d.ops.hash_encoding)";
  m.def("forward", &hash_forward, "Encode: x [P,3], tables [L,T,F], resolutions int64 [L] -> [P, L F]");
  m.def("backward", &hash_backward, "Gradients w.r.t. tables [L,T,F] and x [P,3] (empty when not needed)");
  m.def("double_backward", &hash_double_backward, "Second derivatives w.r.t. grad_out, x and tables");
}
