"""The `guidance:` section of a text-to-3D config: which score distillation, and its settings.

``guidance.type`` picks the method; the fields at the top level are shared (the prior's CFG scale,
the timestep range, w(t), clipping) and each method's own options live in its sub-section:

    guidance:
      type: vsd              # sds | vsd | cds | asd
      guidance_scale: 7.5
      vsd: {lora_rank: 4, lr: 1.0e-4}

CFG convention: every ``guidance_scale`` is in diffusers' convention ``eps_u + s (eps_c - eps_u)``
(threestudio writes ``eps_c + g (eps_c - eps_u)``, so g = s - 1). Each guidance states in its module
docstring where the CFG enters its gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gen3d.guidance.base import WEIGHTINGS, _schedule_values, check_percent_schedule
from gen3d.schedules import Schedule, check_schedule

TYPES = ("sds", "vsd", "cds", "asd")


@dataclass
class VSDConfig:
    """Variational Score Distillation (ProlificDreamer): the LoRA estimator of the renders' distribution."""

    lora_rank: int = 4
    """Rank of the LoRA adapters on the prior UNet's attention projections (ProlificDreamer: 4)."""
    lora_alpha: float | None = None
    """LoRA scaling alpha (None: equal to the rank, so the adapter's scale is 1)."""
    lr: float = 1e-4
    """AdamW learning rate of the LoRA and the camera embedding (ProlificDreamer: 1e-4)."""
    camera_condition: str = "extrinsics"
    """Condition the estimator on the camera: "extrinsics" (flattened camera-to-world, through the UNet's
    class embedding) or "none"."""
    camera_dropout: float = 0.1
    """Probability that the LoRA's own denoising loss sees a zero camera (so it also learns the
    camera-free score; ProlificDreamer: 0.1)."""
    lora_guidance_scale: float = 1.0
    """CFG of the estimator between no camera and the camera: 1 uses the camera-conditioned estimate alone."""
    lora_loss_weight: float = 1.0
    """Weight of the LoRA's denoising loss (ProlificDreamer: 1)."""
    lora_t_max: float = 1.0
    """The LoRA's loss draws its timestep from [0, lora_t_max * T) (ProlificDreamer: the full range)."""

    def __post_init__(self) -> None:
        if not isinstance(self.lora_rank, int) or self.lora_rank < 1:
            raise ValueError(f"guidance.vsd.lora_rank must be an integer >= 1, got {self.lora_rank!r}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ValueError(f"guidance.vsd.lora_alpha must be > 0 or null (= lora_rank), got {self.lora_alpha!r}")
        if not self.lr > 0:
            raise ValueError(f"guidance.vsd.lr must be > 0, got {self.lr!r}")
        if self.camera_condition not in ("extrinsics", "none"):
            raise ValueError(f"guidance.vsd.camera_condition must be 'extrinsics' or 'none', got {self.camera_condition!r}")
        if not 0.0 <= self.camera_dropout <= 1.0:
            raise ValueError(f"guidance.vsd.camera_dropout must be in [0, 1], got {self.camera_dropout!r}")
        if not self.lora_loss_weight >= 0:
            raise ValueError(f"guidance.vsd.lora_loss_weight must be >= 0, got {self.lora_loss_weight!r}")
        if not self.lora_guidance_scale >= 0:
            raise ValueError(f"guidance.vsd.lora_guidance_scale must be >= 0, got {self.lora_guidance_scale!r}")
        if not 0.0 < self.lora_t_max <= 1.0:
            raise ValueError(f"guidance.vsd.lora_t_max must be in (0, 1], got {self.lora_t_max!r}")


@dataclass
class CDSConfig:
    """Consistency distillation (Consistent3D): a fixed noise and a decreasing timestep schedule.

    Timesteps are fractions of the prior's T (the official code's indices / 1000).
    """

    t_start: float = 0.7
    """The less-noisy timestep t' starts here (official coarse stage: 700 / 1000)..."""
    t_end: float = 0.1
    """...and falls to here as sqrt(step / anneal_steps) (official coarse stage: 100 / 1000)."""
    anneal_steps: float = 1.0
    """Steps over which t' falls (a float in (0, 1] is a fraction of the run, an integer a step count;
    official: the whole run)."""
    min_sigma_percent: float = 0.1
    """Lowest timestep allowed, as a fraction of T (official coarse stage: 0.1)."""
    max_sigma_percent: float = 0.98
    """Highest timestep allowed, as a fraction of T (official: 0.98)."""
    end_gap: float = 0.1
    """The noisier t lies at least this far above t' (fraction of T; official: 100 / 1000)..."""
    perturb: float = 0.2
    """...plus a random amount below this (fraction of T; official coarse stage: 200 / 1000)."""
    share_noise: bool = True
    """One fixed noise for every view and step (the method; official: true); false draws a fresh noise each step."""

    def __post_init__(self) -> None:
        for name in ("t_start", "t_end", "min_sigma_percent", "max_sigma_percent", "end_gap", "perturb"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"guidance.cds.{name} must be a fraction of the timesteps in [0, 1], got {value!r}")
        if self.min_sigma_percent > self.max_sigma_percent - self.end_gap:
            raise ValueError(
                f"guidance.cds: min_sigma_percent ({self.min_sigma_percent}) must be <= max_sigma_percent - end_gap "
                f"({self.max_sigma_percent} - {self.end_gap}), or no pair of timesteps fits"
            )
        if isinstance(self.anneal_steps, bool) or not isinstance(self.anneal_steps, (int, float)) or not self.anneal_steps > 0:
            raise ValueError(f"guidance.cds.anneal_steps must be > 0 (a fraction of the run or a step count), got {self.anneal_steps!r}")


@dataclass
class ASDConfig:
    """Asynchronous Score Distillation (ScaleDreamer): the timestep shift."""

    plus_ratio: float = 0.1
    """The second timestep is t + plus_ratio * (t - min_step) (ScaleDreamer: 0.1)."""
    plus_random: bool = True
    """Multiply the shift by U(0, 1) (ScaleDreamer: true)."""

    def __post_init__(self) -> None:
        if not isinstance(self.plus_ratio, (int, float)) or self.plus_ratio < 0:
            raise ValueError(f"guidance.asd.plus_ratio must be a number >= 0, got {self.plus_ratio!r}")


@dataclass
class GuidanceConfig:
    """Score distillation: the method (`type`) and its settings."""

    type: str = "sds"
    """sds (DreamFusion), vsd (ProlificDreamer), cds (Consistent3D) or asd (ScaleDreamer)."""
    guidance_scale: Schedule = 100.0
    """Classifier-free guidance scale s in diffusers' convention eps_u + s (eps_c - eps_u) (threestudio's value + 1);
    a schedule, e.g. [0, 100, 50, 1.0] (Consistent3D's ramp)."""
    min_step_percent: Schedule = 0.02
    """Lowest timestep as a fraction of the prior's T (a schedule: number or [start, v0, v1, end]); sds, vsd, asd."""
    max_step_percent: Schedule = 0.98
    """Highest timestep as a fraction of the prior's T (a schedule: number or [start, v0, v1, end]); sds, vsd, asd."""
    weighting: str = "sds"
    """w(t): "sds" = 1 - abar_t (DreamFusion), "uniform" = 1, "fantasia3d" = sqrt(abar_t) (1 - abar_t)."""
    grad_clip: Schedule | None = None
    """Clamp each entry of g to [-c, c] (a schedule, e.g. [0, 2.0, 8.0, 1000]); None disables clipping."""
    sqrt_anneal: bool = False
    """HiFA: deterministic t shared by the batch, falling from max to min step as sqrt(step / max_steps); sds, vsd, asd."""
    perp_neg_scale: float = 1.0
    """Multiplies the Perp-Neg negative weights when use_perp_neg is on (ScaleDreamer's ASD: 0.5)."""
    vsd: VSDConfig = field(default_factory=VSDConfig)
    """VSD settings (used when type is vsd)."""
    cds: CDSConfig = field(default_factory=CDSConfig)
    """CDS settings (used when type is cds)."""
    asd: ASDConfig = field(default_factory=ASDConfig)
    """ASD settings (used when type is asd)."""

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise ValueError(f"guidance.type must be one of {', '.join(TYPES)}; got {self.type!r}")
        check_schedule(self.guidance_scale, "guidance.guidance_scale")
        scales = [self.guidance_scale] if isinstance(self.guidance_scale, (int, float)) else _schedule_values(self.guidance_scale)
        if any(not s >= 0 for s in scales):
            raise ValueError(f"guidance.guidance_scale must be >= 0, got {self.guidance_scale!r}")
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
        if not isinstance(self.perp_neg_scale, (int, float)) or self.perp_neg_scale < 0:
            raise ValueError(f"guidance.perp_neg_scale must be a number >= 0, got {self.perp_neg_scale!r}")
