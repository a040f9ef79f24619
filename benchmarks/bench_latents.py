"""Which 3D latent should the few-step flow generator (issue 11) model? Fidelity of candidate latents of the
Shapes-world objects at equal size, against the exact surface.

Each candidate encodes an object into a fixed number of floats (``--budget``) without any learning, and is decoded
back to a surface, scored against the exact one (`gen3d.world.metrics.ground_truth_mesh`) by the mean distance both
ways (Chamfer, world units), the F-score at 0.01 and the color error at the surface:

- ``points``: budget / 6 points sampled on the surface, xyz + shaded rgb each (a set: TGS's and Point-E's latent);
  its surface distance is the points' distance to the exact surface one way and the exact surface's samples'
  distance to the nearest point the other;
- ``voxels``: an R^3 grid of the signed distance plus rgb at cell centers, R = (budget / 4)^(1/3) (a dense feature
  grid); decoded by marching cubes at level 0, colors by trilinear interpolation;
- ``occupancy``: an R^3 binary occupancy grid with rgb, the same R (TRELLIS's sparse structure without its second
  stage); decoded by marching cubes at level 0.5 of the occupancy.

    python benchmarks/bench_latents.py                 # 32 objects spread over the catalog, budget 16384
    python benchmarks/bench_latents.py --quick         # 2 objects

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import numpy as np
import torch

from gen3d.world.catalog import training_objects
from gen3d.world.metrics import ground_truth_mesh, point_to_mesh, voxel_centers
from gen3d.world.render import sdf_normals, shade


def surface_scores(pred_points: np.ndarray, pred_colors: np.ndarray, obj, truth, tolerance: float = 0.01,
                   samples: int = 8192, seed: int = 0) -> dict[str, float]:
    """Chamfer (mean of both directed mean distances), F-score and mean rgb error of predicted surface samples."""
    import trimesh
    from scipy.spatial import cKDTree

    d_pred, _ = point_to_mesh(pred_points, truth)
    gt_points, _ = trimesh.sample.sample_surface(truth, samples, seed=seed)
    d_gt, nearest = cKDTree(pred_points).query(gt_points)
    p = torch.as_tensor(np.asarray(gt_points), dtype=torch.float32)
    gt_colors = shade(sdf_normals(obj.sdf, p), obj.color_at(p)).numpy()
    precision, recall = (d_pred < tolerance).mean(), (d_gt < tolerance).mean()
    f = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"chamfer": float(0.5 * (d_pred.mean() + d_gt.mean())), "f_score": float(f),
            "color_error": float(np.abs(pred_colors[nearest] - gt_colors).mean())}


def lit_colors(obj, points: np.ndarray) -> np.ndarray:
    p = torch.as_tensor(points, dtype=torch.float32)
    return shade(sdf_normals(obj.sdf, p), obj.color_at(p)).numpy()


def encode_points(obj, truth, budget: int, seed: int):
    import trimesh

    n = budget // 6
    points, _ = trimesh.sample.sample_surface_even(truth, n, seed=seed)
    if len(points) < n:  # sample_surface_even may return fewer
        extra, _ = trimesh.sample.sample_surface(truth, n - len(points), seed=seed + 1)
        points = np.concatenate([points, extra])
    points = np.asarray(points, dtype=np.float32)
    return points, lit_colors(obj, points)


def decode_grid(values: np.ndarray, level: float, resolution: int, obj, bound: float = 1.0):
    """Marching cubes of a cell-centered grid -> surface samples and their colors (from the object's color field
    sampled on the grid, trilinearly)."""
    import trimesh
    from skimage.measure import marching_cubes

    spacing = 2 * bound / resolution
    try:
        verts, faces, _, _ = marching_cubes(np.pad(values, 1, constant_values=values.max() if level == 0 else 0.0),
                                            level=level, spacing=(spacing,) * 3)
    except (ValueError, RuntimeError):
        return None
    verts = verts - bound - spacing / 2  # the pad shifted the grid by one cell
    mesh = trimesh.Trimesh(verts, faces, process=False)
    points, _ = trimesh.sample.sample_surface(mesh, 8192, seed=0)
    points = np.asarray(points, dtype=np.float32)
    colors = color_grid_lookup(obj, points, resolution, bound)
    return points, colors


def color_grid_lookup(obj, points: np.ndarray, resolution: int, bound: float) -> np.ndarray:
    """The object's shaded colors stored at cell centers, read back trilinearly at `points`."""
    import torch.nn.functional as F

    cells = voxel_centers(resolution, bound)
    # the color of a cell: of its center pushed to the surface along the SDF gradient
    n = sdf_normals(obj.sdf, cells)
    on_surface = cells - obj.sdf(cells)[:, None] * n
    colors = shade(sdf_normals(obj.sdf, on_surface), obj.color_at(on_surface))  # [R^3, 3]
    volume = colors.reshape(resolution, resolution, resolution, 3).permute(3, 2, 1, 0)[None]  # [1, 3, z, y, x]
    p = torch.as_tensor(points)[None, :, None, None] / bound  # grid_sample wants (x, y, z)
    out = F.grid_sample(volume, p, mode="bilinear", padding_mode="border", align_corners=False)
    return out[0, :, :, 0, 0].T.numpy()


def run(obj, budget: int, seed: int) -> dict:
    truth = ground_truth_mesh(obj, 128)
    resolution = round((budget / 4) ** (1 / 3))
    row = {"object": str(obj), "resolution": resolution}
    points, colors = encode_points(obj, truth, budget, seed)
    row["points"] = surface_scores(points, colors, obj, truth)
    sdf = obj.sdf(voxel_centers(resolution, 1.0)).reshape((resolution,) * 3).numpy()
    for name, values, level in (("voxels", sdf, 0.0), ("occupancy", (sdf < 0).astype(np.float32), 0.5)):
        decoded = decode_grid(values, level, resolution, obj)
        row[name] = surface_scores(*decoded, obj, truth) if decoded is not None else None
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--objects", type=int, default=32, help="objects spread over the training catalog")
    p.add_argument("--budget", type=int, default=16384, help="floats per object")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="two objects")
    args = p.parse_args(argv)
    if args.quick:
        args.objects = 2
    torch.set_num_threads(1)
    catalog = training_objects()
    objects = [catalog[i] for i in np.linspace(0, len(catalog) - 1, args.objects).round().astype(int)]
    rows = []
    for obj in objects:
        rows.append(run(obj, args.budget, args.seed))
        print(json.dumps(rows[-1]), file=sys.stderr)
    summary = {}
    for name in ("points", "voxels", "occupancy"):
        scored = [r[name] for r in rows if r[name] is not None]
        summary[name] = {"objects": len(scored), "failed": len(rows) - len(scored)} | {
            k: round(statistics.mean(s[k] for s in scored), 5) for k in ("chamfer", "f_score", "color_error")}
    report = {"settings": vars(args), "resolution": rows[0]["resolution"], "floats": args.budget,
              "summary": summary, "rows": rows}
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
