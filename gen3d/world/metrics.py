"""Quality of a 3D result against the Shapes-world object its prompt names.

Any result is seen through one small protocol, `Query`: occupancy at points and renders from
cameras. `ObjectQuery` wraps a ground-truth `WorldObject` in it (so GT vs GT is the sanity check).

- `iou_3d`: voxel IoU, optionally after normalizing position and scale, best over azimuth for
  shapes without a canonical heading.
- `silhouette_iou`: mask IoU over a fixed set of views.
- `color_error`: mean CIEDE2000 between rendered and ground-truth colors where both are foreground.
- `multiview_consistency`: do a result's own renders agree with each other in 3D? (reprojection).
- `sample_agreement`: for a prior's 2D samples, color and silhouette agreement with ground truth.
- `multi_face`, `seed_diversity`, `saturation`: failure modes of score distillation (a front on the back
  too, the same shape for every seed, colors more saturated than the object's).

Colors are compared in CIELAB with CIEDE2000 (Sharma, Wu and Dalal 2005, "The CIEDE2000
color-difference formula: implementation notes, supplementary test data, and mathematical
observations"), implemented here from that paper's equations; sRGB is converted with the IEC
61966-2-1 transfer curve and D65 white. A CIEDE2000 of about 1 is a just-noticeable difference;
the shading range of the renders alone spans tens of units, so compare errors between methods, not
to zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import torch
from torch import Tensor

from gen3d.cameras import Cameras, spherical_cameras, wrap_azimuth
from gen3d.priors.prompts import view_directions
from gen3d.rendering.types import RenderOutput
from gen3d.world.catalog import SHAPES, WorldObject, parse_prompt
from gen3d.world.render import LIGHT_DIR, render_object, sdf_threads

AZIMUTH_STEP = 15.0
"""Spacing in degrees of the azimuth rotations tried by best-over-azimuth metrics."""


class Query(Protocol):
    """What the metrics need from a 3D result."""

    def occupancy(self, points: Tensor) -> Tensor:
        """[P] occupancy in [0, 1] (or a density, thresholded the same way) at points [P, 3]."""

    def render(self, cameras: Cameras) -> RenderOutput:
        """rgb, alpha and depth [C, H, W, *] from `cameras` (white background preferred)."""


class ObjectQuery:
    """A `WorldObject` seen as a `Query`: exact occupancy and ground-truth renders."""

    def __init__(self, obj: WorldObject, background=(1.0, 1.0, 1.0), supersample: int = 1) -> None:
        self.obj, self.background, self.supersample = obj, background, supersample

    def occupancy(self, points: Tensor) -> Tensor:
        return _gt_occupancy(self.obj, points).float()

    def render(self, cameras: Cameras) -> RenderOutput:
        return render_object(self.obj, cameras, self.background, supersample=self.supersample)


# ----------------------------------------------------------------------------------------------
# Color science


def srgb_to_lab(rgb: Tensor) -> Tensor:
    """CIELAB [..., 3] (D65) from sRGB [..., 3] in [0, 1]; computed in float64."""
    c = rgb.double().clamp(0, 1)
    linear = torch.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    M = c.new_tensor([[0.4124564, 0.3575761, 0.1804375],
                      [0.2126729, 0.7151522, 0.0721750],
                      [0.0193339, 0.1191920, 0.9503041]])
    xyz = linear @ M.T / c.new_tensor([0.95047, 1.0, 1.08883])  # relative to the D65 white
    delta = 6.0 / 29.0
    f = torch.where(xyz > delta**3, xyz.clamp_min(1e-12) ** (1.0 / 3.0), xyz / (3 * delta**2) + 4.0 / 29.0)
    return torch.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def ciede2000(lab1: Tensor, lab2: Tensor) -> Tensor:
    """CIEDE2000 color difference [...] between CIELAB colors [..., 3] (kL = kC = kH = 1).

    Sharma et al. 2005, equations (1)-(25); hue angles in degrees as in the paper.
    """
    lab1, lab2 = torch.broadcast_tensors(lab1.double(), lab2.double())
    L1, a1, b1 = lab1.unbind(-1)
    L2, a2, b2 = lab2.unbind(-1)
    deg = math.pi / 180.0
    c_bar7 = ((torch.hypot(a1, b1) + torch.hypot(a2, b2)) / 2) ** 7
    G = 0.5 * (1 - torch.sqrt(c_bar7 / (c_bar7 + 25.0**7)))  # (4)
    a1p, a2p = (1 + G) * a1, (1 + G) * a2  # (5)
    C1p, C2p = torch.hypot(a1p, b1), torch.hypot(a2p, b2)  # (6)
    h1p = torch.remainder(torch.atan2(b1, a1p) / deg, 360.0)  # (7); atan2(0, 0) = 0 as the paper asks
    h2p = torch.remainder(torch.atan2(b2, a2p) / deg, 360.0)
    chroma0 = (C1p * C2p) == 0
    dLp, dCp = L2 - L1, C2p - C1p  # (8), (9)
    dh = h2p - h1p
    dh = torch.where(dh > 180, dh - 360, torch.where(dh < -180, dh + 360, dh))
    dh = torch.where(chroma0, torch.zeros_like(dh), dh)  # (10)
    dHp = 2 * torch.sqrt(C1p * C2p) * torch.sin(dh * deg / 2)  # (11)
    Lbp, Cbp = (L1 + L2) / 2, (C1p + C2p) / 2  # (12), (13)
    hsum = h1p + h2p
    hbp = torch.where((h1p - h2p).abs() <= 180, hsum / 2, torch.where(hsum < 360, (hsum + 360) / 2, (hsum - 360) / 2))
    hbp = torch.where(chroma0, hsum, hbp)  # (14)
    T = (1 - 0.17 * torch.cos((hbp - 30) * deg) + 0.24 * torch.cos(2 * hbp * deg)
         + 0.32 * torch.cos((3 * hbp + 6) * deg) - 0.20 * torch.cos((4 * hbp - 63) * deg))  # (15)
    dtheta = 30 * torch.exp(-(((hbp - 275) / 25) ** 2))  # (16)
    RC = 2 * torch.sqrt(Cbp**7 / (Cbp**7 + 25.0**7))  # (17)
    SL = 1 + 0.015 * (Lbp - 50) ** 2 / torch.sqrt(20 + (Lbp - 50) ** 2)  # (18)
    SC = 1 + 0.045 * Cbp  # (19)
    SH = 1 + 0.015 * Cbp * T  # (20)
    RT = -torch.sin(2 * dtheta * deg) * RC  # (21)
    l, c, h = dLp / SL, dCp / SC, dHp / SH
    return torch.sqrt((l * l + c * c + h * h + RT * c * h).clamp_min(0))  # (22)


def delta_e(rgb1: Tensor, rgb2: Tensor) -> Tensor:
    """CIEDE2000 [...] between sRGB colors [..., 3]."""
    return ciede2000(srgb_to_lab(rgb1), srgb_to_lab(rgb2))


# ----------------------------------------------------------------------------------------------
# 3D


def voxel_centers(resolution: int, bound: float) -> Tensor:
    """Voxel centers [R^3, 3] of a grid over [-bound, bound]^3."""
    x = (torch.arange(resolution, dtype=torch.float32) + 0.5) / resolution * 2 * bound - bound
    return torch.stack(torch.meshgrid(x, x, x, indexing="ij"), -1).reshape(-1, 3)


def _chunked(fn, points: Tensor, chunk: int = 1 << 17) -> Tensor:
    return torch.cat([torch.as_tensor(fn(points[i:i + chunk])).reshape(-1) for i in range(0, len(points), chunk)])


def _gt_occupancy(obj: WorldObject, points: Tensor) -> Tensor:
    with sdf_threads():
        return _chunked(obj.occupancy, points)


def _center_and_scale(points: Tensor) -> tuple[Tensor, Tensor]:
    """Center of mass [3] and RMS radius of a point set [P, 3]."""
    center = points.mean(0)
    return center, ((points - center) ** 2).sum(-1).mean().sqrt().clamp_min(1e-6)


def _rotate_z(points: Tensor, degrees: float, about: Tensor) -> Tensor:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    R = points.new_tensor([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    return (points - about) @ R.T + about


def _azimuths(obj: WorldObject, best_over_azimuth: bool | None, step: float) -> list[float]:
    """Rotations to try: none; a quarter turn for symmetric shapes (all are at least 4-fold); or a full turn."""
    if best_over_azimuth is None:
        best_over_azimuth = obj.shape_def.rotational_symmetry
        span = 90.0
    else:
        span = 360.0
    if not best_over_azimuth:
        return [0.0]
    return [i * step for i in range(max(1, round(span / step)))]


def _moments(fn: Callable[[Tensor], Tensor], resolution: int, bound: float, threshold: float,
             samples: int) -> tuple[Tensor, Tensor]:
    """Center of mass [3] and RMS radius of {fn > threshold}, from `samples` jittered grids.

    Jittering each voxel's sample point makes the estimate unbiased; a fixed grid aliases thin parts
    (a 2-voxel-thick chair seat) and biases the center by up to a voxel.
    """
    grid, h = voxel_centers(resolution, bound), 2 * bound / resolution
    g = torch.Generator().manual_seed(0)
    points = torch.cat([grid, *(grid + (torch.rand(grid.shape, generator=g) - 0.5) * h for _ in range(samples))])
    occupied = fn(points).float() > threshold  # the unjittered grid too, so a tiny set is never missed
    return _center_and_scale(points[occupied])


def _fill_enclosed(occupied: Tensor, resolution: int) -> Tensor:
    """[R^3] voxels occupied or enclosed by occupied ones (not reachable from the border through free voxels)."""
    from scipy.ndimage import binary_fill_holes

    grid = occupied.reshape(resolution, resolution, resolution).numpy()
    return torch.from_numpy(binary_fill_holes(grid).reshape(-1))


def iou_3d(query: Query, obj: WorldObject, resolution: int = 64, threshold: float = 0.5, normalize: bool = True,
           best_over_azimuth: bool | None = None, bound: float = 1.0, azimuth_step: float = AZIMUTH_STEP,
           moment_samples: int = 4, solid: bool = True) -> float:
    """Voxel IoU between `query` (occupancy > threshold) and `obj` on a grid over [-bound, bound]^3.

    solid: count the voxels the query's occupied voxels enclose as occupied too (what a watertight
    mesh of its surface holds). Score distillation only shapes what renders see, so 3D Gaussians
    and fields often leave cavities inside an opaque surface; the ground truth is solid. The
    query's center and scale are then those of its solid voxels. solid=False scores the raw
    occupancy (`iou_3d(..., solid=False)`; the benchmarks report both).

    Voxels are occupied when their center is. normalize: compare shapes regardless of position and
    size: the ground truth is moved and scaled so its center of mass and RMS radius (radius of
    gyration, robust to a few stray voxels where a bounding radius is not) match the query's, both
    estimated from `moment_samples` jittered grids; IoU is counted on the query's grid. Thin parts
    (chair and table: 0.06 thick, 2 voxels at 64^3) make normalized IoU sensitive to sub-voxel
    misalignment; raise `resolution` for them.
    best_over_azimuth: None -> for shapes with `rotational_symmetry`, the best over a quarter turn;
    True -> the best over a full turn (a result facing the wrong way); False -> as is. Rotations
    are about the vertical axis through the ground truth's center, every `azimuth_step` degrees.
    """
    grid = voxel_centers(resolution, bound)  # [R^3, 3]
    occ_q = _chunked(query.occupancy, grid).float() > threshold  # [R^3]
    if not occ_q.any():
        return 0.0
    enclosed = _fill_enclosed(occ_q, resolution) & ~occ_q if solid else None  # [R^3] inside, empty at the center
    if solid:
        occ_q = occ_q | enclosed

    def occupied(p: Tensor) -> Tensor:
        """The query's occupancy at any points [P, 3], or (solid) the enclosed voxel they fall in."""
        inside = _chunked(query.occupancy, p).float() > threshold
        if enclosed is not None:
            ijk = ((p + bound) / (2 * bound) * resolution).long().clamp_(0, resolution - 1)
            inside |= enclosed[(ijk[:, 0] * resolution + ijk[:, 1]) * resolution + ijk[:, 2]]
        return inside

    points, about = grid, torch.zeros(3)
    if normalize:
        c_q, s_q = _moments(occupied, resolution, bound, 0.5, moment_samples)
        c_g, s_g = _moments(lambda p: _gt_occupancy(obj, p), resolution, bound, 0.5, moment_samples)
        points, about = c_g + (grid - c_q) * (s_g / s_q), c_g  # query-grid voxels in the GT's frame
    best = 0.0
    for az in _azimuths(obj, best_over_azimuth, azimuth_step):
        occ_g = _gt_occupancy(obj, _rotate_z(points, -az, about) if az else points)
        best = max(best, float((occ_q & occ_g).sum() / (occ_q | occ_g).sum()))
    return best


