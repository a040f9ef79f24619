// CPU EWA projection of 3D Gaussians: forward and hand-written backward, OpenMP over Gaussians.
//
// The math is that of gen3d/ops/_projection.py (`project_gaussians`) [Zwicker et al. 2002; Kerbl et
// al. 2023], step for step and in the same order, so that the outputs agree to rounding:
//
//   t = W mu + w,  z = tz if tz > near else max(near, 1e-6)      (culled below; guards the division)
//   mean2d = (fx tx / z + cx, fy ty / z + cy)
//   u = clamp(tx / z, ...), v = clamp(ty / z, ...)               (1.3x the frustum, for J only)
//   J = [[fx / z, 0, -fx u / z], [0, fy / z, -fy v / z]]
//   M = R(q / |q|) diag(s),  F = J W M,  (a, b, c) = (F0.F0 + eps2d, F0.F1, F1.F1 + eps2d)
//   conic = (c, -b, a) / det,  det = a c - b^2  (divided by 1 where det <= 0, as the torch where does)
//
// The backward is the chain rule through those steps, with the torch conventions at the kinks:
// clamp passes the gradient where min <= x <= max, z passes it on to tz only where tz > near, and the
// quaternion normalization is F.normalize's (|q| floored at 1e-12). Only means2d, conics and depths
// carry gradients (to means, quats and scales); culling, extents and radii are not differentiable.
// M is shared by the cameras, so each Gaussian sums dL/dM over its cameras in registers and the
// quaternion and scale gradients are formed once: no atomics, and results do not depend on threads.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr double kAlphaMin = 1.0 / 255.0;  // gen3d.ops._projection.ALPHA_MIN
constexpr double kFrustumClamp = 1.3;      // gen3d.ops._projection.FRUSTUM_CLAMP
constexpr double kNormEps = 1e-12;         // torch.nn.functional.normalize's eps

struct Setup {  // scalars shared by every Gaussian
  int64_t N, C, width, height;
  double near, far, eps2d;
};

// M = R(q / |q|) diag(s), row-major, and the normalized quaternion.
template <typename T>
struct Factor {
  T q[4];      // normalized (w, x, y, z)
  T norm;      // max(|q|, 1e-12)
  T rot[9];    // R(q)
  T m[9];      // R(q) diag(s)
};

template <typename T>
inline void make_factor(const T* quat, const T* scale, Factor<T>& out) {
  const T n = std::sqrt(quat[0] * quat[0] + quat[1] * quat[1] + quat[2] * quat[2] + quat[3] * quat[3]);
  out.norm = std::max(n, static_cast<T>(kNormEps));
  for (int k = 0; k < 4; ++k) out.q[k] = quat[k] / out.norm;
  const T w = out.q[0], x = out.q[1], y = out.q[2], z = out.q[3];
  T* r = out.rot;
  r[0] = 1 - 2 * (y * y + z * z), r[1] = 2 * (x * y - w * z), r[2] = 2 * (x * z + w * y);
  r[3] = 2 * (x * y + w * z), r[4] = 1 - 2 * (x * x + z * z), r[5] = 2 * (y * z - w * x);
  r[6] = 2 * (x * z - w * y), r[7] = 2 * (y * z + w * x), r[8] = 1 - 2 * (x * x + y * y);
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) out.m[3 * i + j] = r[3 * i + j] * scale[j];
}

// One camera's view of one Gaussian: every intermediate the backward needs.
template <typename T>
struct View {
  T t[3];              // camera-space mean
  T z;                 // tz, or the guard value when tz <= near
  bool z_live;         // tz > near: z depends on tz
  T ux, uy;            // clamped tx / z, ty / z
  bool ux_live, uy_live;  // inside the clamp range (inclusive, as torch's clamp backward)
  T jw[6];             // J W, [2, 3]
  T f[6];              // J W M, [2, 3]
  T a, b, c, det;      // Sigma2d entries and determinant
};

// Per camera: the clamp range of tx / z and ty / z (1.3x the half field of view, 3DGS).
template <typename T>
struct Bounds {
  T x_lo, x_hi, y_lo, y_hi;
};

template <typename T>
std::vector<Bounds<T>> make_bounds(const T* Ks, const Setup& s) {
  std::vector<Bounds<T>> out(s.C);
  const T clamp = static_cast<T>(kFrustumClamp);
  for (int64_t cam = 0; cam < s.C; ++cam) {
    const T* K = Ks + 9 * cam;
    const T fx = K[0], fy = K[4], cx = K[2], cy = K[5];
    out[cam] = {-(clamp * cx) / fx, clamp * (static_cast<T>(s.width) - cx) / fx,
                -(clamp * cy) / fy, clamp * (static_cast<T>(s.height) - cy) / fy};
  }
  return out;
}

