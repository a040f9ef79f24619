"""Adaptive density control of 3D Gaussians: clone, split, prune and opacity reset.

The procedure of 3D Gaussian Splatting [Kerbl et al. 2023, Sec. 5.2], with DreamGaussian's
settings [Tang et al. 2023]:

- **Statistics.** After every backward pass, for each camera c and each Gaussian i it sees
  (radius > 0), the norm of the gradient of the loss with respect to its projected center is
  added to an accumulator, and a counter counts the views. Gradients are taken in NDC units as in
  3DGS: the renderer's `means2d` are in pixels, so the x-gradient is multiplied by W/2 and the
  y-gradient by H/2. They are also multiplied by the number of cameras C, because gen3d's losses
  average over the camera batch and one view's gradient would otherwise shrink with C.
- **Densify** every `densify_every` steps in [densify_from, densify_until): Gaussians whose mean
  gradient norm reaches `grad_threshold` are *cloned* (copied in place) when small
  (max scale <= percent_dense * scene_extent) and *split* when large: replaced by `split_factor`
  Gaussians whose means are drawn from the parent Gaussian and whose scales are the parent's
  divided by 0.8 * split_factor. When this would exceed `max_gaussians`, only the candidates with
  the largest gradients are densified.
- **Prune** at the same steps: opacity below `prune_opacity`, and optionally a screen radius above
  `max_screen_size` pixels or a largest scale above `prune_world_size * scene_extent`.
- **Opacity reset** every `opacity_reset_every` steps in the same window: o <- min(o, 0.01), with
  the optimizer's moments of the opacities zeroed (as 3DGS does).

Every change of the number of Gaussians is mirrored in the optimizer ("state surgery"): Adam's
moments are indexed for surviving Gaussians, zero for new ones, and the new parameter tensors
replace the old ones in the optimizer's param groups and on the model.

Call order in a training loop (the one deliberate difference from the reference code, which
densifies *before* `optimizer.step()` and so throws away the gradient step of densification
iterations; here every step's gradients are applied first):

    out = renderer(model, cameras)                  # out.means2d.retain_grad() inside the renderer
    loss.backward()
    strategy.update_stats(out.means2d, out.radii, W, H, step)
    optimizer.step()
    strategy.maybe_densify(model, optimizer, step)  # may replace model parameters
    optimizer.zero_grad(set_to_none=True)

Determinism: the only randomness is the sampling of split positions. It uses the `generator`
passed to `maybe_densify`, or else a fresh generator seeded with (seed, step), so a run resumed
from a checkpoint (model, optimizer and `strategy.state_dict()`) densifies exactly as an
uninterrupted one.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gen3d.ops._projection import quat_to_rotmat
from gen3d.representations.gaussians import PARAM_NAMES, GaussianModel


@dataclass
class DensifyConfig:
    """Adaptive density control of Gaussians (3DGS; defaults from DreamGaussian)."""

    densify_from: float = 100
    """First step that densifies: a step, or a fraction of the run when a non-integer in (0, 1)."""
    densify_until: float = 3000
    """Densification, pruning and opacity resets stop at this step (exclusive); a step, or a fraction of the run when a non-integer in (0, 1)."""
    densify_every: int = 100
    """Densify and prune every this many steps."""
    grad_threshold: float = 0.01
    """Mean view-space gradient norm (NDC units) above which a Gaussian is cloned or split (DreamGaussian 0.01; 3DGS 0.0002)."""
    percent_dense: float = 0.01
    """Gaussians larger than percent_dense * scene_extent are split, smaller ones cloned."""
    opacity_reset_every: int | None = 700
    """Reset opacities to at most `opacity_reset_value` every this many steps; None disables."""
    opacity_reset_value: float = 0.01
    """Opacity ceiling applied by an opacity reset."""
    prune_opacity: float = 0.01
    """Prune Gaussians whose opacity is below this (DreamGaussian 0.01; 3DGS 0.005)."""
    max_screen_size: float | None = None
    """Prune Gaussians whose screen radius exceeded this many pixels since the last densification; None disables."""
    prune_world_size: float | None = 0.1
    """Prune Gaussians whose largest scale exceeds this fraction of the scene extent (3DGS and DreamGaussian: 0.1); None disables."""
    max_gaussians: int = 100_000
    """Cap on the number of Gaussians, so CPU runs stay bounded; densification favors the largest gradients."""
    split_factor: int = 2
    """Number of Gaussians a split Gaussian becomes."""
    split_scale_divisor: float | None = None
    """Scales of split children are the parent's divided by this; None = 0.8 * split_factor (3DGS: 1.6)."""

    def __post_init__(self) -> None:
        for name in ("densify_from", "densify_until"):
            if getattr(self, name) < 0:
                raise ValueError(f"densify.{name} must be >= 0, got {getattr(self, name)}")
        if self.densify_every < 1:
            raise ValueError(f"densify.densify_every must be >= 1, got {self.densify_every}")
        if self.opacity_reset_every is not None and self.opacity_reset_every < 1:
            raise ValueError(f"densify.opacity_reset_every must be >= 1 or None, got {self.opacity_reset_every}")
        if not 0.0 < self.opacity_reset_value < 1.0:
            raise ValueError(f"densify.opacity_reset_value must be in (0, 1), got {self.opacity_reset_value}")
        if self.grad_threshold < 0:
            raise ValueError(f"densify.grad_threshold must be >= 0, got {self.grad_threshold}")
        if not self.percent_dense > 0:
            raise ValueError(f"densify.percent_dense must be > 0, got {self.percent_dense}")
        if not 0.0 <= self.prune_opacity < 1.0:
            raise ValueError(f"densify.prune_opacity must be in [0, 1), got {self.prune_opacity}")
        if self.max_screen_size is not None and not self.max_screen_size > 0:
            raise ValueError(f"densify.max_screen_size must be > 0 or None, got {self.max_screen_size}")
        if self.prune_world_size is not None and not self.prune_world_size > 0:
            raise ValueError(f"densify.prune_world_size must be > 0 or None, got {self.prune_world_size}")
        if self.max_gaussians < 1:
            raise ValueError(f"densify.max_gaussians must be >= 1, got {self.max_gaussians}")
        if self.split_factor < 2:
            raise ValueError(f"densify.split_factor must be >= 2, got {self.split_factor}")
        if self.split_scale_divisor is not None and not self.split_scale_divisor > 0:
            raise ValueError(f"densify.split_scale_divisor must be > 0, got {self.split_scale_divisor}")