# ----------------------------------------------------------------------------------------------
# Image-space


def eval_cameras(size: int = 64, azimuths: int = 8, elevations: Sequence[float] = (10.0, 40.0),
                 distance: float = 2.75, fovy: float = 45.0) -> Cameras:
    """The fixed metric views: `azimuths` evenly spaced from the front, at each elevation."""
    az = torch.arange(azimuths, dtype=torch.float32) * 360.0 / azimuths
    az = wrap_azimuth(az)
    el = torch.tensor(list(elevations), dtype=torch.float32)
    A, E = az.repeat(len(el)), el.repeat_interleave(azimuths)
    n = len(A)
    return spherical_cameras(A, E, torch.full((n,), distance), torch.full((n,), fovy), size, size)


def rotate_cameras(cameras: Cameras, degrees: float) -> Cameras:
    """The cameras turned about the world z axis (rendering an object turned by -degrees)."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    R = torch.eye(4, dtype=cameras.c2w.dtype, device=cameras.device)
    R[:2, :2] = torch.tensor([[c, -s], [s, c]])
    az = wrap_azimuth(cameras.azimuth + degrees)
    return replace(cameras, c2w=R @ cameras.c2w, azimuth=az)


def _mask_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU [C] of boolean masks [C, ...] (1 where both are empty)."""
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def silhouette_iou(query: Query, obj: WorldObject, cameras: Cameras | None = None,
                   best_over_azimuth: bool | None = None, azimuth_step: float = AZIMUTH_STEP) -> float:
    """Mean over views of the IoU of the masks alpha > 0.5 (default views: `eval_cameras()`).

    Not normalized: position and size count. best_over_azimuth as in `iou_3d` (the ground truth is
    turned, the query rendered once).
    """
    cameras = eval_cameras() if cameras is None else cameras
    mask_q = query.render(cameras).alpha[..., 0] > 0.5  # [C, H, W]
    best = 0.0
    for az in _azimuths(obj, best_over_azimuth, azimuth_step):
        mask_g = render_object(obj, rotate_cameras(cameras, az) if az else cameras).alpha[..., 0] > 0.5
        best = max(best, float(_mask_iou(mask_q, mask_g).mean()))
    return best


