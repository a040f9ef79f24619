"""Cameras, the one coordinate convention of gen3d, and the orbit samplers.

Convention (used by every renderer, prior and exporter):

- **World**: right-handed, +z up. Objects sit around the origin inside the unit ball and their
  *front* faces +x, so the camera at azimuth 0 sees the front (as in threestudio).
- **Spherical camera position**: azimuth a and elevation e in degrees, distance d:
  ``eye = d * (cos e cos a, cos e sin a, sin e)``; azimuth grows counter-clockwise seen from above.
- **Camera frame**: OpenCV: x right, y down, z forward (the viewing direction). ``c2w`` maps camera
  coordinates to world coordinates; its columns 0..2 are the camera's right, down and forward axes
  in world space and column 3 is the eye. ``viewmats = inverse(c2w)`` (world to camera), which is
  what gsplat calls ``viewmats``.
- **Intrinsics**: ``K = [[fx, 0, cx], [0, fy, cy], [0, 0, 1]]`` in pixels; the center of pixel
  (i, j) (column i, row j) is at (i + 0.5, j + 0.5), so cx = W / 2 and cy = H / 2.
- **Images**: ``[C, H, W, D]`` tensors, row 0 at the top.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass
class Cameras:
    """A batch of C pinhole cameras of one image size."""

    c2w: Tensor  # [C, 4, 4] camera-to-world, OpenCV camera axes
    K: Tensor  # [C, 3, 3] intrinsics in pixels
    width: int
    height: int
    azimuth: Tensor  # [C] degrees, for view-dependent prompts
    elevation: Tensor  # [C] degrees
    distance: Tensor  # [C]

    def __post_init__(self) -> None:
        C = self.c2w.shape[0]
        if self.c2w.shape != (C, 4, 4) or self.K.shape != (C, 3, 3):
            raise ValueError(f"Cameras: c2w must be [C,4,4] and K [C,3,3], got {tuple(self.c2w.shape)} and {tuple(self.K.shape)}")
        for name in ("azimuth", "elevation", "distance"):
            if getattr(self, name).shape != (C,):
                raise ValueError(f"Cameras: {name} must be [{C}], got {tuple(getattr(self, name).shape)}")
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"Cameras: image size must be positive, got {self.width}x{self.height}")

    def __len__(self) -> int:
        return self.c2w.shape[0]

    @property
    def device(self) -> torch.device:
        return self.c2w.device

    @property
    def viewmats(self) -> Tensor:  # [C, 4, 4] world-to-camera
        return torch.linalg.inv(self.c2w)

    @property
    def eyes(self) -> Tensor:  # [C, 3]
        return self.c2w[:, :3, 3]

    def to(self, device: torch.device | str) -> "Cameras":
        return replace(
            self, c2w=self.c2w.to(device), K=self.K.to(device), azimuth=self.azimuth.to(device),
            elevation=self.elevation.to(device), distance=self.distance.to(device),
        )

    def __getitem__(self, idx) -> "Cameras":
        idx = slice(idx, idx + 1) if isinstance(idx, int) else idx
        return replace(
            self, c2w=self.c2w[idx], K=self.K[idx], azimuth=self.azimuth[idx],
            elevation=self.elevation[idx], distance=self.distance[idx],
        )

    def resized(self, width: int, height: int) -> "Cameras":
        """The same cameras rendering `width` x `height` images (intrinsics scaled)."""
        K = self.K.clone()
        K[:, 0] *= width / self.width
        K[:, 1] *= height / self.height
        return replace(self, K=K, width=width, height=height)


def look_at(eye: Tensor, target: Tensor | None = None, up: Tensor | None = None) -> Tensor:
    """Camera-to-world matrices [C, 4, 4] (OpenCV axes) for cameras at `eye` [C, 3] looking at `target`."""
    target = torch.zeros_like(eye) if target is None else target.expand_as(eye)
    up = eye.new_tensor([0.0, 0.0, 1.0]).expand_as(eye) if up is None else up.expand_as(eye)
    forward = torch.nn.functional.normalize(target - eye, dim=-1)
    right = torch.linalg.cross(forward, up, dim=-1)
    # Looking straight up or down: any horizontal right axis will do.
    degenerate = right.norm(dim=-1, keepdim=True) < 1e-6
    right = torch.where(degenerate, eye.new_tensor([0.0, 1.0, 0.0]).expand_as(eye), right)
    right = torch.nn.functional.normalize(right, dim=-1)
    down = torch.linalg.cross(forward, right, dim=-1)
    c2w = torch.eye(4, dtype=eye.dtype, device=eye.device).repeat(eye.shape[0], 1, 1)
    c2w[:, :3, 0], c2w[:, :3, 1], c2w[:, :3, 2], c2w[:, :3, 3] = right, down, forward, eye
    return c2w


def intrinsics(fovy_deg: Tensor, width: int, height: int) -> Tensor:
    """Pinhole intrinsics [C, 3, 3] from vertical field of view in degrees [C] (square pixels)."""
    fy = 0.5 * height / torch.tan(torch.deg2rad(fovy_deg) / 2)
    K = torch.zeros(fovy_deg.shape[0], 3, 3, dtype=fovy_deg.dtype, device=fovy_deg.device)
    K[:, 0, 0], K[:, 1, 1] = fy, fy
    K[:, 0, 2], K[:, 1, 2], K[:, 2, 2] = width / 2, height / 2, 1.0
    return K


def wrap_azimuth(azimuth: Tensor) -> Tensor:
    """Azimuths in degrees wrapped to [-180, 180) (differences too: the signed angle from one azimuth to another)."""
    return torch.remainder(azimuth.float() + 180.0, 360.0) - 180.0


def spherical_cameras(
    azimuth: Tensor, elevation: Tensor, distance: Tensor, fovy: Tensor, width: int, height: int
) -> Cameras:
    """Cameras on spheres around the origin looking at it; all angles in degrees, all inputs [C]."""
    a, e = torch.deg2rad(azimuth), torch.deg2rad(elevation)
    eye = distance[:, None] * torch.stack([torch.cos(e) * torch.cos(a), torch.cos(e) * torch.sin(a), torch.sin(e)], -1)
    return Cameras(look_at(eye), intrinsics(fovy, width, height), width, height, azimuth, elevation, distance)


@dataclass
class OrbitConfig:
    """Random training cameras on an orbit around the origin."""

    batch_size: int = 4
    """Cameras per optimization step."""
    width: int = 64
    """Render width in pixels."""
    height: int = 64
    """Render height in pixels."""
    elevation_range: tuple[float, float] = (-10.0, 45.0)
    """Elevation in degrees, sampled uniformly."""
    azimuth_range: tuple[float, float] = (-180.0, 180.0)
    """Azimuth in degrees; the batch is stratified over this range so every step sees all sides."""
    distance_range: tuple[float, float] = (2.5, 3.0)
    """Camera distance from the origin."""
    fovy_range: tuple[float, float] = (40.0, 50.0)
    """Vertical field of view in degrees."""
    eval_elevation: float = 15.0
    """Elevation of validation and turntable cameras."""
    eval_distance: float = 2.75
    """Distance of validation and turntable cameras."""
    eval_fovy: float = 45.0
    """Field of view of validation and turntable cameras."""
    eval_size: int = 128
    """Resolution of validation renders and the turntable video."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"cameras.batch_size must be >= 1, got {self.batch_size}")
        for name in ("elevation_range", "azimuth_range", "distance_range", "fovy_range"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"cameras.{name} must be [low, high] with low <= high, got {[lo, hi]}")
        if not (0 < self.fovy_range[0] and self.fovy_range[1] < 180):
            raise ValueError(f"cameras.fovy_range must lie in (0, 180) degrees, got {list(self.fovy_range)}")
        if self.distance_range[0] <= 0:
            raise ValueError(f"cameras.distance_range must be positive, got {list(self.distance_range)}")
        for name in ("width", "height", "eval_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"cameras.{name} must be >= 1 pixel, got {getattr(self, name)}")
        if not self.eval_distance > 0:
            raise ValueError(f"cameras.eval_distance must be > 0, got {self.eval_distance}")
        if not 0 < self.eval_fovy < 180:
            raise ValueError(f"cameras.eval_fovy must lie in (0, 180) degrees, got {self.eval_fovy}")
        if not -90 <= self.eval_elevation <= 90:
            raise ValueError(f"cameras.eval_elevation must lie in [-90, 90] degrees, got {self.eval_elevation}")


def _uniform(lo: float, hi: float, n: int, generator: torch.Generator | None) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator)


