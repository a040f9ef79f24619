"""The compiled CPU projection: `_projection.project_gaussians` as a C++/OpenMP extension.

Same signature, same formulas, same clamps and culling as the torch reference (the kernels are in
csrc/project_cpu.cpp); one fused pass per Gaussian instead of ~60 small torch ops, and a hand-written
backward from the gradients of means2d, conics and depths (the differentiable outputs) to means,
quats and scales. Gaussians are spread over torch's threads (`torch.set_num_threads`) with OpenMP;
each Gaussian sums its cameras' gradients itself, so results do not depend on the number of threads.

Differences from the reference: outputs agree to rounding (the reference's einsum/matmul may sum in
another order), so in float32 a Gaussian exactly on a culling boundary or a radius exactly at an
integer may land on the other side. Cameras are not differentiated: when viewmats or Ks require
grad, the torch reference is used instead.

Built and cached like `_raster_cpp` (same cache directory, source hash in the extension name, one
warning and the torch reference when it cannot be built).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from gen3d.ops._projection import Projection, project_gaussians
from gen3d.ops._raster_cpp import CppExtension

SOURCE = Path(__file__).resolve().parent / "csrc" / "project_cpu.cpp"

EXTENSION = CppExtension(SOURCE, "gen3d_project_cpu", "projection", "the torch projection")


def load_extension():
    """The compiled module, or None when it cannot be built (`build_error()` says why). Built at most once."""
    return EXTENSION.load()


def build_error() -> str | None:
    """Why the extension could not be built, or None (built, or not tried yet)."""
    return EXTENSION.error


def project_cpp_available() -> bool:
    """Whether the C++ projection can be used (builds it on first call); warns once when it cannot."""
    return EXTENSION.available()


class _ProjectCpp(torch.autograd.Function):
    """`project_gaussians` with C++ kernels; see the module docstring."""

    @staticmethod
    def forward(ctx, means, quats, scales, opacities, viewmats, Ks, width: int, height: int, near_plane: float,
                far_plane: float, eps2d: float):
        ext = EXTENSION.require()
        C, N = viewmats.shape[0], means.shape[0]
        dtype = means.dtype
        tensors = [t.detach().to(dtype).contiguous() for t in (means, quats, scales, viewmats, Ks)]
        opac = opacities.detach().to(dtype).expand(C, N).contiguous()  # [C, N]
        scalars = (int(width), int(height), float(near_plane), float(far_plane), float(eps2d))
        means2d, conics, depths, visible, extents, radii = ext.forward(*tensors[:3], opac, *tensors[3:], *scalars)
        ctx.save_for_backward(*tensors)
        ctx.scalars = scalars
        ctx.mark_non_differentiable(visible, extents, radii)
        return means2d, conics, depths, visible, extents, radii

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_means2d, grad_conics, grad_depths, _grad_visible, _grad_extents, _grad_radii):
        means, quats, scales, viewmats, Ks = ctx.saved_tensors
        C, N = viewmats.shape[0], means.shape[0]

        def dense(grad, shape):  # autograd passes None for an unused output
            return means.new_zeros(shape) if grad is None else grad.to(means.dtype).contiguous()

        d_means, d_quats, d_scales = EXTENSION.require().backward(
            means, quats, scales, viewmats, Ks, *ctx.scalars,
            dense(grad_means2d, (C, N, 2)), dense(grad_conics, (C, N, 3)), dense(grad_depths, (C, N)),
        )
        return d_means, d_quats, d_scales, None, None, None, None, None, None, None, None


def project_gaussians_cpp(
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
    """`project_gaussians` in C++ for float32/float64 CPU tensors (torch reference when cameras need grad)."""
    if viewmats.requires_grad or Ks.requires_grad:  # the kernel does not differentiate the cameras
        return project_gaussians(means, quats, scales, opacities, viewmats, Ks, width, height, near_plane,
                                 far_plane, eps2d)
    means2d, conics, depths, visible, extents, radii = _ProjectCpp.apply(
        means, quats, scales, opacities, viewmats, Ks, width, height, near_plane, far_plane, eps2d,
    )
    return Projection(means2d, conics, depths, visible, extents, radii)
