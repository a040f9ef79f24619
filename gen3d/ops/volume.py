"""Volume rendering ops: camera rays, ray-bounds intersection, ray sampling and compositing.

Implements the emission-absorption volume rendering integral [Max 1995, "Optical Models for Direct
Volume Rendering"] with the quadrature of NeRF [Mildenhall et al. 2020, "NeRF: Representing Scenes
as Neural Radiance Fields for View Synthesis"]: along a ray cut into intervals of length delta_i
with density sigma_i and color c_i,

    alpha_i = 1 - exp(-sigma_i delta_i)
    T_i     = exp(-sum_{j<i} sigma_j delta_j)            (transmittance before interval i)
    w_i     = T_i alpha_i,  color = sum_i w_i c_i,  alpha = sum_i w_i = 1 - T_final

Samples are *packed*: all rays' samples in one flat list (`RaySamples`), sorted by ray and then by
t, so rays may carry any number of samples (the occupancy grid drops empty-space samples per ray).
The per-ray exclusive prefix sum of sigma delta is one global cumulative sum in float64 minus each
ray's value at its first sample (see `composite`); it is exact to float64 rounding, needs no padding
and is differentiable by plain autograd (cumsum, gather and exp).

Everything is pure torch and runs on any device and dtype (float64 for gradcheck). Cameras follow
`gen3d.cameras`: OpenCV axes, K in pixels, pixel centers at (i + 0.5, j + 0.5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from gen3d.cameras import Cameras


def camera_rays(cameras: Cameras) -> tuple[Tensor, Tensor]:
    """World-space rays through every pixel center of `cameras`.

    Returns origins [C, H, W, 3] (each camera's eye) and unit directions [C, H, W, 3]; the
    direction of pixel (column i, row j) is c2w_R K^-1 (i + 0.5, j + 0.5, 1), normalized.
    """
    if not isinstance(cameras, Cameras):
        raise ValueError(f"camera_rays: expected a gen3d.cameras.Cameras, got {type(cameras).__name__}")
    C, H, W = len(cameras), cameras.height, cameras.width
    dtype, device = cameras.c2w.dtype, cameras.device
    u = torch.arange(W, dtype=dtype, device=device) + 0.5  # [W]
    v = torch.arange(H, dtype=dtype, device=device) + 0.5  # [H]
    pix = torch.stack([u[None, :].expand(H, W), v[:, None].expand(H, W), torch.ones(H, W, dtype=dtype, device=device)], -1)
    d_cam = torch.einsum("cij,hwj->chwi", torch.linalg.inv(cameras.K), pix)  # [C, H, W, 3]
    d_world = torch.einsum("cij,chwj->chwi", cameras.c2w[:, :3, :3], d_cam)
    directions = torch.nn.functional.normalize(d_world, dim=-1)
    origins = cameras.eyes[:, None, None, :].expand(C, H, W, 3)
    return origins, directions


def _check_rays(origins: Tensor, directions: Tensor, who: str) -> None:
    if not (isinstance(origins, Tensor) and isinstance(directions, Tensor)):
        raise ValueError(f"{who}: origins and directions must be tensors, got {type(origins).__name__} and {type(directions).__name__}")
    if origins.dim() != 2 or origins.shape[-1] != 3 or origins.shape != directions.shape:
        raise ValueError(f"{who}: origins and directions must both be [R, 3], got {tuple(origins.shape)} and {tuple(directions.shape)}")
    if not origins.is_floating_point() or origins.dtype != directions.dtype:
        raise ValueError(f"{who}: origins and directions must share one float dtype, got {origins.dtype} and {directions.dtype}")


def ray_box(origins: Tensor, directions: Tensor, bound: float) -> tuple[Tensor, Tensor, Tensor]:
    """Intersect rays with the box [-bound, bound]^3 (slab method).

    origins, directions: [R, 3] (directions need not be unit; t is in units of |direction|).
    Returns near [R] (clamped at >= 0, so a ray starting inside begins at its origin), far [R] and
    hit [R] bool (far > near); near = far = 0 where the ray misses.
    """
    _check_rays(origins, directions, "ray_box")
    if not (isinstance(bound, (int, float)) and bound > 0):
        raise ValueError(f"ray_box: bound must be a positive number, got {bound!r}")
    return ray_aabb(origins, directions, [-bound] * 3, [bound] * 3)


def ray_aabb(origins: Tensor, directions: Tensor, lo, hi) -> tuple[Tensor, Tensor, Tensor]:
    """Intersect rays [R, 3] with the axis-aligned box [lo, hi] (each 3 numbers or a [3] tensor);
    returns near [R] (>= 0), far [R], hit [R] as `ray_box`."""
    _check_rays(origins, directions, "ray_aabb")
    lo = torch.as_tensor(lo, dtype=origins.dtype, device=origins.device)
    hi = torch.as_tensor(hi, dtype=origins.dtype, device=origins.device)
    if lo.shape != (3,) or hi.shape != (3,):
        raise ValueError(f"ray_aabb: lo and hi must hold 3 numbers, got {tuple(lo.shape)} and {tuple(hi.shape)}")
    # Axis-parallel rays: a tiny signed component keeps 0 * inf from producing NaN.
    tiny = 1e-12 if directions.dtype == torch.float64 else 1e-9
    d = torch.where(directions.abs() < tiny, torch.full_like(directions, tiny), directions)
    t0, t1 = (lo - origins) / d, (hi - origins) / d  # [R, 3]
    near = torch.minimum(t0, t1).amax(-1).clamp_min(0.0)
    far = torch.maximum(t0, t1).amin(-1)
    return _finish(near, far)


def ray_sphere(origins: Tensor, directions: Tensor, radius: float) -> tuple[Tensor, Tensor, Tensor]:
    """Intersect rays with the ball of `radius` at the origin.

    origins, directions: [R, 3] (directions need not be unit). Returns near [R] (clamped at >= 0),
    far [R], hit [R] bool; near = far = 0 where the ray misses.
    """
    _check_rays(origins, directions, "ray_sphere")
    if not (isinstance(radius, (int, float)) and radius > 0):
        raise ValueError(f"ray_sphere: radius must be a positive number, got {radius!r}")
    a = (directions * directions).sum(-1)  # [R]
    b = (origins * directions).sum(-1)  # half of the usual b
    c = (origins * origins).sum(-1) - radius * radius
    disc = b * b - a * c
    root = disc.clamp_min(0.0).sqrt()
    near = ((-b - root) / a).clamp_min(0.0)
    far = (-b + root) / a
    near, far, hit = _finish(near, far)
    hit = hit & (disc > 0)
    return near * hit, far * hit, hit


def _finish(near: Tensor, far: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    hit = far > near
    return near * hit, far * hit, hit


@dataclass
class RaySamples:
    """Packed samples of R rays: S intervals [t_starts, t_ends], sorted by ray, then by t."""

    ray_indices: Tensor  # [S] long, the ray each interval belongs to (non-decreasing)
    t_starts: Tensor  # [S] interval start along the ray
    t_ends: Tensor  # [S] interval end (>= start)

    def __len__(self) -> int:
        return self.ray_indices.shape[0]

    @property
    def midpoints(self) -> Tensor:  # [S]
        return 0.5 * (self.t_starts + self.t_ends)

    @property
    def deltas(self) -> Tensor:  # [S]
        return self.t_ends - self.t_starts

    def positions(self, origins: Tensor, directions: Tensor) -> Tensor:
        """World points [S, 3] at the interval midpoints of rays origins/directions [R, 3]."""
        return origins[self.ray_indices] + directions[self.ray_indices] * self.midpoints[:, None]

    def select(self, keep: Tensor) -> RaySamples:
        """The samples where bool `keep` [S] is True (still sorted)."""
        return RaySamples(self.ray_indices[keep], self.t_starts[keep], self.t_ends[keep])


def uniform_samples(
    near: Tensor,  # [R]
    far: Tensor,  # [R]
    hit: Tensor,  # [R] bool
    n_samples: int | None = None,
    step_size: float | None = None,
    generator: torch.Generator | None = None,
) -> RaySamples:
    """Cut [near, far] of every hit ray into intervals that tile it exactly (see `ray_intervals`)."""
    bounds, valid = ray_intervals(near, far, hit, n_samples, step_size, generator)
    return pack_intervals(bounds, valid)


def ray_intervals(
    near: Tensor,  # [R]
    far: Tensor,  # [R]
    hit: Tensor,  # [R] bool
    n_samples: int | None = None,
    step_size: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Interval boundaries of every ray in padded form: bounds [R, N + 1] and valid [R, N] bool
    (interval k of ray r is [bounds[r, k], bounds[r, k + 1]] where valid[r, k]; N is the largest count).

    Give exactly one of `n_samples` (n intervals per ray) or `step_size` (ceil((far - near) / step)
    intervals per ray, so a ray's step is at most `step_size` and short chords get fewer samples).
    Rays with hit False get none. generator None: equal intervals. A generator makes the sampling
    stratified (NeRF's stratified sampling, in interval form): every inner boundary moves uniformly
    within +-half a step, so the intervals still tile [near, far] in order and the sample points
    (midpoints) cover the ray continuously over training.
    """
    if not all(isinstance(t, Tensor) for t in (near, far, hit)):
        raise ValueError("ray_intervals: near, far and hit must be tensors")
    if near.dim() != 1 or near.shape != far.shape or hit.shape != near.shape or hit.dtype != torch.bool:
        raise ValueError(f"ray_intervals: near, far must be [R] and hit [R] bool, got {tuple(near.shape)}, "
                         f"{tuple(far.shape)}, {tuple(hit.shape)} {hit.dtype}")
    if (n_samples is None) == (step_size is None):
        raise ValueError(f"ray_intervals: give exactly one of n_samples and step_size, got {n_samples!r} and {step_size!r}")
    if n_samples is not None and not (isinstance(n_samples, int) and n_samples > 0):
        raise ValueError(f"ray_intervals: n_samples must be a positive int, got {n_samples!r}")
    if step_size is not None and not (isinstance(step_size, (int, float)) and step_size > 0):
        raise ValueError(f"ray_intervals: step_size must be a positive number, got {step_size!r}")
    length = (far - near).clamp_min(0.0)
    if n_samples is not None:
        counts = torch.full_like(near, n_samples, dtype=torch.long)
    else:
        counts = torch.ceil(length / step_size).long().clamp_min(1)
    counts = counts * hit
    R, N = near.shape[0], int(counts.max()) if near.numel() else 0
    dt = length / counts.clamp_min(1)  # [R]
    k = torch.arange(N + 1, device=near.device, dtype=near.dtype)  # [N + 1]
    offset = k.expand(R, N + 1)
    if generator is not None and N > 1:
        jitter = torch.rand(R, N + 1, generator=generator, device=generator.device, dtype=near.dtype).to(near.device)
        inner = (k[None] > 0) & (k[None] < counts[:, None])  # the ends stay at near and far
        offset = torch.where(inner, offset + jitter - 0.5, offset)
    bounds = torch.minimum(near[:, None] + offset * dt[:, None], far[:, None])  # [R, N + 1]
    valid = torch.arange(N, device=near.device)[None] < counts[:, None]  # [R, N]
    return bounds, valid


def pack_intervals(bounds: Tensor, keep: Tensor) -> RaySamples:
    """Packed `RaySamples` of the intervals where keep [R, N] is True, from bounds [R, N + 1]."""
    R, N = keep.shape
    if bounds.shape != (R, N + 1):
        raise ValueError(f"pack_intervals: bounds must be [R, N + 1] = [{R}, {N + 1}], got {tuple(bounds.shape)}")
    flat = keep.reshape(-1).nonzero()[:, 0]  # [S] row-major: sorted by ray, then by t
    ray_indices = flat // max(N, 1)
    start = flat + ray_indices  # index into bounds.view(-1): row r has N + 1 entries
    b = bounds.reshape(-1)
    return RaySamples(ray_indices, b[start], b[start + 1])


class Composite(NamedTuple):
    """Result of `composite` for R rays and S samples with D color channels."""

    weights: Tensor  # [S] w_i = T_i alpha_i
    colors: Tensor  # [R, D] sum_i w_i c_i (no background)
    alpha: Tensor  # [R] sum_i w_i = 1 - T_final
    depth: Tensor  # [R] expected t, sum_i w_i t_mid_i / alpha (normalized), 0 where alpha is 0


def composite(densities: Tensor, colors: Tensor, samples: RaySamples, n_rays: int) -> Composite:
    """NeRF quadrature over packed samples (see the module docstring); differentiable w.r.t.
    densities [S] (>= 0) and colors [S, D].

    The exclusive per-ray prefix sums E_i = sum_{j<i, same ray} sigma_j delta_j are computed as
    G_i - G_{first(ray_i)}, with G the global exclusive cumsum over all S samples in float64. This
    is exact except for float64 rounding of the running total: the error is below ~1e-16 times
    the sum of sigma delta over all rays so far (1e-10 absolute for 16k rays of optical depth 50),
    far below float32 resolution, and its gradient is exact (cumsum and gather are linear).
    Depth is the weights' expected t normalized by alpha (as `gen3d.ops.rasterize` normalizes its
    z), 0 where alpha is 0.
    """
    if not isinstance(samples, RaySamples):
        raise ValueError(f"composite: samples must be RaySamples, got {type(samples).__name__}")
    S = len(samples)
    if not isinstance(densities, Tensor) or densities.shape != (S,):
        raise ValueError(f"composite: densities must be [S] = [{S}], got {tuple(getattr(densities, 'shape', ()))}")
    if not isinstance(colors, Tensor) or colors.dim() != 2 or colors.shape[0] != S:
        raise ValueError(f"composite: colors must be [S, D] with S = {S}, got {tuple(getattr(colors, 'shape', ()))}")
    if not (isinstance(n_rays, int) and n_rays >= 0):
        raise ValueError(f"composite: n_rays must be a non-negative int, got {n_rays!r}")
    idx = samples.ray_indices
    if S and (int(idx.min()) < 0 or int(idx.max()) >= n_rays or bool((idx[1:] < idx[:-1]).any())):
        raise ValueError(f"composite: ray_indices must be sorted and in [0, {n_rays}), got range "
                         f"[{int(idx.min())}, {int(idx.max())}] (sorted: {not bool((idx[1:] < idx[:-1]).any())})")
    dtype = densities.dtype
    tau = densities * samples.deltas  # [S] optical depth of each interval
    trans = torch.exp(-exclusive_segment_cumsum(tau.double(), idx, n_rays)).to(dtype)  # [S] T_i
    weights = trans * -torch.expm1(-tau)  # [S]
    alpha = torch.zeros(n_rays, dtype=dtype, device=densities.device).index_add(0, idx, weights)
    rgb = torch.zeros(n_rays, colors.shape[1], dtype=colors.dtype, device=colors.device).index_add(
        0, idx, weights[:, None].to(colors.dtype) * colors)
    wt = torch.zeros(n_rays, dtype=dtype, device=densities.device).index_add(0, idx, weights * samples.midpoints.to(dtype))
    depth = torch.where(alpha > 0, wt / alpha.clamp_min(1e-10), torch.zeros_like(wt))
    return Composite(weights, rgb, alpha, depth)


def exclusive_segment_cumsum(values: Tensor, ray_indices: Tensor, n_rays: int) -> Tensor:
    """Per-ray exclusive cumulative sum of packed values [S] -> [S] (sum over the earlier samples of
    the same ray), as G_i - G_first(ray_i) with G the global exclusive cumsum, computed in float64
    and returned in the dtype of `values`. `ray_indices` [S] must be sorted."""
    if values.numel() == 0:
        return values.clone()
    v = values.double()
    G = torch.nn.functional.pad(torch.cumsum(v, 0)[:-1], (1, 0))  # [S] global exclusive cumsum
    counts = torch.bincount(ray_indices, minlength=n_rays)  # [R]
    first = torch.cumsum(counts, 0) - counts  # [R] index of each ray's first sample
    return (G - G[first[ray_indices]]).to(values.dtype)


def segment_sum(values: Tensor, ray_indices: Tensor, n_rays: int) -> Tensor:
    """Sum per-sample values [S, ...] over each ray -> [R, ...] (differentiable)."""
    out = values.new_zeros((n_rays, *values.shape[1:]))
    return out.index_add(0, ray_indices, values)


__all__ = [
    "Composite",
    "RaySamples",
    "camera_rays",
    "composite",
    "exclusive_segment_cumsum",
    "pack_intervals",
    "ray_aabb",
    "ray_box",
    "ray_intervals",
    "ray_sphere",
    "segment_sum",
    "uniform_samples",
]