def color_error(query: Query, obj: WorldObject, cameras: Cameras | None = None) -> float:
    """Mean CIEDE2000 between the query's and the ground truth's rendered rgb (default views: `eval_cameras()`).

    Over pixels with alpha > 0.5 in both renders; NaN when there are none. The ground truth is the
    shaded render (what the prior was trained to draw), so a result that baked the same shading
    scores 0.
    """
    cameras = eval_cameras() if cameras is None else cameras
    out_q, out_g = query.render(cameras), render_object(obj, cameras)
    both = (out_q.alpha[..., 0] > 0.5) & (out_g.alpha[..., 0] > 0.5)  # [C, H, W]
    if not both.any():
        return float("nan")
    return float(delta_e(out_q.rgb[both], out_g.rgb[both]).mean())


@dataclass
class MultiviewConsistency:
    """How well a result's renders agree with each other (see `multiview_consistency`)."""

    delta_e: float
    """Mean CIEDE2000 between a surface point's color in one view and in its neighbouring view."""
    matched_fraction: float
    """Share of reprojected foreground pixels that land on foreground at the expected depth (occlusions lower it)."""


def multiview_consistency(query: Query, cameras: Cameras | None = None, depth_tolerance: float = 0.03
                          ) -> MultiviewConsistency:
    """Reprojection consistency of the query's own renders.

    Each foreground pixel (alpha > 0.5) of view i is lifted to 3D with its depth and projected into
    the nearest other view j (by viewing direction). Where it lands on foreground whose depth
    agrees within `depth_tolerance` (world units; otherwise it is occluded or the depths disagree),
    its two colors are compared with CIEDE2000. A 3D result with view-independent color scores
    near 0 (resampling at shading gradients and edges adds a little); colors painted per view,
    e.g. by view-dependent spherical harmonics fitting each view's prompt, score high. Default
    views: 16 azimuths at 15 degrees of elevation, 64 x 64.
    """
    if cameras is None:
        cameras = eval_cameras(64, azimuths=16, elevations=(15.0,))
    C = len(cameras)
    if C < 2:
        raise ValueError(f"multiview_consistency needs at least 2 cameras, got {C}")
    out = query.render(cameras)
    H, W = cameras.height, cameras.width
    fwd = cameras.c2w[:, :3, 2]  # [C, 3] viewing directions
    sim = fwd @ fwd.T - 3 * torch.eye(C)
    neighbour = sim.argmax(1)  # [C]
    j_, i_ = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    w2c = cameras.viewmats
    errors, matched, total = [], 0, 0
    for i in range(C):
        j = int(neighbour[i])
        fg = out.alpha[i, ..., 0] > 0.5  # [H, W]
        if not fg.any():
            continue
        K = cameras.K[i]
        z = out.depth[i, ..., 0][fg]  # [P]
        x_cam = torch.stack([(i_[fg] - K[0, 2]) / K[0, 0] * z, (j_[fg] - K[1, 2]) / K[1, 1] * z, z], -1)  # [P, 3]
        x_world = x_cam @ cameras.c2w[i, :3, :3].T + cameras.c2w[i, :3, 3]
        y = x_world @ w2c[j, :3, :3].T + w2c[j, :3, 3]  # [P, 3] in camera j
        uv = y @ cameras.K[j].T
        u, v = uv[:, 0] / uv[:, 2].clamp_min(1e-6), uv[:, 1] / uv[:, 2].clamp_min(1e-6)
        col, row = u.floor().long(), v.floor().long()
        inside = (y[:, 2] > 0) & (col >= 0) & (col < W) & (row >= 0) & (row < H)
        total += int(fg.sum())
        col, row, y = col[inside], row[inside], y[inside]
        ok = (out.alpha[j, row, col, 0] > 0.5) & ((out.depth[j, row, col, 0] - y[:, 2]).abs() < depth_tolerance)
        matched += int(ok.sum())
        if ok.any():
            src = out.rgb[i][fg][inside][ok]
            errors.append(delta_e(src, out.rgb[j, row[ok], col[ok]]))
    mean_de = float(torch.cat(errors).mean()) if errors else float("nan")
    return MultiviewConsistency(delta_e=mean_de, matched_fraction=matched / max(total, 1))


