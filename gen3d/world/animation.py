"""Animated Shapes-world objects with known motion: the ground truth of 4D generation (issue 12).

An `AnimatedObject` is a catalog object moved over time t in [0, 1] by one of four motions, each a similarity
transform of the object's canonical (catalog) frame, ``x_world = s(t) R(t) x + c(t)`` (z is up):

- ``spin``: a turn about the vertical axis through the origin, `amount` turns over the clip;
- ``bounce``: a vertical hop, height `amount` x 4 t (1 - t) (up and back down);
- ``grow``: uniform scale from 1 - `amount` at t = 0 to 1 at t = 1, about the origin;
- ``swing``: a pendulum about the horizontal y axis through a pivot above the object (z = 0.75), angle
  `amount` x sin(2 pi t) degrees.

The exact SDF at time t is ``s sdf(R^T (x - c) / s)`` and the albedo is read at the canonical point, so the
sphere tracer renders any frame exactly (`render`), and `move` gives the true trajectory of any canonical point
(motion error of a 4D result).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from gen3d.cameras import Cameras
from gen3d.world.catalog import WorldObject

MOTIONS = {"spin": 1.0, "bounce": 0.25, "grow": 0.4, "swing": 20.0}
"""Motion name -> its default `amount` (turns, height, scale lost at t = 0, degrees)."""
VERBS = {"spin": "spinning", "bounce": "bouncing", "grow": "growing", "swing": "swinging"}
"""Motion name -> the word captions use for it ("a red mug, bouncing")."""
PIVOT_HEIGHT = 0.75
"""Height of the swing's pivot."""
RENDER_RADIUS = 1.35
"""Radius of the sphere the tracer starts from: every motion keeps the object inside it at default amounts."""


def _rotation(axis: str, radians: Tensor) -> Tensor:
    c, s = torch.cos(radians), torch.sin(radians)
    one, zero = torch.ones_like(c), torch.zeros_like(c)
    if axis == "z":
        rows = [[c, -s, zero], [s, c, zero], [zero, zero, one]]
    else:  # "y"
        rows = [[c, zero, s], [zero, one, zero], [-s, zero, c]]
    return torch.stack([torch.stack(r, -1) for r in rows], -2)


@dataclass(frozen=True)
class AnimatedObject:
    """A catalog object and its motion, e.g. ``AnimatedObject(WorldObject("mug", "red"), "spin")``."""

    obj: WorldObject
    motion: str
    amount: float | None = None
    """Size of the motion (None: `MOTIONS`' default)."""

    def __post_init__(self) -> None:
        if self.motion not in MOTIONS:
            raise ValueError(f"unknown motion {self.motion!r}; known: {sorted(MOTIONS)}")
        if self.amount is not None and not math.isfinite(self.amount):
            raise ValueError(f"amount must be a finite number, got {self.amount}")

    @property
    def rest_time(self) -> float:
        """The time at which the object is at rest, in its catalog pose and size: 0, or 1 for a growth."""
        return 1.0 if self.motion == "grow" else 0.0

    @property
    def size(self) -> float:
        return MOTIONS[self.motion] if self.amount is None else float(self.amount)

    def transform(self, t: float) -> tuple[Tensor, Tensor, float]:
        """(R [3, 3], c [3], s) with x_world = s R x + c at time t."""
        t = float(t)
        R, c, s = torch.eye(3), torch.zeros(3), 1.0
        if self.motion == "spin":
            R = _rotation("z", torch.tensor(2 * math.pi * self.size * t))
        elif self.motion == "bounce":
            c = torch.tensor([0.0, 0.0, self.size * 4 * t * (1 - t)])
        elif self.motion == "grow":
            s = 1 - self.size * (1 - t)
        else:  # swing: rotate about the pivot
            R = _rotation("y", torch.tensor(math.radians(self.size * math.sin(2 * math.pi * t))))
            pivot = torch.tensor([0.0, 0.0, PIVOT_HEIGHT])
            c = pivot - R @ pivot
        return R, c, s

    def move(self, points: Tensor, t: float) -> Tensor:
        """Canonical points [P, 3] -> their positions at time t."""
        R, c, s = self.transform(t)
        return s * points @ R.T + c

    def to_canonical(self, points: Tensor, t: float) -> Tensor:
        """World points [P, 3] at time t -> canonical points."""
        R, c, s = self.transform(t)
        return (points - c) @ R / s

    def sdf(self, points: Tensor, t: float) -> Tensor:
        """Exact signed distance [P] at time t."""
        _, _, s = self.transform(t)
        return s * self.obj.sdf(self.to_canonical(points, t))

    def color_at(self, points: Tensor, t: float) -> Tensor:
        return self.obj.color_at(self.to_canonical(points, t))

    def render(self, cameras: Cameras, t: float, background=(1.0, 1.0, 1.0), supersample: int = 1):
        """Ground-truth frame at time t (`gen3d.world.render.render_sdf`)."""
        from gen3d.world.render import render_sdf

        return render_sdf(lambda p: self.sdf(p, t), lambda p: self.color_at(p, t), cameras, background,
                          supersample=supersample, radius=RENDER_RADIUS)

    def frames(self, cameras: Cameras, n: int, supersample: int = 1) -> Tensor:
        """rgb [n, C, H, W, 3] of the clip at n evenly spaced times from 0 to 1."""
        return torch.stack([self.render(cameras, t, supersample=supersample).rgb
                            for t in torch.linspace(0, 1, n).tolist()])

    def caption(self, rng=None) -> str:
        return f"{self.obj.caption(rng)}, {VERBS[self.motion]}"

    def __str__(self) -> str:
        return f"{self.motion} {self.obj}"



def save_clip(animated: AnimatedObject, path, frames: int = 8, size: int = 128, elevation: float = 0.0,
              distance: float = 1.9, fovy: float = 40.0, azimuth: float = 0.0, fps: float = 4.0):
    """Render `frames` evenly spaced frames of `animated` from one camera (by default the front view of the
    video-to-4D preset's input camera) and write them as a video (.mp4, .gif) over white, or as RGBA PNGs
    ``frame_000.png ...`` in a folder (a path without a suffix). Returns the path written."""
    from pathlib import Path

    from gen3d.cameras import spherical_cameras
    from gen3d.export.video import save_image, write_video
    from gen3d.io import atomic_folder

    one = lambda v: torch.tensor([float(v)])  # noqa: E731
    cams = spherical_cameras(one(azimuth), one(elevation), one(distance), one(fovy), size, size)
    outs = [animated.render(cams, t, background=(0.0, 0.0, 0.0), supersample=2)
            for t in torch.linspace(0, 1, frames).tolist()]
    path = Path(path)
    if path.suffix:
        white = torch.stack([o.rgb[0] + (1 - o.alpha[0]) for o in outs]).clamp(0, 1)
        return write_video(path, white, fps=fps)
    with atomic_folder(path) as tmp:
        for i, o in enumerate(outs):
            alpha = o.alpha[0].clamp(1e-6, 1)
            save_image(tmp / f"frame_{i:03d}.png", torch.cat([(o.rgb[0] / alpha).clamp(0, 1), o.alpha[0]], -1))
    return path
