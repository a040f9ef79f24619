"""Rectified flow in TRELLIS's convention, its Euler sampler, and few-step distillation by marginal-data transport
(MDT-dist: Zhou et al. 2025, "Few-step Flow for 3D Generation via Marginal-Data Transport Distillation"), for any
velocity model.

A velocity model is a callable ``model(x, t, cond) -> v`` with x ``[B, ...]``, t ``[B]`` in [0, 1] (1 = noise) and
`cond` anything the model takes (None: unconditional, the null condition classifier-free guidance contrasts with).

Convention (TRELLIS, with ``s = sigma_min``):

    x_t = (1 - t) x0 + (s + (1 - s) t) eps          v = (1 - s) eps - x0         x0 = x_t - t v  (s = 0)

The Euler sampler walks ``t`` from 1 to 0: ``x <- x - (t_i - t_{i+1}) v(x, t_i)``, on a grid that `rescale_t` r
warps as ``t <- r t / (1 + (r - 1) t)`` (r > 1 spends more steps at high noise), with classifier-free guidance
``(1 + w) v(x, c) - w v(x, null)`` applied inside `guidance_interval`.

MDT-dist trains a student whose output at (x_t, t) is read as the *average* velocity from t to 0, so that one step
``x0 = x_t - t u(x_t, t)`` lands on the data (MeanFlow's u(x_t, 0, t)). Its two losses, from the official code
(``flow_matching_mdt.py``, "discrete" mode):

- **Velocity matching** (VM), on data x0: with ``v_pred = u(x_t, t)`` and, without gradient, the teacher's guided
  velocity ``v_T`` and the student's value one teacher Euler step earlier,
  ``D = (sg(v_pred) - u(x_t - dt v_T, t - dt)) / dt`` (the derivative of u along the teacher's ODE), normalized
  ``D <- D / (|D| + c)`` per sample, the target is ``v_tgt = v_T - t D`` (the identity u = v - t du/dt) and
  ``L_VM = |v_pred - v_tgt|^2``.
- **Velocity distillation** (VD), on the student's own one-step samples ``x_f = eps_f - u(eps_f, 1)``: the same
  target computed at x_f without gradient, and ``L_VD = |v_pred - v_tgt + u_f - sg(u_f)|^2``, whose gradient
  reaches the student only through u_f, as ``2 (v_pred - v_tgt)``: the student at the noised fake sample plays the
  fake velocity field (no separate fake-score network).

`consistency_loss` is the consistency-distillation baseline in the same parameterization
(``f(x_t, t) = x_t - t u(x_t, t)`` matched to ``sg(f)`` one teacher Euler step earlier).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

VelocityModel = Callable[[Tensor, Tensor, Any], Tensor]


def _bcast(t: Tensor, x: Tensor) -> Tensor:
    """t [B] -> [B, 1, ..., 1] to broadcast against x [B, ...]."""
    return t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)


def diffuse(x0: Tensor, t: Tensor, eps: Tensor, sigma_min: float = 1e-5) -> Tensor:
    """x_t = (1 - t) x0 + (sigma_min + (1 - sigma_min) t) eps."""
    tb = _bcast(t, x0)
    return (1 - tb) * x0 + (sigma_min + (1 - sigma_min) * tb) * eps


def velocity_target(x0: Tensor, eps: Tensor, sigma_min: float = 1e-5) -> Tensor:
    """The flow-matching target d x_t / d t = (1 - sigma_min) eps - x0."""
    return (1 - sigma_min) * eps - x0


def guided(model: VelocityModel, x: Tensor, t: Tensor, cond: Any, scale: float, null: Any = None) -> Tensor:
    """Classifier-free guided velocity (1 + w) v(x, t, cond) - w v(x, t, null); w = 0: one conditional call."""
    v = model(x, t, cond)
    if scale == 0:
        return v
    return (1 + scale) * v - scale * model(x, t, null)


def logit_normal_t(n: int, generator: torch.Generator | None = None, mean: float = 1.0, std: float = 1.0,
                   low: float = 0.0, high: float = 1.0) -> Tensor:
    """n times in (low, high): low + (high - low) sigmoid(N(mean, std)) (TRELLIS's time sampling)."""
    z = torch.randn(n, generator=generator) * std + mean
    return low + (high - low) * torch.sigmoid(z)


def time_grid(steps: int, rescale_t: float = 1.0) -> Tensor:
    """steps + 1 times from 1 to 0, warped by t <- r t / (1 + (r - 1) t)."""
    if steps < 1:
        raise ValueError(f"time_grid: steps must be >= 1, got {steps}")
    if not rescale_t > 0:
        raise ValueError(f"time_grid: rescale_t must be > 0, got {rescale_t}")
    t = torch.linspace(1.0, 0.0, steps + 1)
    return rescale_t * t / (1 + (rescale_t - 1) * t)


@torch.no_grad()
def euler_sample(model: VelocityModel, noise: Tensor, cond: Any = None, steps: int = 25, guidance: float = 0.0,
                 null: Any = None, rescale_t: float = 1.0,
                 guidance_interval: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """Integrate dx/dt = v from t = 1 (`noise`) to t = 0 in `steps` Euler steps; returns x0."""
    x = noise
    grid = time_grid(steps, rescale_t)
    for t_now, t_next in zip(grid[:-1].tolist(), grid[1:].tolist()):
        t = torch.full((x.shape[0],), t_now, device=x.device)
        w = guidance if guidance_interval[0] <= t_now <= guidance_interval[1] else 0.0
        x = x - (t_now - t_next) * guided(model, x, t, cond, w, null)
    return x


def flow_matching_loss(model: VelocityModel, x0: Tensor, cond: Any, generator: torch.Generator | None = None,
                       sigma_min: float = 1e-5, t: Tensor | None = None, eps: Tensor | None = None) -> Tensor:
    """Mean squared error of the velocity at x_t against (1 - sigma_min) eps - x0 (t logit-normal by default).
    Condition dropout for guidance is the caller's: pass `cond` with some entries already set to the null."""
    B = x0.shape[0]
    t = logit_normal_t(B, generator).to(x0.device) if t is None else t
    eps = torch.randn(x0.shape, generator=generator).to(x0) if eps is None else eps
    return (model(diffuse(x0, t, eps, sigma_min), t, cond) - velocity_target(x0, eps, sigma_min)).square().mean()


@dataclass
class MDTConfig:
    """MDT-dist's settings (defaults: the official code's)."""

    delta: float = 0.01
    """dt of the teacher Euler step the derivative D is taken over (``distill_interval``)."""
    d_norm: float | None = 0.1
    """D <- D / (|D| + d_norm) per sample (None: no normalization)."""
    guidance_vm: float = 40.0
    """Teacher CFG scale w in the VM target."""
    guidance_vd: float = 100.0
    """Teacher CFG scale w in the VD target."""
    lambda_vm: float = 1.0
    """Weight of velocity matching."""
    lambda_vd: float = 1.0
    """Weight of velocity distillation."""
    sigma_min: float = 1e-5
    """The flow's sigma_min."""

    def __post_init__(self) -> None:
        if not 0 < self.delta < 0.5:
            raise ValueError(f"MDTConfig.delta must be in (0, 0.5), got {self.delta}")
        if not 0 <= self.sigma_min < 0.5:
            raise ValueError(f"MDTConfig.sigma_min must be in [0, 0.5), got {self.sigma_min}")
        if self.d_norm is not None and not self.d_norm > 0:
            raise ValueError(f"MDTConfig.d_norm must be > 0 or None, got {self.d_norm}")
        for name in ("guidance_vm", "guidance_vd", "lambda_vm", "lambda_vd"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"MDTConfig.{name} must be a finite number >= 0, got {value}")

    def sample_t(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """t = sigma_min + delta + (1 - delta - sigma_min) sigmoid(N(1, 1)): every t leaves room for the step back."""
        return logit_normal_t(n, generator, low=self.sigma_min + self.delta, high=1.0)


def mdt_target(student: VelocityModel, teacher: VelocityModel, x_t: Tensor, t: Tensor, cond: Any, guidance: float,
               cfg: MDTConfig, null: Any = None, v_pred: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(v_pred, v_tgt) at x_t (see the module docstring); v_pred carries the student's gradient unless given."""
    if v_pred is None:
        v_pred = student(x_t, t, cond)
    with torch.no_grad():
        v_teacher = guided(teacher, x_t, t, cond, guidance, null)
        x_prev = x_t - cfg.delta * v_teacher
        v_prev = student(x_prev, t - cfg.delta, cond)
        D = (v_pred.detach() - v_prev) / cfg.delta
        if cfg.d_norm is not None:
            norm = D.flatten(1).norm(dim=1)
            D = D / _bcast(norm + cfg.d_norm, D)
        v_target = v_teacher - _bcast(t, D) * D
    return v_pred, v_target


def mdt_losses(student: VelocityModel, teacher: VelocityModel, x0: Tensor, cond: Any, cfg: MDTConfig,
               generator: torch.Generator | None = None, null: Any = None) -> dict[str, Tensor]:
    """The two MDT-dist losses on a batch of data x0 (same eps and t for both, as the official code): {"vm", "vd",
    "loss" = lambda_vm vm + lambda_vd vd}."""
    B = x0.shape[0]
    t = cfg.sample_t(B, generator).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator).to(x0)
    out: dict[str, Tensor] = {}
    total = x0.new_zeros(())
    if cfg.lambda_vm:
        v_pred, v_tgt = mdt_target(student, teacher, diffuse(x0, t, eps, cfg.sigma_min), t, cond, cfg.guidance_vm,
                                   cfg, null)
        out["vm"] = (v_pred - v_tgt).square().mean()
        total = total + cfg.lambda_vm * out["vm"]
    if cfg.lambda_vd:
        eps_fake = torch.randn(x0.shape, generator=generator).to(x0)
        u_fake = student(eps_fake, torch.ones(B, device=x0.device), cond)
        x_fake = eps_fake - u_fake  # the one-step sample
        with torch.no_grad():
            v_pred, v_tgt = mdt_target(student, teacher, diffuse(x_fake.detach(), t, eps, cfg.sigma_min), t, cond,
                                       cfg.guidance_vd, cfg, null)
        out["vd"] = (v_pred - v_tgt + u_fake - u_fake.detach()).square().mean()
        total = total + cfg.lambda_vd * out["vd"]
    out["loss"] = total
    return out


def consistency_loss(student: VelocityModel, teacher: VelocityModel, x0: Tensor, cond: Any, cfg: MDTConfig,
                     generator: torch.Generator | None = None, null: Any = None,
                     target_model: VelocityModel | None = None) -> Tensor:
    """Consistency distillation in the same parameterization: f(x, t) = x - t u(x, t) at x_t matched to
    sg(f_target) one guided teacher Euler step earlier (`target_model`: an EMA of the student, default itself)."""
    B = x0.shape[0]
    t = cfg.sample_t(B, generator).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator).to(x0)
    x_t = diffuse(x0, t, eps, cfg.sigma_min)
    f_now = x_t - _bcast(t, x_t) * student(x_t, t, cond)
    with torch.no_grad():
        x_prev = x_t - cfg.delta * guided(teacher, x_t, t, cond, cfg.guidance_vm, null)
        t_prev = t - cfg.delta
        f_prev = x_prev - _bcast(t_prev, x_prev) * (target_model or student)(x_prev, t_prev, cond)
    return (f_now - f_prev).square().mean()