@dataclass
class DensifyResult:
    """What one `maybe_densify` call did."""

    cloned: int = 0
    split: int = 0
    pruned: int = 0
    opacity_reset: bool = False
    num_gaussians: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.cloned or self.split or self.pruned or self.opacity_reset)


def _resolve_step(value: float, max_steps: int | None, name: str) -> int:
    """A step, or a fraction of the run when `value` is a non-integer in (0, 1) (gen3d.schedules' rule)."""
    if isinstance(value, float) and 0.0 < value < 1.0 and not value.is_integer():
        if max_steps is None:
            raise ValueError(f"densify.{name}={value} is a fraction of the run: pass max_steps to DensifyStrategy")
        return round(value * max_steps)
    return int(value)


class DensifyStrategy:
    """Clone / split / prune / opacity-reset schedule for a `GaussianModel`; see the module docstring.

    `scene_extent` is the scene's size in world units that `percent_dense` and `prune_world_size`
    are relative to (3DGS: the camera spread; DreamGaussian passes 4 for objects in the unit ball).
    `max_steps` (the run length) is needed only when `densify_from` / `densify_until` are fractions.
    """

    def __init__(self, cfg: DensifyConfig, scene_extent: float, max_steps: int | None = None, seed: int = 0) -> None:
        if not scene_extent > 0:
            raise ValueError(f"DensifyStrategy: scene_extent must be > 0, got {scene_extent}")
        self.cfg = cfg
        self.scene_extent = float(scene_extent)
        self.seed = int(seed)
        self.densify_from = _resolve_step(cfg.densify_from, max_steps, "densify_from")
        self.densify_until = _resolve_step(cfg.densify_until, max_steps, "densify_until")
        self.grad_accum: Tensor | None = None  # [N] sum of view-space gradient norms
        self.count: Tensor | None = None  # [N] number of views that saw each Gaussian
        self.max_radii: Tensor | None = None  # [N] largest screen radius in pixels since the last densification

    # ------------------------------------------------------------------------------ statistics

    @torch.no_grad()
    def update_stats(
        self,
        means2d: Tensor | None,  # [C, N, 2] pixels, its .grad populated by backward
        radii: Tensor | None,  # [C, N] pixels (or [C, N, 2]), 0 for Gaussians a camera does not see
        width: int,
        height: int,
        step: int | None = None,
    ) -> None:
        """Accumulate view-space gradient norms and screen radii; call after `loss.backward()`.

        Does nothing without `means2d.grad` (e.g. a renderer that does not expose it), and from
        `densify_until` on when `step` is given.
        """
        if means2d is None or radii is None or means2d.grad is None:
            return
        if step is not None and step >= self.densify_until:
            return
        grad = means2d.grad
        if grad.dim() == 2:
            grad, radii = grad[None], radii[None]
        if radii.dim() == 3:
            radii = radii.amax(-1)
        C, N = grad.shape[0], grad.shape[1]
        if grad.shape != (C, N, 2) or radii.shape != (C, N):
            raise ValueError(
                f"DensifyStrategy.update_stats: expected means2d.grad [C, N, 2] and radii [C, N], "
                f"got {list(means2d.grad.shape)} and {list(radii.shape)}"
            )
        self._ensure_stats(N, grad.device)
        # Pixel gradients -> NDC gradients (d pixel / d ndc = W/2, H/2), times C for the batch mean.
        scale = grad.new_tensor([width / 2.0, height / 2.0]) * C
        norms = (grad * scale).norm(dim=-1)  # [C, N]
        visible = radii > 0  # [C, N]
        self.grad_accum += (norms * visible).sum(0).to(self.grad_accum)
        self.count += visible.sum(0).to(self.count)
        self.max_radii = torch.maximum(self.max_radii, (radii * visible).amax(0).to(self.max_radii))

    def _ensure_stats(self, N: int, device: torch.device) -> None:
        if self.grad_accum is None:
            self._reset_stats(N, device)
        elif self.grad_accum.shape[0] != N:
            raise ValueError(
                f"DensifyStrategy: got {N} Gaussians but the statistics track {self.grad_accum.shape[0]}; "
                "change the number of Gaussians only through the strategy, or reset() it"
            )

    def _reset_stats(self, N: int, device: torch.device) -> None:
        self.grad_accum = torch.zeros(N, device=device)
        self.count = torch.zeros(N, device=device)
        self.max_radii = torch.zeros(N, device=device)

    def reset(self) -> None:
        """Forget the accumulated statistics (e.g. after replacing the model's Gaussians)."""
        self.grad_accum = self.count = self.max_radii = None

    # --------------------------------------------------------------------------- the schedule

    def is_densify_step(self, step: int) -> bool:
        return step > 0 and self.densify_from <= step < self.densify_until and step % self.cfg.densify_every == 0

    def is_reset_step(self, step: int) -> bool:
        every = self.cfg.opacity_reset_every
        return every is not None and 0 < step < self.densify_until and step % every == 0

    @torch.no_grad()
    def maybe_densify(
        self,
        model: GaussianModel,
        optimizer: torch.optim.Optimizer | None,
        step: int,
        generator: torch.Generator | None = None,
    ) -> DensifyResult:
        """Densify, prune and reset opacities when `step` calls for it; call after `optimizer.step()`.

        The model's parameters (and their entries in `optimizer`) may be replaced by new tensors.
        Split positions are drawn from `generator`, or from a generator seeded with (seed, step).
        """
        result = DensifyResult(num_gaussians=model.num_gaussians)
        if self.is_densify_step(step):
            if generator is None:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            result = self.densify_and_prune(model, optimizer, generator)
        if self.is_reset_step(step):
            self.reset_opacity(model, optimizer)
            result.opacity_reset = True
        return result

    # ------------------------------------------------------------------------------ operations

    @torch.no_grad()
    def densify_and_prune(
        self, model: GaussianModel, optimizer: torch.optim.Optimizer | None, generator: torch.Generator | None
    ) -> DensifyResult:
        """One densification: clone and split by accumulated gradient, prune, reset the statistics."""
        cfg, N = self.cfg, model.num_gaussians
        self._ensure_stats(N, model.means.device)
        grads = self.grad_accum / self.count.clamp_min(1.0)  # [N] mean gradient norm per view
        large = model.scales.amax(-1) > cfg.percent_dense * self.scene_extent  # [N]
        high = grads >= cfg.grad_threshold
        clone, split = high & ~large, high & large
        clone, split = self._cap(clone, split, grads, N)

        # New Gaussians: clones (copies) first, then split children.
        clone_idx, split_idx = clone.nonzero().squeeze(1), split.nonzero().squeeze(1)
        k = cfg.split_factor
        new = {name: [getattr(model, name)[clone_idx]] for name in PARAM_NAMES}
        if split_idx.numel():
            parent = split_idx.repeat(k)  # [k*S], children grouped by draw
            eps = torch.randn(parent.shape[0], 3, generator=generator,
                              device=generator.device if generator is not None else "cpu")
            local = eps.to(model.means) * model.scales[parent]  # [k*S, 3] sample in the parent's frame
            offset = (quat_to_rotmat(model.quats[parent]) @ local[:, :, None])[:, :, 0]
            for name in PARAM_NAMES:
                new[name].append(getattr(model, name)[parent])
            new["means"][-1] = model.means[parent] + offset
            divisor = cfg.split_scale_divisor if cfg.split_scale_divisor is not None else 0.8 * k
            new["log_scales"][-1] = model.log_scales[parent] - math.log(divisor)
        appended = {name: torch.cat(parts) for name, parts in new.items()}
        num_new = appended["means"].shape[0]
        max_radii = torch.cat([self.max_radii, self.max_radii[clone_idx], self.max_radii.new_zeros(num_new - len(clone_idx))])
        if num_new:
            _append_gaussians(model, optimizer, appended)

        # Prune: the split parents, and everything too transparent or too large.
        prune = torch.cat([split, split.new_zeros(num_new)])
        prune |= model.opacities < cfg.prune_opacity
        if cfg.max_screen_size is not None:
            prune |= max_radii > cfg.max_screen_size
        if cfg.prune_world_size is not None:
            prune |= model.scales.amax(-1) > cfg.prune_world_size * self.scene_extent
        if prune.numel() and bool(prune.all()):
            warnings.warn(
                f"densification would prune all {prune.numel()} Gaussians (opacity below {cfg.prune_opacity} "
                "or too large); keeping the split parents' children and skipping the pruning", stacklevel=2
            )
            prune = torch.cat([split, split.new_zeros(num_new)])
        if bool(prune.any()):
            _keep_gaussians(model, optimizer, ~prune)
        self._reset_stats(model.num_gaussians, model.means.device)
        return DensifyResult(
            cloned=len(clone_idx), split=len(split_idx),
            pruned=int(prune.sum()) - len(split_idx), num_gaussians=model.num_gaussians,
        )

    def _cap(self, clone: Tensor, split: Tensor, grads: Tensor, N: int) -> tuple[Tensor, Tensor]:
        """Keep only the largest-gradient candidates whose new Gaussians fit under `max_gaussians`."""
        cost = clone.long() + split.long() * (self.cfg.split_factor - 1)  # [N] Gaussians added
        budget = max(self.cfg.max_gaussians - N, 0)
        if int(cost.sum()) <= budget:
            return clone, split
        candidates = (clone | split).nonzero().squeeze(1)
        order = torch.argsort(grads[candidates], descending=True, stable=True)
        candidates = candidates[order]
        fits = torch.cumsum(cost[candidates], 0) <= budget
        chosen = torch.zeros_like(clone)
        chosen[candidates[fits]] = True
        return clone & chosen, split & chosen

    @torch.no_grad()
    def reset_opacity(self, model: GaussianModel, optimizer: torch.optim.Optimizer | None) -> None:
        """o <- min(o, opacity_reset_value), and zero the optimizer's moments of the opacities."""
        ceiling = torch.logit(torch.tensor(self.cfg.opacity_reset_value, dtype=model.opacity_logits.dtype))
        model.opacity_logits.clamp_(max=ceiling.item())
        if optimizer is not None:
            for key, value in optimizer.state.get(model.opacity_logits, {}).items():
                if key != "step" and isinstance(value, Tensor) and value.shape == model.opacity_logits.shape:
                    value.zero_()

    # ----------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Tensor]:
        """The accumulated statistics (tensors only, so they fit in safetensors); empty before the first step."""
        empty = torch.zeros(0)
        return {
            "grad_accum": self.grad_accum if self.grad_accum is not None else empty,
            "count": self.count if self.count is not None else empty,
            "max_radii": self.max_radii if self.max_radii is not None else empty,
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = {"grad_accum", "count", "max_radii"} - set(state)
        if missing:
            raise KeyError(f"DensifyStrategy.load_state_dict: missing {sorted(missing)}")
        if state["grad_accum"].numel() == 0:
            self.reset()
            return
        self.grad_accum = state["grad_accum"].clone()
        self.count = state["count"].clone()
        self.max_radii = state["max_radii"].clone()


# --------------------------------------------------------------------- optimizer state surgery


def _replace_parameters(
    model: GaussianModel,
    optimizer: torch.optim.Optimizer | None,
    param_fn: Callable[[str, Tensor], Tensor],
    state_fn: Callable[[str, Tensor], Tensor],
) -> None:
    """Replace every Gaussian parameter by `param_fn(name, old)` on the model and in the optimizer.

    Per-parameter optimizer state tensors shaped like the parameter (Adam's exp_avg, exp_avg_sq,
    max_exp_avg_sq) become `state_fn(name, state)`; scalars such as Adam's `step` are kept.
    """
    for name in PARAM_NAMES:
        old = getattr(model, name)
        new = nn.Parameter(param_fn(name, old.detach()).contiguous(), requires_grad=old.requires_grad)
        if optimizer is not None:
            for group in optimizer.param_groups:
                for i, p in enumerate(group["params"]):
                    if p is old:
                        group["params"][i] = new
            state = optimizer.state.pop(old, None)
            if state is not None:
                optimizer.state[new] = {
                    key: state_fn(name, value) if isinstance(value, Tensor) and value.dim() > 0 and value.shape == old.shape else value
                    for key, value in state.items()
                }
        setattr(model, name, new)


def _append_gaussians(model: GaussianModel, optimizer: torch.optim.Optimizer | None, new: dict[str, Tensor]) -> None:
    """Append Gaussians (`new[name]` [M, ...] per parameter) with zero optimizer moments."""
    _replace_parameters(
        model, optimizer,
        lambda name, old: torch.cat([old, new[name].to(old)]),
        lambda name, state: torch.cat([state, state.new_zeros(new[name].shape[0], *state.shape[1:])]),
    )


def _keep_gaussians(model: GaussianModel, optimizer: torch.optim.Optimizer | None, keep: Tensor) -> None:
    """Keep only the Gaussians where `keep` [N] is True, in the model and the optimizer state."""
    _replace_parameters(model, optimizer, lambda name, old: old[keep], lambda name, state: state[keep])
