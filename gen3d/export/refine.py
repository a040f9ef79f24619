"""Texture refinement: a short optimization of a baked UV texture through the differentiable mesh renderer.

DreamGaussian's second stage [Tang et al. 2023, Sec. 3.3 "UV-space texture refinement"]: the texture
baked from the Gaussians is blurry where the surface query misses what the splats render, so the
mesh is rendered from random views and its texture optimized (Adam on the texture, lr 0.2 in their
configs, 50 steps) against a target. Here the target is either

- ``render``: the representation's own albedo render from the same camera (what the user saw during
  training), an MSE over the pixels the mesh covers; or
- ``sds``: score distillation with the run's prior and guidance, as the first stage did.

(DreamGaussian's own target is an SDEdit-style multi-step denoising of the mesh render; gen3d's two
modes are the issue's.) The texture is parameterized by logits, texture = sigmoid(z), so it stays in
[0, 1]; texels no render reaches keep their baked values and, after the steps, seams are padded
again from the texels the mesh covers (`gen3d.export.texture.pad_texture`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from gen3d.cameras import Cameras
from gen3d.rendering.mesh import render_mesh
from gen3d.rendering.types import RenderOutput

__all__ = ["TextureRefineConfig", "refine_texture", "render_loss"]

MODES = ("render", "sds")


@dataclass
class TextureRefineConfig:
    """Texture refinement of glb / obj exports (DreamGaussian's second stage)."""

    steps: int = 0
    """Optimization steps (0: off; DreamGaussian: 50)."""
    mode: str = "render"
    """Target: render (the result's own albedo renders from the same views) or sds (the run's prior and guidance)."""
    lr: float = 0.01
    """Adam learning rate on the texture logits (DreamGaussian: 0.2 against its SDEdit targets; against the result's
    renders 0.01 measured best of 0.2, 0.05 and 0.01: larger steps overshoot the already close baked colors)."""
    batch_size: int = 4
    """Views per step."""
    resolution: int = 256
    """Render size in pixels (DreamGaussian: 512)."""

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"texture_refine.steps must be >= 0, got {self.steps}")
        if self.mode not in MODES:
            raise ValueError(f"texture_refine.mode must be one of {list(MODES)}, got {self.mode!r}")
        if not self.lr > 0:
            raise ValueError(f"texture_refine.lr must be > 0, got {self.lr}")
        if self.batch_size < 1 or not 16 <= self.resolution <= 2048:
            raise ValueError(f"texture_refine: batch_size must be >= 1 and resolution in 16..2048, got "
                             f"{self.batch_size} and {self.resolution}")


def render_loss(target: Callable[[Cameras], RenderOutput]) -> Callable[[RenderOutput, Cameras], Tensor]:
    """The ``render`` mode's loss: MSE to `target(cameras)`'s rgb on the pixels both the mesh and the target cover
    (target alpha > 0.5)."""

    def loss(out: RenderOutput, cameras: Cameras) -> Tensor:
        with torch.no_grad():
            ref = target(cameras)
        mask = out.alpha * (ref.alpha > 0.5)  # where both are opaque: the target's soft edges are blended with white
        return ((out.rgb - ref.rgb).square() * mask).sum() / (3.0 * mask.sum().clamp_min(1.0))

    return loss


def refine_texture(vertices: np.ndarray, faces: np.ndarray, uv: np.ndarray, texture: np.ndarray,
                   loss_fn: Callable[[RenderOutput, Cameras], Tensor], cameras: Callable[[int], Cameras],
                   cfg: TextureRefineConfig, device: torch.device | str = "cpu", progress: bool = True,
                   ) -> tuple[np.ndarray, list[float]]:
    """Optimize `texture` [S, S, 3] uint8 of the mesh (vertices [V, 3], faces [F, 3], uv [V, 2]) -> (texture, losses).

    loss_fn(render, cameras): the loss of a mesh render (rgb over white, alpha = coverage) from `cameras`;
    cameras(step): the views of a step (their size is the render size). Returns the refined texture as
    uint8 (seams padded from the covered texels) and the loss of every step.
    """
    from gen3d.export.texture import pad_texture, rasterize_uv

    v = torch.as_tensor(vertices, dtype=torch.float32, device=device)
    f = torch.as_tensor(faces, dtype=torch.long, device=device)
    t_uv = torch.as_tensor(uv, dtype=torch.float32, device=device)
    start = torch.as_tensor(texture, dtype=torch.float32, device=device) / 255.0
    logits = torch.logit(start.clamp(1e-3, 1 - 1e-3)).requires_grad_(True)  # [S, S, 3]
    optimizer = torch.optim.Adam([logits], lr=cfg.lr)
    losses = []
    for step in tqdm(range(cfg.steps), desc="texture refinement", unit="step", disable=not progress,
                     dynamic_ncols=True, file=sys.stderr):
        cams = cameras(step).to(device)
        out = render_mesh(v, f, cams, uv=t_uv, texture=torch.sigmoid(logits))
        loss = loss_fn(out, cams)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    image = torch.sigmoid(logits.detach()).cpu().numpy()
    size = texture.shape[0]
    covered = np.zeros(size * size, bool)
    covered[rasterize_uv(torch.as_tensor(uv), torch.as_tensor(faces, dtype=torch.long), size)[0].numpy()] = True
    image = pad_texture(image, covered.reshape(size, size))
    return (image * 255.0).round().clip(0, 255).astype(np.uint8), losses
