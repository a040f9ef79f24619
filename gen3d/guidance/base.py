"""What every score-distillation guidance shares: its output type, timestep sampling, weighting,
and the reparameterised loss that applies a hand-computed gradient.

A guidance computes a per-element gradient g on the prior's input z (without backpropagating
through the UNet, as DreamFusion's SDS does) and applies it with

    L = 0.5 * sum((z - sg(z - g))^2) / B,   so   dL/dz = g / B

(sg = stop-gradient). Autograd then carries g / B through the VAE encoder and resize back to the
render and the 3D parameters. SDS, VSD, CDS and ASD differ only in how they compute g.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gen3d.schedules import Schedule, check_schedule, schedule_value

if TYPE_CHECKING:
    from gen3d.cameras import Cameras
    from gen3d.priors.diffusion import DiffusionPrior, NoisePrediction
    from gen3d.priors.prompts import PromptBatch

WEIGHTINGS = ("sds", "uniform", "fantasia3d")


@dataclass
class GuidanceOutput:
    """What a guidance returns for one batch of B renders."""

    loss: Tensor  # [] scalar to backpropagate: 0.5 * sum((z - sg(z - g))^2) / B
    grad: Tensor  # [B, C, h, w] g, detached (after the non-finite guard and clipping)
    t: Tensor  # [B] int64 diffusion timesteps used
    grad_norm: float  # ||g||_2 over the batch, for logging
    nonfinite: int  # NaN/Inf entries of g replaced by 0 (non-zero means the prior misbehaved)
    logs: dict[str, float] = field(default_factory=dict)  # extra scalars to log (e.g. VSD's LoRA loss)


def step_range(num_train_timesteps: int, min_percent: float, max_percent: float) -> tuple[int, int]:
    """Integer timestep bounds ``(int(T * min_percent), int(T * max_percent))``, clamped to [0, T - 1].

    A 1e-6 guard keeps float error from turning e.g. 0.29 * 100 = 28.999... into 28.
    """
    if not 0.0 <= min_percent <= max_percent <= 1.0:
        raise ValueError(
            f"timestep range needs 0 <= min_step_percent <= max_step_percent <= 1, got {min_percent} and {max_percent}"
        )
    T = num_train_timesteps
    lo = min(int(T * min_percent + 1e-6), T - 1)
    hi = min(int(T * max_percent + 1e-6), T - 1)
    return lo, hi


def sample_timesteps(
    batch_size: int,
    num_train_timesteps: int,
    min_percent: Schedule,
    max_percent: Schedule,
    step: int,
    max_steps: int,
    *,
    sqrt_anneal: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Timesteps ``[B]`` (int64, CPU) for this training step, as threestudio samples them.

    Default: ``t ~ randint(min_step, max_step + 1)`` independently per sample, with the percentages
    evaluated from their schedules at `step`. ``sqrt_anneal`` (HiFA, Zhu et al. 2023, "HiFA:
    High-fidelity Text-to-3D Generation with Advanced Diffusion Guidance"): a deterministic t shared
    by the batch, ``pct = (max - min) * (1 - sqrt(step / max_steps)) + min``, so t falls from
    max_step to min_step over the run.
    """
    lo_pct = schedule_value(min_percent, step, max_steps)
    hi_pct = schedule_value(max_percent, step, max_steps)
    if sqrt_anneal:
        p = (min(max(step, 0), max_steps) / max(max_steps, 1)) ** 0.5
        pct = (hi_pct - lo_pct) * (1.0 - p) + lo_pct
        lo, _ = step_range(num_train_timesteps, pct, pct)
        return torch.full((batch_size,), lo, dtype=torch.long)
    lo, hi = step_range(num_train_timesteps, lo_pct, hi_pct)
    device = generator.device if generator is not None else "cpu"
    return torch.randint(lo, hi + 1, (batch_size,), generator=generator, device=device).cpu()


def timestep_weight(weighting: str, alphas_cumprod: Tensor, t: Tensor) -> Tensor:
    """w(t) ``[B, 1, 1, 1]`` for timesteps t ``[B]`` given abar ``[T]``.

    "sds": 1 - abar_t (DreamFusion's w(t) = sigma_t^2); "uniform": 1; "fantasia3d":
    sqrt(abar_t) * (1 - abar_t) (the weighting threestudio names after Fantasia3D, Chen et al. 2023,
    which damps large t further).
    """
    abar = alphas_cumprod[t.to(alphas_cumprod.device).long()].view(-1, 1, 1, 1).float()
    if weighting == "sds":
        return 1.0 - abar
    if weighting == "uniform":
        return torch.ones_like(abar)
    if weighting == "fantasia3d":
        return abar.sqrt() * (1.0 - abar)
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")


def reparameterized_loss(z: Tensor, grad: Tensor) -> Tensor:
    """``0.5 * sum((z - sg(z - g))^2) / B``: a scalar whose gradient w.r.t. z is exactly g / B."""
    target = (z - grad).detach()
    return 0.5 * (z - target).pow(2).sum() / z.shape[0]


