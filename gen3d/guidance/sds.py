"""Score Distillation Sampling (SDS).

DreamFusion (Poole et al. 2022, "DreamFusion: Text-to-3D using 2D Diffusion") optimises a 3D scene
so that its renders look likely to a frozen text-to-image diffusion model. For a render encoded to
z, a random timestep t and noise eps:

    x_t   = sqrt(abar_t) z + sqrt(1 - abar_t) eps
    eps^  = eps_u + s (eps_c - eps_u)                       (classifier-free guidance, no UNet grad)
    g     = w(t) (eps^ - eps)
    L     = 0.5 sum((z - sg(z - g))^2) / B                  so dL/dz = g / B

as threestudio implements it (ALGORITHMS.md §1), with these deliberate conventions:

- guidance_scale s is in diffusers' convention (eps_u + s (eps_c - eps_u)); threestudio's g is s - 1.
- weighting "sds" is DreamFusion's w(t) = sigma_t^2 = 1 - abar_t; "uniform" is 1; "fantasia3d" is
  sqrt(abar_t) (1 - abar_t), the variant threestudio names after Fantasia3D (Chen et al. 2023,
  "Fantasia3D: Disentangling Geometry and Appearance for High-quality Text-to-3D Content Creation").
- For latent priors z is the VAE latent and g reaches the render through the encoder, as in Magic3D
  (Lin et al. 2023, "Magic3D: High-Resolution Text-to-3D Content Creation") and threestudio's SD guidance.
- non-finite entries of g become 0 (threestudio maps Inf to the largest float); the count is reported.
- ``sqrt_anneal`` is HiFA's deterministic timestep schedule (Zhu et al. 2023).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gen3d.guidance.base import Guidance, GuidanceOutput, finish, guided_noise, noise_like, timestep_weight
from gen3d.guidance.config import GuidanceConfig

if TYPE_CHECKING:
    from gen3d.cameras import Cameras
    from gen3d.priors.diffusion import DiffusionPrior
    from gen3d.priors.prompts import PromptBatch


class SDSGuidance(Guidance):
    """SDS over a `DiffusionPrior`: ``guidance(rgb [B, H, W, 3], prompts, step, max_steps) -> GuidanceOutput``."""

    def __init__(self, prior: "DiffusionPrior", cfg: GuidanceConfig | None = None) -> None:
        self.prior = prior
        self.cfg = cfg or GuidanceConfig()

    def noise(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The diffusion noise eps, shaped like z."""
        return noise_like(z, generator)

    def guide(
        self,
        z: Tensor,
        prompts: "PromptBatch",
        step: int,
        max_steps: int,
        generator: torch.Generator | None = None,
        cameras: "Cameras | None" = None,
    ) -> GuidanceOutput:
        """SDS on z ``[B, C, h, w]`` (the prior's latents or [-1, 1] pixels, requiring grad), or on a video prior's
        ``[B, C, F, h, w]``."""
        cfg, prior = self.cfg, self.prior
        B = z.shape[0]
        z = z.float()
        t = self.timesteps(B, step, max_steps, generator).to(z.device)  # [B]
        eps = self.noise(z, generator)  # [B, C, h, w]
        with torch.no_grad():
            x_t = prior.add_noise(z.detach(), eps, t)
            pred = guided_noise(prior, x_t, t, prompts, self.scale(step, max_steps), cfg.perp_neg_scale)
            w = timestep_weight(cfg.weighting, prior.alphas_cumprod, t).view(-1, *[1] * (z.ndim - 1))
            grad = w * (pred.eps_guided - eps)
        return finish(z, grad, t, self.clip(step, max_steps))
