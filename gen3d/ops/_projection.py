"""EWA projection of 3D Gaussians to screen space, shared by the torch rasterizer backends.

Math [Zwicker et al. 2002, "EWA Splatting"; Kerbl et al. 2023, "3D Gaussian Splatting", Sec. 4]:

- world covariance      Sigma = R S S^T R^T, R from the normalized quaternion (w, x, y, z), S = diag(scales)
- camera space          t = W mu + w (W, w: rotation and translation of the world-to-camera viewmat)
- local affine camera   J = [[fx / tz, 0, -fx tx / tz^2], [0, fy / tz, -fy ty / tz^2]], where tx / tz
                        and ty / tz are clamped to 1.3x the frustum (as 3DGS does) so that Gaussians
                        far outside the image do not blow up the Jacobian
- screen covariance     Sigma2d = J W Sigma W^T J^T + eps2d I (eps2d: the 3DGS low-pass filter)
- conic                 Sigma2d^-1 stored as (a, b, c) = ([0,0], [0,1], [1,1]) entries
- center                mean2d = (fx tx / tz + cx, fy ty / tz + cy) in pixels (unclamped)

All differentiable by autograd; culling and screen extents are computed without gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

ALPHA_MIN = 1.0 / 255.0  # pairs with alpha below this are skipped (3DGS)
ALPHA_MAX = 0.99  # alpha is clamped to this so that 1 - alpha never vanishes (3DGS)
FRUSTUM_CLAMP = 1.3  # Jacobian evaluated at most 1.3x the half field of view off axis (3DGS)


@dataclass
class Projection:
    """Screen-space Gaussians for C cameras; entries where `visible` is False are meaningless."""

    means2d: Tensor  # [C, N, 2] pixels
    conics: Tensor  # [C, N, 3] (a, b, c) of the inverse 2D covariance
    depths: Tensor  # [C, N] camera-space z
    visible: Tensor  # [C, N] bool: in front of the near plane, before far, reaches alpha >= 1/255 on screen
    extents: Tensor  # [C, N, 2] half-size in pixels of the box holding every pixel with alpha >= 1/255
    radii: Tensor  # [C, N] int32, ceil(3 sqrt(largest eigenvalue of Sigma2d)) as in 3DGS, 0 if not visible


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """Rotation matrices [N, 3, 3] of quaternions [N, 4] (w, x, y, z), normalized here."""
    w, x, y, z = torch.nn.functional.normalize(quats, dim=-1).unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(quats.shape[:-1] + (3, 3))


def covariance_factor(quats: Tensor, scales: Tensor) -> Tensor:
    """M = R S [N, 3, 3], so that the world covariance is Sigma = M M^T."""
    return quat_to_rotmat(quats) * scales[..., None, :]


def project_gaussians(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4]
    scales: Tensor,  # [N, 3]
    opacities: Tensor,  # [N]
    viewmats: Tensor,  # [C, 4, 4]
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    near_plane: float,
    far_plane: float,
    eps2d: float,
) -> Projection:
    """Project N Gaussians into C pinhole cameras (see the module docstring for the math)."""
    rot, trans = viewmats[:, :3, :3], viewmats[:, :3, 3]  # [C, 3, 3], [C, 3]
    t = torch.einsum("cij,nj->cni", rot, means) + trans[:, None, :]  # [C, N, 3]
    tx, ty, tz = t.unbind(-1)  # [C, N] each
    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]  # [C, 1]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]

    # Guard the division for Gaussians at or behind the camera; they are culled below.
    z = torch.where(tz > near_plane, tz, torch.full_like(tz, max(near_plane, 1e-6)))
    means2d = torch.stack([fx * tx / z + cx, fy * ty / z + cy], dim=-1)  # [C, N, 2]

    # The Jacobian is evaluated at the clamped direction to keep off-screen Gaussians tame.
    ux = (tx / z).clamp(-FRUSTUM_CLAMP * cx / fx, FRUSTUM_CLAMP * (width - cx) / fx)  # [C, N]
    uy = (ty / z).clamp(-FRUSTUM_CLAMP * cy / fy, FRUSTUM_CLAMP * (height - cy) / fy)
    zero = torch.zeros_like(z)
    jac = torch.stack([fx / z, zero, -fx * ux / z, zero, fy / z, -fy * uy / z], -1).reshape(z.shape + (2, 3))

    # Sigma2d = (J W M)(J W M)^T with M = R S: one [2, 3] factor per camera and Gaussian.
    jw = jac @ rot[:, None]  # [C, N, 2, 3]
    f = jw @ covariance_factor(quats, scales)[None]  # [C, N, 2, 3]
    cov_a = (f[..., 0, :] * f[..., 0, :]).sum(-1) + eps2d  # [C, N]
    cov_b = (f[..., 0, :] * f[..., 1, :]).sum(-1)
    cov_c = (f[..., 1, :] * f[..., 1, :]).sum(-1) + eps2d
    det = cov_a * cov_c - cov_b * cov_b
    det_safe = torch.where(det > 0, det, torch.ones_like(det))
    conics = torch.stack([cov_c / det_safe, -cov_b / det_safe, cov_a / det_safe], dim=-1)  # [C, N, 3]

    with torch.no_grad():
        opac = opacities.detach().expand_as(tz)
        # alpha = o exp(-q/2) >= 1/255  <=>  q <= 2 ln(255 o); the ellipse q <= r^2 spans
        # r sqrt(Sigma_xx) horizontally and r sqrt(Sigma_yy) vertically (plus a hair for rounding).
        r = torch.sqrt(2.0 * torch.log((opac / ALPHA_MIN).clamp_min(1.0)))
        extents = torch.stack([r * cov_a.sqrt(), r * cov_c.sqrt()], dim=-1) * (1 + 1e-4) + 1e-4
        m2 = means2d.detach()
        on_screen = (
            (m2[..., 0] + extents[..., 0] > 0) & (m2[..., 0] - extents[..., 0] < width)
            & (m2[..., 1] + extents[..., 1] > 0) & (m2[..., 1] - extents[..., 1] < height)
        )
        visible = (tz > near_plane) & (tz < far_plane) & (det > 0) & (opac >= ALPHA_MIN) & on_screen
        mid = 0.5 * (cov_a + cov_c)
        lambda_max = mid + torch.sqrt((mid * mid - det).clamp_min(0.1))
        radii = torch.where(visible, torch.ceil(3.0 * lambda_max.sqrt()), torch.zeros_like(mid)).int()
    return Projection(means2d, conics, tz, visible, extents, radii)


def gaussian_alpha(opacity: Tensor, conic: Tensor, dx: Tensor, dy: Tensor) -> Tensor:
    """alpha = min(0.99, o exp(-d^T Sigma2d^-1 d / 2)), zeroed below 1/255; broadcasts its inputs."""
    a, b, c = conic.unbind(-1)
    q = a * dx * dx + 2.0 * b * dx * dy + c * dy * dy
    alpha = opacity * torch.exp(-0.5 * q)
    return torch.nn.functional.threshold(alpha, ALPHA_MIN, 0.0).clamp_max(ALPHA_MAX)


def tile_grid(width: int, height: int, tile_size: int) -> tuple[int, int]:
    """(tiles_x, tiles_y) covering the image."""
    return math.ceil(width / tile_size), math.ceil(height / tile_size)
