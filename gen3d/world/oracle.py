"""An oracle text-to-video prior: the exact denoiser of a Shapes-world object's true clips.

The denoiser that minimizes the diffusion loss over a finite set of clips {x_i} is known in closed form: with
x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps and eps ~ N(0, S), the posterior over which clip was noised is
p(i | x_t) ∝ exp(-|x_t - sqrt(abar) x_i|²_S^-1 / (2 (1 - abar))), so

    x0_hat(x_t) = sum_i p(i | x_t) x_i,    eps_hat = (x_t - sqrt(abar) x0_hat) / sqrt(1 - abar)

(the "ideal denoiser" of a training set, e.g. Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models", appendix B.3; Kadkhodaie et al. 2024, "Generalization in diffusion models arises from
geometry-adaptive harmonic representations"). S is the covariance of the video prior's noise: PYoCo's mixed noise
shares a part across frames (`gen3d.priors.video.mixed_noise`), and the distance is taken in its metric.

`ExactVideoDenoiser` keeps an embedded video prior's text encoder, schedule and noise but answers every UNet call
with this denoiser: conditioned on "<object>, <motion>" over that motion's true clips, unconditioned over all
motions' clips. It knows each motion exactly, so it is the ceiling of what video SDS can draw from a video prior:
`benchmarks/bench_4d.py --kinds text_oracle` runs text-to-4D with it to measure the dynamic stage apart from the
learned prior (README, 4D). It renders ground truth, so it is a measuring instrument, not a generator.

It ignores the camera (the learned priors know it only through the view words), so its estimate mixes the clips of
every camera that fits: where a motion's direction on screen depends on the camera (a swing seen from the left or
the right side) the mix cancels it. With ``azimuth_window=w`` each clip is denoised over the true clips whose camera
azimuth is within w degrees of its own (`VideoDiffusionPrior.seen_from`), the ceiling of a camera-conditioned prior.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from gen3d.cameras import wrap_azimuth
from gen3d.priors.prompts import DIRECTIONS
from gen3d.priors.video import VideoDiffusionPrior


class ExactVideoDenoiser(VideoDiffusionPrior):
    """`prior`'s interface; UNet calls answered by the exact denoiser of ``clips[prompt]`` (``[K, 3, F, h, w]`` in
    [-1, 1] at the prior's resolution; the prompt "" is the unconditional set). With `azimuth_window` (degrees) and
    `azimuths` (``{prompt: [K]}``, each clip's camera azimuth; `true_clips(..., return_azimuths=True)`), a clip seen
    from a camera (`seen_from`) is denoised over the clips within the window of its azimuth only."""

    def __init__(self, prior: VideoDiffusionPrior, clips: dict[str, Tensor],
                 azimuths: dict[str, Tensor] | None = None, azimuth_window: float | None = None) -> None:
        super().__init__(prior.unet, prior.scheduler, prior.text_encoder, prior.tokenizer, prior.vae,
                         num_frames=prior.num_frames, model_name=f"exact:{prior.model_name}", device=prior.device,
                         dtype=prior.dtype)
        self.noise_correlation = prior.noise_correlation
        if "" not in clips:
            raise ValueError("ExactVideoDenoiser: clips needs the unconditional set under the prompt \"\"")
        frames = clips[""].shape[2] if clips[""].ndim == 5 else 0
        shape = (3, frames, self.resolution, self.resolution)
        for prompt, x in clips.items():
            if x.ndim != 5 or tuple(x.shape[1:]) != shape:
                raise ValueError(f"ExactVideoDenoiser: clips[{prompt!r}] must be [K, 3, F, {self.resolution}, "
                                 f"{self.resolution}] with one F for all, got {tuple(x.shape)}")
        self.num_frames = frames
        self.prompts = list(clips)
        self.clip_sets = [clips[p].float().to(self.device) for p in self.prompts]
        self.azimuth_window = azimuth_window
        if azimuth_window is not None:
            if not 0 < azimuth_window <= 180:
                raise ValueError(f"ExactVideoDenoiser: azimuth_window must be in (0, 180] degrees, got "
                                 f"{azimuth_window}")
            if azimuths is None or set(azimuths) != set(clips) or any(
                    azimuths[p].shape != (len(clips[p]),) for p in clips):
                raise ValueError("ExactVideoDenoiser: azimuth_window needs azimuths {prompt: [K]}, one per clip of "
                                 "every prompt (true_clips(..., return_azimuths=True))")
            self.azimuth_sets = [azimuths[p].float().to(self.device) for p in self.prompts]
        variants = [(p, i) for i, p in enumerate(self.prompts)]
        variants += [(f"{p}, {d} view", i) for i, p in enumerate(self.prompts) if p for d in DIRECTIONS]
        self.keys = self.encode_text([v for v, _ in variants]).float()  # [prompts and their view variants, L, D]
        self.key_sets = [i for _, i in variants]

    def clip_set(self, text: Tensor, azimuth: float | None = None) -> Tensor:
        """The clips of the prompt (with or without a view suffix) that `text` ``[L, D]`` encodes; with an
        `azimuth_window` and a camera `azimuth` (degrees), only those seen from within the window."""
        d = (self.keys - text.float()).square().flatten(1).sum(1)
        if float(d.min()) > 1e-6 * float(self.keys.square().sum() / len(self.keys)):
            raise ValueError(f"ExactVideoDenoiser knows only the prompts {self.prompts} (and their view variants); "
                             f"it was asked about another one")
        i = self.key_sets[int(d.argmin())]
        if self.azimuth_window is None or azimuth is None:
            return self.clip_sets[i]
        near = wrap_azimuth(self.azimuth_sets[i] - azimuth).abs() <= self.azimuth_window
        if not near.any():
            raise ValueError(f"ExactVideoDenoiser: no clip of {self.prompts[i]!r} within {self.azimuth_window} "
                             f"degrees of azimuth {azimuth:.1f}; give more views or a wider azimuth_window")
        return self.clip_sets[i][near]

    def unet_eps(self, x_t: Tensor, t: Tensor, text: Tensor) -> Tensor:
        cams = self.cameras
        if cams is not None and len(x_t) % len(cams):
            raise ValueError(f"ExactVideoDenoiser: {len(x_t)} clips for {len(cams)} cameras")
        out = []
        for n, (x, step, emb) in enumerate(zip(x_t.float(), t, text)):
            azimuth = None if cams is None else float(cams.azimuth[n % len(cams)])  # the CFG batch repeats the clips
            data = self.clip_set(emb, azimuth)  # [K, C, F, h, w]
            abar = self.alphas_cumprod[int(step)].float()
            d2 = mixed_noise_distance(x[None] - abar.sqrt() * data, self.noise_correlation)
            w = torch.softmax(-d2 / (2 * (1 - abar)), 0)
            x0 = torch.einsum("k,kcfhw->cfhw", w, data)
            out.append((x - abar.sqrt() * x0) / (1 - abar).sqrt())
        return torch.stack(out)


def mixed_noise_distance(r: Tensor, alpha: float) -> Tensor:
    """Squared Mahalanobis norms ``[K]`` of residuals r ``[K, C, F, h, w]`` under the covariance of
    `gen3d.priors.video.mixed_noise`: across the F frames of each pixel, S = (I + a² 1 1ᵀ) / (1 + a²), whose inverse
    is (1 + a²) (I - a² / (1 + F a²) 1 1ᵀ) (Sherman-Morrison); a = 0 is the plain squared norm."""
    a2 = alpha * alpha
    frames = r.shape[2]
    per_pixel = r.square().sum(2) - a2 / (1 + frames * a2) * r.sum(2).square()
    return (1 + a2) * per_pixel.flatten(1).sum(1)


def true_clips(prompt: str, orbit, views: int, frames: int, size: int, generator: torch.Generator | None = None,
               supersample: int = 2, return_azimuths: bool = False):
    """``{"<prompt>, <verb>": clips [2 views, 3, F, size, size]}`` in [-1, 1]: the world object `prompt` under each
    motion, from `views` cameras drawn from `orbit` (a `CameraConfig`), each on black and on white; and ``""``: all of
    them. With `return_azimuths`, also ``{prompt: [K]}``: the azimuth (degrees) of each clip's camera."""
    from gen3d.cameras import sample_orbit
    from gen3d.world.animation import MOTIONS, VERBS, AnimatedObject
    from gen3d.world.catalog import parse_prompt

    obj = parse_prompt(prompt)
    if obj is None:
        raise ValueError(f"true_clips: {prompt!r} names no Shapes-world object (it needs a color and a shape word, "
                         f"e.g. \"a red sphere\")")
    cams = sample_orbit(replace(orbit, batch_size=views), generator, width=size, height=size)
    out = {}
    for motion in MOTIONS:
        anim = AnimatedObject(obj, motion)
        renders = [anim.render(cams, t, background=(0.0, 0.0, 0.0), supersample=supersample)
                   for t in torch.linspace(0, 1, frames).tolist()]
        premult = torch.stack([o.rgb for o in renders], 2).permute(0, 4, 2, 1, 3)  # [views, 3, F, s, s]
        a = torch.stack([o.alpha for o in renders], 2).permute(0, 4, 2, 1, 3)
        out[f"{prompt}, {VERBS[motion]}"] = torch.cat([premult, premult + 1 - a]) * 2 - 1
    out[""] = torch.cat(list(out.values()))
    if not return_azimuths:
        return out
    azimuths = {p: cams.azimuth.float().repeat(len(x) // views) for p, x in out.items()}
    return out, azimuths
