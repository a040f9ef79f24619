"""Rendering triangle meshes (vertex colors or a UV texture) with gen3d's differentiable mesh rasterizer.

The rasterizer (`gen3d.ops.mesh_raster`) gives each pixel its face and perspective-correct
barycentrics; colors are interpolated per vertex, or uv coordinates are interpolated and the texture
is sampled bilinearly (`torch.nn.functional.grid_sample`), so gradients reach the texture, the vertex
colors and (through the barycentrics) the vertex positions. Unlit: what the albedo looks like, as
gen3d's Gaussian and field renders of the albedo are. Texture convention: glTF / OBJ, v = 0 at the
bottom of the image (row 0 is v = 1), texel centers at ((col + 0.5) / S, 1 - (row + 0.5) / S).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from gen3d.cameras import Cameras
from gen3d.errors import Gen3dError
from gen3d.ops.mesh_raster import interpolate, rasterize_mesh
from gen3d.rendering.types import RenderOutput

__all__ = ["MeshQuery", "render_mesh", "sample_texture"]


def sample_texture(texture: Tensor, uv: Tensor) -> Tensor:
    """Bilinear lookup of `texture` [S, S, 3] at uv [..., 2] (v = 0 at the image's bottom) -> [..., 3]."""
    grid = torch.stack([2.0 * uv[..., 0] - 1.0, 1.0 - 2.0 * uv[..., 1]], -1).reshape(1, -1, 1, 2)
    out = F.grid_sample(texture.permute(2, 0, 1)[None], grid.to(texture.dtype), mode="bilinear",
                        padding_mode="border", align_corners=False)  # [1, 3, P, 1]
    return out[0, :, :, 0].T.reshape(*uv.shape[:-1], texture.shape[-1])


def render_mesh(vertices: Tensor, faces: Tensor, cameras: Cameras, colors: Tensor | None = None,
                uv: Tensor | None = None, texture: Tensor | None = None, background: Tensor | None = None,
                backend: str = "auto") -> RenderOutput:
    """Render a mesh with per-vertex `colors` [V, 3] or with `uv` [V, 2] and `texture` [S, S, 3] (floats in [0, 1]).

    background: [3] color behind the mesh (white if None). Returns rgb [C, H, W, 3], alpha [C, H, W, 1]
    (1 on the mesh, 0 off it: no antialiasing), depth [C, H, W, 1] (camera z, 0 off the mesh).
    """
    if (colors is None) == (texture is None) or (texture is not None and uv is None):
        raise ValueError("render_mesh: pass either colors [V, 3], or uv [V, 2] and texture [S, S, 3]")
    raster = rasterize_mesh(vertices, faces, cameras, backend=backend)
    mask = raster.mask[..., None].to(vertices.dtype)  # [C, H, W, 1]
    if texture is None:
        rgb = interpolate(colors, faces, raster)
    else:
        rgb = sample_texture(texture, interpolate(uv, faces, raster))
    bg = torch.ones(3, dtype=rgb.dtype, device=rgb.device) if background is None else background.to(rgb)
    rgb = rgb * mask + bg * (1.0 - mask)
    return RenderOutput(rgb=rgb, alpha=mask, depth=raster.depth[..., None])


class MeshQuery:
    """An exported mesh (`trimesh.Trimesh` with a texture or vertex colors) seen by the quality metrics' renders
    (`gen3d.world.metrics.silhouette_iou`, `color_error`); it has no occupancy."""

    def __init__(self, mesh, device: torch.device | str = "cpu") -> None:
        f32 = dict(dtype=torch.float32, device=device)
        self.vertices = torch.as_tensor(np.asarray(mesh.vertices), **f32)
        self.faces = torch.as_tensor(np.asarray(mesh.faces), dtype=torch.long, device=device)
        visual = mesh.visual
        self.uv = self.texture = self.colors = None
        if getattr(visual, "kind", None) == "texture":
            image = getattr(visual.material, "baseColorTexture", None) or getattr(visual.material, "image", None)
            self.uv = torch.as_tensor(np.asarray(visual.uv), **f32)
            self.texture = torch.as_tensor(np.array(image.convert("RGB")), **f32) / 255.0
        else:
            self.colors = torch.as_tensor(np.asarray(visual.vertex_colors)[:, :3], **f32) / 255.0

    def occupancy(self, points: Tensor) -> Tensor:
        raise Gen3dError("MeshQuery has no occupancy; use the render-based metrics")

    @torch.no_grad()
    def render(self, cameras: Cameras) -> RenderOutput:
        return render_mesh(self.vertices, self.faces, cameras.to(self.vertices.device), colors=self.colors,
                           uv=self.uv, texture=self.texture)
