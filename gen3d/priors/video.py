"""A frozen text-to-video diffusion model, for the temporal guidance of 4D generation (issue 12).

`VideoDiffusionPrior` is `DiffusionPrior` over clips: renders are ``[B, F, H, W, 3]`` in [0, 1] and the
UNet's input is ``z [B, C, F, h, w]``, the layout of diffusers' `UNet3DConditionModel` (ModelScope
text-to-video, Wang et al. 2023, "ModelScope Text-to-Video Technical Report"; zeroscope), which factorizes
space and time: every ResNet block is followed by a temporal convolution and every spatial transformer by a
temporal one. Both kinds load through `from_pretrained`:

- the embedded ``gen3d/shapes-t2v``: 8 frames of 32x32 pixels of animated Shapes-world objects, trained by
  ``gen3d world train-video-prior`` (prompts like "a red mug, bouncing");
- a hub or local text-to-video pipeline folder (model_index.json with a `UNet3DConditionModel` unet, a
  `CLIPTextModel`, its tokenizer, a scheduler and, for latent models, a VAE), e.g.
  ``damo-vilab/text-to-video-ms-1.7b`` or ``cerspense/zeroscope_v2_576w`` once in the local Hugging Face
  cache. Latent videos are encoded frame by frame by the image VAE, as those pipelines decode them.

Everything else (noise schedule, prediction type, classifier-free guidance in one batched call, cached
prompt embeddings) is the image prior's.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from gen3d.errors import PriorNotAvailable
from gen3d.priors.diffusion import DiffusionPrior

EMBEDDED_T2V = Path(__file__).resolve().parents[1] / "assets" / "shapes-t2v"
DEFAULT_FRAMES = 16
"""Frames of a hub video model whose folder does not say (ModelScope and zeroscope train on 16)."""


class VideoDiffusionPrior(DiffusionPrior):
    """A frozen text-to-video model: ``encode([B, F, H, W, 3]) -> z [B, C, F, h, w]`` and the image prior's
    noise prediction on such z. `num_frames` is the clip length the model was trained on."""

    def __init__(self, unet, scheduler, text_encoder, tokenizer, vae=None, *, num_frames: int | None = None,
                 **kwargs) -> None:
        if not _is_video_unet(unet):
            raise PriorNotAvailable(
                f"prior {kwargs.get('model_name', '')!r} is an image model ({type(unet).__name__}); video guidance "
                f"needs a text-to-video model with a UNet3DConditionModel, e.g. the embedded gen3d/shapes-t2v"
            )
        config = unet.config
        extra = config.in_channels - config.out_channels if vae is None else 0
        self.time_channel = extra in (1, 1 + REST_CHANNELS)
        self.rest_frame = extra == 1 + REST_CHANNELS
        """The UNet also takes the object at rest (`with_rest_channels`; from `train-video-prior rest_frame=true`)."""
        self.extra_channels = extra if self.time_channel else 0
        self.rest: Tensor | None = None
        self.cameras = None
        """The clips' cameras within `seen_from` (None outside)."""
        super().__init__(unet, scheduler, text_encoder, tokenizer, vae, **kwargs)
        self.num_frames = int(num_frames or DEFAULT_FRAMES)
        self.noise_correlation = 0.0
        """α of the mixed noise the model was trained with (`mixed_noise`; 0: independent per frame, hub models)."""

    @classmethod
    def from_pretrained(cls, model: str, **kwargs) -> "VideoDiffusionPrior":
        """Load like `DiffusionPrior.from_pretrained`; the clip length comes from gen3d_prior.json when present."""
        prior = super().from_pretrained(model, **kwargs)
        from gen3d.priors.diffusion import _locate

        card = _locate(str(model), False, kwargs.get("cache_dir")) / "gen3d_prior.json"
        if card.is_file():
            info = json.loads(card.read_text())
            prior.num_frames = int(info.get("frames", prior.num_frames))
            prior.noise_correlation = float(info.get("noise_correlation", 0.0))
        return prior

    def noise(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Diffusion noise shaped like z ``[B, C, F, h, w]`` as the model was trained on it (`mixed_noise`)."""
        return mixed_noise(z.shape, self.noise_correlation, generator).to(z.device)

    def encode(self, rgb: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Clips ``[B, F, H, W, 3]`` in [0, 1] -> z ``[B, C, F, h, w]`` (differentiable)."""
        if rgb.ndim != 5 or rgb.shape[-1] != 3:
            raise ValueError(f"VideoDiffusionPrior.encode: rgb must be [B, F, H, W, 3], got {tuple(rgb.shape)}")
        B, Fr = rgb.shape[:2]
        z = super().encode(rgb.flatten(0, 1), generator)  # [B F, C, h, w]
        return z.view(B, Fr, *z.shape[1:]).transpose(1, 2)

    def decode(self, z: Tensor) -> Tensor:
        """z ``[B, C, F, h, w]`` -> clips ``[B, F, H, W, 3]`` in [0, 1]."""
        B, _, Fr = z.shape[:3]
        frames = super().decode(z.transpose(1, 2).flatten(0, 1))
        return frames.view(B, Fr, *frames.shape[1:])

    @contextmanager
    def at_rest(self, rest: Tensor | None):
        """Within: the UNet sees `rest` ``[B, H, W, 3]`` in [0, 1], the object at rest (undeformed) seen from each
        clip's camera, as its image condition (None: no image, the text-to-video model). A prior without that input
        (`rest_frame` False: hub models) ignores it."""
        if rest is not None and (rest.ndim != 4 or rest.shape[-1] != 3):
            raise ValueError(f"VideoDiffusionPrior.at_rest: rest must be [B, H, W, 3], got {tuple(rest.shape)}")
        previous = self.rest
        self.rest = None if rest is None or not self.rest_frame else super().encode(rest.detach())  # [B, C, h, w]
        try:
            yield self
        finally:
            self.rest = previous

    @contextmanager
    def seen_from(self, cameras):
        """Within: the clips are seen from `cameras` (a `Cameras` of one camera per clip; video SDS sets it). The
        learned priors (the embedded one, hub text-to-video models) take no camera and ignore it;
        `gen3d.world.oracle.ExactVideoDenoiser` with an `azimuth_window` uses it."""
        previous, self.cameras = self.cameras, cameras
        try:
            yield self
        finally:
            self.cameras = previous

    def unet_eps(self, x_t: Tensor, t: Tensor, text: Tensor) -> Tensor:
        """One UNet call as epsilon on clips x_t ``[N, C, F, h, w]``; a UNet with a time channel gets it appended,
        one with rest-frame channels the `at_rest` image (repeated over the classifier-free guidance batch)."""
        if not self.time_channel:
            return super().unet_eps(x_t, t, text)
        x = with_time_channel(x_t)
        if self.rest_frame:
            rest = self.rest
            if rest is not None:
                if x_t.shape[0] % rest.shape[0]:
                    raise ValueError(f"VideoDiffusionPrior: {x_t.shape[0]} clips for {rest.shape[0]} rest images")
                rest = rest.repeat(x_t.shape[0] // rest.shape[0], 1, 1, 1)
            x = with_rest_channels(x, rest)
        return super().unet_eps(x, t, text)

    def _abar(self, t: Tensor) -> Tensor:  # [B] -> [B, 1, 1, 1, 1]
        return self.alphas_cumprod[t.to(self.device).long()].view(-1, 1, 1, 1, 1)

    def predict_noise_perp_neg(self, *args, **kwargs):
        raise ValueError("Perp-Neg is for view-dependent image prompts; video guidance takes plain prompts")

    def __repr__(self) -> str:
        return super().__repr__().replace("DiffusionPrior(", f"VideoDiffusionPrior({self.num_frames} frames, ", 1)


def mixed_noise(shape, alpha: float, generator: torch.Generator | None = None) -> Tensor:
    """Gaussian noise ``[B, C, F, h, w]`` whose frames share a part: ``(alpha e_shared + e_f) / sqrt(1 + alpha^2)``,
    unit variance per entry, correlation alpha^2 / (1 + alpha^2) between frames (PYoCo's mixed noise, Ge et al. 2023,
    "Preserve Your Own Correlation: A Noise Prior for Video Diffusion Models"; alpha = 0 is independent noise).

    A video model trained on it sees frames that differ only where the content does, which makes their relation
    (the motion) easier to learn, and samples whose frames agree from the first step on.
    """
    device = generator.device if generator is not None else "cpu"
    own = torch.randn(tuple(shape), generator=generator, device=device)
    if not alpha:
        return own
    B, C, _, h, w = shape
    shared = torch.randn((B, C, 1, h, w), generator=generator, device=device)
    return (alpha * shared + own) / (1 + alpha * alpha) ** 0.5


def with_time_channel(x: Tensor) -> Tensor:
    """Clips ``[N, C, F, h, w]`` with one more channel holding each frame's time, from -1 (first) to 1 (last).

    The embedded video prior's UNet takes it (in_channels = out_channels + 1, like CoordConv's coordinate channels,
    Liu et al. 2018): diffusers' `UNet3DConditionModel` has no frame-position embedding, and without one a motion
    such as "bouncing" (up at the middle frames, down at the ends) cannot be told from its reverse or placed in time.
    """
    N, _, F_, h, w = x.shape
    time = torch.linspace(-1, 1, F_, device=x.device, dtype=x.dtype).view(1, 1, F_, 1, 1).expand(N, 1, F_, h, w)
    return torch.cat([x, time], 1)


REST_CHANNELS = 4
"""Input channels of the rest-frame condition: the image (3) and whether there is one (1)."""


def with_rest_channels(x: Tensor, rest: Tensor | None) -> Tensor:
    """Clips ``[N, C, F, h, w]`` with `REST_CHANNELS` more: the rest image ``[N, 3, h, w]`` in [-1, 1] on every
    frame and a channel of ones (None: zeros in all four, "no image").

    The image conditioning of image-to-video models (Stable Video Diffusion, Blattmann et al. 2023, "Stable Video
    Diffusion: Scaling Latent Video Diffusion Models to Large Datasets", concatenates the conditioning frame's latent to
    every frame's input). Here the image is the object *at rest* from the clip's camera: the first frame of a spin,
    bounce or swing, the last (full-size) frame of a growth. Given what the object looks like, what is left for the
    model to learn from a caption is how it moves; the text-only model did not learn it (see the README's 4D
    section). In 4D generation the rest image is the static stage rendered from the clip's camera.
    """
    N, _, F_, h, w = x.shape
    if rest is None:
        extra = x.new_zeros(N, REST_CHANNELS, F_, h, w)
    else:
        if tuple(rest.shape) != (N, 3, h, w):
            raise ValueError(f"with_rest_channels: rest must be [{N}, 3, {h}, {w}], got {tuple(rest.shape)}")
        extra = torch.cat([rest.to(x), x.new_ones(N, 1, h, w)], 1)[:, :, None].expand(N, REST_CHANNELS, F_, h, w)
    return torch.cat([x, extra], 1)


def _is_video_unet(unet) -> bool:
    name = getattr(unet.config, "_class_name", "") or type(unet).__name__
    return "3D" in name or "Video" in name


@torch.no_grad()
def sample_videos(prior: VideoDiffusionPrior, prompts: list[str], steps: int = 25, guidance_scale: float = 5.0,
                  frames: int | None = None, generator: torch.Generator | None = None,
                  rest: Tensor | None = None) -> Tensor:
    """Clips ``[N, F, H, W, 3]`` in [0, 1] for `prompts` by DDIM (the pictures of the README and tests); `rest`
    ``[N, H, W, 3]``: the objects at rest, for a prior that takes them (`VideoDiffusionPrior.at_rest`)."""
    from gen3d.priors.sampling import ddim

    cond = prior.encode_text(prompts)
    uncond = prior.encode_text([""]).expand_as(cond)
    shape = (len(prompts), prior.unet.config.out_channels, frames or prior.num_frames, prior.latent_size,
             prior.latent_size)
    x = mixed_noise(shape, prior.noise_correlation, generator).to(prior.device, torch.float32)

    def eps_fn(x_t: Tensor, t: Tensor) -> Tensor:
        return prior.predict_noise(x_t.to(prior.dtype), t, cond, uncond, guidance_scale).eps_guided

    with prior.at_rest(rest):
        return prior.decode(ddim(eps_fn, x, prior.alphas_cumprod, prior.num_train_timesteps, steps))

