"""Typed outputs of renderers."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class SampleRecord:
    """Per-sample quantities of a volume render, for regularizers that act along rays (S samples of
    R rays, packed and sorted by ray; see `gen3d.ops.volume.RaySamples`)."""

    weights: Tensor  # [S] compositing weights w_i = T_i alpha_i (differentiable)
    normals: Tensor | None  # [S, 3] unit outward world normals, None when the renderer computed none
    directions: Tensor  # [S, 3] unit world direction of each sample's ray (camera to point)
    ray_indices: Tensor  # [S] long, index of each sample's ray in [0, n_rays), rays in [C, H, W] order
    n_rays: int  # R = C * H * W
    t_starts: Tensor | None = None  # [S] interval starts along the ray (for interval losses, e.g. distortion)
    t_ends: Tensor | None = None  # [S] interval ends


@dataclass
class RenderOutput:
    """What a renderer returns for C cameras of size H x W."""

    rgb: Tensor  # [C, H, W, 3] in [0, 1], composited over the background
    alpha: Tensor  # [C, H, W, 1] accumulated opacity
    depth: Tensor  # [C, H, W, 1] expected camera-space depth (z), 0 where alpha is ~0
    normal: Tensor | None = None  # [C, H, W, 3] world-space normals, where the renderer has them
    means2d: Tensor | None = None  # [C, N, 2] projected Gaussian centers; its .grad drives densification
    radii: Tensor | None = None  # [C, N] screen-space radius in pixels, 0 for culled Gaussians
    samples: SampleRecord | None = None  # per-sample record of a volume render (None for Gaussians)
