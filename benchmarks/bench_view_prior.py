"""How well the embedded view-conditioned prior draws novel views of one input view, in 2D.

For each object, the input is its ground-truth view from `SAMPLE_CAMERA` (azimuth 30, elevation 15,
distance 2.25); the prior draws the object turned by 90, 180 and 270 degrees (DDIM, Zero123's
classifier-free guidance) and every sample is scored against the ground-truth render of *that*
camera: PSNR over the image (on white), silhouette IoU (foreground: pixels away from white) and
the foreground's mean color error (CIEDE2000).

References in the same run, scored the same way:

- "input copy": the input view itself as the answer, the best a prior that ignores the camera
  could hope for on average;
- "wrong pose": the same prior and seeds asked for the view turned another 180 degrees, scored
  against the right view. If the prior uses the camera, its right-pose samples beat these.

A sample-free figure of the same question, `pose_loss_ratio`: the prior's denoising error on the
true novel view (noised at t = 100, 300, ..., 900 with fixed noise) given the right pose, divided
by the error given the pose turned another 180 degrees. 1 means the prior ignores the camera; the
lower, the more it uses it. The same figure for the other two parts of the pose, from the same input
view: `elevation_loss_ratio` (targets at elevation 45 and -10, each scored with its own pose and with
the other's) and `distance_loss_ratio` (targets 0.2 closer and 0.2 farther, likewise).

    python benchmarks/bench_view_prior.py                  # 8 seen objects + the 5 held-out pairs
    python benchmarks/bench_view_prior.py --quick          # 2 objects, 1 sample, 10 steps (smoke test)
    python benchmarks/bench_view_prior.py --prior path/to/folder

Prints one JSON object: per-object figures, then means for seen and held-out objects.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

SEEN = ["red mug", "pink house", "gray chair", "yellow snowman", "blue rocket", "orange cube", "teal torus", "green cone"]
TURNS = (90.0, 180.0, 270.0)
FOREGROUND = 0.12  # largest channel difference from white that counts as foreground (as sample_agreement)


def _mean(values) -> float:
    values = [v for v in values if v == v]
    return round(statistics.mean(values), 4) if values else float("nan")


def scores(pred: torch.Tensor, truth: torch.Tensor) -> dict[str, list[float]]:
    """Per-image PSNR, silhouette IoU and foreground ΔE00 of `pred` against `truth` (both [N, h, w, 3] on white)."""
    from gen3d.world.metrics import ciede2000, srgb_to_lab

    mse = (pred - truth).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    psnr = (-10 * torch.log10(mse)).tolist()
    mask_p = (pred - 1).abs().amax(-1) > FOREGROUND
    mask_t = (truth - 1).abs().amax(-1) > FOREGROUND
    inter = (mask_p & mask_t).flatten(1).sum(1).float()
    union = (mask_p | mask_t).flatten(1).sum(1).float().clamp_min(1)
    iou = (inter / union).tolist()
    color = []
    for p, t, mp, mt in zip(pred, truth, mask_p, mask_t):
        if mp.any() and mt.any():
            color.append(float(ciede2000(srgb_to_lab(p[mp]).mean(0), srgb_to_lab(t[mt]).mean(0))))
        else:
            color.append(float("nan"))
    return {"psnr": psnr, "silhouette_iou": iou, "color_error": color}


@torch.no_grad()
def pose_loss_ratio(prior, inputs: torch.Tensor, truth: torch.Tensor, right: torch.Tensor, wrong: torch.Tensor) -> float:
    """Conditional ε-MSE on `truth` [B, h, w, 3] with the right poses over that with the wrong poses (see the docstring)."""
    x0 = prior.encode(truth)  # [B, 3, h, w]
    g = torch.Generator().manual_seed(0)
    errors = {}
    for name, pose in (("right", right), ("wrong", wrong)):
        cond = prior.encode_condition(inputs, pose)
        total = 0.0
        for step in range(100, 1000, 200):
            t = torch.full((len(x0),), step, dtype=torch.long)
            eps = torch.randn(x0.shape, generator=g)
            pred = prior.predict_noise(prior.add_noise(x0, eps, t), t, cond, guidance_scale=1.0).eps_cond
            total += float((pred - eps).pow(2).mean())
        g.manual_seed(0)  # the same noise for both poses
        errors[name] = total
    return errors["right"] / errors["wrong"]


def swap_ratios(prior, obj, size: int) -> dict[str, float]:
    """`pose_loss_ratio` for elevation and distance: two targets from the input camera moved up/down (or
    closer/farther), each scored with its own pose (right) and with the other target's (wrong)."""
    from gen3d.priors.view_conditioning import relative_pose
    from gen3d.world.train_view_prior import SAMPLE_CAMERA, render_on_white

    cam = SAMPLE_CAMERA
    three = lambda v: torch.full((3,), float(v))
    moves = {"elevation": (three(cam["azimuth"]), torch.tensor([cam["elevation"], 45.0, -10.0]), three(cam["distance"])),
             "distance": (three(cam["azimuth"]), three(cam["elevation"]),
                          torch.tensor([0.0, -0.2, 0.2]) + cam["distance"])}
    ratios = {}
    for name, (az, el, di) in moves.items():
        views = render_on_white(obj, az, el, di, three(cam["fovy"]), size, 2).permute(0, 2, 3, 1)  # [3, h, w, 3]
        right = relative_pose(el[0], az[0], di[0], el[1:], az[1:], di[1:])  # [2, 4]
        ratios[f"{name}_loss_ratio"] = round(pose_loss_ratio(prior, views[:1].expand(2, -1, -1, -1), views[1:],
                                                             right, right.flip(0)), 4)
    return ratios


