"""Triplane feature sampling [Chan et al. 2022, "Efficient Geometry-aware 3D Generative Adversarial
Networks" (EG3D)].

A point x = (x, y, z) in [-1, 1]^3 is projected onto three axis-aligned feature planes, each
``[F, R, R]``, and each is sampled bilinearly:

    plane 0 "xy": width axis x, height axis y
    plane 1 "xz": width axis x, height axis z
    plane 2 "yz": width axis y, height axis z

(row index = height, column index = width, as `F.grid_sample` reads ``grid[..., 0]`` along the width).
The three samples ``[P, F]`` are then reduced:

- ``"sum"``: their sum (EG3D, which sums; its decoder then sees F features);
- ``"product"``: their elementwise product [Fridovich-Keil et al. 2023, "K-Planes"], which makes a
  feature depend jointly on the three coordinates;
- ``"concat"``: ``[P, 3F]``, plane-major (features of xy, then xz, then yz).

Sampling: ``align_corners=True`` (texel (i, j) sits exactly at ``-1 + 2 j / (R - 1)`` along the width,
``-1 + 2 i / (R - 1)`` along the height, so the R x R texels are the vertices of a grid spanning
[-1, 1]^2, as in the hash grid's levels), ``padding_mode="border"``: points outside [-1, 1] read the
edge (the fields give them density 0 anyway). Differentiable w.r.t. the planes and x, also twice
(bilinear `grid_sample` has an exact double backward), so analytic normals can be trained.

One `F.grid_sample` call for the three planes (a batch of 3). `sample_triplane_reference` is the
same sampling written out as 4-corner gathers, for the tests and the benchmark.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

REDUCTIONS = ("sum", "product", "concat")
PLANE_AXES = ((0, 1), (0, 2), (1, 2))
"""(width axis, height axis) of planes xy, xz and yz."""


def sample_triplane(
    planes: Tensor,  # [3, F, R, R] planes xy, xz, yz
    x: Tensor,  # [P, 3] in [-1, 1]
    reduce: str = "sum",
) -> Tensor:  # [P, F] ("sum", "product") or [P, 3F] ("concat")
    """Bilinear samples of the three planes at the projections of `x`, reduced (see the module docstring)."""
    _check_inputs(planes, x, reduce, "sample_triplane")
    P, nf = x.shape[0], planes.shape[1]
    grid = torch.stack([x[:, list(axes)] for axes in PLANE_AXES])  # [3, P, 2] (width coord, height coord)
    samples = F.grid_sample(planes, grid[:, None], mode="bilinear", padding_mode="border", align_corners=True)
    samples = samples[:, :, 0]  # [3, F, P]
    return _reduce(samples, reduce, P, nf)


def sample_triplane_reference(planes: Tensor, x: Tensor, reduce: str = "sum") -> Tensor:
    """`sample_triplane` by hand: per plane, the 4 texels around the point and their bilinear weights."""
    _check_inputs(planes, x, reduce, "sample_triplane_reference")
    P, nf, R = x.shape[0], planes.shape[1], planes.shape[-1]
    out = []
    for plane, (wa, ha) in zip(planes, PLANE_AXES):
        u = (x[:, wa].clamp(-1, 1) + 1) / 2 * (R - 1)  # [P] continuous column
        v = (x[:, ha].clamp(-1, 1) + 1) / 2 * (R - 1)  # [P] continuous row
        u0 = u.detach().floor().clamp(max=R - 2).long()  # lower texel (the last cell on the upper edge)
        v0 = v.detach().floor().clamp(max=R - 2).long()
        fu, fv = u - u0, v - v0
        u1, v1 = u0 + 1, v0 + 1
        value = (plane[:, v0, u0] * (1 - fu) * (1 - fv) + plane[:, v0, u1] * fu * (1 - fv)
                 + plane[:, v1, u0] * (1 - fu) * fv + plane[:, v1, u1] * fu * fv)  # [F, P]
        out.append(value)
    return _reduce(torch.stack(out), reduce, P, nf)


def _reduce(samples: Tensor, reduce: str, P: int, nf: int) -> Tensor:  # samples [3, F, P]
    if reduce == "sum":
        return samples.sum(0).t()
    if reduce == "product":
        return samples.prod(0).t()
    return samples.permute(2, 0, 1).reshape(P, 3 * nf)


def _check_inputs(planes, x, reduce, who: str) -> None:
    if not isinstance(planes, Tensor) or planes.dim() != 4 or planes.shape[0] != 3 or planes.shape[2] != planes.shape[3]:
        raise ValueError(f"{who}: planes must be a tensor [3, F, R, R], got "
                         f"{tuple(planes.shape) if isinstance(planes, Tensor) else type(planes).__name__}")
    if not planes.is_floating_point() or planes.shape[1] < 1 or planes.shape[2] < 2:
        raise ValueError(f"{who}: planes must be floating with F >= 1 and R >= 2, got {tuple(planes.shape)} {planes.dtype}")
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[-1] != 3 or not x.is_floating_point():
        raise ValueError(f"{who}: x must be a float tensor [P, 3], got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if x.dtype != planes.dtype or x.device != planes.device:
        raise ValueError(f"{who}: x and planes must share dtype and device, got {x.dtype} on {x.device} "
                         f"and {planes.dtype} on {planes.device}")
    if reduce not in REDUCTIONS:
        raise ValueError(f"{who}: reduce must be one of {REDUCTIONS}, got {reduce!r}")