def finish(
    z: Tensor, grad: Tensor, t: Tensor, grad_clip: float | None = None, logs: dict[str, float] | None = None
) -> GuidanceOutput:
    """Guard g against NaN/Inf, clip it to [-c, c] if asked, and build the GuidanceOutput for z ``[B, ...]``.

    Non-finite entries (NaN and +-Inf) become 0. threestudio's ``nan_to_num`` maps Inf to the largest
    float instead; zero is deliberate here, so one bad pixel cannot make the loss infinite.
    """
    grad = grad.detach().float()
    bad = ~torch.isfinite(grad)
    nonfinite = int(bad.sum())
    if nonfinite:
        grad = torch.where(bad, torch.zeros_like(grad), grad)
    if grad_clip is not None:
        grad = grad.clamp(-grad_clip, grad_clip)
    z = z.float()
    return GuidanceOutput(
        loss=reparameterized_loss(z, grad),
        grad=grad,
        t=t,
        grad_norm=float(grad.norm()),
        nonfinite=nonfinite,
        logs=logs or {},
    )


def check_percent_schedule(value: Schedule, name: str) -> None:
    """ValueError unless `value` is a schedule whose values (and constant value) lie in [0, 1]."""
    check_schedule(value, name)
    values = [value] if isinstance(value, (int, float)) else _schedule_values(value)
    if any(not 0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"{name} must stay within [0, 1] (a fraction of the diffusion timesteps), got {value!r}")


def _schedule_values(value) -> list[float]:
    """The value entries (not the step entries) of a schedule list."""
    v = list(value)
    if len(v) == 3:
        return [v[0], v[1]]
    if len(v) == 4:
        return [v[1], v[2]]
    return v[1::2]


def noise_like(z: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard normal noise shaped like z (float32), drawn from `generator` when given."""
    device = generator.device if generator is not None else z.device
    return torch.randn(z.shape, generator=generator, device=device, dtype=torch.float32).to(z.device)


def guided_noise(
    prior: "DiffusionPrior", x_t: Tensor, t: Tensor, prompts: "PromptBatch", guidance_scale: float,
    perp_neg_scale: float = 1.0,
) -> "NoisePrediction":
    """The prior's CFG epsilon for `prompts`, through Perp-Neg when the batch carries negatives.

    `perp_neg_scale` multiplies the prompt processor's negative weights (ScaleDreamer's ASD uses 0.5).
    """
    if prompts.neg is not None:
        return prior.predict_noise_perp_neg(
            x_t, t, prompts.cond, prompts.uncond, prompts.neg, prompts.neg_weights * perp_neg_scale, guidance_scale
        )
    return prior.predict_noise(x_t, t, prompts.cond, prompts.uncond, guidance_scale)


class Guidance:
    """Base of the score-distillation guidances: encode renders, then compute g on z.

    Subclasses implement `guide` on z ``[B, C, h, w]``; `__call__` takes renders ``[B, H, W, 3]``.
    A guidance with state of its own (VSD's LoRA estimator, CDS's fixed noise) returns it from
    `state_dict` so that runs checkpoint and resume it; `System` saves it next to the optimizer.
    """

    prior: "DiffusionPrior"

    def __call__(
        self,
        rgb: Tensor,
        prompts: "PromptBatch",
        step: int,
        max_steps: int,
        generator: torch.Generator | None = None,
        cameras: "Cameras | None" = None,
    ) -> GuidanceOutput:
        """Guidance for renders rgb ``[B, H, W, 3]`` in [0, 1] at training `step` of `max_steps`.

        cameras: the B cameras of the renders (VSD conditions its estimator on them; others ignore them).
        """
        if rgb.ndim != 4 or rgb.shape[-1] != 3:
            raise ValueError(f"{type(self).__name__}: rgb must be [B, H, W, 3], got {tuple(rgb.shape)}")
        if rgb.shape[0] != len(prompts):
            raise ValueError(
                f"{type(self).__name__}: {rgb.shape[0]} renders but {len(prompts)} text conditions"
            )
        z = self.prior.encode(rgb, generator=generator)
        return self.guide(z, prompts, step, max_steps, generator, cameras)

    def guide(
        self,
        z: Tensor,
        prompts: "PromptBatch",
        step: int,
        max_steps: int,
        generator: torch.Generator | None = None,
        cameras: "Cameras | None" = None,
    ) -> GuidanceOutput:
        """Guidance on the prior's input z ``[B, C, h, w]`` directly (latents or [-1, 1] pixels)."""
        raise NotImplementedError

    # shared by the guidances whose cfg is a `GuidanceConfig`
    def timesteps(self, batch_size: int, step: int, max_steps: int, generator: torch.Generator | None) -> Tensor:
        """``[B]`` timesteps from the config's min/max_step_percent schedules (and sqrt_anneal)."""
        cfg = self.cfg
        return sample_timesteps(
            batch_size, self.prior.num_train_timesteps, cfg.min_step_percent, cfg.max_step_percent, step, max_steps,
            sqrt_anneal=cfg.sqrt_anneal, generator=generator,
        )

    def scale(self, step: int, max_steps: int) -> float:
        """The CFG scale (diffusers convention) at `step`."""
        return schedule_value(self.cfg.guidance_scale, step, max_steps)

    def clip(self, step: int, max_steps: int) -> float | None:
        """The gradient clip at `step`, None without clipping."""
        return None if self.cfg.grad_clip is None else schedule_value(self.cfg.grad_clip, step, max_steps)

    def state_dict(self) -> dict:
        """The guidance's own training state (tensors and nested dicts of tensors); empty for SDS."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no state to load, got keys {sorted(state)}")
