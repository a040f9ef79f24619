"""4D generation on Shapes-world animations with known motion: per-frame 3D IoU, motion error, flicker, time.

For each animated object (one per motion: bounce, grow, swing, spin) it runs, on the embedded priors:

- ``text``: text-to-4D (`configs/text-to-4d.yaml`: DreamGaussian, then video SDS + per-frame SDS) on
  prompt="<object>", motion="<verb>";
- ``text_no_video``: the same run without the video prior (lambda_video=0): per-frame image SDS alone, the reference
  that shows what the video prior adds;
- ``text_oracle``: ``text`` with the video prior replaced by the exact denoiser of the object's true clips
  (`gen3d.world.oracle.ExactVideoDenoiser`, 128 cameras) and video CFG scale 1 (the exact conditional score; a larger
  scale pushes each motion away from the others, e.g. a growing cone to sink, away from the bounce): a prior that
  knows every motion exactly, so the ceiling of the dynamic stage, measured apart from the learned prior;
- ``text_oracle_camera``: ``text_oracle`` that also knows each clip's camera (`azimuth_window=30`: each clip is
  denoised over the true clips from cameras within 30 degrees of its azimuth; 256 cameras): the ceiling of a
  camera-conditioned prior, where the plain oracle, like the learned prior's view words, cannot tell a swing seen
  from the left side from one seen from the right;
- ``video``: video-to-4D (`configs/video-to-4d.yaml`: DreamGaussian4D) on the object's true clip from the input camera
  (`gen3d.world.animation.save_clip`, RGBA frames);
- ``frozen``: each run's own static stage held still (the deformation field set to the identity): the score of no
  motion at all, for scale.

Scores (`gen3d.world.motion_metrics`): per-frame 3D IoU (normalized: the shape at each time), motion error (mean
distance of the Gaussians from where the true motion takes them, world units; the object is about 1 unit tall),
flicker (frame-to-frame change of the front view that the true motion does not explain) and seconds per run.

    python benchmarks/bench_4d.py > benchmarks/results/4d.json
    python benchmarks/bench_4d.py --quick          # one object, few steps: a smoke test

With a prior that does know its motion words, such as the single-object control of `bench_video_prior.py`, the same
script shows whether text-to-4D turns that knowledge into motion:

    python benchmarks/bench_4d.py --kinds text text_no_video --objects "a red sphere" --motions bounce grow \
        --override video_prior=/tmp/t2v-one
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

from gen3d.world.animation import VERBS

CASES = [("a red mug", "bounce"), ("a green cone", "grow"), ("a yellow lamp", "swing"), ("a blue cube", "spin")]


def evaluate(system, animated, resolution: int = 48) -> dict[str, float]:
    """Per-frame 3D IoU (mean, min), motion error and flicker of a finished 4D run against `animated`."""
    from gen3d.cameras import orbit_cameras
    from gen3d.world.motion_metrics import flicker, frame_iou, motion_error

    times = system.times()
    ious = frame_iou(system.query, animated, times, resolution=resolution)
    cams = orbit_cameras(1, 15.0, 2.25, 45.0, 64, 64)
    flick = flicker(lambda t: system.clip_frames(cams, [t])[0], animated, cams, times)
    return {"iou_mean": statistics.mean(ious), "iou_min": min(ious), "motion_error": motion_error(system.dynamic, animated, times),
            "flicker": flick}


def frozen(system) -> None:
    """Reset the run's deformation field to the identity (its static stage held still)."""
    from gen3d.representations.deformation import DeformationField

    system.field = DeformationField(system.cfg.deformation).to(system.device)


KINDS = ["text", "text_no_video", "text_oracle", "text_oracle_camera", "video"]
FIGURE_CAMERA = dict(elevation=15.0, distance=2.25, fovy=45.0)


def front_clip(render_at, size: int = 64, frames: int = 8):
    """rgb [F, size, size, 3] of a clip from the front camera: ``render_at(cameras, t)`` -> rgb [1, H, W, 3]."""
    from gen3d.cameras import orbit_cameras

    cams = orbit_cameras(1, FIGURE_CAMERA["elevation"], FIGURE_CAMERA["distance"], FIGURE_CAMERA["fovy"], size, size)
    return torch.cat([render_at(cams, t) for t in torch.linspace(0, 1, frames).tolist()]).clamp(0, 1)


