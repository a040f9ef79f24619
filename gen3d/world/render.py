"""Ground-truth renders of Shapes-world objects by sphere tracing their signed distance functions.

Rays follow `gen3d.cameras` (OpenCV axes, pixel centers at +0.5). Each ray is clipped to the
bounding sphere of radius `BOUND_RADIUS`; rays that miss it are background at once, the rest step
by the signed distance (Hart 1996, "Sphere tracing") until it falls below `eps`, all rays of all
cameras in one batch that shrinks as rays finish. Normals are the SDF gradient by a tetrahedral
finite difference.

Shading is Lambertian under lights **fixed in the world** (a key light above the front, a weaker
fill from behind on the other side) plus ambient. Because it does not depend on the viewer, the
shaded color of a surface point is the same in every view: a 3D representation with
view-independent colors can reproduce these renders exactly, and the renders still carry shape
cues. With albedo c the rendered color is ``s(n) * c`` with the scalar
``s(n) = ambient + key * max(n.L, 0) + fill * max(n.L_fill, 0)`` in ``[ambient, 1]``, applied in
sRGB (a deliberate simplification: no gamma round trip, so the hue of every pixel is the albedo's).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

from gen3d.cameras import Cameras
from gen3d.rendering.types import RenderOutput
from gen3d.world.catalog import BOUND_RADIUS, WorldObject

LIGHT_DIR = (0.6, 0.35, 0.75)
"""Default key light direction in world space (towards the light): above, in front, a little to +y."""
AMBIENT, KEY, FILL = 0.4, 0.5, 0.2
"""Shading weights; with the default lights s(n) stays within [0.4, 0.95]."""
SDF_THREADS: int | None = 1
"""Intra-op threads for SDF evaluation (None: leave torch's setting alone). Sphere tracing is
thousands of small elementwise ops: measured on 2 cores, a second thread gained nothing when the
machine was idle and made a 16-view render 20-40x slower when another process held a core."""


@contextmanager
def sdf_threads(n: int | None = None) -> Iterator[None]:
    """Run the block with `n` (default `SDF_THREADS`) torch intra-op threads, then restore the setting."""
    n = SDF_THREADS if n is None else n
    previous = torch.get_num_threads()
    if n is None or n == previous:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def camera_rays(cameras: Cameras) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pixel rays: origins [C, H, W, 3], unit directions [C, H, W, 3] (world), and z_per_t [C, H, W].

    ``depth = t * z_per_t`` converts a distance along the ray to camera-space depth.
    """
    C, H, W = len(cameras), cameras.height, cameras.width
    dev = cameras.device
    j, i = torch.meshgrid(torch.arange(H, device=dev, dtype=torch.float32) + 0.5,
                          torch.arange(W, device=dev, dtype=torch.float32) + 0.5, indexing="ij")  # [H, W]
    K = cameras.K.float()
    x = (i[None] - K[:, 0, 2, None, None]) / K[:, 0, 0, None, None]  # [C, H, W]
    y = (j[None] - K[:, 1, 2, None, None]) / K[:, 1, 1, None, None]
    d_cam = torch.stack([x, y, torch.ones_like(x)], -1)  # [C, H, W, 3]
    norm = d_cam.norm(dim=-1)  # [C, H, W]
    R = cameras.c2w[:, :3, :3].float()  # [C, 3, 3]
    dirs = torch.einsum("cij,chwj->chwi", R, d_cam) / norm[..., None]
    origins = cameras.c2w[:, None, None, :3, 3].float().expand(C, H, W, 3)
    return origins, dirs, 1.0 / norm


def sphere_trace(sdf: Callable[[Tensor], Tensor], origins: Tensor, dirs: Tensor, radius: float = BOUND_RADIUS,
                 max_steps: int = 100, eps: float = 3e-4) -> tuple[Tensor, Tensor]:
    """March rays [R, 3] (unit `dirs`) through `sdf` inside the sphere of `radius` at the origin.

    Returns t [R] (distance along each ray to the surface) and hit [R] bool.
    """
    R = origins.shape[0]
    b = (origins * dirs).sum(-1)  # [R]
    disc = b * b - ((origins * origins).sum(-1) - radius * radius)
    root = disc.clamp_min(0).sqrt()
    t = (-b - root).clamp_min(0)  # [R] entry into the bounding sphere
    t_far = -b + root
    hit = torch.zeros(R, dtype=torch.bool, device=origins.device)
    idx = torch.nonzero(disc > 0).squeeze(1)  # rays still marching
    o, d, t_act, far = origins[idx], dirs[idx], t[idx], t_far[idx]
    for _ in range(max_steps):
        if idx.numel() == 0:
            break
        dist = sdf(o + t_act[:, None] * d)  # [R']
        done = dist < eps
        hit[idx[done]] = True
        t[idx[done]] = t_act[done]
        t_act = t_act + dist
        keep = ~done & (t_act < far)
        idx, o, d, t_act, far = idx[keep], o[keep], d[keep], t_act[keep], far[keep]
    if idx.numel():  # out of steps, typically grazing a silhouette: close enough counts as a hit
        near = sdf(o + t_act[:, None] * d) < 10 * eps
        hit[idx[near]], t[idx[near]] = True, t_act[near]
    return t, hit


def sdf_normals(sdf: Callable[[Tensor], Tensor], points: Tensor, h: float = 5e-4) -> Tensor:
    """Unit SDF gradients [P, 3] at points [P, 3] (tetrahedral central differences, 4 SDF calls)."""
    k = points.new_tensor([[1, -1, -1], [-1, -1, 1], [-1, 1, -1], [1, 1, 1]])  # [4, 3]
    values = sdf((points[None] + h * k[:, None]).reshape(-1, 3)).reshape(4, -1)  # [4, P]
    return F.normalize((values[..., None] * k[:, None]).sum(0), dim=-1)


def shade(normals: Tensor, albedo: Tensor, light_dir: Sequence[float] = LIGHT_DIR) -> Tensor:
    """Lit color [P, 3] from world normals [P, 3] and albedo [P, 3] (see the module docstring)."""
    key = F.normalize(normals.new_tensor(light_dir), dim=0)
    fill = F.normalize(torch.stack([-key[0], -key[1], 0.5 * key[2].abs()]), dim=0)
    s = AMBIENT + KEY * (normals @ key).clamp_min(0) + FILL * (normals @ fill).clamp_min(0)  # [P]
    return (s[:, None] * albedo).clamp(0, 1)


def _background(background, C: int, device) -> Tensor:
    bg = torch.as_tensor(background, dtype=torch.float32, device=device)
    if bg.shape == (3,):
        bg = bg.expand(C, 3)
    if bg.shape != (C, 3):
        raise ValueError(f"background must be [3] or [C={C}, 3], got {tuple(bg.shape)}")
    return bg


def render_sdf(sdf: Callable[[Tensor], Tensor], albedo: Callable[[Tensor], Tensor], cameras: Cameras,
               background=(1.0, 1.0, 1.0), light_dir: Sequence[float] = LIGHT_DIR, supersample: int = 1,
               radius: float = BOUND_RADIUS, eps: float = 3e-4) -> RenderOutput:
    """Render any SDF (points [P, 3] -> [P]) with an albedo function (points [P, 3] -> [P, 3]).

    supersample: render at s x s samples per pixel and average (antialiased rgb and fractional alpha;
    depth is the mean over the covered samples, normals the normalized mean).
    """
    if supersample < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    with sdf_threads():
        return _render_sdf(sdf, albedo, cameras, background, light_dir, supersample, radius, eps)


def _render_sdf(sdf, albedo, cameras: Cameras, background, light_dir, supersample: int, radius: float,
                eps: float) -> RenderOutput:
    C, H, W, s = len(cameras), cameras.height, cameras.width, supersample
    bg = _background(background, C, cameras.device)  # [C, 3]
    cams = cameras.resized(W * s, H * s) if s > 1 else cameras
    origins, dirs, z_per_t = camera_rays(cams)
    o, d = origins.reshape(-1, 3), dirs.reshape(-1, 3)
    n_rays = o.shape[0]
    color = torch.zeros(n_rays, 3, device=o.device)
    normal = torch.zeros(n_rays, 3, device=o.device)
    t, hit = sphere_trace(sdf, o, d, radius=radius, eps=eps)
    if hit.any():
        pts = o[hit] + t[hit, None] * d[hit]  # [P, 3]
        n = sdf_normals(sdf, pts)
        normal[hit] = n
        color[hit] = shade(n, albedo(pts), light_dir)
    shape = (C, H * s, W * s)
    alpha = hit.float().reshape(*shape, 1)
    depth = (t * z_per_t.reshape(-1) * hit).reshape(*shape, 1)
    color, normal = color.reshape(*shape, 3), normal.reshape(*shape, 3)
    if s > 1:
        pool = lambda x: F.avg_pool2d(x.permute(0, 3, 1, 2), s).permute(0, 2, 3, 1)
        a = pool(alpha)  # [C, H, W, 1]
        covered = a.clamp_min(1e-8)
        color, depth = pool(color), pool(depth) / covered * (a > 0)  # color stays premultiplied
        normal, alpha = F.normalize(pool(normal), dim=-1), a
    rgb = color + (1 - alpha) * bg[:, None, None]  # premultiplied color over the background
    return RenderOutput(rgb=rgb.clamp(0, 1), alpha=alpha, depth=depth, normal=normal)


def render_object(obj: WorldObject, cameras: Cameras, background=(1.0, 1.0, 1.0),
                  light_dir: Sequence[float] = LIGHT_DIR, supersample: int = 1) -> RenderOutput:
    """Ground-truth render of a Shapes-world object.

    Returns rgb [C, H, W, 3] over `background` ([3] or [C, 3]), alpha [C, H, W, 1] (binary unless
    supersampled), depth [C, H, W, 1] (camera z, 0 on background), normal [C, H, W, 3] (world space,
    0 on background).
    """
    return render_sdf(obj.sdf, obj.color_at, cameras, background, light_dir, supersample)


def contact_sheet(objects: Sequence[WorldObject], cameras: Cameras, background=(1.0, 1.0, 1.0),
                  supersample: int = 2) -> Tensor:
    """One image [len(objects) * H, C * W, 3]: a row per object, a column per camera."""
    rows = [render_object(o, cameras, background, supersample=supersample).rgb for o in objects]  # [C, H, W, 3]
    return torch.cat([torch.cat(list(r), dim=1) for r in rows], dim=0)
