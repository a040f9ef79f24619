"""Zero-1-to-3 score distillation: SDS with a view-conditioned prior.

Zero-1-to-3 (Liu et al. 2023, "Zero-1-to-3: Zero-shot One Image to 3D Object") denoises a novel view
given the input image and the relative camera between them; used as the prior of SDS (as in their
3D reconstruction, in Magic123 and in DreamGaussian's image mode) it pulls every render of the 3D
result toward a view of the object in the input image from that render's camera:

    pose  = (delta elevation, sin delta azimuth, cos delta azimuth, delta distance)   (render vs input camera)
    x_t   = sqrt(abar_t) z + sqrt(1 - abar_t) eps
    eps^  = eps_u + s (eps_c(x_t; input view, pose) - eps_u)                       (CFG, no UNet gradient)
    g     = w(t) (eps^ - eps),   L = 0.5 sum((z - sg(z - g))^2) / B

with the timestep range, w(t), the CFG scale s (Zero123's default 3; DreamGaussian uses 5) and
clipping from a `GuidanceConfig`. The input view is encoded once; each step only re-projects the
poses (`ViewConditionedPrior.repose`). Convention: gen3d's poses use the elevation change (up is
positive); Zero123's polar-angle change is its negative (`gen3d.priors.view_conditioning.relative_pose`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gen3d.guidance.base import Guidance, GuidanceOutput, finish, noise_like, timestep_weight
from gen3d.guidance.config import GuidanceConfig
from gen3d.priors.view_conditioning import relative_pose

if TYPE_CHECKING:
    from gen3d.cameras import Cameras
    from gen3d.priors.view_conditioning import ViewConditionedPrior


class Zero123Guidance(Guidance):
    """``guidance(rgb [B, H, W, 3], cameras, step, max_steps) -> GuidanceOutput`` for one input view.

    reference: the input view [H, W, 3] (or [1, H, W, 3]) in [0, 1] on white; elevation, azimuth (degrees)
    and distance of the camera it was taken from (the 3D result's frame is the input camera's).
    """

    def __init__(self, prior: "ViewConditionedPrior", reference: Tensor, elevation: float, azimuth: float,
                 distance: float, cfg: GuidanceConfig | None = None) -> None:
        self.prior, self.cfg = prior, cfg or GuidanceConfig(guidance_scale=3.0)
        if cfg is not None and cfg.type != "sds":
            raise ValueError(f"image guidance is Zero123 SDS; guidance type {cfg.type!r} is not supported with it")
        self.reference = (float(elevation), float(azimuth), float(distance))
        image = reference[None] if reference.dim() == 3 else reference
        with torch.no_grad():
            self.condition = prior.encode_condition(image, relative_pose(*self.reference, *self.reference))

    def poses(self, cameras: "Cameras") -> Tensor:
        """Relative poses [B, 4] from the input camera to `cameras`."""
        return relative_pose(*self.reference, cameras.elevation.cpu(), cameras.azimuth.cpu(), cameras.distance.cpu())

    def __call__(self, rgb: Tensor, cameras: "Cameras", step: int, max_steps: int,  # type: ignore[override]
                 generator: torch.Generator | None = None) -> GuidanceOutput:
        if rgb.ndim != 4 or rgb.shape[-1] != 3:
            raise ValueError(f"Zero123Guidance: rgb must be [B, H, W, 3], got {tuple(rgb.shape)}")
        if rgb.shape[0] != len(cameras):
            raise ValueError(f"Zero123Guidance: {rgb.shape[0]} renders but {len(cameras)} cameras")
        prior, B = self.prior, rgb.shape[0]
        condition = prior.repose(self.condition.expand(B), self.poses(cameras))
        z = prior.encode(rgb).float()
        t = self.timesteps(B, step, max_steps, generator).to(z.device)
        eps = noise_like(z, generator)
        with torch.no_grad():
            x_t = prior.add_noise(z.detach(), eps, t)
            pred = prior.predict_noise(x_t, t, condition, self.scale(step, max_steps))
            grad = timestep_weight(self.cfg.weighting, prior.alphas_cumprod, t) * (pred.eps_guided - eps)
        return finish(z, grad, t, self.clip(step, max_steps))