template <typename T>
inline void make_view(const T* mean, const Factor<T>& fac, const T* viewmat, const T* K, const Bounds<T>& bd,
                      const Setup& s, View<T>& v) {
  for (int i = 0; i < 3; ++i)
    v.t[i] = viewmat[4 * i] * mean[0] + viewmat[4 * i + 1] * mean[1] + viewmat[4 * i + 2] * mean[2] + viewmat[4 * i + 3];
  const T near = static_cast<T>(s.near);
  v.z_live = v.t[2] > near;
  v.z = v.z_live ? v.t[2] : static_cast<T>(std::max(s.near, 1e-6));
  const T fx = K[0], fy = K[4];
  const T rx = v.t[0] / v.z, ry = v.t[1] / v.z;
  v.ux_live = rx >= bd.x_lo && rx <= bd.x_hi;
  v.uy_live = ry >= bd.y_lo && ry <= bd.y_hi;
  v.ux = std::min(std::max(rx, bd.x_lo), bd.x_hi);
  v.uy = std::min(std::max(ry, bd.y_lo), bd.y_hi);
  const T j00 = fx / v.z, j02 = -fx * v.ux / v.z, j11 = fy / v.z, j12 = -fy * v.uy / v.z;
  for (int k = 0; k < 3; ++k) {
    v.jw[k] = j00 * viewmat[k] + j02 * viewmat[8 + k];
    v.jw[3 + k] = j11 * viewmat[4 + k] + j12 * viewmat[8 + k];
  }
  for (int r = 0; r < 2; ++r)
    for (int k = 0; k < 3; ++k)
      v.f[3 * r + k] = v.jw[3 * r] * fac.m[k] + v.jw[3 * r + 1] * fac.m[3 + k] + v.jw[3 * r + 2] * fac.m[6 + k];
  const T* f0 = v.f;
  const T* f1 = v.f + 3;
  const T eps = static_cast<T>(s.eps2d);
  v.a = (f0[0] * f0[0] + f0[1] * f0[1] + f0[2] * f0[2]) + eps;
  v.b = f0[0] * f1[0] + f0[1] * f1[1] + f0[2] * f1[2];
  v.c = (f1[0] * f1[0] + f1[1] * f1[1] + f1[2] * f1[2]) + eps;
  v.det = v.a * v.c - v.b * v.b;
}

template <typename T>
void forward_kernel(const T* means, const T* quats, const T* scales, const T* opacities, const T* viewmats,
                    const T* Ks, Setup s, int num_threads, T* means2d, T* conics, T* depths, bool* visible,
                    T* extents, int32_t* radii) {
  const int64_t N = s.N;
  const std::vector<Bounds<T>> bounds = make_bounds(Ks, s);
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    Factor<T> fac;
    make_factor(quats + 4 * n, scales + 3 * n, fac);
    T r = 0, o_prev = 0;
    for (int64_t cam = 0; cam < s.C; ++cam) {
      const T* K = Ks + 9 * cam;
      View<T> v;
      make_view(means + 3 * n, fac, viewmats + 16 * cam, K, bounds[cam], s, v);
      const int64_t i = cam * N + n;
      const T mx = K[0] * v.t[0] / v.z + K[2], my = K[4] * v.t[1] / v.z + K[5];
      means2d[2 * i] = mx, means2d[2 * i + 1] = my;
      const T det_safe = v.det > 0 ? v.det : T(1);
      conics[3 * i] = v.c / det_safe, conics[3 * i + 1] = -v.b / det_safe, conics[3 * i + 2] = v.a / det_safe;
      depths[i] = v.t[2];

      // alpha = o exp(-q/2) >= 1/255 inside the ellipse q <= r^2, r^2 = 2 ln(255 o).
      const T o = opacities[i];
      if (cam == 0 || o != o_prev) {  // opacities are usually shared by the cameras: one log per Gaussian
        r = std::sqrt(T(2) * std::log(std::max(o / static_cast<T>(kAlphaMin), T(1))));
        o_prev = o;
      }
      const T grow = static_cast<T>(1 + 1e-4), pad = static_cast<T>(1e-4);
      const T ex = r * std::sqrt(v.a) * grow + pad, ey = r * std::sqrt(v.c) * grow + pad;
      extents[2 * i] = ex, extents[2 * i + 1] = ey;
      const bool on_screen = (mx + ex > 0) && (mx - ex < static_cast<T>(s.width)) && (my + ey > 0) &&
                             (my - ey < static_cast<T>(s.height));
      const bool vis = v.z_live && v.t[2] < static_cast<T>(s.far) && v.det > 0 &&
                       o >= static_cast<T>(kAlphaMin) && on_screen;
      visible[i] = vis;
      const T mid = T(0.5) * (v.a + v.c);
      const T lambda_max = mid + std::sqrt(std::max(mid * mid - v.det, T(0.1)));
      radii[i] = vis ? static_cast<int32_t>(std::ceil(T(3) * std::sqrt(lambda_max))) : 0;
    }
  }
}

