"""One surface interface for every representation, and the automatic iso-level they share.

`extract_surface(representation)` turns 3D Gaussians (`GaussianModel`) or a neural field (`Field`) into
a closed, outward-oriented, vertex-colored mesh the same way: sample a density on a grid over
[-bound, bound]^3, choose the iso-level, run marching cubes, drop floaters, color the vertices.
Only the density, the rendered silhouettes and the color come from the representation:

| | density d(x) | rendered opacity along a ray | color |
|---|---|---|---|
| Gaussians | sum_i o_i exp(-q_i(x)/2) (DreamGaussian's) | 1 - prod_i (1 - alpha_i), alpha_i = min(0.99, o_i exp(-q2_i/2)) (3DGS's splatting) | density-weighted DC color |
| field | volume density sigma(x) | 1 - exp(-integral sigma) (NeRF's compositing) | albedo features |

**The iso-level** (`silhouette_level`): a density has no built-in surface level. A field's sigma
is an attenuation rate whose scale depends on training; the Gaussians' d is a sum of bumps whose
value at the visible edge depends on how densely they overlap (DreamGaussian's fixed 1 suits dense,
well-trained scenes and leaves holes in sparse ones; 0.5 bloats dense ones). gen3d picks **the level
tau whose solid {d > tau} has the same silhouettes as the representation's own rendering**, where the
rendering counts as covered where it is more than 50% opaque. Three orthographic views along the grid
axes, one ray per grid column; the solid covers a column when the column's maximum exceeds tau; tau
maximizes the IoU of the two masks pooled over the three views. The solid's masks change only when
tau passes a column maximum, so the IoU is maximized exactly by sorting the 3 R^2 column maxima and
sweeping them once with running counts; tau is the midpoint between the lowest maximum kept and the
highest left out. The field's derivation and its cost are in `gen3d.export.field_mesh`; for Gaussians
the rendered opacity is splatted orthographically (`gaussian_silhouettes`), a few ms at R = 128 for
ten thousand Gaussians. How it does against ground truth on the Shapes world is in the README
(`benchmarks/bench_export.py`).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["extract_surface", "gaussian_silhouettes", "silhouette_level"]

ALPHA_MIN, ALPHA_MAX = 1.0 / 255.0, 0.99  # 3DGS's splatting bounds


def silhouette_level(grid: Tensor, covered: Tensor) -> tuple[float, float]:
    """The level tau of `grid` whose solid's axis silhouettes best match `covered` -> (tau, IoU).

    grid: [R, R, R] densities at the nodes (index [i, j, k] = (x_i, y_j, z_k)).
    covered: [3, R, R] bool, the rendered silhouettes along x, y and z (view a's mask is indexed by
    the two other axes in order, as `grid.amax(a)` is).
    Returns the IoU-maximizing tau (see the module docstring) and that IoU (1: exact match). The
    caller checks that `covered` is not empty.
    """
    peak = torch.stack([grid.detach().amax(a) for a in range(3)]).cpu().double().flatten()  # [3 R^2] column maxima
    target = covered.cpu().flatten()
    if peak.shape != target.shape:
        raise ValueError(f"silhouette_level: covered must be [3, R, R] for a grid [R, R, R], got "
                         f"{tuple(covered.shape)} for {tuple(grid.shape)}")
    values, order = peak.sort(descending=True)  # [3 R^2]
    levels, counts = values.unique_consecutive(return_counts=True)  # [G] distinct maxima, descending
    group = torch.repeat_interleave(torch.arange(len(levels)), counts)  # [3 R^2] group of each sorted column
    hits = torch.zeros(len(levels), dtype=torch.float64).index_add(0, group, target[order].double())  # [G]
    inter = hits.cumsum(0)  # [G] |solid & target| once groups 0..g are inside (tau just below levels[g])
    union = target.sum() + (counts - hits).cumsum(0)  # [G]
    iou = inter / union
    best = int(iou.argmax())
    upper = float(levels[best])  # lowest column maximum kept inside
    lower = float(levels[best + 1]) if best + 1 < len(levels) else 0.0  # highest one left out
    return 0.5 * (upper + lower), float(iou[best])


@torch.no_grad()
def gaussian_silhouettes(model, resolution: int, bound: float, pairs: int = 1 << 22) -> Tensor:
    """The Gaussians' orthographic opacity along x, y and z at the grid's columns -> [3, R, R] in [0, 1].

    View a looks along world axis a; its pixel (i, j) is the column through the nodes (u_i, v_j) of the
    two other axes in order. Each Gaussian splats its marginal 2D covariance (Sigma without row and
    column a: the exact projection of a 3D Gaussian along an axis) with 3DGS's alpha_i = min(0.99,
    o_i exp(-q/2)), skipped below 1/255, and alpha = 1 - prod_i (1 - alpha_i) (compositing order does
    not change the total opacity). Each Gaussian visits the pixels of its 3-sigma box, `pairs`
    (Gaussian, pixel) pairs at a time.
    """
    R = resolution
    spacing = 2.0 * bound / (R - 1)
    device = model.means.device
    axis = torch.linspace(-bound, bound, R, device=device)
    out = torch.zeros(3, R * R, device=device)
    if model.num_gaussians == 0:
        return out.view(3, R, R)
    rot, s = model.rotations, model.scales
    cov = (rot * s[:, None, :].square()) @ rot.transpose(1, 2)  # [N, 3, 3] R S^2 R^T
    opacity = model.opacities
    for a in range(3):
        uv = [k for k in range(3) if k != a]
        mean = model.means[:, uv]  # [N, 2]
        cov2 = cov[:, uv][:, :, uv]  # [N, 2, 2]
        inv = torch.linalg.inv(cov2)
        half = (3.0 * cov2.diagonal(dim1=1, dim2=2).sqrt() / spacing).ceil()  # [N, 2] 3-sigma box in pixels
        center = ((mean + bound) / spacing).round()
        lo = (center - half).clamp(0, R - 1).long()
        hi = (center + half).clamp(0, R - 1).long()
        inside = ((center + half) >= 0).all(1) & ((center - half) <= R - 1).all(1) & (opacity >= ALPHA_MIN)
        size = (hi - lo + 1) * inside[:, None]  # [N, 2]
        count = size[:, 0] * size[:, 1]  # [N] pixels per Gaussian
        log_t = torch.zeros(R * R, device=device)
        start = 0
        ends = torch.cumsum(count, 0)
        while start < len(count):  # groups of Gaussians with at most `pairs` pixels in all (at least one Gaussian)
            base = int(ends[start - 1]) if start else 0
            stop = max(start + 1, int(torch.searchsorted(ends, base + pairs, right=True)))
            idx = torch.arange(start, stop, device=device)
            n = count[idx]
            g = torch.repeat_interleave(idx, n)  # [P] Gaussian of each pair
            local = torch.arange(len(g), device=device) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
            i = lo[g, 0] + local // size[g, 1]
            j = lo[g, 1] + local % size[g, 1]
            d = torch.stack([axis[i], axis[j]], 1) - mean[g]  # [P, 2]
            q = (d[:, None, :] @ inv[g] @ d[:, :, None])[:, 0, 0]
            alpha = (opacity[g] * torch.exp(-0.5 * q)).clamp(max=ALPHA_MAX)
            alpha = alpha * (alpha >= ALPHA_MIN)
            log_t.index_add_(0, i * R + j, torch.log1p(-alpha))
            start = stop
        out[a] = 1.0 - torch.exp(log_t)
    return out.view(3, R, R)


def extract_surface(representation, resolution: int = 128, threshold: float | str = "auto", **kwargs):
    """The vertex-colored surface mesh (`trimesh.Trimesh`) of 3D Gaussians or a neural field.

    threshold: "auto" (`silhouette_level`) or a density level > 0. Other keyword arguments go to
    `gen3d.export.mesh.extract_mesh` (Gaussians) or `gen3d.export.field_mesh.extract_field_mesh`
    (fields): bound, min_component_ratio, ... The level used is in ``mesh.metadata["threshold"]`` and,
    when automatic, the silhouette IoU in ``["threshold_iou"]``.
    """
    from gen3d.representations.fields import Field
    from gen3d.representations.gaussians import GaussianModel

    if isinstance(representation, GaussianModel):
        from gen3d.export.mesh import extract_mesh

        return extract_mesh(representation, resolution=resolution, threshold=threshold, **kwargs)
    if isinstance(representation, Field):
        from gen3d.export.field_mesh import extract_field_mesh

        return extract_field_mesh(representation, resolution=resolution, threshold=threshold, **kwargs)
    raise ValueError(f"extract_surface: expected a GaussianModel or a Field, got {type(representation).__name__}")
