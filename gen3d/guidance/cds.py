"""Consistency distillation (CDS) from Consistent3D.

Consistent3D (Wu et al. 2024, "Consistent3D: Towards Consistent High-Fidelity Text-to-3D Generation
with Deterministic Sampling Prior") replaces SDS's fresh random noise, which makes its gradient a
stochastic-differential-equation sample, with the deterministic probability-flow ODE: two adjacent
points of one ODE trajectory under a *fixed* perturbation eps*, the less noisy guiding the noisier.
In the variance-exploding form u = z + sigma eps* with sigma_t = sqrt((1 - abar_t) / abar_t)
(the usual x_t is sqrt(abar_t) u_t):

    eps_t  = teacher(x_t, t)                                 x_t  = sqrt(abar_t) (z + sigma_t eps*)
    u_t'   = u_t + (sigma_t' - sigma_t) eps_t                one Euler (= DDIM) ODE step to t' < t
    eps_t' = teacher(sqrt(abar_t') u_t', t')
    g      = w(t) (eps_t - eps_t')

so CDS is SDS with the true noise replaced by the teacher's prediction at the ODE-advanced point.
Sign (ALGORITHMS.md §3): the official code writes ``target = z + w (eps_t' - eps_t)``, so z descends
along w (eps_t - eps_t'), as here.

Schedule: the batch shares t' = a + (b - a) sqrt(min(k / K, 1)) at step k (falling from `t_start` to
`t_end`), clamped to [min_sigma, max_sigma - end_gap]; then t = t' + U{end_gap, end_gap + perturb},
clamped to [min_sigma, max_sigma]. eps* is drawn once per run (``share_noise``) from the run's
generator, shaped like one z, shared by every view and step, and checkpointed (``share_noise=false``
draws a fresh noise per view and step instead, an ablation).

CFG convention: the teacher is the prior with classifier-free guidance in diffusers' convention
``eps_u + s (eps_c - eps_u)`` (the official code's threestudio form ``eps_c + g (eps_c - eps_u)`` is
g = s - 1), through Perp-Neg when the prompts carry negatives (the official code has no Perp-Neg
for CDS; gen3d allows it). ``recon_std_rescale`` (0 in every official config) is not implemented.
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


def cds_timesteps(
    cfg: GuidanceConfig, num_train_timesteps: int, step: int, max_steps: int, generator: torch.Generator | None = None
) -> tuple[int, int]:
    """The (t, t') pair of training `step`: t' on the decreasing sqrt schedule, t = t' + gap + perturbation."""
    c, T = cfg.cds, num_train_timesteps
    index = lambda frac: min(int(T * frac + 1e-6), T - 1)  # noqa: E731
    lo, hi, gap, perturb = index(c.min_sigma_percent), index(c.max_sigma_percent), index(c.end_gap), index(c.perturb)
    K = c.anneal_steps * max_steps if isinstance(c.anneal_steps, float) and c.anneal_steps <= 1.0 else c.anneal_steps
    progress = min(step / max(K, 1.0), 1.0) ** 0.5
    a, b = T * c.t_start, T * c.t_end
    t_less = int(min(max(a + (b - a) * progress, lo), hi - gap))
    shift = int(torch.randint(gap, gap + max(perturb, 1), (1,), generator=generator).item())
    t = min(max(t_less + shift, lo), hi)
    return t, t_less


def sigma_ve(abar: Tensor) -> Tensor:
    """The variance-exploding noise level sqrt((1 - abar) / abar)."""
    return ((1.0 - abar) / abar).sqrt()


class CDSGuidance(Guidance):
    """Consistency distillation over a `DiffusionPrior` (see the module docstring)."""

    def __init__(self, prior: "DiffusionPrior", cfg: GuidanceConfig | None = None) -> None:
        self.prior = prior
        self.cfg = cfg or GuidanceConfig(type="cds")
        self.fixed_noise: Tensor | None = None  # [C, h, w] eps*, drawn on the first call

    def teacher(self, x: Tensor, t: Tensor, prompts: "PromptBatch", scale: float) -> Tensor:
        """The CFG epsilon ``[B, C, h, w]`` of the prior at (x, t)."""
        return guided_noise(self.prior, x, t, prompts, scale, self.cfg.perp_neg_scale).eps_guided

    def guide(
        self,
        z: Tensor,
        prompts: "PromptBatch",
        step: int,
        max_steps: int,
        generator: torch.Generator | None = None,
        cameras: "Cameras | None" = None,
    ) -> GuidanceOutput:
        """CDS on z ``[B, C, h, w]``."""
        cfg, prior = self.cfg, self.prior
        B = z.shape[0]
        z = z.float()
        if not cfg.cds.share_noise:
            noise = noise_like(z, generator)
        else:
            if self.fixed_noise is None or self.fixed_noise.shape != z.shape[1:]:
                self.fixed_noise = noise_like(z[0], generator)
            noise = self.fixed_noise.to(z.device).expand_as(z)
        t_int, t_less_int = cds_timesteps(cfg, prior.num_train_timesteps, step, max_steps, generator)
        t = torch.full((B,), t_int, dtype=torch.long, device=z.device)
        t_less = torch.full((B,), t_less_int, dtype=torch.long, device=z.device)
        abar = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
        abar_less = prior.alphas_cumprod[t_less].view(-1, 1, 1, 1)
        scale = self.scale(step, max_steps)
        with torch.no_grad():
            u = z.detach() + sigma_ve(abar) * noise
            eps_t = self.teacher(abar.sqrt() * u, t, prompts, scale)
            u_less = u + (sigma_ve(abar_less) - sigma_ve(abar)) * eps_t
            eps_less = self.teacher(abar_less.sqrt() * u_less, t_less, prompts, scale)
            grad = timestep_weight(cfg.weighting, prior.alphas_cumprod, t) * (eps_t - eps_less)
        return finish(z, grad, t, self.clip(step, max_steps), logs={"t_less": float(t_less_int)})

    def state_dict(self) -> dict:
        return {} if self.fixed_noise is None else {"fixed_noise": self.fixed_noise.detach().cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.fixed_noise = state.get("fixed_noise")
