"""Asynchronous Score Distillation (ASD) from ScaleDreamer.

ScaleDreamer (Ma et al. 2024, "ScaleDreamer: Scalable Text-to-3D Synthesis with Asynchronous Score
Distillation") keeps SDS's frozen prior and no LoRA, and replaces the true noise in the SDS gradient
by the prior's own *conditional* prediction at a slightly later timestep t+ > t, with the same
noise eps (ALGORITHMS.md §4):

    t   ~ U{min_step .. max_step}
    d   = plus_ratio (t - min_step), clamped to [0, T - 1 - t];  if plus_random: d <- d U(0, 1)
    t+  = clamp(t + floor(d), 1, T - 1)
    x_t = add_noise(z, eps, t);   x_t+ = add_noise(z, eps, t+)
    g   = w(t) (eps_hat(x_t, t) - eps_c(x_t+, t+))

The shift makes eps_c(x_t+, t+) a stand-in for the score of the renders' own distribution (VSD's
LoRA estimator) at no training cost: the prior drifts little between t and t+, so the difference
keeps the CFG direction and removes the noise residual of SDS's "eps_hat - eps".

CFG convention: the first term is classifier-free guided in diffusers' convention
``eps_u + s (eps_c - eps_u)`` (ScaleDreamer: s = 7.5, the same convention), through Perp-Neg when
the prompts carry negatives (ScaleDreamer scales the negative weights by 0.5: `perp_neg_scale`);
the second term is the plain conditional prediction, without CFG. With a zero shift
g = w(t) (s - 1) (eps_c - eps_u): the CFG direction alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gen3d.guidance.base import Guidance, GuidanceOutput, finish, guided_noise, noise_like, step_range, timestep_weight
from gen3d.guidance.config import GuidanceConfig
from gen3d.schedules import schedule_value

if TYPE_CHECKING:
    from gen3d.cameras import Cameras
    from gen3d.priors.diffusion import DiffusionPrior
    from gen3d.priors.prompts import PromptBatch


def shifted_timesteps(
    t: Tensor, min_step: int, num_train_timesteps: int, plus_ratio: float, plus_random: bool,
    generator: torch.Generator | None = None,
) -> Tensor:
    """ScaleDreamer's t+ ``[B]`` for timesteps t ``[B]`` (int64, CPU)."""
    T = num_train_timesteps
    shift = (plus_ratio * (t - min_step).float()).clamp(min=0.0)
    shift = torch.minimum(shift, (T - 1 - t).float())
    if plus_random:
        shift = shift * torch.rand(t.shape, generator=generator)
    return (t + shift.floor().long()).clamp(1, T - 1)


class ASDGuidance(Guidance):
    """Asynchronous score distillation over a `DiffusionPrior` (see the module docstring)."""

    def __init__(self, prior: "DiffusionPrior", cfg: GuidanceConfig | None = None) -> None:
        self.prior = prior
        self.cfg = cfg or GuidanceConfig(type="asd")

    def guide(
        self,
        z: Tensor,
        prompts: "PromptBatch",
        step: int,
        max_steps: int,
        generator: torch.Generator | None = None,
        cameras: "Cameras | None" = None,
    ) -> GuidanceOutput:
        """ASD on z ``[B, C, h, w]``."""
        cfg, prior = self.cfg, self.prior
        B, T = z.shape[0], prior.num_train_timesteps
        z = z.float()
        t = self.timesteps(B, step, max_steps, generator)  # [B] CPU
        min_step, _ = step_range(T, schedule_value(cfg.min_step_percent, step, max_steps),
                                 schedule_value(cfg.max_step_percent, step, max_steps))
        t_plus = shifted_timesteps(t, min_step, T, cfg.asd.plus_ratio, cfg.asd.plus_random, generator)
        t, t_plus = t.to(z.device), t_plus.to(z.device)
        eps = noise_like(z, generator)  # [B, C, h, w] one noise for both timesteps
        with torch.no_grad():
            x_t = prior.add_noise(z.detach(), eps, t)
            eps_guided = guided_noise(prior, x_t, t, prompts, self.scale(step, max_steps), cfg.perp_neg_scale).eps_guided
            eps_plus = prior.unet_eps(prior.add_noise(z.detach(), eps, t_plus), t_plus, prompts.cond)
            grad = timestep_weight(cfg.weighting, prior.alphas_cumprod, t) * (eps_guided - eps_plus)
        return finish(z, grad, t, self.clip(step, max_steps), logs={"t_plus": float(t_plus.float().mean())})
