"""Real Zero-1-to-3 checkpoints (latent, Stable-Diffusion based) in diffusers format.

Zero-1-to-3 (Liu et al. 2023) fine-tunes Stable Diffusion's UNet to denoise a novel view's VAE latent
given the input view twice over (the same structure as gen3d's pixel-space embedded prior,
`gen3d.priors.view_conditioning`, at full size):

- on channels: ``[x_t ‖ c_concat]``, 4 + 4 channels, where ``c_concat`` is the VAE's posterior mode
  of the input view *without* the latent scaling factor (as Zero123's code conditions on it);
- through cross-attention: one token ``cc_projection([CLIP image embedding (768) ‖ pose (4)])`` (a
  772 -> 768 linear layer), pose = ``(Δpolar [rad], sin Δazimuth, cos Δazimuth, Δradius)``.

CFG zeroes both the token and the concatenated latent for the unconditional branch. Zero123's polar
angle grows downward, so ``Δpolar = -Δelevation`` of gen3d's convention (`relative_pose`).

The layouts of the public conversions (Zero123, Zero123-XL, Stable-Zero123: e.g. ``bennyguo/zero123-xl-diffusers``
used by threestudio, ``ashawkey/zero123-xl-diffusers`` by DreamGaussian, ``kxic/zero123-xl``) differ in
what they call the projection (``cc_projection`` or ``clip_camera_projection``) and its weight names
(``projection.*`` or ``proj.*``); `LatentZero123Prior.from_pretrained` reads either into a plain
``nn.Linear`` from the safetensors or bin file, without importing any custom pipeline code. It
shares `ViewConditionedPrior`'s interface, so `gen3d.guidance.zero123.Zero123Guidance` takes both;
`load_view_prior` picks the class from the folder. Not verified here: no real checkpoint is available
offline (tests build tiny random models in this layout).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gen3d.errors import PriorNotAvailable
from gen3d.priors.diffusion import NoisePrediction, _component_class, _first_line, _freeze, _load_component, \
    resolve_device, resolve_dtype
from gen3d.priors.view_conditioning import Condition, locate_view_prior

__all__ = ["LatentZero123Prior", "load_view_prior"]

PROJECTION_FOLDERS = ("cc_projection", "clip_camera_projection")
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _load_projection(model: str, folder: Path, dtype: torch.dtype) -> nn.Linear:
    """The 772 -> 768 camera projection of a Zero123 folder as an nn.Linear (either naming)."""
    from safetensors.torch import load_file

    for name in PROJECTION_FOLDERS:
        sub = folder / name
        files = sorted(sub.glob("*.safetensors")) or sorted(sub.glob("*.bin"))
        if not files:
            continue
        try:
            state = load_file(str(files[0])) if files[0].suffix == ".safetensors" else \
                torch.load(files[0], map_location="cpu", weights_only=True)
        except Exception as exc:
            raise PriorNotAvailable(f"prior {model!r}: cannot read {files[0]}: {_first_line(exc)}") from exc
        weight = next((v for k, v in state.items() if k.endswith("weight")), None)
        bias = next((v for k, v in state.items() if k.endswith("bias")), None)
        if weight is None or weight.dim() != 2:
            raise PriorNotAvailable(f"prior {model!r}: {files[0]} holds no linear projection weight")
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
        return linear.to(dtype)
    raise PriorNotAvailable(f"prior {model!r} has no camera projection ({' or '.join(PROJECTION_FOLDERS)}/ with "
                            f"weights) in {folder}")


class LatentZero123Prior:
    """A frozen latent Zero123: epsilon of a novel view's latent given an input view and a relative camera."""

    def __init__(self, unet: nn.Module, vae: nn.Module, image_encoder: nn.Module, projection: nn.Linear,
                 scheduler: Any, *, image_mean=CLIP_MEAN, image_std=CLIP_STD, clip_size: int = 224,
                 model_name: str = "", device: str | torch.device = "cpu", dtype: str | torch.dtype = "auto"):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model_name = model_name
        self.unet, self.vae, self.image_encoder, self.projection, self.scheduler = unet, vae, image_encoder, projection, scheduler
        for module in (unet, vae, image_encoder, projection):
            module.to(self.device, self.dtype)
            _freeze(module)
        latent = unet.config.out_channels
        if unet.config.in_channels != 2 * latent or vae.config.latent_channels != latent:
            raise PriorNotAvailable(f"prior {model_name!r}: a latent Zero123 UNet takes 2 x {latent} channels (noisy latent ‖ "
                                    f"input latent), this one takes {unet.config.in_channels}")
        cross = unet.config.cross_attention_dim
        if projection.out_features != cross:
            raise PriorNotAvailable(f"prior {model_name!r}: the camera projection makes {projection.out_features}-d tokens but "
                                    f"the UNet attends to {cross}-d ones")
        if scheduler.config.get("prediction_type", "epsilon") != "epsilon":
            raise PriorNotAvailable(f"prior {model_name!r}: prediction_type {scheduler.config.get('prediction_type')!r}; "
                                    "Zero123 priors predict epsilon")
        self.scaling = float(getattr(vae.config, "scaling_factor", 0.18215))
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)
        sample = unet.config.sample_size
        self.resolution = int(sample[0] if isinstance(sample, (list, tuple)) else sample) * self.downsample
        self.mean = torch.tensor(image_mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(image_std, device=self.device).view(1, 3, 1, 1)
        self.clip_size = clip_size
        from diffusers import DDPMScheduler

        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.alphas_cumprod = DDPMScheduler.from_config(scheduler.config).alphas_cumprod.to(self.device, torch.float32)

    @classmethod
    def from_pretrained(cls, model: str, *, device: str | torch.device = "cpu", dtype: str = "auto",
                        download: bool = False, cache_dir: str | None = None) -> "LatentZero123Prior":
        """Load a Zero123 diffusers folder or hub id (see the module docstring for the layouts it reads)."""
        device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, device)
        folder = locate_view_prior(str(model), download, cache_dir)
        index = json.loads((folder / "model_index.json").read_text()) if (folder / "model_index.json").is_file() else {}
        parts = {}
        for name in ("unet", "vae", "image_encoder", "scheduler"):
            component = _component_class(model, index, name)
            if component is None:
                raise PriorNotAvailable(f"prior {model!r} has no '{name}' component in {folder / 'model_index.json'}; "
                                        "a latent Zero123 needs unet, vae, image_encoder, scheduler and a camera projection")
            parts[name] = _load_component(model, folder, name, component, torch_dtype)
        extractor = folder / "feature_extractor" / "preprocessor_config.json"
        clip = {}
        if extractor.is_file():
            config = json.loads(extractor.read_text())
            size = config.get("crop_size") or config.get("size") or 224
            clip = {"image_mean": tuple(config.get("image_mean", CLIP_MEAN)), "image_std": tuple(config.get("image_std", CLIP_STD)),
                    "clip_size": int(size.get("height", size.get("shortest_edge", 224)) if isinstance(size, dict) else size)}
        return cls(parts["unet"], parts["vae"], parts["image_encoder"], _load_projection(model, folder, torch_dtype),
                   parts["scheduler"], model_name=str(model), device=device, dtype=torch_dtype, **clip)

    @property
    def latent_size(self) -> int:
        return self.resolution // self.downsample

    def _pixels(self, rgb: Tensor) -> Tensor:
        """Images [B, H, W, 3] in [0, 1] -> [B, 3, R, R] in [-1, 1] at the model's resolution."""
        if rgb.ndim != 4 or rgb.shape[-1] != 3:
            raise ValueError(f"LatentZero123Prior: images must be [B, H, W, 3], got {tuple(rgb.shape)}")
        x = rgb.permute(0, 3, 1, 2).to(self.device, self.dtype)
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(x, (self.resolution, self.resolution), mode="bilinear", align_corners=False)
        return 2.0 * x - 1.0

    def encode(self, rgb: Tensor) -> Tensor:
        """Renders [B, H, W, 3] -> scaled VAE latents [B, 4, h, w] (the posterior mean), differentiable."""
        return self.vae.encode(self._pixels(rgb)).latent_dist.mean * self.scaling

    def add_noise(self, z: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        abar = self.alphas_cumprod[t.to(self.device).long()].view(-1, 1, 1, 1).to(z.dtype)
        return abar.sqrt() * z + (1.0 - abar).sqrt() * eps

    @staticmethod
    def zero123_pose(pose: Tensor) -> Tensor:
        """gen3d's relative pose (Δelevation, sin, cos, Δdistance) -> Zero123's (Δpolar = -Δelevation, sin, cos, Δradius)."""
        return torch.cat([-pose[:, :1], pose[:, 1:]], 1)

    def encode_condition(self, image: Tensor, pose: Tensor) -> Condition:
        """Input views [B or 1, H, W, 3] and relative poses [B, 4] -> `Condition` (CLIP embedding, latent, token)."""
        x = self._pixels(image)
        clip = F.interpolate((x + 1.0) / 2.0, (self.clip_size, self.clip_size), mode="bicubic", align_corners=False)
        embeds = self.image_encoder(pixel_values=((clip - self.mean) / self.std).to(self.dtype)).image_embeds  # [B, 768]
        latent = self.vae.encode(x).latent_dist.mode()  # unscaled, as Zero123 concatenates it
        if latent.shape[0] == 1 and pose.shape[0] > 1:
            latent, embeds = latent.expand(pose.shape[0], -1, -1, -1), embeds.expand(pose.shape[0], -1)
        pose = pose.to(self.device, self.dtype)
        tokens = self.projection(torch.cat([embeds, self.zero123_pose(pose)], -1))[:, None]
        return Condition(latent, embeds, embeds.new_zeros(embeds.shape[0], 0, embeds.shape[1]), pose, tokens)

    def repose(self, condition: Condition, pose: Tensor) -> Condition:
        pose = pose.to(self.device, self.dtype)
        tokens = self.projection(torch.cat([condition.image_embeds, self.zero123_pose(pose)], -1))[:, None]
        return replace(condition, pose=pose, tokens=tokens)

    def predict_noise(self, x_t: Tensor, t: Tensor, condition: Condition, guidance_scale: float = 3.0) -> NoisePrediction:
        """CFG epsilon, conditional and unconditional (zero token, zero latent) in one batched UNet call."""
        B = x_t.shape[0]
        latent, tokens = condition.image, condition.tokens
        if len(condition) == 1 and B > 1:
            latent, tokens = latent.expand(B, -1, -1, -1), tokens.expand(B, -1, -1)
        x = torch.cat([x_t, x_t]).to(self.device, self.dtype)
        cond = torch.cat([latent, torch.zeros_like(latent)])
        eps = self.unet(torch.cat([x, cond], 1), torch.cat([t, t]).to(self.device),
                        encoder_hidden_states=torch.cat([tokens, torch.zeros_like(tokens)])).sample.float()
        eps_c, eps_u = eps[:B], eps[B:]
        return NoisePrediction(eps_u + guidance_scale * (eps_c - eps_u), eps_c, eps_u)

    def __repr__(self) -> str:
        return (f"LatentZero123Prior({self.model_name!r}, latent, resolution={self.resolution}, "
                f"T={self.num_train_timesteps}, {self.device}, {self.dtype})")


def load_view_prior(model: str, *, device: str | torch.device = "cpu", dtype: str = "auto", download: bool = False):
    """The view-conditioned prior `model` names: gen3d's pixel-space kind (the embedded one) or a latent Zero123."""
    from gen3d.priors.view_conditioning import EMBEDDED_VIEW_PRIORS, ViewConditionedPrior

    if model in EMBEDDED_VIEW_PRIORS:
        return ViewConditionedPrior.from_pretrained(model, device=device, dtype=dtype, download=download)
    folder = locate_view_prior(str(model), download, None)
    index = folder / "model_index.json"
    has_vae = index.is_file() and "vae" in json.loads(index.read_text())
    unet_config = folder / "unet" / "config.json"
    channels = json.loads(unet_config.read_text()).get("out_channels", 3) if unet_config.is_file() else 3
    if not has_vae and channels != 3:  # images are RGB: a UNet on other channels denoises latents
        raise PriorNotAvailable(f"prior {model!r}: its UNet denoises {channels}-channel latents (a latent Zero123) but "
                                f"model_index.json lists no 'vae' component to encode images; re-download or "
                                f"re-export the model with its vae/")
    cls = LatentZero123Prior if has_vae else ViewConditionedPrior
    return cls.from_pretrained(model, device=device, dtype=dtype, download=download)
