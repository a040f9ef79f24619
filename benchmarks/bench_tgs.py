"""Feed-forward reconstruction (TGS) on the Shapes world: quality on held-out objects and views, and latency on CPU,
against the optimization it replaces, in the same run.

**Sweep.** The shipped reconstructor (``gen3d/shapes-tgs``, or ``--model FOLDER``) reconstructs each held-out object
(`gen3d.world.catalog.HELD_OUT`: never in its training set) from each of ``--azimuths`` input cameras (evenly spaced
from azimuth 0, elevation 15, distance 1.9, field of view 40: inside its training orbit; 64² RGBA renders, the camera
known). Per input, against the ground truth:

- ``novel_psnr`` / ``novel_ssim`` / ``novel_silhouette_iou``: renders from 14 views turned 45-315 degrees from the
  input's azimuth at elevations 10 and 40 (128², over white), as `bench_image` scores them;
- ``input_psnr``: the same at the input camera;
- ``iou_3d``: voxel IoU in the ground truth's frame (``aligned``: no normalization, no search);
- ``chamfer``: the symmetric Chamfer distance (mean squared nearest-neighbour distance both ways, x1000; the
  training loss) between the Gaussians' centers (opacity > 0.05) and 4096 points on the exact surface.

Training objects seen from the same cameras are reported too (``--train-objects`` of them): the gap between the two
is what generalization to new color/shape pairs costs.

**Recentered inputs.** `gen3d reconstruct` does not know the camera of a user's image: it centers the object and
scales it to fill 75% of the view, seen from the fixed input camera (`image-to-3d`'s framing). Each held-out
object's front view (256² RGBA) goes through that path (``held_out_recentered``), scored where the frame is not the
ground truth's: the silhouette IoU at the input camera against the prepared input's mask, and the 3D IoU after
normalizing position and scale (``iou_3d_normalized``; the known-camera rows get the same figure for comparison).

**Latency.** One image through the network (input resizing and forward pass; the model loaded once before), batch 1,
``--repeats`` times after a warm-up, at 1 and 2 torch threads: min and median milliseconds; and images per second at
batch 8. The reference in the same run is the optimization-based recipe on the same input (`image-to-3d`:
Zero123 SDS from a random ball, ``--reference-steps`` steps), timed once per run of the script on the first held-out
object: ``speedup`` is its seconds over the reconstruction's median.

    python benchmarks/bench_tgs.py                  # 5 held-out objects x 8 input views, 5 training objects, latency
    python benchmarks/bench_tgs.py --quick          # one object, two views, 3 repeats (a smoke test)

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_image import input_image, psnr_ssim  # noqa: E402

from gen3d.cameras import spherical_cameras  # noqa: E402
from gen3d.models.tgs import load_tgs, prepare_input, reconstruct  # noqa: E402
from gen3d.rendering.gaussian import GaussianQuery  # noqa: E402
from gen3d.world.catalog import held_out_objects, training_objects  # noqa: E402
from gen3d.world.metrics import iou_3d, silhouette_iou  # noqa: E402
from gen3d.world.recon_data import build_recon_set, chamfer_distance  # noqa: E402
from gen3d.world.render import render_object  # noqa: E402

ELEVATION, DISTANCE, FOVY, INPUT_SIZE = 15.0, 1.9, 40.0, 64


def camera(azimuth: float, size: int = INPUT_SIZE, elevation: float = ELEVATION):
    one = lambda v: torch.tensor([float(v)])  # noqa: E731
    return spherical_cameras(one(azimuth), one(elevation), one(DISTANCE), one(FOVY), size, size)


def view(obj, azimuth: float):
    """The object's 64² render from the input camera at `azimuth`: rgb on white [S, S, 3], mask [S, S]."""
    out = render_object(obj, camera(azimuth), supersample=2)
    return out.rgb[0], out.alpha[0, ..., 0]


def novel_cameras(azimuth: float, size: int):
    """14 views: 7 azimuths 45 degrees apart starting 45 degrees from the input's, at elevations 10 and 40."""
    az = torch.tensor([azimuth + 45.0 * k for k in range(1, 8)] * 2)
    el = torch.tensor([10.0] * 7 + [40.0] * 7)
    n = len(az)
    return spherical_cameras(az, el, torch.full((n,), DISTANCE), torch.full((n,), FOVY), size, size)


