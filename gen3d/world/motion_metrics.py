"""Scores of a 4D result against an `AnimatedObject`'s known motion (issue 12).

- `motion_error`: how far the result's Gaussians are, at each time, from where the true motion takes the points
  they started at (t = 0): mean distance in world units over opaque Gaussians and times;
- `frame_iou`: the 3D IoU (`gen3d.world.metrics.iou_3d`, normalized: shape, not position or size) of the result at
  each time against the true object at that time;
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


class FrameObject:
    """An `AnimatedObject` frozen at time t, seen as the `WorldObject` the 3D metrics take (its occupancy and shape)."""

    def __init__(self, animated: AnimatedObject, t: float) -> None:
        self.animated, self.t = animated, float(t)
        self.shape_def = animated.obj.shape_def

    def occupancy(self, points: Tensor) -> Tensor:
        return self.animated.sdf(points, self.t) <= 0


def frame_iou(query_at: Callable[[float], object], animated: AnimatedObject, times: Sequence[float],
              resolution: int = 48) -> list[float]:
    """3D IoU per time of ``query_at(t)`` (a `gen3d.world.metrics.Query`) against the object at t."""
    from gen3d.world.metrics import iou_3d

    return [iou_3d(query_at(t), FrameObject(animated, t), resolution=resolution) for t in times]