template <typename T>
void backward_kernel(const T* means, const T* quats, const T* scales, const T* viewmats, const T* Ks, Setup s,
                     const T* g_means2d, const T* g_conics, const T* g_depths, int num_threads, T* d_means,
                     T* d_quats, T* d_scales) {
  const int64_t N = s.N;
  const std::vector<Bounds<T>> bounds = make_bounds(Ks, s);
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    Factor<T> fac;
    make_factor(quats + 4 * n, scales + 3 * n, fac);
    T dm[9] = {0, 0, 0, 0, 0, 0, 0, 0, 0};  // dL/dM summed over cameras
    T dmu[3] = {0, 0, 0};
    for (int64_t cam = 0; cam < s.C; ++cam) {
      const T* W = viewmats + 16 * cam;
      const T* K = Ks + 9 * cam;
      const T fx = K[0], fy = K[4];
      View<T> v;
      make_view(means + 3 * n, fac, W, K, bounds[cam], s, v);
      const int64_t i = cam * N + n;

      // conic = (c, -b, a) / det  ->  dL/d(a, b, c)
      const T gA = g_conics[3 * i], gB = g_conics[3 * i + 1], gC = g_conics[3 * i + 2];
      T ga, gb, gc;
      if (v.det > 0) {
        const T inv = T(1) / v.det;
        const T g_det = -(gA * v.c - gB * v.b + gC * v.a) * inv * inv;
        ga = gC * inv + g_det * v.c;
        gb = -gB * inv - T(2) * g_det * v.b;
        gc = gA * inv + g_det * v.a;
      } else {
        ga = gC, gb = -gB, gc = gA;
      }
      // (a, b, c) = (F0.F0, F0.F1, F1.F1)  ->  dL/dF
      T gf[6];
      for (int k = 0; k < 3; ++k) {
        gf[k] = T(2) * ga * v.f[k] + gb * v.f[3 + k];
        gf[3 + k] = gb * v.f[k] + T(2) * gc * v.f[3 + k];
      }
      // F = (J W) M  ->  dL/dM += (J W)^T dL/dF,  dL/d(J W) = dL/dF M^T
      for (int r = 0; r < 3; ++r)
        for (int k = 0; k < 3; ++k) dm[3 * r + k] += v.jw[r] * gf[k] + v.jw[3 + r] * gf[3 + k];
      T gjw[6];
      for (int r = 0; r < 2; ++r)
        for (int k = 0; k < 3; ++k)
          gjw[3 * r + k] = gf[3 * r] * fac.m[3 * k] + gf[3 * r + 1] * fac.m[3 * k + 1] + gf[3 * r + 2] * fac.m[3 * k + 2];
      // J W  ->  dL/dJ = dL/d(J W) W^T on the four nonzero entries of J
      const T gj00 = gjw[0] * W[0] + gjw[1] * W[1] + gjw[2] * W[2];
      const T gj02 = gjw[0] * W[8] + gjw[1] * W[9] + gjw[2] * W[10];
      const T gj11 = gjw[3] * W[4] + gjw[4] * W[5] + gjw[5] * W[6];
      const T gj12 = gjw[3] * W[8] + gjw[4] * W[9] + gjw[5] * W[10];
      const T z = v.z, z2 = v.z * v.z;
      // J = [[fx / z, 0, -fx u / z], [0, fy / z, -fy v / z]]
      T gz = -fx / z2 * gj00 + fx * v.ux / z2 * gj02 - fy / z2 * gj11 + fy * v.uy / z2 * gj12;
      T gtx = 0, gty = 0;
      if (v.ux_live) {  // u = tx / z
        const T gu = -fx / z * gj02;
        gtx += gu / z;
        gz -= gu * v.t[0] / z2;
      }
      if (v.uy_live) {
        const T gv = -fy / z * gj12;
        gty += gv / z;
        gz -= gv * v.t[1] / z2;
      }
      // mean2d = (fx tx / z + cx, fy ty / z + cy)
      const T gmx = g_means2d[2 * i], gmy = g_means2d[2 * i + 1];
      gtx += fx * gmx / z;
      gty += fy * gmy / z;
      gz -= (fx * v.t[0] * gmx + fy * v.t[1] * gmy) / z2;
      const T gtz = g_depths[i] + (v.z_live ? gz : T(0));
      // t = W mu + w
      for (int k = 0; k < 3; ++k) dmu[k] += W[k] * gtx + W[4 + k] * gty + W[8 + k] * gtz;
    }
    for (int k = 0; k < 3; ++k) d_means[3 * n + k] = dmu[k];

    // M = R diag(s)  ->  dL/ds_j = sum_i dM_ij R_ij,  dL/dR_ij = dM_ij s_j
    const T* sc = scales + 3 * n;
    T gr[9];
    for (int r = 0; r < 3; ++r)
      for (int k = 0; k < 3; ++k) gr[3 * r + k] = dm[3 * r + k] * sc[k];
    for (int k = 0; k < 3; ++k)
      d_scales[3 * n + k] = dm[k] * fac.rot[k] + dm[3 + k] * fac.rot[3 + k] + dm[6 + k] * fac.rot[6 + k];
    // R(q_hat)  ->  dL/dq_hat
    const T w = fac.q[0], x = fac.q[1], y = fac.q[2], zq = fac.q[3];
    T gq[4];
    gq[0] = T(2) * (-zq * gr[1] + y * gr[2] + zq * gr[3] - x * gr[5] - y * gr[6] + x * gr[7]);
    gq[1] = T(2) * (y * gr[1] + zq * gr[2] + y * gr[3] - T(2) * x * gr[4] - w * gr[5] + zq * gr[6] + w * gr[7] -
                    T(2) * x * gr[8]);
    gq[2] = T(2) * (-T(2) * y * gr[0] + x * gr[1] + w * gr[2] + x * gr[3] + zq * gr[5] - w * gr[6] + zq * gr[7] -
                    T(2) * y * gr[8]);
    gq[3] = T(2) * (-T(2) * zq * gr[0] - w * gr[1] + x * gr[2] + w * gr[3] - T(2) * zq * gr[4] + y * gr[5] +
                    x * gr[6] + y * gr[7]);
    // q_hat = q / max(|q|, eps)  ->  (g - q_hat (q_hat . g)) / |q|, or g / eps below the floor
    const T* q = quats + 4 * n;
    const T qn = std::sqrt(q[0] * q[0] + q[1] * q[1] + q[2] * q[2] + q[3] * q[3]);
    const T dot = gq[0] * fac.q[0] + gq[1] * fac.q[1] + gq[2] * fac.q[2] + gq[3] * fac.q[3];
    for (int k = 0; k < 4; ++k)
      d_quats[4 * n + k] = qn > static_cast<T>(kNormEps) ? (gq[k] - fac.q[k] * dot) / fac.norm : gq[k] / fac.norm;
  }
}

