"""Typed outputs of renderers."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class RenderOutput:
    """What a renderer returns for C cameras of size H x W."""

    rgb: Tensor  # [C, H, W, 3] in [0, 1], composited over the background
    alpha: Tensor  # [C, H, W, 1] accumulated opacity
    depth: Tensor  # [C, H, W, 1] expected camera-space depth (z), 0 where alpha is ~0
    normal: Tensor | None = None  # [C, H, W, 3] world-space normals, where the renderer has them
    means2d: Tensor | None = None  # [C, N, 2] projected Gaussian centers; its .grad drives densification
    radii: Tensor | None = None  # [C, N] screen-space radius in pixels, 0 for culled Gaussians