# ----------------------------------------------------------------------------------------------
# 2D samples of a prior


@dataclass
class SampleAgreement:
    """Agreement of one 2D sample with its prompt's ground truth."""

    prompt: str
    object: WorldObject | None
    """The object the prompt names (None: not a Shapes-world prompt; the scores are then NaN)."""
    color_delta_e: float
    """CIEDE2000 between the mean Lab colors of the sample's foreground and of the best-matching view's
    (the closest in color among the views whose silhouette IoU is within 0.05 of the best)."""
    silhouette_iou: float
    """IoU of the sample's foreground with the best-matching ground-truth view."""


def _reference_views(size_h: int, size_w: int) -> Cameras:
    """Ground-truth views for `sample_agreement`: 12 azimuths x 3 elevations x 2 distances."""
    az = torch.arange(12, dtype=torch.float32) * 30.0
    az = wrap_azimuth(az)
    grid = torch.cartesian_prod(az, torch.tensor([0.0, 20.0, 40.0]), torch.tensor([2.5, 3.0]))
    n = len(grid)
    return spherical_cameras(grid[:, 0], grid[:, 1], grid[:, 2], torch.full((n,), 45.0), size_w, size_h)


def border_background(images: Tensor) -> Tensor:
    """Each image's background color [N, 3]: the per-channel median of its one-pixel border."""
    border = torch.cat([images[:, 0], images[:, -1], images[:, 1:-1, 0], images[:, 1:-1, -1]], 1)  # [N, P, 3]
    return border.float().median(1).values