void check_inputs(const torch::Tensor& means, const torch::Tensor& quats, const torch::Tensor& scales,
                  const torch::Tensor& viewmats, const torch::Tensor& Ks) {
  const auto N = means.size(0), C = viewmats.size(0);
  const auto dtype = means.scalar_type();
  TORCH_CHECK(means.dim() == 2 && means.size(1) == 3, "means must be [N, 3]");
  TORCH_CHECK(quats.sizes() == torch::IntArrayRef({N, 4}), "quats must be [N, 4]");
  TORCH_CHECK(scales.sizes() == torch::IntArrayRef({N, 3}), "scales must be [N, 3]");
  TORCH_CHECK(viewmats.sizes() == torch::IntArrayRef({C, 4, 4}), "viewmats must be [C, 4, 4]");
  TORCH_CHECK(Ks.sizes() == torch::IntArrayRef({C, 3, 3}), "Ks must be [C, 3, 3]");
  for (const auto* t : {&means, &quats, &scales, &viewmats, &Ks}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->scalar_type() == dtype,
                "projection inputs must be contiguous CPU tensors of one dtype");
  }
}

Setup make_setup(const torch::Tensor& means, const torch::Tensor& viewmats, int64_t width, int64_t height,
                 double near_plane, double far_plane, double eps2d) {
  return Setup{means.size(0), viewmats.size(0), width, height, near_plane, far_plane, eps2d};
}

}  // namespace