def main(argv: list[str] | None = None) -> dict:
    from gen3d.priors.sampling import sample_novel_views
    from gen3d.priors.view_conditioning import ViewConditionedPrior, relative_pose
    from gen3d.world.catalog import HELD_OUT, WorldObject
    from gen3d.world.train_view_prior import SAMPLE_CAMERA, render_on_white

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prior", default="gen3d/shapes-zero123")
    parser.add_argument("--samples", type=int, default=2, help="samples per novel view")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (Zero123: 3)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="2 objects, 1 sample, 10 steps (smoke test)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    prior = ViewConditionedPrior.from_pretrained(args.prior)
    size = prior.resolution
    objects = [(WorldObject(shape=name.split()[1], color=name.split()[0]), False) for name in SEEN]
    objects += [(WorldObject(shape=s, color=c), True) for c, s in HELD_OUT]
    turns = TURNS
    if args.quick:
        objects, args.samples, args.steps, turns = [objects[0], objects[-1]], 1, 10, (180.0,)

    cam = SAMPLE_CAMERA
    azimuth = torch.tensor([cam["azimuth"] + d for d in (0.0, *turns)])
    full = lambda v: torch.full((len(azimuth),), float(v))
    rows = []
    for obj, held in objects:
        views = render_on_white(obj, azimuth, full(cam["elevation"]), full(cam["distance"]), full(cam["fovy"]),
                                size, 2).permute(0, 2, 3, 1)  # [1 + T, h, w, 3]
        inputs, truth = views[0], views[1:].repeat_interleave(args.samples, 0)  # [T * S, h, w, 3]
        target_azimuth = azimuth[1:].repeat_interleave(args.samples)
        right = relative_pose(cam["elevation"], cam["azimuth"], cam["distance"], cam["elevation"], target_azimuth, cam["distance"])
        wrong = relative_pose(cam["elevation"], cam["azimuth"], cam["distance"], cam["elevation"], target_azimuth + 180.0,
                              cam["distance"])
        batch = inputs[None].expand(len(truth), -1, -1, -1)
        result = {}
        for name, pose in (("prior", right), ("wrong_pose", wrong)):
            images = sample_novel_views(prior, batch, pose, steps=args.steps, guidance_scale=args.guidance,
                                        generator=torch.Generator().manual_seed(0))
            result[name] = scores(images, truth)
        result["input_copy"] = scores(batch, truth)
        row = {"object": str(obj), "held_out": held, "pose_loss_ratio": round(pose_loss_ratio(prior, batch, truth, right, wrong), 4)}
        row.update(swap_ratios(prior, obj, size))
        for name, figures in result.items():
            for metric, values in figures.items():
                row[f"{name}_{metric}"] = _mean(values)
        rows.append(row)
    summary = {}
    for group, keep in (("seen", False), ("held_out", True)):
        sel = [r for r in rows if r["held_out"] == keep]
        if sel:
            summary[group] = {k: _mean(r[k] for r in sel) for k in rows[0] if k not in ("object", "held_out")}
    report = {"benchmark": "shapes-view-prior", "prior": args.prior, "samples_per_view": args.samples,
              "steps": args.steps, "guidance": args.guidance, "turns": list(turns), "input_camera": cam,
              "objects": rows, "summary": summary}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
