"""Video score distillation: SDS through a text-to-video prior, the temporal guidance of 4D generation.

Align Your Gaussians (Ling et al. 2024, "Align Your Gaussians: Text-to-4D with Dynamic 3D Gaussians and Composed
Diffusion Models") and 4D-fy (Bahmani et al. 2024) train the motion of a 4D representation by rendering a clip
(F frames at times t_0 < ... < t_F-1 from one camera) and applying SDS with a text-to-video model to the whole
clip at once: the clip is encoded to z ``[B, C, F, h, w]``, noised with one diffusion timestep per clip, and

    g = w(t) (eps^(x_t; prompt) - eps)

is the same estimate as image SDS (`gen3d.guidance.sds`), but the video model's temporal layers make eps^ depend
on every frame, so g moves each frame toward a motion the model finds likely. The noise eps is drawn as the model was
trained (the embedded prior: frames share part of it, `gen3d.priors.video.mixed_noise`). Classifier-free guidance, weighting,
timestep range and clipping are `GuidanceConfig`'s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gen3d.guidance.base import GuidanceOutput
from gen3d.guidance.sds import SDSGuidance

if TYPE_CHECKING:
    from gen3d.cameras import Cameras
    from gen3d.priors.prompts import PromptBatch


class VideoSDSGuidance(SDSGuidance):
    """SDS over a `VideoDiffusionPrior`: ``guidance(clips [B, F, H, W, 3], prompts, step, max_steps)``."""

    def __call__(self, rgb: Tensor, prompts: "PromptBatch", step: int, max_steps: int,
                 generator: torch.Generator | None = None, cameras: "Cameras | None" = None) -> GuidanceOutput:
        """Guidance for clips rgb ``[B, F, H, W, 3]`` in [0, 1]; `prompts` has one condition per clip."""
        if rgb.ndim != 5 or rgb.shape[-1] != 3:
            raise ValueError(f"VideoSDSGuidance: rgb must be clips [B, F, H, W, 3], got {tuple(rgb.shape)}")
        if rgb.shape[0] != len(prompts):
            raise ValueError(f"VideoSDSGuidance: {rgb.shape[0]} clips but {len(prompts)} text conditions")
        z = self.prior.encode(rgb, generator=generator)
        with self.prior.seen_from(cameras):
            return self.guide(z, prompts, step, max_steps, generator, cameras)

    def noise(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The noise the video model was trained with (frames partly shared, `gen3d.priors.video.mixed_noise`)."""
        return self.prior.noise(z, generator)
