"""Real spherical harmonics up to degree 3, in the convention of 3D Gaussian Splatting.

A view-dependent color is a linear combination of K = (degree + 1)^2 real SH basis functions of
the viewing direction, one coefficient vector of D channels per basis function [Kerbl et al. 2023,
"3D Gaussian Splatting for Real-Time Radiance Field Rendering", following Plenoxels, Fridovich-Keil
et al. 2022]. The basis is the orthonormal real SH basis Y_lm with the Condon-Shortley phase, in
the order and sign convention of the 3DGS reference code, so that `f_dc` / `f_rest` fields of a
Gaussian PLY written by gen3d evaluate to the same colors in other 3DGS viewers:

- l = 0: C0
- l = 1: -C1 y, C1 z, -C1 x                                   with C1 = sqrt(3 / 4pi)
- l = 2: C2a xy, -C2a yz, C2b (2z^2 - x^2 - y^2), -C2a xz, C2c (x^2 - y^2)
         with C2a = sqrt(15 / 4pi), C2b = sqrt(5 / 16pi), C2c = sqrt(15 / 16pi)
- l = 3: -C3a y (3x^2 - y^2), C3b xyz, -C3c y (4z^2 - x^2 - y^2), C3d z (2z^2 - 3x^2 - 3y^2),
         -C3c x (4z^2 - x^2 - y^2), C3e z (x^2 - y^2), -C3a x (x^2 - 3y^2)
         with C3a = sqrt(35 / 32pi), C3b = sqrt(105 / 4pi), C3c = sqrt(21 / 32pi),
         C3d = sqrt(7 / 16pi), C3e = sqrt(105 / 16pi)

**The 0.5 offset.** 3DGS stores colors so that ``rgb = max(eval_sh(...) + 0.5, 0)``. `eval_sh` returns
the raw SH sum *without* the 0.5; the caller adds 0.5 and clamps. `rgb_to_sh` / `sh_to_rgb` convert
a constant color to and from the DC coefficient and *do* include the 0.5, as PLY exporters expect.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

C0 = 0.28209479177387814  # sqrt(1 / 4pi)
C1 = math.sqrt(3.0 / (4.0 * math.pi))
_C2A = math.sqrt(15.0 / (4.0 * math.pi))
_C2B = math.sqrt(5.0 / (16.0 * math.pi))
_C2C = math.sqrt(15.0 / (16.0 * math.pi))
_C3A = math.sqrt(35.0 / (32.0 * math.pi))
_C3B = math.sqrt(105.0 / (4.0 * math.pi))
_C3C = math.sqrt(21.0 / (32.0 * math.pi))
_C3D = math.sqrt(7.0 / (16.0 * math.pi))
_C3E = math.sqrt(105.0 / (16.0 * math.pi))

MAX_DEGREE = 3


def num_sh_bases(degree: int) -> int:
    """K = (degree + 1)^2 basis functions for SH bands 0..degree."""
    return (degree + 1) ** 2


def sh_basis(degree: int, dirs: Tensor) -> Tensor:
    """The real SH basis functions Y_0..Y_{K-1} at unit directions `dirs` [..., 3] -> [..., K]."""
    if not 0 <= degree <= MAX_DEGREE:
        raise ValueError(f"sh_basis: degree must be in 0..{MAX_DEGREE}, got {degree}")
    x, y, z = dirs.unbind(-1)
    bases = [torch.full_like(x, C0)]
    if degree >= 1:
        bases += [-C1 * y, C1 * z, -C1 * x]
    if degree >= 2:
        xx, yy, zz = x * x, y * y, z * z
        bases += [
            _C2A * x * y,
            -_C2A * y * z,
            _C2B * (2.0 * zz - xx - yy),
            -_C2A * x * z,
            _C2C * (xx - yy),
        ]
    if degree >= 3:
        bases += [
            -_C3A * y * (3.0 * xx - yy),
            _C3B * x * y * z,
            -_C3C * y * (4.0 * zz - xx - yy),
            _C3D * z * (2.0 * zz - 3.0 * xx - 3.0 * yy),
            -_C3C * x * (4.0 * zz - xx - yy),
            _C3E * z * (xx - yy),
            -_C3A * x * (xx - 3.0 * yy),
        ]
    return torch.stack(bases, dim=-1)


def eval_sh(degree: int, coeffs: Tensor, dirs: Tensor) -> Tensor:
    """Evaluate SH colors: sum_k coeffs[..., k, :] * Y_k(dirs / |dirs|).

    coeffs: [..., K, D] with K >= (degree + 1)^2; only the first (degree + 1)^2 are used, so a
        degree-3 Gaussian can be rendered at a lower degree (the 3DGS warm-up schedule).
    dirs:   [..., 3] viewing directions (camera to Gaussian), need not be normalized; broadcast
        against coeffs' leading dimensions.
    Returns the raw sum [..., D], *without* the +0.5 offset of 3DGS (the caller adds it and clamps).
    """
    K = num_sh_bases(degree)
    if coeffs.dim() < 2 or coeffs.shape[-2] < K:
        raise ValueError(f"eval_sh: degree {degree} needs coeffs [..., >= {K}, D], got {tuple(coeffs.shape)}")
    if dirs.shape[-1] != 3:
        raise ValueError(f"eval_sh: dirs must be [..., 3], got {tuple(dirs.shape)}")
    basis = sh_basis(degree, torch.nn.functional.normalize(dirs, dim=-1))  # [..., K]
    return (basis[..., None] * coeffs[..., :K, :]).sum(dim=-2)


def rgb_to_sh(rgb: Tensor) -> Tensor:
    """DC coefficient whose SH color is `rgb`: (rgb - 0.5) / C0 (inverse of `sh_to_rgb`)."""
    return (rgb - 0.5) / C0


def sh_to_rgb(sh: Tensor) -> Tensor:
    """Constant color of a DC coefficient: C0 * sh + 0.5 (not clamped)."""
    return sh * C0 + 0.5
