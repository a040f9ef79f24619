"""Speed of the Gaussian rasterizer backends on CPU: forward + backward, in one run, printed as JSON.

    python benchmarks/bench_rasterize.py --repeats 3        # 10k Gaussians at 128^2 and 50k at 256^2
    python benchmarks/bench_rasterize.py --quick            # tiny sizes, a smoke test

Scene: N Gaussians uniform in the unit ball, log-uniform scales in [0.01, 0.05], random rotations,
opacities in [0.1, 0.9], one camera at distance 2.7 with a 45 degree vertical field of view.
Each timing is `rasterize_gaussians` + backward of a loss on colors, alphas and depths, with
gradients for means, quats, scales, opacities and colors, after one warm-up run.

Gaussian-pixel pairs:
- torch (tile backend): pairs evaluated = sum over tiles of (Gaussians in the tile's list) x (pixels per
  tile), i.e. every (Gaussian, pixel) of every overlapping tile; `pairs_padded` adds the padding
  the chunked evaluation also computes.
- dense: N_visible x H x W, every visible Gaussian with every pixel. When that exceeds
  `--dense-max-pairs`, the dense backend renders the full image from a random subset of the
  Gaussians and the time is extrapolated linearly in visible Gaussians (flagged `extrapolated`).
- gsplat: its pure-torch implementation (`gsplat.cuda._torch_impl`) has the projection and the tile
  intersection but its pixel rasterization calls a CUDA kernel, so only those two stages are timed
  against ours; gsplat's tile intersection is a Python loop, timed on a subset of Gaussians and
  extrapolated linearly.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

from gen3d.cameras import orbit_cameras
from gen3d.ops._projection import project_gaussians
from gen3d.ops._raster_torch import bin_gaussians
from gen3d.ops.rasterize import rasterize_gaussians

FULL_CASES = [(10_000, 128), (50_000, 256)]
QUICK_CASES = [(200, 24)]


def make_scene(n: int, size: int, seed: int = 0):
    """Random Gaussians in the unit ball and one camera looking at them; leaves require grad."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1)
    means = dirs * torch.rand(n, 1, generator=g) ** (1 / 3)
    scales = torch.exp(torch.empty(n, 3).uniform_(math.log(0.01), math.log(0.05), generator=g))
    gauss = {
        "means": means, "quats": torch.randn(n, 4, generator=g), "scales": scales,
        "opacities": 0.1 + 0.8 * torch.rand(n, generator=g), "colors": torch.rand(n, 3, generator=g),
    }
    for t in gauss.values():
        t.requires_grad_(True)
    cams = orbit_cameras(1, elevation=15.0, distance=2.7, fovy=45.0, width=size, height=size)
    return gauss, cams.viewmats, cams.K


def _time(fn, repeats: int) -> dict:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"min": min(times), "median": statistics.median(times), "all": times}


def _fwd_bwd(gauss, viewmats, Ks, width, height, backend, tile_size=16):
    def run():
        for t in gauss.values():
            t.grad = None
        out = rasterize_gaussians(**gauss, viewmats=viewmats, Ks=Ks, width=width, height=height,
                                  backend=backend, tile_size=tile_size)
        (out.colors.sum() + out.alphas.sum() + 0.1 * out.depths.sum()).backward()
    return run


def bench_torch(gauss, viewmats, Ks, size, tile_size, repeats) -> dict:
    with torch.no_grad():
        proj = project_gaussians(gauss["means"], gauss["quats"], gauss["scales"], gauss["opacities"], viewmats, Ks,
                                 size, size, 0.01, 1e10, 0.3)
        bins = bin_gaussians(proj.means2d, proj.conics, gauss["opacities"].expand(1, -1), proj.extents, proj.depths,
                             proj.visible, size, size, tile_size)
    pixels = tile_size * tile_size
    pairs = bins.num_pairs * pixels
    t = _time(_fwd_bwd(gauss, viewmats, Ks, size, size, "torch", tile_size), repeats)
    return {
        "tile_size": tile_size, "tile_gaussian_pairs": bins.num_pairs, "pairs": pairs,
        "pairs_padded": sum(len(ids) * n for ids, n in bins.chunks) * pixels,
        "fwd_bwd_s": t, "pairs_per_s": pairs / t["min"],
    }