def score(model, obj, azimuth: float, surface: torch.Tensor, eval_size: int,
          iou_resolution: int = 64) -> dict[str, float]:
    query = GaussianQuery(model)
    cams = novel_cameras(azimuth, eval_size)
    psnr, ssim = psnr_ssim(query, obj, cams)
    input_psnr, _ = psnr_ssim(query, obj, camera(azimuth, eval_size))
    keep = model.opacities.detach() > 0.05
    centers = model.means.detach()[keep][None]
    return {"novel_psnr": psnr, "novel_ssim": ssim, "novel_silhouette_iou": float(silhouette_iou(query, obj, cams)),
            "input_psnr": input_psnr,
            "iou_3d": float(iou_3d(query, obj, resolution=iou_resolution, normalize=False, best_over_azimuth=False)),
            "iou_3d_normalized": float(iou_3d(query, obj, resolution=iou_resolution)),
            "chamfer": 1000 * float(chamfer_distance(centers, surface[None])[0]) if keep.any() else float("nan")}


def sweep(net, objects, azimuths, eval_size: int, split: str, iou_resolution: int = 64) -> list[dict]:
    rows = []
    for obj in objects:
        surface = build_recon_set([obj], views=1, size=8, points=4096, seed=1).points[0]
        for az in azimuths:
            rgb, mask = view(obj, az)
            model, seconds = reconstruct(net, rgb, mask, camera(az))
            scores = score(model, obj, az, surface, eval_size, iou_resolution)
            rows.append({"split": split, "object": str(obj), "azimuth": az, "seconds": seconds,
                         **{k: round(v, 4) for k, v in scores.items()}})
            print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def recentered(model_id: str, objects, tmp: Path, iou_resolution: int = 64) -> list[dict]:
    """Each object's front view through `gen3d reconstruct`'s path (recentered, fixed input camera)."""
    from gen3d.cli import load_run_config

    rows = []
    for obj in objects:
        image = input_image(obj, tmp / f"{obj.color}_{obj.shape}.png")
        system_cls, cfg = load_run_config("image-to-3d", [f"image={image}", f"elevation={ELEVATION}", "init=tgs",
                                                          f"recon_model={model_id}", "progress=false"])
        run_dir = tmp / f"run-{obj.color}_{obj.shape}"
        run_dir.mkdir()
        system = system_cls(cfg, run_dir)
        model = system.reconstruct()
        query = GaussianQuery(model)
        with torch.no_grad():
            alpha = query.render(system.ref_camera).alpha[0, ..., 0] > 0.5
        mask = system.ref_mask[0, ..., 0] > 0.5
        rows.append({"split": "held_out_recentered", "object": str(obj), "azimuth": 0.0,
                     "seconds": system.recon_seconds,
                     "input_silhouette_iou": round(float((alpha & mask).sum() / (alpha | mask).sum()), 4),
                     "iou_3d_normalized": round(float(iou_3d(query, obj, resolution=iou_resolution)), 4)})
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def latency(net, repeats: int) -> dict:
    obj = held_out_objects()[0]
    rgb, mask = view(obj, 0.0)
    out = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        times = []
        for i in range(repeats + 2):
            _, seconds = reconstruct(net, rgb, mask, camera(0.0))
            if i >= 2:  # warm-up
                times.append(seconds * 1000)
        image, cams = prepare_input(rgb, mask, camera(0.0), net.cfg.image_size)
        batch = image.expand(8, -1, -1, -1)
        cams8 = cams[[0] * 8]
        with torch.no_grad():
            net(batch, cams8)
            t0 = time.perf_counter()
            for _ in range(max(1, repeats // 4)):
                net(batch, cams8)
            per_batch = (time.perf_counter() - t0) / max(1, repeats // 4)
        out[f"threads_{threads}"] = {"min_ms": round(min(times), 2), "median_ms": round(statistics.median(times), 2),
                                     "batch8_images_per_s": round(8 / per_batch, 1)}
    return out


def reference_run(steps: int, threads: int) -> dict:
    """The optimization recipe (image-to-3d, random init) on the first held-out object's front view: its seconds."""
    from gen3d.cli import load_run_config
    from gen3d.runs import new_run_dir
    from gen3d.systems.base import write_config

    torch.set_num_threads(threads)
    obj = held_out_objects()[0]
    with tempfile.TemporaryDirectory() as tmp:
        image = input_image(obj, Path(tmp) / "input.png", size=INPUT_SIZE)
        overrides = [f"image={image}", f"elevation={ELEVATION}", f"ref_distance={DISTANCE}", f"ref_fovy={FOVY}",
                     "recenter=false", f"output_dir={tmp}", "progress=false", "exports=[]", "turntable_frames=0",
                     "val_every=0", "checkpoint_every=0", f"max_steps={steps}"]
        system_cls, cfg = load_run_config("image-to-3d", overrides)
        run_dir = new_run_dir(cfg.output_dir, system_cls.name, "reference")
        write_config(run_dir, cfg)
        system = system_cls(cfg, run_dir)
        t0 = time.perf_counter()
        system.fit()
        seconds = time.perf_counter() - t0
        surface = build_recon_set([obj], views=1, size=8, points=4096, seed=1).points[0]
        scores = score(system.model, obj, 0.0, surface, 128)
    return {"object": str(obj), "steps": steps, "threads": threads, "seconds": round(seconds, 2),
            **{k: round(v, 4) for k, v in scores.items()}}


def summarize(rows: list[dict]) -> dict:
    out = {}
    for split in dict.fromkeys(r["split"] for r in rows):
        mine = [r for r in rows if r["split"] == split]
        keys = [k for k in mine[0] if k not in ("split", "object", "azimuth", "seconds")]
        out[split] = {"inputs": len(mine), "objects": len({r["object"] for r in mine})} | {
            k: round(statistics.mean(r[k] for r in mine), 4) for k in keys}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gen3d/shapes-tgs", help="the reconstructor: embedded id or folder")
    p.add_argument("--azimuths", type=int, default=8, help="input views per object, evenly spaced from azimuth 0")
    p.add_argument("--train-objects", type=int, default=5, help="training objects also scored (0: none)")
    p.add_argument("--eval-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=20, help="timed forward passes per thread count")
    p.add_argument("--reference-steps", type=int, default=400, help="steps of the optimization recipe timed")
    p.add_argument("--threads", type=int, default=2, help="torch threads for everything but the latency sweep")
    p.add_argument("--iou-resolution", type=int,
                   help="voxels per side of the 3D IoU grid (default: 64, 32 with --quick)")
    p.add_argument("--quick", action="store_true", help="one object, two views, 3 repeats, a 5-step reference, "
                   "3D IoU on a 32^3 grid")
    args = p.parse_args(argv)
    if args.quick:
        args.azimuths, args.train_objects, args.eval_size, args.repeats, args.reference_steps = 2, 1, 32, 3, 5
    torch.set_num_threads(args.threads)
    net = load_tgs(args.model)
    azimuths = [360.0 * k / args.azimuths for k in range(args.azimuths)]
    held = held_out_objects()[:1] if args.quick else held_out_objects()
    train = training_objects()[:: max(1, len(training_objects()) // max(1, args.train_objects))][:args.train_objects]
    res = args.iou_resolution = args.iou_resolution or (32 if args.quick else 64)
    rows = sweep(net, held, azimuths, args.eval_size, "held_out", res) + sweep(net, train, azimuths, args.eval_size,
                                                                              "train", res)
    with tempfile.TemporaryDirectory() as tmp:
        rows += recentered(args.model, held, Path(tmp), res)
    timing = latency(net, args.repeats)
    reference = reference_run(args.reference_steps, args.threads)
    median = timing[f"threads_{min(args.threads, 2)}"]["median_ms"] / 1000
    report = {"settings": vars(args), "model": {"id": args.model, "gaussians": net.cfg.num_gaussians,
                                                 "parameters": sum(p.numel() for p in net.parameters())},
              "summary": summarize(rows), "latency": timing, "reference": reference,
              "speedup_vs_reference": round(reference["seconds"] / median, 1), "rows": rows}
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