def sample_orbit(cfg: OrbitConfig, generator: torch.Generator | None = None,
                 width: int | None = None, height: int | None = None) -> Cameras:
    """Draw `cfg.batch_size` random cameras; azimuths are stratified over the range."""
    n = cfg.batch_size
    lo, hi = cfg.azimuth_range
    azimuth = lo + (hi - lo) * (torch.arange(n) + torch.rand(n, generator=generator)) / n
    return spherical_cameras(
        azimuth, _uniform(*cfg.elevation_range, n, generator), _uniform(*cfg.distance_range, n, generator),
        _uniform(*cfg.fovy_range, n, generator), width or cfg.width, height or cfg.height,
    )


def orbit_cameras(n: int, elevation: float = 15.0, distance: float = 2.75, fovy: float = 45.0,
                  width: int = 128, height: int = 128, start_azimuth: float = 0.0) -> Cameras:
    """`n` fixed cameras evenly spaced in azimuth, starting at the front (for validation and turntables)."""
    azimuth = start_azimuth + torch.arange(n, dtype=torch.float32) * 360.0 / n
    azimuth = wrap_azimuth(azimuth)
    full = lambda v: torch.full((n,), float(v))  # noqa: E731
    return spherical_cameras(azimuth, full(elevation), full(distance), full(fovy), width, height)