def sample_agreement(images: Tensor, prompts: Sequence[str], background="border",
                     foreground_threshold: float = 0.12) -> list[SampleAgreement]:
    """Score a prior's samples images [N, H, W, 3] (in [0, 1]) against their prompts' ground truth.

    Foreground: pixels whose largest channel difference from the background exceeds
    `foreground_threshold`. `background` is a color (r, g, b) shared by every image, or "border":
    each image's own, the median of its border pixels (`border_background`), for priors trained on
    more than one background. The ground truth is rendered from `_reference_views` (12 azimuths x
    elevations 0/20/40 x distances 2.5/3.0, fovy 45); when the prompt ends in a view word
    ("..., side view"), only the views of that direction (`view_directions`) count, so the silhouette
    score also checks the view. Color: mean Lab over the foreground, sample vs the ground-truth view
    whose silhouette matches best (so shading differences between views do not count; among views
    within 0.05 of the best IoU, the closest in color).
    """
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] != len(prompts):
        raise ValueError(f"images must be [N, H, W, 3] with N = len(prompts) = {len(prompts)}, "
                         f"got {tuple(images.shape)}")
    H, W = images.shape[1:3]
    if isinstance(background, str):
        if background != "border":
            raise ValueError(f'background must be a color (r, g, b) or "border", got {background!r}')
        bgs = border_background(images)
    else:
        bgs = torch.as_tensor(background, dtype=torch.float32).expand(len(images), 3)
    white = torch.ones(3)
    cams = _reference_views(H, W)
    directions = view_directions(cams.azimuth, cams.elevation)
    gt_cache: dict[WorldObject, RenderOutput] = {}
    results = []
    for n, prompt in enumerate(prompts):
        obj = parse_prompt(prompt)
        if obj is None:
            results.append(SampleAgreement(prompt, None, float("nan"), float("nan")))
            continue
        if obj not in gt_cache:
            gt_cache[obj] = render_object(obj, cams, background=white)
        gt = gt_cache[obj]
        words = prompt.replace(",", " ").split()
        wanted = [d for d in ("front", "side", "back", "overhead") if d in words[-2:]]
        views = [k for k, d in enumerate(directions) if not wanted or d == wanted[0]] or list(range(len(cams)))
        mask_g = gt.alpha[views, ..., 0] > 0.5  # [V, H, W]
        mask_s = (images[n].float() - bgs[n]).abs().amax(-1) > foreground_threshold  # [H, W]
        ious = _mask_iou(mask_s.expand_as(mask_g), mask_g)  # [V]
        iou = float(ious.max())
        color = float("nan")
        if mask_s.any():
            lab_s = srgb_to_lab(images[n][mask_s]).mean(0)
            # symmetric shapes tie on silhouette: among the near-best views, the closest in color
            close = [k for k in range(len(views)) if ious[k] >= iou - 0.05 and mask_g[k].any()]
            color = min(float(ciede2000(lab_s, srgb_to_lab(gt.rgb[views[k]][mask_g[k]]).mean(0))) for k in close)
        results.append(SampleAgreement(prompt, obj, color, iou))
    return results


# ----------------------------------------------------------------------------------------------
# Failure modes of score distillation: multiple faces, seed collapse, over-saturation


def _solid_occupied(query: Query, resolution: int, bound: float, threshold: float) -> Callable[[Tensor], Tensor]:
    """The query's occupancy > threshold at any points [P, 3], plus the voxels its occupied voxels enclose.

    The same solid reading as `iou_3d(..., solid=True)`, as a function to evaluate anywhere.
    """
    occ = _chunked(query.occupancy, voxel_centers(resolution, bound)).float().cpu() > threshold  # [R^3]
    enclosed = _fill_enclosed(occ, resolution) & ~occ  # [R^3]; never on the border, so clamping below is safe

    def occupied(p: Tensor) -> Tensor:
        inside = _chunked(query.occupancy, p).float().cpu() > threshold
        ijk = ((p + bound) / (2 * bound) * resolution).long().clamp_(0, resolution - 1)
        return inside | enclosed[(ijk[:, 0] * resolution + ijk[:, 1]) * resolution + ijk[:, 2]]

    return occupied