// -> means2d [C, N, 2], conics [C, N, 3], depths [C, N], visible [C, N] bool, extents [C, N, 2], radii [C, N] int32
std::vector<torch::Tensor> project_forward(torch::Tensor means, torch::Tensor quats, torch::Tensor scales,
                                           torch::Tensor opacities, torch::Tensor viewmats, torch::Tensor Ks,
                                           int64_t width, int64_t height, double near_plane, double far_plane,
                                           double eps2d) {
  check_inputs(means, quats, scales, viewmats, Ks);
  const Setup s = make_setup(means, viewmats, width, height, near_plane, far_plane, eps2d);
  TORCH_CHECK(opacities.sizes() == torch::IntArrayRef({s.C, s.N}) && opacities.is_contiguous() &&
                  opacities.scalar_type() == means.scalar_type(),
              "opacities must be a contiguous [C, N] tensor of the means dtype");
  const auto opts = means.options();
  auto means2d = torch::empty({s.C, s.N, 2}, opts);
  auto conics = torch::empty({s.C, s.N, 3}, opts);
  auto depths = torch::empty({s.C, s.N}, opts);
  auto visible = torch::empty({s.C, s.N}, opts.dtype(torch::kBool));
  auto extents = torch::empty({s.C, s.N, 2}, opts);
  auto radii = torch::empty({s.C, s.N}, opts.dtype(torch::kInt32));
  const int threads = at::get_num_threads();
  AT_DISPATCH_FLOATING_TYPES(means.scalar_type(), "project_forward", [&] {
    forward_kernel<scalar_t>(means.data_ptr<scalar_t>(), quats.data_ptr<scalar_t>(), scales.data_ptr<scalar_t>(),
                             opacities.data_ptr<scalar_t>(), viewmats.data_ptr<scalar_t>(), Ks.data_ptr<scalar_t>(),
                             s, threads, means2d.data_ptr<scalar_t>(), conics.data_ptr<scalar_t>(),
                             depths.data_ptr<scalar_t>(), visible.data_ptr<bool>(), extents.data_ptr<scalar_t>(),
                             radii.data_ptr<int32_t>());
  });
  return {means2d, conics, depths, visible, extents, radii};
}

// -> gradients w.r.t. means [N, 3], quats [N, 4], scales [N, 3]
std::vector<torch::Tensor> project_backward(torch::Tensor means, torch::Tensor quats, torch::Tensor scales,
                                            torch::Tensor viewmats, torch::Tensor Ks, int64_t width, int64_t height,
                                            double near_plane, double far_plane, double eps2d,
                                            torch::Tensor grad_means2d, torch::Tensor grad_conics,
                                            torch::Tensor grad_depths) {
  check_inputs(means, quats, scales, viewmats, Ks);
  const Setup s = make_setup(means, viewmats, width, height, near_plane, far_plane, eps2d);
  const auto dtype = means.scalar_type();
  TORCH_CHECK(grad_means2d.sizes() == torch::IntArrayRef({s.C, s.N, 2}) && grad_means2d.is_contiguous() &&
                  grad_means2d.scalar_type() == dtype, "grad_means2d must be a contiguous [C, N, 2] tensor");
  TORCH_CHECK(grad_conics.sizes() == torch::IntArrayRef({s.C, s.N, 3}) && grad_conics.is_contiguous() &&
                  grad_conics.scalar_type() == dtype, "grad_conics must be a contiguous [C, N, 3] tensor");
  TORCH_CHECK(grad_depths.sizes() == torch::IntArrayRef({s.C, s.N}) && grad_depths.is_contiguous() &&
                  grad_depths.scalar_type() == dtype, "grad_depths must be a contiguous [C, N] tensor");
  auto d_means = torch::empty_like(means);
  auto d_quats = torch::empty_like(quats);
  auto d_scales = torch::empty_like(scales);
  const int threads = at::get_num_threads();
  AT_DISPATCH_FLOATING_TYPES(dtype, "project_backward", [&] {
    backward_kernel<scalar_t>(means.data_ptr<scalar_t>(), quats.data_ptr<scalar_t>(), scales.data_ptr<scalar_t>(),
                              viewmats.data_ptr<scalar_t>(), Ks.data_ptr<scalar_t>(), s,
                              grad_means2d.data_ptr<scalar_t>(), grad_conics.data_ptr<scalar_t>(),
                              grad_depths.data_ptr<scalar_t>(), threads, d_means.data_ptr<scalar_t>(),
                              d_quats.data_ptr<scalar_t>(), d_scales.data_ptr<scalar_t>());
  });
  return {d_means, d_quats, d_scales};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CPU EWA projection of 3D Gaussians (gen3d.ops._project_cpp)";
  m.def("forward", &project_forward,
        "Project: means2d [C,N,2], conics [C,N,3], depths [C,N], visible [C,N], extents [C,N,2], radii [C,N]");
  m.def("backward", &project_backward, "Gradients w.r.t. means, quats, scales");
}
