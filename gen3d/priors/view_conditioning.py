"""A view-conditioned diffusion prior in the style of Zero-1-to-3 (Liu et al., 2023, "Zero-1-to-3:
Zero-shot One Image to 3D Object").

Zero-1-to-3 denoises a novel view x of an object given one input view c of it and the relative
camera between them. The input view enters the UNet twice:

- on channels: the UNet input is ``[x_t ‖ c]`` (Zero123 concatenates the VAE latent of c);
- through cross-attention: Zero123 maps ``[CLIP image embedding of c ‖ pose]`` to one token with a
  linear layer (``cc_projection``), the pose being ``(Δθ polar, sin Δφ, cos Δφ, Δr)``.

Classifier-free guidance (Ho & Salimans, 2022) uses an unconditional branch with the concatenated
view and the tokens set to zero: ``eps_hat = eps_u + s (eps_c - eps_u)``, Zero123's default s = 3.

gen3d's version is the same model shrunk to the Shapes world (the embedded ``gen3d/shapes-zero123``,
trained by ``gen3d world train-view-prior``). Deliberate differences from Zero123:

- pixel space at 32x32 (x and c in [-1, 1], so the UNet takes 6 channels), no VAE;
- the image encoder is a tiny `CLIPVisionModelWithProjection` trained from scratch with the UNet
  (Zero123 keeps a pretrained CLIP ViT-L/14 frozen); it takes the view in [-1, 1] without CLIP's
  mean/std normalization;
- the pose is ``(Δelevation in radians, sin Δazimuth, cos Δazimuth, Δdistance)``: Zero123's polar
  Δθ is ``-Δelevation``;
- `CameraProjection` builds the cross-attention tokens in one of two layouts (``tokens`` in its
  config): ``"single"`` is Zero123's one token ``Linear([image embedding ‖ pose])``; ``"patches"``
  is ``[image embedding + MLP(pose), the 16 patch tokens]``. See `gen3d.world.train_view_prior`
  for which one the shipped model uses and why;
- optionally (a UNet config with ``class_embed_type="projection"``) the pose is also added to the
  timestep embedding, as MVDream does with its camera; `view_unet` passes it when the UNet has one.

A model is a folder in diffusers pipeline layout::

    model_index.json   unet, scheduler, image_encoder, cc_projection
    unet/              UNet2DConditionModel   (in_channels 6 = noisy view ‖ input view, out 3)
    scheduler/         DDPMScheduler          (epsilon prediction)
    image_encoder/     CLIPVisionModelWithProjection
    cc_projection/     CameraProjection       (listed as ["gen3d.priors.view_conditioning", "CameraProjection"])

Shapes: images ``[B, H, W, 3]`` in [0, 1]; ``x`` and ``x_t`` ``[B, 3, h, w]`` in the UNet's pixel
space [-1, 1]; poses ``[B, 4]``; tokens ``[B, L, D]``.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from gen3d.errors import PriorNotAvailable
from gen3d.priors.diffusion import (
    EMBEDDED_HINT,
    NoisePrediction,
    _component_class,
    _first_line,
    _freeze,
    _load_component,
    _locate,
    resolve_device,
    resolve_dtype,
)

EMBEDDED_VIEW_PRIORS = {
    # id -> folder inside the installed package; trained by `gen3d world train-view-prior`
    "gen3d/shapes-zero123": Path(__file__).resolve().parents[1] / "assets" / "shapes-zero123",
}
VIEW_HINT = "the embedded view-conditioned Shapes-world prior (gen3d/shapes-zero123, offline, CPU)"
REQUIRED_COMPONENTS = ("unet", "scheduler", "image_encoder", "cc_projection")
PROJECTION_MODULES = ("gen3d.priors.view_conditioning",)
"""Modules a model_index.json may name for cc_projection (never import arbitrary modules from a file)."""
TOKEN_LAYOUTS = ("single", "patches")


def locate_view_prior(model: str, download: bool, cache_dir: str | None) -> Path:
    """The local folder of a view-conditioned prior (`gen3d.priors.diffusion._locate`), its errors naming the
    embedded view prior, not the text one, as the offline alternative."""
    try:
        return _locate(model, download, cache_dir)
    except PriorNotAvailable as exc:
        raise PriorNotAvailable(str(exc).replace(EMBEDDED_HINT, VIEW_HINT)) from exc.__cause__


def relative_pose(elev_in, azim_in, dist_in, elev_out, azim_out, dist_out) -> Tensor:
    """Relative camera from an input view to an output view, ``[B, 4]`` float32.

    Inputs are numbers or tensors broadcastable to ``[B]`` (a 0-d input gives B = 1): elevations and
    azimuths in degrees (`gen3d.cameras` convention), distances in world units. Returns per row
    ``(Δe, sin Δa, cos Δa, Δd)`` with ``Δe = radians(elev_out - elev_in)``,
    ``Δa = radians(azim_out - azim_in)`` and ``Δd = dist_out - dist_in``: periodic in azimuth,
    zero-elevation / unit-cosine / zero-distance for the identity. This is Zero-1-to-3's
    ``(Δθ, sin Δφ, cos Δφ, Δr)`` except that Zero123's Δθ is the change of the polar angle, -Δe.
    """
    values = [torch.as_tensor(v, dtype=torch.float32) for v in (elev_in, azim_in, dist_in, elev_out, azim_out, dist_out)]
    e0, a0, d0, e1, a1, d1 = (v.reshape(-1) for v in torch.broadcast_tensors(*values))
    d_azim = torch.deg2rad(a1 - a0)
    return torch.stack([torch.deg2rad(e1 - e0), torch.sin(d_azim), torch.cos(d_azim), d1 - d0], -1)  # [B, 4]


class CameraProjection(ModelMixin, ConfigMixin):
    """Cross-attention tokens from an image embedding and a relative pose (Zero123's ``cc_projection``).

    tokens="single": Zero-1-to-3's one token ``Linear([image_embeds ‖ pose])`` ``[B, 1, token_dim]``,
        initialized as Zero123 does: identity on the image part (when the widths agree), zero on the pose.
    tokens="patches": ``[image_embeds + MLP(pose), Linear(LayerNorm(patch))...]`` ``[B, 1 + P, token_dim]``:
        the pose token rides on the global image token and the patch tokens keep spatial detail.
    """

    @register_to_config
    def __init__(self, image_dim: int = 64, patch_dim: int = 64, pose_dim: int = 4, token_dim: int = 64,
                 hidden_dim: int = 128, tokens: str = "single"):
        super().__init__()
        if tokens not in TOKEN_LAYOUTS:
            raise ValueError(f"CameraProjection: tokens must be one of {TOKEN_LAYOUTS}, got {tokens!r}")
        if tokens == "single":
            self.proj = nn.Linear(image_dim + pose_dim, token_dim)
            with torch.no_grad():
                self.proj.weight.zero_()
                self.proj.bias.zero_()
                if image_dim == token_dim:
                    self.proj.weight[:, :image_dim].copy_(torch.eye(token_dim))
                else:
                    nn.init.xavier_uniform_(self.proj.weight[:, :image_dim])
        else:
            if image_dim != token_dim:
                raise ValueError(
                    f"CameraProjection(tokens='patches'): image_dim {image_dim} must equal token_dim {token_dim}"
                )
            self.pose_mlp = nn.Sequential(nn.Linear(pose_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, token_dim))
            self.patch_proj = nn.Sequential(nn.LayerNorm(patch_dim), nn.Linear(patch_dim, token_dim))

    def forward(self, image_embeds: Tensor, pose: Tensor, patch_tokens: Tensor | None = None) -> Tensor:
        """image_embeds ``[B, image_dim]``, pose ``[B, 4]``, patch_tokens ``[B, P, patch_dim]`` -> ``[B, L, token_dim]``."""
        pose = pose.to(image_embeds.dtype)
        if self.config.tokens == "single":
            return self.proj(torch.cat([image_embeds, pose], -1))[:, None]  # [B, 1, D]
        if patch_tokens is None:
            raise ValueError("CameraProjection(tokens='patches') needs patch_tokens")
        first = image_embeds + self.pose_mlp(pose)  # [B, D]
        return torch.cat([first[:, None], self.patch_proj(patch_tokens)], 1)  # [B, 1 + P, D]


def encode_view(image_encoder: nn.Module, cc_projection: CameraProjection, x: Tensor,
                pose: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The conditioning path shared by training and inference.

    x ``[B, 3, h, w]`` in [-1, 1], pose ``[B, 4]`` -> (image_embeds ``[B, Di]``, patch tokens ``[B, P, Dp]``,
    cross-attention tokens ``[B, L, D]``).
    """
    out = image_encoder(pixel_values=x)
    patches = out.last_hidden_state[:, 1:]  # [B, P, Dp] without the CLS token
    return out.image_embeds, patches, cc_projection(out.image_embeds, pose, patches)


def view_unet(unet: nn.Module, x_t: Tensor, t: Tensor, view: Tensor, tokens: Tensor, pose: Tensor) -> Tensor:
    """One UNet call: x_t and view ``[B, 3, h, w]``, t ``[B]``, tokens ``[B, L, D]``, pose ``[B, 4]`` -> ``[B, 3, h, w]``.

    A dropped condition is a zero view, zero tokens and a zero pose. UNets built with
    ``class_embed_type="projection"`` also get the pose added to their timestep embedding.
    """
    class_labels = pose if unet.config.class_embed_type is not None else None
    return unet(torch.cat([x_t, view], 1), t, encoder_hidden_states=tokens, class_labels=class_labels).sample


@dataclass
class Condition:
    """An encoded input view with its relative poses, ready for `ViewConditionedPrior.predict_noise`.

    Compute it once per input image and pose batch; `ViewConditionedPrior.repose` swaps the poses
    without re-encoding the image.
    """

    image: Tensor  # [B, 3, h, w] input view in [-1, 1], concatenated to x_t
    image_embeds: Tensor  # [B, Di] projected CLS embedding
    patch_tokens: Tensor  # [B, P, Dp] image encoder patch states
    pose: Tensor  # [B, 4] relative pose (see `relative_pose`)
    tokens: Tensor  # [B, L, D] cross-attention tokens

    def __len__(self) -> int:
        return self.image.shape[0]

    def expand(self, batch_size: int) -> "Condition":
        """A condition of one input view repeated `batch_size` times (views, no copies)."""
        if len(self) != 1:
            raise ValueError(f"Condition.expand: needs a condition of 1 view, got {len(self)}")
        B = batch_size
        return Condition(self.image.expand(B, -1, -1, -1), self.image_embeds.expand(B, -1),
                         self.patch_tokens.expand(B, -1, -1), self.pose.expand(B, -1), self.tokens.expand(B, -1, -1))


def _projection_class(model: str, index: dict):
    entry = index.get("cc_projection")
    if not entry or entry[0] is None or entry[1] is None:
        return None
    module_name, class_name = entry
    if module_name not in PROJECTION_MODULES:
        raise PriorNotAvailable(
            f"prior {model!r}: component 'cc_projection' comes from {module_name!r}; gen3d loads it only from "
            f"{', '.join(PROJECTION_MODULES)}"
        )
    cls = getattr(importlib.import_module(module_name), class_name, None)
    if cls is None:
        raise PriorNotAvailable(f"prior {model!r}: {module_name} has no class {class_name!r} for component 'cc_projection'")
    return cls


class ViewConditionedPrior:
    """A frozen Zero123-style prior: epsilon of a novel view given an input view and a relative camera.

    Pixel space only: the UNet takes ``[x_t ‖ input view]`` (2 x 3 channels) at `resolution`.
    """

    def __init__(self, unet: nn.Module, scheduler: Any, image_encoder: nn.Module, cc_projection: CameraProjection,
                 *, model_name: str = "", device: str | torch.device = "cpu", dtype: str | torch.dtype = "auto"):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model_name = model_name
        self.unet, self.image_encoder, self.cc_projection, self.scheduler = unet, image_encoder, cc_projection, scheduler
        for module in (unet, image_encoder, cc_projection):
            module.to(self.device)
            if module.dtype != self.dtype:
                module.to(dtype=self.dtype)
            _freeze(module)
        channels = unet.config.out_channels
        if unet.config.in_channels != 2 * channels:
            raise PriorNotAvailable(
                f"prior {model_name!r}: a view-conditioned pixel UNet takes 2 x {channels} channels (noisy view ‖ "
                f"input view), this one takes {unet.config.in_channels}; latent Zero123 models are not supported"
            )
        token_dim, cross_dim = cc_projection.config.token_dim, unet.config.cross_attention_dim
        if token_dim != cross_dim:
            raise PriorNotAvailable(
                f"prior {model_name!r}: cc_projection makes {token_dim}-d tokens but the UNet attends to {cross_dim}-d ones"
            )
        sample_size = unet.config.sample_size
        self.resolution = int(sample_size[0] if isinstance(sample_size, (tuple, list)) else sample_size)
        config = scheduler.config
        self.num_train_timesteps = int(config.num_train_timesteps)
        if config.get("prediction_type", "epsilon") != "epsilon":
            raise PriorNotAvailable(
                f"prior {model_name!r}: prediction_type {config.get('prediction_type')!r}; view-conditioned "
                f"priors must predict epsilon"
            )
        alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
        if alphas_cumprod is None:
            from diffusers import DDPMScheduler

            alphas_cumprod = DDPMScheduler.from_config(config).alphas_cumprod
        self.alphas_cumprod: Tensor = alphas_cumprod.to(self.device, torch.float32)  # [T]

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, model: str, *, device: str | torch.device = "cpu", dtype: str = "auto",
                        download: bool = False, cache_dir: str | None = None) -> ViewConditionedPrior:
        """Load ``gen3d/shapes-zero123`` (embedded) or a folder with the layout in the module docstring.

        Raises PriorNotAvailable with a one-line remedy when the model cannot be found or loaded.
        """
        device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, device)
        model = str(model)
        if model in EMBEDDED_VIEW_PRIORS:
            folder = EMBEDDED_VIEW_PRIORS[model]
            if not (folder / "model_index.json").is_file():
                raise PriorNotAvailable(
                    f"the embedded prior {model!r} is missing from this installation ({folder}); "
                    f"rebuild it with: gen3d world train-view-prior"
                )
        else:
            folder = locate_view_prior(model, download, cache_dir)
        index_file = folder / "model_index.json"
        if not index_file.is_file():
            raise PriorNotAvailable(
                f"prior folder {str(folder)!r} has no model_index.json; point it at a view-conditioned prior "
                f"folder (model_index.json + {'/, '.join(REQUIRED_COMPONENTS)}/), e.g. one written by "
                f"gen3d world train-view-prior"
            )
        try:
            index = json.loads(index_file.read_text())
        except (OSError, ValueError) as exc:
            raise PriorNotAvailable(f"prior {model!r}: cannot read {index_file}: {_first_line(exc)}") from exc
        parts: dict[str, Any] = {}
        for name in REQUIRED_COMPONENTS:
            if name == "cc_projection":
                component_cls = _projection_class(model, index)
            else:
                component_cls = _component_class(model, index, name)
            if component_cls is None:
                raise PriorNotAvailable(
                    f"prior {model!r} has no '{name}' component in {index_file}; a view-conditioned prior needs "
                    f"{', '.join(REQUIRED_COMPONENTS)}"
                )
            parts[name] = _load_component(model, folder, name, component_cls, torch_dtype)
        return cls(**parts, model_name=model, device=device, dtype=torch_dtype)

    # ------------------------------------------------------------------ image <-> x
    @property
    def latent_size(self) -> int:
        """Spatial size h = w of x (pixel space: the resolution)."""
        return self.resolution

    def encode(self, rgb: Tensor) -> Tensor:
        """Images ``[B, H, W, 3]`` in [0, 1] -> x ``[B, 3, h, w]`` in [-1, 1] (bilinear resize), differentiable."""
        if rgb.ndim != 4 or rgb.shape[-1] != 3:
            raise ValueError(f"ViewConditionedPrior.encode: rgb must be [B, H, W, 3], got {tuple(rgb.shape)}")
        x = rgb.permute(0, 3, 1, 2).to(self.device, self.dtype)  # [B, 3, H, W]
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(x, (self.resolution, self.resolution), mode="bilinear", align_corners=False)
        return 2.0 * x - 1.0

    def decode(self, x: Tensor) -> Tensor:
        """x ``[B, 3, h, w]`` -> images ``[B, h, w, 3]`` in [0, 1] (float32)."""
        return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0).permute(0, 2, 3, 1)

    # ------------------------------------------------------------------ diffusion process
    def add_noise(self, x: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """Forward process ``x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps``; x, eps ``[B, 3, h, w]``, t ``[B]``."""
        abar = self.alphas_cumprod[t.to(self.device).long()].view(-1, 1, 1, 1).to(x.dtype)
        return abar.sqrt() * x + (1.0 - abar).sqrt() * eps

    # ------------------------------------------------------------------ conditioning
    def encode_condition(self, image: Tensor, pose: Tensor) -> Condition:
        """Input views ``[B, H, W, 3]`` in [0, 1] and relative poses ``[B, 4]`` (`relative_pose`) -> `Condition`.

        A single image with B poses is broadcast. Gradients flow if the caller enables them.
        """
        if pose.ndim != 2 or pose.shape[-1] != 4:
            raise ValueError(f"encode_condition: pose must be [B, 4], got {tuple(pose.shape)}")
        x = self.encode(image)  # [B or 1, 3, h, w]
        if x.shape[0] == 1 and pose.shape[0] > 1:
            x = x.expand(pose.shape[0], -1, -1, -1)
        if x.shape[0] != pose.shape[0]:
            raise ValueError(f"encode_condition: {x.shape[0]} images but {pose.shape[0]} poses")
        pose = pose.to(self.device, self.dtype)
        embeds, patches, tokens = encode_view(self.image_encoder, self.cc_projection, x, pose)
        return Condition(x, embeds, patches, pose, tokens)

    def repose(self, condition: Condition, pose: Tensor) -> Condition:
        """The same input views with new relative poses ``[B, 4]`` (only cc_projection runs again)."""
        if pose.shape != condition.pose.shape:
            raise ValueError(f"repose: pose must be {tuple(condition.pose.shape)}, got {tuple(pose.shape)}")
        pose = pose.to(self.device, self.dtype)
        tokens = self.cc_projection(condition.image_embeds, pose, condition.patch_tokens)
        return replace(condition, pose=pose, tokens=tokens)

    def predict_noise(self, x_t: Tensor, t: Tensor, condition: Condition, guidance_scale: float = 3.0) -> NoisePrediction:
        """Classifier-free guided epsilon in one batched UNet call (Zero-1-to-3, Ho & Salimans 2022).

        ``eps_guided = eps_u + s * (eps_c - eps_u)``, s = `guidance_scale`; eps_c sees ``[x_t ‖ view]`` and
        the condition's tokens (and pose), eps_u sees ``[x_t ‖ 0]``, zero tokens and a zero pose (how the
        prior was trained to drop its condition). x_t ``[B, 3, h, w]``, t ``[B]``, condition of batch B (or 1, broadcast).
        """
        B = x_t.shape[0]
        image, tokens = condition.image, condition.tokens
        if len(condition) == 1 and B > 1:
            image, tokens = image.expand(B, -1, -1, -1), tokens.expand(B, -1, -1)
        if not (image.shape[0] == t.shape[0] == B):
            raise ValueError(
                f"ViewConditionedPrior: batch sizes differ: x_t {tuple(x_t.shape)}, t {tuple(t.shape)}, "
                f"condition of {len(condition)}"
            )
        pose = condition.pose.expand(B, -1) if len(condition) == 1 else condition.pose
        x_t = x_t.to(self.device, self.dtype)
        eps = view_unet(
            self.unet, torch.cat([x_t, x_t]), torch.cat([t, t]).to(self.device),
            torch.cat([image, torch.zeros_like(image)]),  # [2B, 3, h, w]
            torch.cat([tokens, torch.zeros_like(tokens)]),  # [2B, L, D]
            torch.cat([pose, torch.zeros_like(pose)]),  # [2B, 4]
        ).float()
        eps_c, eps_u = eps[:B], eps[B:]
        return NoisePrediction(eps_u + guidance_scale * (eps_c - eps_u), eps_c, eps_u)

    def __repr__(self) -> str:
        layout = self.cc_projection.config.tokens
        return (f"ViewConditionedPrior({self.model_name!r}, pixel, resolution={self.resolution}, "
                f"T={self.num_train_timesteps}, tokens={layout}, {self.device}, {self.dtype})")