def _mask_moments(alpha: Tensor) -> tuple[Tensor, Tensor]:
    """Centroid [2] (x, y in pixels) and RMS radius of the mask alpha [H, W] > 0.5 (the image center and 1 if empty)."""
    H, W = alpha.shape
    mask = alpha > 0.5
    if not mask.any():
        return alpha.new_tensor([W / 2, H / 2]), alpha.new_tensor(1.0)
    y, x = torch.nonzero(mask, as_tuple=True)
    xy = torch.stack([x, y], -1).to(alpha) + 0.5  # [P, 2] pixel centers
    return _center_and_scale(xy)


def _align_view(rgb: Tensor, alpha: Tensor, ref_alpha: Tensor) -> tuple[Tensor, Tensor]:
    """rgb [H, W, 3] over white and alpha [H, W] moved and scaled so the mask's centroid and RMS radius are
    those of ref_alpha [H, W] > 0.5 (bilinear resampling; outside the image is white background)."""
    H, W = alpha.shape
    c, s = _mask_moments(alpha)
    c_ref, s_ref = _mask_moments(ref_alpha)
    j, i = torch.meshgrid(torch.arange(H, dtype=rgb.dtype) + 0.5, torch.arange(W, dtype=rgb.dtype) + 0.5, indexing="ij")
    src = c + (torch.stack([i, j], -1) - c_ref) * (s / s_ref)  # [H, W, 2] where each output pixel samples
    grid = src / src.new_tensor([W, H]) * 2 - 1  # grid_sample's [-1, 1] with align_corners=False
    planes = torch.cat([rgb - 1, alpha[..., None]], -1).permute(2, 0, 1)[None]  # zero outside = white, empty
    out = torch.nn.functional.grid_sample(planes, grid[None], align_corners=False)[0].permute(1, 2, 0)
    return out[..., :3] + 1, out[..., 3]


def _blur(image: Tensor) -> Tensor:
    """image [H, W, D] filtered by the 3 x 3 binomial kernel [1, 2, 1] x [1, 2, 1] / 16 (edges replicated)."""
    k = image.new_tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None]) / 16
    D = image.shape[-1]
    x = torch.nn.functional.pad(image.permute(2, 0, 1)[None], (1, 1, 1, 1), mode="replicate")
    return torch.nn.functional.conv2d(x, k.expand(D, 1, 3, 3), groups=D)[0].permute(1, 2, 0)


def _view_distance(rgb_q: Tensor, alpha_q: Tensor, rgb_g: Tensor, alpha_g: Tensor) -> float:
    """Mean CIEDE2000 [] between two renders rgb [H, W, 3] over white, both blurred by `_blur`, over the
    pixels where either blurred alpha [H, W] > 0.5 (0 when there are none)."""
    rgb_q, rgb_g = _blur(rgb_q), _blur(rgb_g)
    union = (_blur(alpha_q[..., None])[..., 0] > 0.5) | (_blur(alpha_g[..., None])[..., 0] > 0.5)
    if not union.any():
        return 0.0
    return float(delta_e(rgb_q[union], rgb_g[union]).mean())


@dataclass
class MultiFace:
    """Does a result show its front on its back too (the Janus problem)? See `multi_face`."""

    front_ok: bool
    """The query's front view (azimuth 0) is closer to the ground truth's front view than to its back view."""
    back_like_front: bool
    """The query's back view (azimuth 180) is closer to the ground truth's front view than to its back view."""
    is_multi_face: bool
    """front_ok and back_like_front: a correct front, and a front again on the back."""
    front_to_front: float
    """Distance (`multi_face`) from the query's front view to the ground-truth front view."""
    front_to_back: float
    """... from the query's front view to the ground-truth back view."""
    back_to_front: float
    """... from the query's back view to the ground-truth front view."""
    back_to_back: float
    """... from the query's back view to the ground-truth back view."""


