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

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gen3d.guidance.base import (
    WEIGHTINGS,
    Guidance,
    GuidanceOutput,
    check_percent_schedule,
    finish,
    guided_noise,
    noise_like,
    sample_timesteps,
    timestep_weight,
)
from gen3d.schedules import Schedule, check_schedule, schedule_value

if TYPE_CHECKING:
    from gen3d.priors.diffusion import DiffusionPrior
    from gen3d.priors.prompts import PromptBatch


@dataclass
class SDSConfig:
    """Score Distillation Sampling (DreamFusion) as threestudio runs it."""

    guidance_scale: float = 100.0
    """Classifier-free guidance scale s in diffusers' convention eps_u + s (eps_c - eps_u); threestudio's value + 1."""
    min_step_percent: Schedule = 0.02
    """Lowest timestep as a fraction of the prior's T (a schedule: number or [start, v0, v1, end])."""
    max_step_percent: Schedule = 0.98
    """Highest timestep as a fraction of the prior's T (a schedule: number or [start, v0, v1, end])."""
    weighting: str = "sds"
    """w(t): "sds" = 1 - abar_t (DreamFusion), "uniform" = 1, "fantasia3d" = sqrt(abar_t) (1 - abar_t)."""
    grad_clip: Schedule | None = None
    """Clamp each entry of g to [-c, c] (a schedule, e.g. [0, 2.0, 8.0, 1000]); None disables clipping."""
    sqrt_anneal: bool = False
    """HiFA: deterministic t shared by the batch, falling from max to min step as sqrt(step / max_steps)."""

    def __post_init__(self) -> None:
        if not isinstance(self.guidance_scale, (int, float)) or self.guidance_scale < 0:
            raise ValueError(f"guidance.guidance_scale must be a number >= 0, got {self.guidance_scale!r}")
        check_percent_schedule(self.min_step_percent, "guidance.min_step_percent")
        check_percent_schedule(self.max_step_percent, "guidance.max_step_percent")
        if (isinstance(self.min_step_percent, (int, float)) and isinstance(self.max_step_percent, (int, float))
                and self.min_step_percent > self.max_step_percent):
            raise ValueError(
                f"guidance.min_step_percent ({self.min_step_percent}) must not exceed "
                f"guidance.max_step_percent ({self.max_step_percent})"
            )
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"guidance.weighting must be one of {', '.join(WEIGHTINGS)}; got {self.weighting!r}")
        if self.grad_clip is not None:
            check_schedule(self.grad_clip, "guidance.grad_clip")
            if isinstance(self.grad_clip, (int, float)) and self.grad_clip <= 0:
                raise ValueError(f"guidance.grad_clip must be > 0 or null (no clipping), got {self.grad_clip}")


class SDSGuidance(Guidance):
    """SDS over a `DiffusionPrior`: ``guidance(rgb [B, H, W, 3], prompts, step, max_steps) -> GuidanceOutput``."""

    def __init__(self, prior: "DiffusionPrior", cfg: SDSConfig | None = None) -> None:
        self.prior = prior
        self.cfg = cfg or SDSConfig()

    def guide(
        self,
        z: Tensor,
        prompts: "PromptBatch",
        step: int,
        max_steps: int,
        generator: torch.Generator | None = None,
    ) -> GuidanceOutput:
        """SDS on z ``[B, C, h, w]`` (the prior's latents or [-1, 1] pixels, requiring grad)."""
        cfg, prior = self.cfg, self.prior
        B = z.shape[0]
        z = z.float()
        t = sample_timesteps(
            B, prior.num_train_timesteps, cfg.min_step_percent, cfg.max_step_percent, step, max_steps,
            sqrt_anneal=cfg.sqrt_anneal, generator=generator,
        ).to(z.device)  # [B]
        eps = noise_like(z, generator)  # [B, C, h, w]
        with torch.no_grad():
            x_t = prior.add_noise(z.detach(), eps, t)
            pred = guided_noise(prior, x_t, t, prompts, cfg.guidance_scale)
            grad = timestep_weight(cfg.weighting, prior.alphas_cumprod, t) * (pred.eps_guided - eps)
        clip = None if cfg.grad_clip is None else schedule_value(cfg.grad_clip, step, max_steps)
        return finish(z, grad, t, clip)
