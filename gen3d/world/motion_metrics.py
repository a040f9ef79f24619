"""Scores of a 4D result against an `AnimatedObject`'s known motion (issue 12).

- `motion_error`: how far the result's Gaussians are, at each time, from where the true motion takes the points
  they started at (t = 0): mean distance in world units over opaque Gaussians and times;
- `flicker`: the frame-to-frame change of the result's renders that the true motion does not explain, mean
  absolute ``(pred[i+1] - pred[i]) - (truth[i+1] - truth[i])`` over consecutive frames (0 when every change is the
  object's own motion; a frozen result of a moving object scores the truth's own change).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from gen3d.cameras import Cameras
from gen3d.world.animation import AnimatedObject


@torch.no_grad()
def motion_error(dynamic, animated: AnimatedObject, times: Sequence[float], min_opacity: float = 0.05) -> float:
    """Mean distance of `dynamic.at(t).means` to the true positions at t of the points the Gaussians occupy at t=0."""
    start = dynamic.at(times[0])
    keep = start.opacities > min_opacity
    canonical = animated.to_canonical(start.means[keep], times[0])
    errors = [(dynamic.at(t).means[keep] - animated.move(canonical, t)).norm(dim=-1).mean() for t in times]
    return torch.stack(errors).mean().item()


@torch.no_grad()
def flicker(render: Callable[[float], Tensor], animated: AnimatedObject, cameras: Cameras,
            times: Sequence[float]) -> float:
    """Mean |Δ predicted frame - Δ true frame| over consecutive `times`; `render(t)` gives rgb [C, H, W, 3]."""
    if len(times) < 2:
        raise ValueError("flicker needs at least two times")
    pred = torch.stack([render(t) for t in times])
    truth = torch.stack([animated.render(cameras, t).rgb for t in times])
    return ((pred[1:] - pred[:-1]) - (truth[1:] - truth[:-1])).abs().mean().item()
