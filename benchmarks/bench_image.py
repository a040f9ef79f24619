"""Image-to-3D on the Shapes world: one input view of an object the priors never saw, scored in 3D.

Each held-out object (`gen3d.world.catalog.HELD_OUT`: color/shape pairs left out of both embedded
priors' training) is rendered once from the front (azimuth 0, elevation 15, distance 1.9, field of view
40: inside the view prior's training orbit) as a 256² RGBA image, and a recipe turns that image into 3D
(`gen3d run <config> image=... elevation=15 recenter=false`: the input camera is known, so the image keeps
its framing and the result is in the ground truth's frame). Scores against the ground truth:

- 3D IoU in the input camera's frame (``aligned``: position and scale as reconstructed, no search)
  and after normalizing position and scale (``normalized``, `gen3d.world.metrics.iou_3d`);
- novel-view PSNR and SSIM (scikit-image, on RGB over white) and silhouette IoU against ground-truth
  renders from 14 novel views (7 azimuths away from the input x elevations 10 and 40, 128²), and the
  same at the input view (how well the reference was fitted);
- seconds of training.

Methods (``--methods``): ``zero123`` (the `image-to-3d` preset: Gaussians, Zero123 SDS + reference
losses), ``reference-only`` (the same with lambda_zero123=0: what the view prior adds), ``magic123``
(the `magic123` preset: a hash-grid field with joint text + Zero123 guidance; the prompt is the
object's caption), ``tgs`` (the shipped feed-forward reconstructor alone, `gen3d reconstruct`: its
seconds are the forward pass) and ``tgs+zero123`` (the `image-to-3d` preset started from it, init=tgs).
With ``--mesh``, each result's surface (`System.mesh`, the export's automatic iso-level) is also scored
against the exact surface: Chamfer distance (mean of both directions, world units), normal consistency
and F-score at 0.01 (`gen3d.world.metrics.mesh_distance`).

    python benchmarks/bench_image.py                         # zero123 and reference-only on the 5 held-out objects
    python benchmarks/bench_image.py --methods magic123      # the field recipe (slower)
    python benchmarks/bench_image.py --methods tgs tgs+zero123 zero123 --mesh   # feed-forward vs optimization
    python benchmarks/bench_image.py --quick                 # one object, 10 steps (smoke test)
    python benchmarks/bench_image.py --figure docs/image_to_3d.png   # and the renders, one row per object

Prints one JSON object: per-run rows and a summary per method (means over objects).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gen3d.cameras import spherical_cameras
from gen3d.world.catalog import caption, held_out_objects
from gen3d.world.metrics import ObjectQuery, eval_cameras, iou_3d, silhouette_iou
from gen3d.world.render import render_object

INPUT_CAMERA = {"azimuth": 0.0, "elevation": 15.0, "distance": 1.9, "fovy": 40.0}
METHODS = {"zero123": ("image-to-3d", []), "reference-only": ("image-to-3d", ["lambda_zero123=0"]),
           "magic123": ("magic123", []), "tgs": ("image-to-3d", ["init=tgs"]),
           "tgs+zero123": ("image-to-3d", ["init=tgs"])}


def input_image(obj, path: Path, size: int = 256) -> Path:
    """The object's front view as an RGBA PNG."""
    from PIL import Image

    c = INPUT_CAMERA
    one = lambda v: torch.tensor([float(v)])  # noqa: E731
    cams = spherical_cameras(one(c["azimuth"]), one(c["elevation"]), one(c["distance"]), one(c["fovy"]), size, size)
    out = render_object(obj, cams, supersample=2)
    rgba = torch.cat([out.rgb[0], out.alpha[0]], -1).numpy()
    Image.fromarray((rgba * 255).round().astype(np.uint8), "RGBA").save(path)
    return path