def multi_face(query: Query, obj: WorldObject, size: int = 96, elevation: float = 10.0, normalize: bool = True,
               distance: float = 2.75, fovy: float = 45.0) -> MultiFace:
    """Janus check: is the query's back view more like the ground truth's front than its back?

    Only for shapes with a front (`Shape.has_front`: mug, house, chair, snowman, rocket); ValueError
    otherwise. The query and the ground truth are rendered from azimuth 0 (front) and 180 (back) at
    `elevation`, `size` x `size`, over white. Distance between two renders: both are blurred by a
    3 x 3 binomial filter (so a softer or half-pixel-shifted render still matches the features it
    draws), then the mean CIEDE2000 over the pixels where either alpha > 0.5. A pixel inside one
    silhouette only is compared with the white background, which charges silhouette mismatch in the
    same units, so there is no separate silhouette term. Images are compared as rendered, never
    mirrored: a mug's back view is the mirror image of its front (handle left instead of right), and
    a mug that draws its handle on the right from both sides is a two-faced mug.

    Lighting. The ground truth is lit by lights fixed in the world, so its back is darker than its
    front; a result lit the other way (turned around, or a front drawn on the back and lit from
    behind) would otherwise be judged by brightness rather than by its door, nose or backrest. Each
    ground-truth view is therefore rendered under the world lights and under the same lights turned
    180 degrees about z, and the distance to it is the smaller of the two.

    normalize: before each comparison, move and scale the query's view in the image so that its
    silhouette's centroid and RMS radius are the ground-truth view's, so an off-center or smaller
    result is compared feature for feature. (In 2D, per pair of views, rather than in 3D: a center of
    mass is not where a turned object turns about, e.g. the chair's lies towards its backrest.)

    `front_ok`: front-to-front < front-to-back; `back_like_front`: back-to-front < back-to-back;
    `is_multi_face`: both. A result facing the wrong way has front_ok False and is not counted.

    The features that tell front from back are small: a door and windows, a backrest, a handle's
    side, a porthole, and for the snowman a nose, eyes and buttons a few pixels wide. At the
    default 96 x 96 the decisions on the ground truth, on it turned around and on two-faced
    versions hold for results down to 70% of the object's size and blurred by two binomial passes,
    except the snowman at that size and blur; the distances are returned so that a close call shows.
    """
    if not obj.shape_def.has_front:
        raise ValueError(f"multi_face needs a shape with a front (has_front: "
                         f"{sorted(n for n, s in SHAPES.items() if s.has_front)}), got {obj.shape!r}")
    n = 2
    cameras = spherical_cameras(torch.tensor([0.0, 180.0]), torch.full((n,), float(elevation)),
                                torch.full((n,), float(distance)), torch.full((n,), float(fovy)), size, size)
    out_q = query.render(cameras)
    rgb_q, alpha_q = out_q.rgb.detach().float().cpu(), out_q.alpha[..., 0].detach().float().cpu()  # [2, H, W, *]
    lights = [LIGHT_DIR, (-LIGHT_DIR[0], -LIGHT_DIR[1], LIGHT_DIR[2])]  # the world's, and turned half a turn about z
    gts = [render_object(obj, cameras, light_dir=light) for light in lights]

    def dist(i: int, j: int) -> float:
        """Query view i to ground-truth view j, under the closer of the two lightings."""
        rgb, alpha = rgb_q[i], alpha_q[i]
        if normalize:
            rgb, alpha = _align_view(rgb, alpha, gts[0].alpha[j, ..., 0])
        return min(_view_distance(rgb, alpha, g.rgb[j], g.alpha[j, ..., 0]) for g in gts)

    ff, fb, bf, bb = dist(0, 0), dist(0, 1), dist(1, 0), dist(1, 1)
    front_ok, back_like_front = ff < fb, bf < bb
    return MultiFace(front_ok=front_ok, back_like_front=back_like_front, is_multi_face=front_ok and back_like_front,
                     front_to_front=ff, front_to_back=fb, back_to_front=bf, back_to_back=bb)


def seed_diversity(queries: Sequence[Query], resolution: int = 48, threshold: float = 0.5, bound: float = 1.0,
                   extent: float = 3.0, best_over_azimuth: bool = False, azimuth_step: float = AZIMUTH_STEP,
                   moment_samples: int = 4) -> float:
    """Diversity of results of one prompt across seeds: the mean over pairs of 1 - 3D IoU.

    0: the same shape every time; 1: no overlap. Each query is read as `iou_3d` reads it (occupancy >
    threshold on a `resolution`^3 grid over [-bound, bound]^3, enclosed voxels filled) and normalized
    the same way: its center of mass and RMS radius (jittered grids) are mapped to the origin and 1.
    IoU is counted on a `resolution`^3 grid over [-extent, extent]^3 in those normalized units (3 RMS
    radii hold every Shapes-world object), so position and size do not count, shape does.
    best_over_azimuth: the best IoU over a quarter turn (as `iou_3d` for rotationally symmetric
    shapes), so a turned cube is not a different cube.
    """
    if len(queries) < 2:
        raise ValueError(f"seed_diversity needs at least 2 queries (one per seed), got {len(queries)}")
    unit = voxel_centers(resolution, extent)  # [R^3, 3] normalized coordinates
    azimuths = [i * azimuth_step for i in range(max(1, round(90.0 / azimuth_step)))] if best_over_azimuth else [0.0]
    normalized = []  # per query: its solid occupancy (any points), center [3] and RMS radius
    for q in queries:
        occupied = _solid_occupied(q, resolution, bound, threshold)
        center, scale = _moments(occupied, resolution, bound, threshold, moment_samples)
        normalized.append((occupied, center, scale))
    grids = [occ(center + unit * scale) for occ, center, scale in normalized]  # [R^3] bool each
    distances = []
    for i in range(len(queries)):
        for j in range(i + 1, len(queries)):
            occ_j, center_j, scale_j = normalized[j]
            best = 0.0
            for az in azimuths:
                g_j = grids[j] if az == 0 else occ_j(center_j + _rotate_z(unit, az, torch.zeros(3)) * scale_j)
                union = (grids[i] | g_j).sum()
                best = max(best, float((grids[i] & g_j).sum() / union) if union > 0 else 1.0)
            distances.append(1.0 - best)
    return sum(distances) / len(distances)


