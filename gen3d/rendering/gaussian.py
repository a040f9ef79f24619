"""Render a `GaussianModel` from a batch of cameras (3D Gaussian splatting, Kerbl et al. 2023)."""

from __future__ import annotations

import torch
from torch import Tensor

from gen3d.cameras import Cameras
from gen3d.ops.rasterize import rasterize_gaussians
from gen3d.ops.sh import eval_sh
from gen3d.rendering.types import RenderOutput


def render_gaussians(model, cameras: Cameras, background: Tensor | None = None,
                     sh_degree: int | None = None, backend: str = "auto") -> RenderOutput:
    """Render `model` (a `GaussianModel`) from `cameras`.

    background: [3] or [C, 3] color behind the object (black if None).
    sh_degree: SH degree to evaluate (default: the model's).
    backend: rasterizer backend, one of `gen3d.ops.rasterize.BACKENDS` (auto, torch, cpp, dense, gsplat).
    Colors follow the 3DGS convention ``rgb = max(SH(dir) + 0.5, 0)`` with the view direction
    from each camera's eye to each Gaussian.
    """
    degree = model.sh_degree if sh_degree is None else sh_degree
    sh = model.sh  # [N, K, 3]
    if degree == 0:
        colors = torch.clamp_min(eval_sh(0, sh, model.means) + 0.5, 0.0)  # [N, 3]; direction unused
    else:
        dirs = model.means[None] - cameras.eyes[:, None]  # [C, N, 3]
        colors = torch.clamp_min(eval_sh(degree, sh[None].expand(len(cameras), -1, -1, -1), dirs) + 0.5, 0.0)
    if background is not None and background.dim() == 1:
        background = background[None].expand(len(cameras), -1)
    out = rasterize_gaussians(
        model.means, model.quats, model.scales, model.opacities, colors,
        cameras.viewmats, cameras.K, cameras.width, cameras.height,
        backgrounds=background, backend=backend,  # tile size: each backend's fastest
    )
    return RenderOutput(rgb=out.colors, alpha=out.alphas, depth=out.depths, means2d=out.means2d, radii=out.radii)


class GaussianQuery:
    """A `GaussianModel` seen through the one query interface the quality metrics use.

    occupancy(points [P, 3]) -> [P] is the Gaussian density sum clamped to [0, 1] (the mesh export's
    isosurface is its 0.5 level); render(cameras) renders over white.
    """

    def __init__(self, model, backend: str = "auto"):
        self.model, self.backend = model, backend

    @torch.no_grad()
    def occupancy(self, points: Tensor) -> Tensor:
        return self.model.density(points.to(self.model.means.device)).clamp(0.0, 1.0)

    @torch.no_grad()
    def render(self, cameras: Cameras) -> RenderOutput:
        cameras = cameras.to(self.model.means.device)
        white = torch.ones(len(cameras), 3, device=self.model.means.device)
        return render_gaussians(self.model, cameras, white, backend=self.backend)
