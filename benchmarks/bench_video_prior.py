"""Does the embedded text-to-video prior know the motions? Denoising errors on fresh true clips.

For clips of animated Shapes-world objects rendered anew (seed 1000, not the training clips; seen objects and the
held-out color/shape pairs), the prior's denoising error at each t in {200, 400, 600, 700, 850, 950} is compared across
captions and frame orders. Each ratio is error(right) / error(altered) at one t (the same for the ε and the x0 error);
1 means the prior ignores what was altered:

- ``motion``: the right motion word over the three other motion words ("a red mug, bouncing" vs "..., spinning");
- ``order``: the frames in their order over the same frames reversed in time (grow, bounce, spin and swing all
  look different played backwards: a shrinking object, a spin the other way; bounce is its own reverse, so its
  ratio stays near 1);
- ``shuffle``: in order over randomly shuffled frames (temporal coherence).

The motion word can only matter where the noisy clip does not already show the motion: at high noise (t >= 700),
where video SDS decides what moves. ``motion_high_noise`` sums those t. At low noise a perfect model scores
near 1 too.

A prior that takes the object at rest (``train-video-prior rest_frame=true``) is shown the true rest image of each
clip (``trained``) and, for reference, none (``trained_without_image``); its figure puts each sampled clip over the
true one.

References in the same run: the untrained inflation of the image prior (the video UNet before training: the image
prior on every frame; its order ratios are 1 by construction), and with ``--compare`` other priors, such as the
single-object control that shows how far the ratio moves when a prior does learn the motion words:

    gen3d world train-video-prior max_objects=1 steps=600 high_noise_weight_cap=20 output=/tmp/t2v-one work_dir=/tmp/t2v-one-work
    python benchmarks/bench_video_prior.py --compare /tmp/t2v-one --figure docs/video_prior_clips.png \
        > benchmarks/results/video_prior.json
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

import torch
import torch.nn.functional as F

from gen3d.world.animation import VERBS


def clips(pairs, frames: int, size: int, seed: int):
    """True clips [N, 3, F, s, s] in [-1, 1] on white of (object, motion) pairs, one random camera each, their
    (object, motion, view word), and the objects at rest [N, s, s, 3] in [0, 1] from the clips' cameras
    (`gen3d.priors.video.VideoDiffusionPrior.at_rest`)."""
    from gen3d.cameras import sample_orbit
    from gen3d.priors.prompts import view_directions
    from gen3d.world.animation import AnimatedObject
    from gen3d.world.train_prior import TRAIN_ORBIT

    g = torch.Generator().manual_seed(seed)
    out, info, rest = [], [], []
    for obj, motion in pairs:
        cams = sample_orbit(replace(TRAIN_ORBIT, batch_size=1), g, width=size, height=size)
        animated = AnimatedObject(obj, motion)
        clip = animated.frames(cams, frames, supersample=2)[:, 0]  # [F, s, s, 3] over white
        out.append(clip.permute(3, 0, 1, 2) * 2 - 1)
        info.append((obj, motion, view_directions(cams.azimuth, cams.elevation)[0]))
        rest.append(animated.render(cams, animated.rest_time, supersample=2).rgb[0])
    return torch.stack(out), info, torch.stack(rest)


TIMESTEPS = (200, 400, 600, 700, 850, 950)
HIGH_NOISE = 700


@torch.no_grad()
def ratios(prior, data, info, rest=None, seed: int = 0, timesteps=TIMESTEPS) -> dict:
    """Per t: the motion, order and shuffle ratios; ``motion_high_noise`` over t >= HIGH_NOISE; per motion at high
    noise. With `rest`, a prior that takes the object at rest is shown it (the same image for every alteration)."""
    g = torch.Generator().manual_seed(seed)
    keys = ("right", "wrong_motion", "reversed", "shuffled")
    sums = {t: dict.fromkeys(keys, 0.0) for t in timesteps}
    per_motion: dict[str, list[float]] = {m: [0.0, 0.0] for m in VERBS}
    frames = data.shape[2]
    for i, (x0, (obj, motion, view)) in enumerate(zip(data, info)):
        base = obj.caption()
        caps = [f"{base}, {VERBS[motion]}, {view} view"] + [f"{base}, {VERBS[m]}, {view} view" for m in VERBS if m != motion]
        emb = prior.encode_text(caps)
        perm = torch.randperm(frames, generator=g)
        for t in timesteps:
            eps = prior.noise(x0[None], g)[0]  # as the model was trained: mixed noise for the embedded prior
            ab = prior.alphas_cumprod[t]
            # the altered clips carry their noise with their frames: a model blind to time scores them exactly equal
            x_rev, e_rev, x_shuf, e_shuf = x0.flip(1), eps.flip(1), x0[:, perm], eps[:, perm]
            noisy = lambda x, e: ab.sqrt() * x + (1 - ab).sqrt() * e  # noqa: E731
            xs = torch.stack([noisy(x0, eps)] * len(caps) + [noisy(x_rev, e_rev), noisy(x_shuf, e_shuf)])
            text = torch.cat([emb, emb[:1], emb[:1]])
            with prior.at_rest(None if rest is None else rest[i:i + 1]):
                out = prior.unet_eps(xs, torch.full((len(xs),), t), text)
            target = torch.stack([eps] * len(caps) + [e_rev, e_shuf])
            err = (out - target).pow(2).flatten(1).mean(1)
            s = sums[t]
            s["right"] += err[0].item()
            s["wrong_motion"] += err[1:len(caps)].mean().item()
            s["reversed"] += err[len(caps)].item()
            s["shuffled"] += err[len(caps) + 1].item()
            if t >= HIGH_NOISE:  # x0 errors (ε error * (1 - ab) / ab), so the noisiest t weigh most
                w = ((1 - ab) / ab).item()
                per_motion[motion][0] += w * err[0].item()
                per_motion[motion][1] += w * err[1:len(caps)].mean().item()
    r = lambda a, b: round(a / b, 4)  # noqa: E731
    return {"motion_high_noise": r(sum(a for a, _ in per_motion.values()), sum(b for _, b in per_motion.values())),
            "motion_high_noise_per_motion": {m: r(a, b) for m, (a, b) in per_motion.items()},
            "per_t": {t: {"motion": r(s["right"], s["wrong_motion"]), "order": r(s["right"], s["reversed"]),
                          "shuffle": r(s["right"], s["shuffled"])} for t, s in sums.items()}}


def baseline_prior(frames: int):
    """The video UNet inflated from the image prior, untrained (the image prior on every frame)."""
    import tempfile

    from gen3d.world.train_video_prior import VideoPriorTrainConfig, VideoPriorTrainer

    with tempfile.TemporaryDirectory() as tmp:
        trainer = VideoPriorTrainer(VideoPriorTrainConfig(output=f"{tmp}/out", work_dir=tmp, frames=frames,
                                                          progress=False))
        return trainer.prior()


def main(argv: list[str] | None = None) -> dict:
    from gen3d.priors.video import VideoDiffusionPrior, sample_videos
    from gen3d.world.catalog import held_out_objects, training_objects

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prior", default="gen3d/shapes-t2v")
    parser.add_argument("--compare", nargs="*", default=[], help="other priors to score on the same clips")
    parser.add_argument("--objects", type=int, default=8, help="seen objects (every 19th training object)")
    parser.add_argument("--quick", action="store_true",
                        help="1 object, no held-out ones, t in {400, 850}: a smoke test")
    parser.add_argument("--figure", help="write sampled clips (one row per prompt) to this PNG")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    prior = VideoDiffusionPrior.from_pretrained(args.prior)
    seen = training_objects()[::19][: 1 if args.quick else args.objects]
    groups = {"seen": seen} if args.quick else {"seen": seen, "held_out": held_out_objects()}
    timesteps = (400, 850) if args.quick else TIMESTEPS
    report = {"benchmark": "video-prior", "prior": args.prior, "frames": prior.num_frames, "timesteps": timesteps}
    base = baseline_prior(prior.num_frames)
    compared = {path: VideoDiffusionPrior.from_pretrained(path) for path in args.compare}
    for name, objects in groups.items():
        pairs = [(obj, motion) for obj in objects for motion in VERBS]
        data, info, rest = clips(pairs, prior.num_frames, prior.resolution, seed=1000)
        report[name] = {"clips": len(data), "trained": ratios(prior, data, info, rest, timesteps=timesteps),
                        "untrained_inflation": ratios(base, data, info, timesteps=timesteps),
                        **{path: ratios(other, data, info, rest, timesteps=timesteps)
                           for path, other in compared.items()}}
        if prior.rest_frame:  # the same prior shown no image: the text-to-video model it also is
            report[name]["trained_without_image"] = ratios(prior, data, info, timesteps=timesteps)
        print(json.dumps({name: report[name]}), file=sys.stderr)
    if args.figure:
        from gen3d.export.video import image_grid, save_image
        from gen3d.world.catalog import WorldObject

        cases = [("red", "mug", "spin"), ("blue", "cube", "bounce"), ("green", "cone", "grow"),
                 ("yellow", "lamp", "swing"), ("blue", "mug", "bounce")]
        prompts = [f"a {c} {s}, {VERBS[m]}" for c, s, m in cases]
        rest = None
        if prior.rest_frame:  # each sampled clip over the true one, from the same camera
            truth, _, rest = clips([(WorldObject(s, c), m) for c, s, m in cases], prior.num_frames, prior.resolution,
                                   seed=0)
            truth = (truth.permute(0, 2, 3, 4, 1) + 1) / 2
        videos = sample_videos(prior, prompts, steps=25, guidance_scale=5.0, generator=torch.Generator().manual_seed(0),
                               rest=rest)
        if rest is not None:
            videos = torch.stack([videos, truth], 1).flatten(0, 1)
        scale = max(2, 64 // prior.resolution)  # frames at least 64 pixels wide
        save_image(args.figure, image_grid(F.interpolate(videos.flatten(0, 1).permute(0, 3, 1, 2), scale_factor=scale,
                                                         mode="nearest").permute(0, 2, 3, 1), nrow=prior.num_frames))
        report["figure"] = args.figure
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