def saturation(query: Query, cameras: Cameras | None = None) -> float:
    """Mean CIELAB chroma C*ab = sqrt(a*^2 + b*^2) of the query's foreground (alpha > 0.5) pixels.

    Default views: `eval_cameras()`; NaN when nothing is foreground. Chroma rather than HSV
    saturation: it is in the units of the other color metrics here and stays small on dark pixels,
    where (max - min) / max of a noisy render jumps to 1. It grows with lightness, so compare a result
    with its ground truth rendered from the same views (`saturation(ObjectQuery(obj))`): a ratio
    above 1 is a result more colorful than the object, the over-saturation of score distillation at
    high guidance scales. Gray objects have a chroma near 0; compare differences for them.
    """
    cameras = eval_cameras() if cameras is None else cameras
    out = query.render(cameras)
    fg = out.alpha[..., 0].detach().cpu() > 0.5  # [C, H, W]
    if not fg.any():
        return float("nan")
    lab = srgb_to_lab(out.rgb.detach().float().cpu()[fg])  # [P, 3]
    return float(torch.hypot(lab[:, 1], lab[:, 2]).mean())


# ----------------------------------------------------------------------------------------------
# Meshes against ground truth


def ground_truth_mesh(obj: WorldObject, resolution: int = 192, bound: float = 1.0):
    """The object's surface (the zero level of its SDF) by marching cubes on a `resolution`^3 node grid -> trimesh,
    colored with the object's albedo at the vertices; surface error about 1 / resolution of the box or less."""
    from gen3d.export.field_mesh import density_grid_of
    from gen3d.export.mesh import isosurface_mesh, vertex_colored

    with sdf_threads():
        grid = density_grid_of(lambda p: -obj.sdf(p), resolution, bound)  # inside > 0
        mesh = isosurface_mesh(grid, bound, 0.0, min_component_ratio=0.0)
        return vertex_colored(mesh, obj.color_at(torch.as_tensor(mesh.vertices, dtype=torch.float32)))


def point_to_mesh(points, mesh, candidates: int = 8):
    """Distance [P] from points [P, 3] to a triangle mesh's surface, and the index [P] of the nearest face.

    Exact point-triangle distances (to the plane when the projection falls inside the triangle, else to
    the nearest edge segment) against the `candidates` faces whose centroids are nearest (scipy's k-d
    tree): exact whenever the nearest face is among them, which holds on meshes of small, well-shaped
    triangles such as marching-cubes output.
    """
    import numpy as np
    from scipy.spatial import cKDTree

    tri = np.asarray(mesh.triangles, np.float64)  # [F, 3, 3]
    k = min(candidates, len(tri))
    _, cand = cKDTree(tri.mean(1)).query(points, k=k)
    cand = cand.reshape(len(points), k)
    a, b, c = (tri[cand, i] for i in range(3))  # [P, k, 3]
    p = np.asarray(points, np.float64)[:, None, :]
    normal = np.cross(b - a, c - a)
    area2 = np.linalg.norm(normal, axis=-1, keepdims=True)
    n = normal / np.maximum(area2, 1e-30)
    height = ((p - a) * n).sum(-1)
    q = p - height[..., None] * n  # projection on the plane
    inside = (area2[..., 0] > 1e-20)
    for u, v in ((a, b), (b, c), (c, a)):
        inside &= (np.cross(v - u, q - u) * normal).sum(-1) >= 0
    best = np.where(inside, np.abs(height), np.inf)
    for u, v in ((a, b), (b, c), (c, a)):
        e = v - u
        t = np.clip(((p - u) * e).sum(-1) / np.maximum((e * e).sum(-1), 1e-30), 0.0, 1.0)
        best = np.minimum(best, np.linalg.norm(p - (u + t[..., None] * e), axis=-1))
    j = best.argmin(1)
    rows = np.arange(len(points))
    return best[rows, j], cand[rows, j]


@dataclass
class MeshDistance:
    chamfer: float  # mean of the two directed mean distances, world units
    normal_consistency: float  # mean |n . n_nearest| over both directions, in [0, 1]
    f_score: float  # at `tolerance`: harmonic mean of precision and recall of surface samples


def mesh_distance(mesh, reference, samples: int = 20000, tolerance: float = 0.01, seed: int = 0) -> MeshDistance:
    """Chamfer distance, normal consistency and F-score between two meshes' surfaces (the metrics of Mescheder et al.
    2019, "Occupancy Networks", Sec. 4), from `samples` area-uniform points on each surface and their exact distances
    to the other surface (`point_to_mesh`); normals are the faces' (orientation ignored)."""
    import numpy as np
    import trimesh

    rng = np.random.default_rng(seed)

    def directed(src, dst):
        points, face = trimesh.sample.sample_surface(src, samples, seed=int(rng.integers(1 << 31)))
        dist, nearest = point_to_mesh(points, dst)
        agree = np.abs((np.asarray(src.face_normals)[face] * np.asarray(dst.face_normals)[nearest]).sum(1))
        return dist, agree

    (d_pq, n_pq), (d_qp, n_qp) = directed(mesh, reference), directed(reference, mesh)
    precision, recall = (d_pq < tolerance).mean(), (d_qp < tolerance).mean()
    f_score = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return MeshDistance(float(0.5 * (d_pq.mean() + d_qp.mean())), float(0.5 * (n_pq.mean() + n_qp.mean())),
                        float(f_score))