def psnr_ssim(query, obj, cams) -> tuple[float, float]:
    """Mean PSNR and SSIM (scikit-image, RGB over white) of the query's renders against the ground truth's."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    with torch.no_grad():
        mine, truth = query.render(cams), render_object(obj, cams, supersample=2)
    a, b = mine.rgb.clamp(0, 1).cpu().numpy(), truth.rgb.numpy()
    return (float(np.mean([peak_signal_noise_ratio(t, m, data_range=1.0) for m, t in zip(a, b)])),
            float(np.mean([structural_similarity(t, m, channel_axis=-1, data_range=1.0) for m, t in zip(a, b)])))


def image_scores(query, obj, size: int) -> dict[str, float]:
    """PSNR / SSIM / silhouette IoU at the novel views and at the input view."""
    cams = eval_cameras(size, elevations=(10.0, 40.0), distance=INPUT_CAMERA["distance"], fovy=INPUT_CAMERA["fovy"])
    novel = (cams.azimuth != 0).nonzero().squeeze(1)
    one = lambda v: torch.tensor([float(v)])  # noqa: E731
    c = INPUT_CAMERA
    front = spherical_cameras(one(c["azimuth"]), one(c["elevation"]), one(c["distance"]), one(c["fovy"]), size, size)
    scores = {}
    for name, views in (("novel", cams[novel]), ("input_view", front)):
        scores[f"{name}_psnr"], scores[f"{name}_ssim"] = psnr_ssim(query, obj, views)
        scores[f"{name}_silhouette_iou"] = float(silhouette_iou(query, obj, views))
    return scores


def run(method: str, obj, image: Path, args, out_dir: Path) -> dict:
    from gen3d.cli import load_run_config
    from gen3d.runs import new_run_dir
    from gen3d.systems.base import write_config

    config, extra = METHODS[method]
    overrides = [f"image={image}", f"elevation={INPUT_CAMERA['elevation']}", f"ref_distance={INPUT_CAMERA['distance']}",
                 f"ref_fovy={INPUT_CAMERA['fovy']}", "recenter=false", f"output_dir={out_dir}", "progress=false",
                 "exports=[]", "turntable_frames=0", "val_every=0", "checkpoint_every=0", f"seed={args.seed}", *extra]
    if method == "magic123":
        overrides.append(f"prompt={caption(obj.shape, obj.color)}")
    if args.quick:
        overrides += ["max_steps=10", "image_size=32", "cameras.batch_size=2"]
    overrides += args.override
    system_cls, cfg = load_run_config(config, overrides)
    run_dir = new_run_dir(cfg.output_dir, system_cls.name, f"{obj.color}_{obj.shape}")
    write_config(run_dir, cfg)
    system = system_cls(cfg, run_dir)
    if method == "tgs":  # the reconstruction alone: no optimization step
        system.model = system.reconstruct()
        seconds, steps = system.recon_seconds, 0
    else:
        t0 = time.perf_counter()
        system.fit()
        seconds, steps = time.perf_counter() - t0, cfg.max_steps
    query = system.query()
    res = args.iou_resolution or (32 if args.quick else 64)  # the 3D IoU grid
    extra = {}
    if args.mesh:
        from gen3d.world.metrics import ground_truth_mesh, mesh_distance

        d = mesh_distance(system.mesh(), ground_truth_mesh(obj))
        extra = {"mesh_chamfer": round(d.chamfer, 5), "mesh_normal_consistency": round(d.normal_consistency, 4),
                 "mesh_f_score": round(d.f_score, 4)}
    if args.figure:
        with torch.no_grad():
            FIGURE.setdefault(str(obj), {})[method] = query.render(figure_cameras()).rgb.clamp(0, 1).cpu()
    return {"method": method, "object": str(obj), "seconds": round(seconds, 3 if steps == 0 else 1), "steps": steps,
            "iou_3d_aligned": round(float(iou_3d(query, obj, resolution=res, normalize=False,
                                                 best_over_azimuth=False)), 4),
            "iou_3d_normalized": round(float(iou_3d(query, obj, resolution=res)), 4),
            **{k: round(v, 4) for k, v in image_scores(query, obj, args.eval_size).items()}, **extra}


FIGURE: dict[str, dict[str, torch.Tensor]] = {}  # object -> method -> renders [4, S, S, 3]


def figure_cameras(size: int = 96):
    """The figure's views: the input camera turned to azimuths 0, 90, 180 and 270."""
    c = INPUT_CAMERA
    n = 4
    return spherical_cameras(torch.tensor([0.0, 90.0, 180.0, -90.0]), torch.full((n,), c["elevation"]),
                             torch.full((n,), c["distance"]), torch.full((n,), c["fovy"]), size, size)


def save_figure(path: Path, objects, images: dict[str, Path], methods: list[str]) -> None:
    """One row per object: the input image, the ground truth from 4 views, then each method from the same views."""
    from PIL import Image

    from gen3d.export.video import save_image

    rows = []
    for obj in objects:
        truth = render_object(obj, figure_cameras(), supersample=2).rgb  # [4, S, S, 3]
        S = truth.shape[1]
        rgba = np.asarray(Image.open(images[str(obj)]).convert("RGBA").resize((S, S)), np.float32) / 255
        image = torch.from_numpy(rgba[..., :3] * rgba[..., 3:] + 1 - rgba[..., 3:])
        tiles = [image] + list(truth) + [v for m in methods for v in FIGURE[str(obj)][m]]
        rows.append(torch.cat(tiles, 1))
    save_image(path, torch.cat(rows, 0))


def summarize(rows: list[dict]) -> dict:
    out = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        keys = [k for k in mine[0] if k not in ("method", "object", "steps")]
        out[method] = {"runs": len(mine)} | {k: round(statistics.mean(r[k] for r in mine), 4) for k in keys}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=["zero123", "reference-only"], choices=list(METHODS))
    p.add_argument("--objects", type=int, default=5, help="how many of the held-out objects")
    p.add_argument("--override", nargs="*", default=[], help="extra key=value overrides for every run")
    p.add_argument("--eval-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iou-resolution", type=int,
                   help="voxels per side of the 3D IoU grid (default: 64, 32 with --quick)")
    p.add_argument("--quick", action="store_true", help="one object, 10 steps, 3D IoU on a 32^3 grid (a smoke test)")
    p.add_argument("--mesh", action="store_true", help="also score each result's extracted surface against the exact "
                                                      "one (Chamfer, normal consistency, F-score)")
    p.add_argument("--figure", help="also write a PNG: per object the input, the ground truth and each method from "
                                    "4 views")
    args = p.parse_args(argv)
    if args.quick:
        args.objects, args.eval_size = 1, 32
    torch.set_num_threads(args.threads)
    objects = held_out_objects()[:args.objects]
    rows, images = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for obj in objects:
            image = images[str(obj)] = input_image(obj, Path(tmp) / f"{obj.color}_{obj.shape}.png")
            for method in args.methods:
                rows.append(run(method, obj, image, args, Path(tmp) / "outputs"))
                print(json.dumps(rows[-1]), file=sys.stderr)
        if args.figure:
            save_figure(Path(args.figure), objects, images, args.methods)
    gt = {str(o): image_scores(ObjectQuery(o), o, args.eval_size)["novel_psnr"] for o in objects[:1]}
    report = {"settings": vars(args), "input_camera": INPUT_CAMERA, "rows": rows, "summary": summarize(rows),
              "sanity_ground_truth_novel_psnr": gt}
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