def bench_dense(gauss, viewmats, Ks, size, visible, repeats, max_pairs) -> dict:
    """All-pairs time for the full image; above `max_pairs`, measured on a random subset of the
    Gaussians and scaled by visible Gaussians (the dense cost is linear in them)."""
    n = gauss["means"].shape[0]
    keep = min(n, max(1, max_pairs // (size * size)))
    subset = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:keep]
    sub = {k: v.detach()[subset].requires_grad_(True) for k, v in gauss.items()}
    with torch.no_grad():
        measured_visible = int(project_gaussians(sub["means"], sub["quats"], sub["scales"], sub["opacities"], viewmats, Ks,
                                                 size, size, 0.01, 1e10, 0.3).visible.sum())
    t = _time(_fwd_bwd(sub, viewmats, Ks, size, size, "dense"), repeats)
    scale = visible / measured_visible
    full = {k: v * scale for k, v in t.items() if k != "all"}
    pairs = visible * size * size
    return {
        "pairs": pairs, "fwd_bwd_s": full, "pairs_per_s": pairs / full["min"], "extrapolated": keep < n,
        "measured_visible_gaussians": measured_visible, "measured_fwd_bwd_s": t,
    }


def bench_gsplat_torch_impl(gauss, viewmats, Ks, size, repeats, subset: int) -> dict:
    """gsplat's pure-torch projection and tile intersection versus ours (the stages that run on CPU)."""
    try:
        import gsplat
        from gsplat.cuda._torch_impl import (
            _fully_fused_projection,
            _isect_tiles,
            _quat_scale_to_covar_preci,
        )
    except ImportError as exc:
        return {"available": False, "reason": f"gsplat's pure-torch implementation does not import: {exc}"}
    g = gauss

    def gsplat_projection():
        covars, _ = _quat_scale_to_covar_preci(g["quats"], g["scales"], True, False, triu=False)
        return _fully_fused_projection(g["means"], covars, viewmats, Ks, size, size)

    def our_projection():
        return project_gaussians(g["means"], g["quats"], g["scales"], g["opacities"], viewmats, Ks, size, size, 0.01, 1e10, 0.3)

    def gsplat_fwd_bwd():
        _, means2d, depths, conics, _ = gsplat_projection()
        (means2d.sum() + conics.sum() + depths.sum()).backward()

    def our_fwd_bwd():
        p = our_projection()
        (p.means2d.sum() + p.conics.sum() + p.depths.sum()).backward()

    t_gs, t_ours = _time(gsplat_fwd_bwd, repeats), _time(our_fwd_bwd, repeats)
    with torch.no_grad():
        radii, means2d, depths, _, _ = gsplat_projection()
        p = our_projection()
        tiles = math.ceil(size / 16)
        n = min(subset, means2d.shape[1])
        start = time.perf_counter()
        _, isect_ids, _ = _isect_tiles(means2d[:, :n], radii[:, :n], depths[:, :n], 16, tiles, tiles)
        t_isect = (time.perf_counter() - start) * means2d.shape[1] / n
    t_bin = _time(lambda: bin_gaussians(p.means2d.detach(), p.conics.detach(), g["opacities"].detach().expand(1, -1),
                                        p.extents, p.depths.detach(), p.visible, size, size, 16), repeats)
    return {
        "available": True, "version": gsplat.__version__,
        "projection_fwd_bwd_s": {"gsplat": t_gs, "ours": t_ours, "ratio_ours_over_gsplat": t_ours["min"] / t_gs["min"]},
        "tile_intersection_s": {
            "gsplat": t_isect, "gsplat_extrapolated_from_gaussians": n, "ours": t_bin,
            "ratio_ours_over_gsplat": t_bin["min"] / t_isect,
            "gsplat_pairs_in_subset": int(isect_ids.shape[0]),
        },
        "rasterize_to_pixels": "not timed: gsplat's torch _rasterize_to_pixels calls the CUDA kernel "
                               "rasterize_to_indices_in_range (and needs nerfacc), so it cannot run on CPU",
    }


def run_case(n: int, size: int, repeats: int, dense_max_pairs: int, gsplat_subset: int) -> dict:
    gauss, viewmats, Ks = make_scene(n, size)
    with torch.no_grad():
        visible = int(project_gaussians(gauss["means"], gauss["quats"], gauss["scales"], gauss["opacities"], viewmats, Ks,
                                        size, size, 0.01, 1e10, 0.3).visible.sum())
    ours = bench_torch(gauss, viewmats, Ks, size, 16, repeats)
    ours8 = bench_torch(gauss, viewmats, Ks, size, 8, repeats)
    dense = bench_dense(gauss, viewmats, Ks, size, visible, repeats, dense_max_pairs)
    return {
        "n_gaussians": n, "width": size, "height": size, "visible_gaussians": visible,
        "torch": ours, "torch_tile8": ours8, "dense": dense,
        "ratio_torch_over_dense": ours["fwd_bwd_s"]["min"] / dense["fwd_bwd_s"]["min"],
        "ratio_torch_tile8_over_dense": ours8["fwd_bwd_s"]["min"] / dense["fwd_bwd_s"]["min"],
        "gsplat_torch_impl": bench_gsplat_torch_impl(gauss, viewmats, Ks, size, repeats, gsplat_subset),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (after one warm-up)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test")
    parser.add_argument("--dense-max-pairs", type=float, default=2e8, help="above this the dense time is extrapolated")
    parser.add_argument("--gsplat-subset", type=int, default=2000, help="Gaussians fed to gsplat's Python tile loop")
    args = parser.parse_args(argv)
    cases = QUICK_CASES if args.quick else FULL_CASES
    report = {
        "benchmark": "rasterize_gaussians forward+backward, CPU",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "pairs_definition": {
            "torch": "sum over tiles of list length x tile pixels (Gaussian-pixel pairs of overlapping tiles)",
            "dense": "visible Gaussians x H x W",
        },
        "ratios": "ours / reference time (below 1 means ours is faster)",
        "cases": [
            run_case(n, size, args.repeats, int(args.dense_max_pairs), 50 if args.quick else args.gsplat_subset)
            for n, size in cases
        ],
    }
    return report


if __name__ == "__main__":
    json.dump(main(sys.argv[1:]), sys.stdout, indent=1)
    print()
