"""How well the embedded text-to-image prior draws what its prompts name, in 2D.

Samples each prompt several times (DDIM, classifier-free guidance) and scores every sample with
`gen3d.world.metrics.sample_agreement`: CIEDE2000 between the foreground's mean color and the
ground truth's, and silhouette IoU against the best-matching ground-truth view. The reference in
the same run is the ground truth itself rendered at the prior's resolution and scored the same
way (the best a sample can do under this metric) and the *unconditional* samples of the same
seeds scored against each prompt (what the prompt adds).

    python benchmarks/bench_prior_samples.py                 # every shape (seen colors) + held-out pairs
    python benchmarks/bench_prior_samples.py --samples 2 --quick
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch


def _mean(values) -> float:
    values = [v for v in values if v == v]
    return round(statistics.mean(values), 4) if values else float("nan")


def main(argv: list[str] | None = None) -> dict:
    from gen3d.cameras import orbit_cameras
    from gen3d.priors.diffusion import DiffusionPrior
    from gen3d.priors.sampling import sample_images
    from gen3d.world.catalog import HELD_OUT, parse_prompt
    from gen3d.world.metrics import sample_agreement
    from gen3d.world.render import render_object
    from gen3d.world.train_prior import sample_prompts

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prior", default="gen3d/shapes-t2i")
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps")
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    parser.add_argument("--quick", action="store_true", help="3 prompts, 10 steps (smoke test)")
    args = parser.parse_args(argv)
    prior = DiffusionPrior.from_pretrained(args.prior)
    prompts = sample_prompts()
    if args.quick:
        prompts, args.steps = prompts[:2] + prompts[-1:], 10
    held = {f"{c} {s}" for c, s in HELD_OUT}
    repeated = [p for p in prompts for _ in range(args.samples)]
    gen = torch.Generator().manual_seed(0)
    images = sample_images(prior, repeated, steps=args.steps, guidance_scale=args.guidance, generator=gen)
    gen = torch.Generator().manual_seed(0)
    uncond = sample_images(prior, [""] * len(repeated), steps=args.steps, guidance_scale=1.0, generator=gen)
    size = images.shape[1]
    cams = orbit_cameras(len(repeated), elevation=15.0, distance=2.25, width=size, height=size)
    truth = torch.cat([render_object(parse_prompt(p), cams[i:i + 1], supersample=2).rgb for i, p in enumerate(repeated)])
    scored = {name: sample_agreement(imgs, repeated) for name, imgs in
              (("prior", images), ("unconditional", uncond), ("ground_truth", truth))}
    rows = []
    for k, prompt in enumerate(prompts):
        part = slice(k * args.samples, (k + 1) * args.samples)
        row = {"prompt": prompt, "held_out": str(parse_prompt(prompt)) in held}
        for name, results in scored.items():
            row[f"{name}_color_delta_e"] = _mean(r.color_delta_e for r in results[part])
            row[f"{name}_silhouette_iou"] = _mean(r.silhouette_iou for r in results[part])
        rows.append(row)
    summary = {}
    for group, keep in (("seen", False), ("held_out", True)):
        sel = [r for r in rows if r["held_out"] == keep]
        summary[group] = {key: _mean(r[key] for r in sel) for key in rows[0] if key.endswith(("_delta_e", "_iou"))}
    report = {"benchmark": "shapes-prior-samples", "prior": args.prior, "samples_per_prompt": args.samples,
              "steps": args.steps, "guidance": args.guidance, "prompts": rows, "summary": summary}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