def run_case(kind: str, prompt: str, motion: str, overrides: list[str], out_dir: Path,
             iou_resolution: int = 48, oracle_views: int = 128) -> tuple[dict, dict, torch.Tensor]:
    """One run: its scores, those of its frozen static stage, and its clip from the front (for the figure). The oracle
    kinds render the true clips from `oracle_views` cameras (twice as many for `text_oracle_camera`)."""
    from gen3d.cli import load_run_config
    from gen3d.runs import new_run_dir
    from gen3d.systems.base import write_config
    from gen3d.world.animation import AnimatedObject, save_clip
    from gen3d.world.catalog import parse_prompt

    animated = AnimatedObject(parse_prompt(prompt), motion)
    common = [f"output_dir={out_dir}", "progress=false", "exports=[]", "turntable_frames=0", "val_every=0",
              "checkpoint_every=0"]
    if kind == "video":
        clip = save_clip(animated, out_dir / f"clip-{motion}-{prompt.replace(' ', '_')}", frames=8, size=128)
        system_cls, cfg = load_run_config("video-to-4d", [f"video={clip}", *common, *overrides])
    else:
        extra = {"text_no_video": ["lambda_video=0"], "text_oracle": ["video_guidance.guidance_scale=1"],
                 "text_oracle_camera": ["video_guidance.guidance_scale=1"]}.get(kind, [])
        system_cls, cfg = load_run_config("text-to-4d", [f"prompt={prompt}", f"motion={VERBS[motion]}", *common,
                                                         *extra, *overrides])
    run = new_run_dir(cfg.output_dir, system_cls.name, f"{kind}-{prompt}-{motion}")
    write_config(run, cfg)
    system = system_cls(cfg, run)
    t0 = time.perf_counter()
    if kind.startswith("text_oracle"):
        from gen3d.world.oracle import ExactVideoDenoiser, true_clips

        system.ensure_training()
        camera = kind == "text_oracle_camera"
        truth, azimuths = true_clips(prompt, cfg.cameras, oracle_views * (2 if camera else 1), cfg.frames,
                                     system.video_prior.resolution, torch.Generator().manual_seed(cfg.seed),
                                     return_azimuths=True)
        oracle = ExactVideoDenoiser(system.video_prior, truth, azimuths, azimuth_window=30.0 if camera else None)
        system.setup_video_prior(f"{prompt}, {cfg.motion}", oracle)
    system.fit()
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        clip = front_clip(lambda c, t: system.clip_frames(c, [t])[0], frames=cfg.frames)
        row = {"kind": kind, "object": prompt, "motion": motion, "seconds": round(seconds, 1),
               "n_gaussians": system.model.num_gaussians, **_rounded(evaluate(system, animated, iou_resolution))}
        frozen(system)
        still = {"kind": f"frozen_{kind}", "object": prompt, "motion": motion,
                 **_rounded(evaluate(system, animated, iou_resolution))}
    return row, still, clip


def _rounded(d: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in d.items()}


def summarize(rows: list[dict]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for kind in dict.fromkeys(r["kind"] for r in rows):
        sel = [r for r in rows if r["kind"] == kind]
        keys = [k for k in ("seconds", "iou_mean", "iou_min", "motion_error", "flicker") if k in sel[0]]
        out[kind] = {k: round(statistics.mean(r[k] for r in sel), 4) for k in keys} | {"n": len(sel)}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", nargs="*", default=["text", "text_no_video", "video"], choices=KINDS,
                        help="runs per object (see the module's docstring)")
    parser.add_argument("--motions", nargs="*", help="only these motions (bounce, grow, swing, spin)")
    parser.add_argument("--objects", nargs="*", help="these objects (\"a red sphere\") under every chosen motion, in "
                        "place of the four default cases")
    parser.add_argument("--override", nargs="*", default=[], help="config overrides for every run")
    parser.add_argument("--quick", action="store_true", help="one object, 12 steps, IoU on a 24^3 grid, 16 oracle "
                        "cameras: a smoke test of the script")
    parser.add_argument("--iou-resolution", type=int,
                        help="voxels per side of the per-frame IoU grid (default: 48, 24 with --quick)")
    parser.add_argument("--output-dir", help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--figure", help="PNG of every run's clip from the front, each object's true clip below them")
    parser.add_argument("--merge", nargs="*", default=[], help="JSON reports of earlier runs to merge into this one")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [(o, m) for o in args.objects for m in VERBS] if args.objects else CASES
    cases = [c for c in cases if not args.motions or c[1] in args.motions]
    overrides = list(args.override)
    if args.quick:
        cases = cases[:1]
        overrides = ["max_steps=12", "static_steps=8", "frames=4", *overrides]
    args.iou_resolution = args.iou_resolution or (24 if args.quick else 48)
    rows, clips = [], []
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(args.output_dir or tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        for prompt, motion in cases:
            for kind in args.kinds:
                row, still, clip = run_case(kind, prompt, motion, overrides, out_dir, args.iou_resolution,
                                            oracle_views=16 if args.quick else 128)
                print(json.dumps(row), json.dumps(still), file=sys.stderr)
                rows += [row, still]
                clips.append(clip)
            if args.figure:
                from gen3d.world.animation import AnimatedObject
                from gen3d.world.catalog import parse_prompt

                truth = AnimatedObject(parse_prompt(prompt), motion)
                clips.append(front_clip(lambda c, t: truth.render(c, t, supersample=2).rgb, frames=clips[-1].shape[0]))
    if args.figure:
        from gen3d.export.video import image_grid, save_image

        save_image(args.figure, image_grid(torch.cat(clips), nrow=clips[0].shape[0]))
    for path in args.merge:  # e.g. the kinds run in another process
        rows += json.loads(Path(path).read_text())["rows"]
    report = {"benchmark": "shapes-4d", "overrides": overrides, "iou_resolution": args.iou_resolution,
              "threads": torch.get_num_threads(), "rows": rows,
              "summary": summarize(rows)}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
