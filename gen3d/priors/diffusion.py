"""One wrapper over a pretrained text-conditioned diffusion model, for every guidance.

`DiffusionPrior` holds the frozen diffusers/transformers components (UNet, noise scheduler, text
encoder + tokenizer, optional VAE) and offers what score distillation needs and nothing more:

- `encode` / `decode` between renders ``[B, H, W, 3]`` in [0, 1] and the UNet's input space ``z``
  (VAE latents for latent priors such as Stable Diffusion; pixels in [-1, 1] for pixel priors such
  as DeepFloyd IF stage I and gen3d's embedded Shapes-world priors);
- `add_noise`: the forward process ``x_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps`` (DDPM, Ho et al.
  2020) with ``abar_t`` = `alphas_cumprod` from the model's own scheduler config;
- `predict_noise`: an epsilon prediction with classifier-free guidance (Ho & Salimans 2022) in one
  batched UNet call, whatever the UNet was trained to predict (epsilon, v or x0; learned variance);
- `encode_text`: cached prompt embeddings.

Both kinds of prior load through `DiffusionPrior.from_pretrained`, from a local folder in diffusers
pipeline layout (``model_index.json`` + one subfolder per component) or from a hub id found in the
local Hugging Face cache. Nothing is downloaded unless ``download=True``.

Classifier-free guidance convention (diffusers): ``eps_hat = eps_u + s * (eps_c - eps_u)``.
threestudio writes ``eps_c + g * (eps_c - eps_u)``, so its ``guidance_scale`` g equals ``s - 1``
here: threestudio's DreamFusion default g = 100 is s = 101 (the difference is 1%, and gen3d's
default s = 100 is used as is).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from gen3d.errors import PriorNotAvailable

EMBEDDED_PRIORS = {
    # id -> folder inside the installed package; trained by `gen3d world train-prior`
    "gen3d/shapes-t2i": Path(__file__).resolve().parents[1] / "assets" / "shapes-t2i",
    # trained by `gen3d world train-video-prior` (a `VideoDiffusionPrior`, gen3d.priors.video)
    "gen3d/shapes-t2v": Path(__file__).resolve().parents[1] / "assets" / "shapes-t2v",
}
EMBEDDED_HINT = "the embedded Shapes-world prior (prior=gen3d/shapes-t2i, offline, CPU; prompts like \"a red mug\")"
"""How error messages name the always-available offline alternative (update in this one place)."""

REQUIRED_COMPONENTS = ("unet", "scheduler", "text_encoder", "tokenizer")
OPTIONAL_COMPONENTS = ("vae",)
LIBRARIES = ("diffusers", "transformers")
_log = logging.getLogger(__name__)
MAX_TEXT_LENGTH = 77  # CLIP's context; DeepFloyd IF's pipeline also tokenizes T5 prompts to 77

# What a hub snapshot must hold: configs, tokenizer files and safetensors weights of our components,
# without the fp16 / non-EMA duplicates many repos carry next to them.
VIEW_COMPONENTS = ("image_encoder", "feature_extractor", "cc_projection", "clip_camera_projection")
"""What view-conditioned priors (Zero123) add, so that one download fetches them too."""
_ALLOW = ["model_index.json"] + [
    f"{c}/{pattern}"
    for c in REQUIRED_COMPONENTS + OPTIONAL_COMPONENTS + VIEW_COMPONENTS
    for pattern in ("*.json", "*.txt", "*.model", "*.safetensors")
] + ["cc_projection/*.bin", "clip_camera_projection/*.bin"]  # some conversions ship the projection as .bin only
_IGNORE = ["*fp16*", "*non_ema*", "*.ckpt", "*.msgpack", "*.onnx*"]


@dataclass
class NoisePrediction:
    """Epsilon predictions for a batch of B noisy inputs, each ``[B, C, h, w]`` in float32."""

    eps_guided: Tensor  # [B, C, h, w] eps_u + s * (eps_c - eps_u)
    eps_cond: Tensor  # [B, C, h, w] with the (view-dependent) prompt
    eps_uncond: Tensor  # [B, C, h, w] with the negative / empty prompt


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """"auto" is float16 on CUDA and float32 elsewhere; names like "float16" map to torch dtypes."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"prior dtype must be 'auto' or one of {sorted(table)}, got {dtype!r}")
    return table[dtype]


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto" is CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _locate(model: str, download: bool, cache_dir: str | None) -> Path:
    """A local folder for `model` (a folder path, an embedded id or a hub id), or a one-line PriorNotAvailable."""
    if model in EMBEDDED_PRIORS:
        folder = EMBEDDED_PRIORS[model]
        if not (folder / "model_index.json").is_file():
            raise PriorNotAvailable(
                f"the embedded prior {model!r} is missing from this installation ({folder}); "
                f"rebuild it with: gen3d world {'train-video-prior' if model.endswith('t2v') else 'train-prior'}"
            )
        return folder
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise PriorNotAvailable(
            f"prior {model!r} is a file, not a folder; point prior= at a diffusers pipeline folder "
            f"(model_index.json + component subfolders) or a hub id"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(model)
    except Exception:  # HFValidationError: bad characters, too many slashes, a path, ...
        raise PriorNotAvailable(
            f"prior {model!r} is neither an existing folder nor a valid Hugging Face repo id "
            f"('namespace/name', e.g. 'stabilityai/stable-diffusion-2-1-base'); check the spelling, "
            f"or use {EMBEDDED_HINT}"
        ) from None
    try:
        folder = snapshot_download(
            model, local_files_only=not download, allow_patterns=_ALLOW, ignore_patterns=_IGNORE,
            cache_dir=cache_dir,
        )
    except Exception as exc:  # never let a hub traceback reach the user: each case has a remedy
        if not download:
            raise PriorNotAvailable(
                f"prior {model!r} is not available offline (not in the local Hugging Face cache); "
                f"fetch it with `hf download {model}` (`huggingface-cli download {model}` on older "
                f"huggingface_hub) on a machine with network, or pass download=true, "
                f"or use {EMBEDDED_HINT}"
            ) from exc
        raise PriorNotAvailable(
            f"could not download prior {model!r} ({_first_line(exc)}); check the id, your network, "
            f"HF_HUB_OFFLINE and your Hugging Face login for gated models, or use {EMBEDDED_HINT}"
        ) from exc
    return Path(folder)


def _component_class(model: str, index: dict, name: str):
    """The diffusers/transformers class model_index.json names for component `name`, or None if absent."""
    entry = index.get(name)
    if not entry or entry[0] is None or entry[1] is None:
        return None
    library, class_name = entry[0], entry[1]
    if library not in LIBRARIES:
        raise PriorNotAvailable(
            f"prior {model!r}: component '{name}' comes from library {library!r}; gen3d loads only "
            f"{' and '.join(LIBRARIES)} components"
        )
    module = __import__(library)
    cls = getattr(module, class_name, None)
    if cls is None:
        raise PriorNotAvailable(
            f"prior {model!r}: {library} {getattr(module, '__version__', '')} has no class {class_name!r} "
            f"for component '{name}'; upgrade {library}"
        )
    return cls


def _load_component(model: str, folder: Path, name: str, cls, dtype: torch.dtype):
    if not (folder / name).is_dir():
        raise PriorNotAvailable(
            f"prior {model!r} lists component '{name}' in model_index.json but has no '{name}/' subfolder "
            f"in {folder}; re-download or re-export the model"
        )
    kwargs: dict[str, Any] = {}
    if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
        kwargs = {"torch_dtype": dtype} if cls.__module__.startswith("diffusers") else {"dtype": dtype}
    try:
        return cls.from_pretrained(str(folder), subfolder=name, **kwargs)
    except Exception as exc:  # missing weights, corrupt files, config from a newer library, ...
        raise PriorNotAvailable(
            f"prior {model!r}: could not load component '{name}' ({cls.__name__}) from {folder / name}: "
            f"{_first_line(exc)}"
        ) from exc


def _freeze(module: torch.nn.Module | None) -> None:
    if module is not None:
        module.eval()
        module.requires_grad_(False)


def leading_words(text: str, n: int) -> str:
    """`text` up to the end of its `n`-th whitespace-separated word (all of it when shorter). Every word is at least
    one token, so a tokenizer that truncates to fewer than `n` tokens reads the same ids from this as from `text`,
    without tokenizing the rest (a 100,000-character prompt took seconds per view)."""
    words = 0
    for match in re.finditer(r"\S+", text):
        words += 1
        if words == n:
            return text[:match.end()]
    return text


class DiffusionPrior:
    """A frozen text-to-image diffusion model seen through the few operations score distillation needs.

    Shapes: renders are ``[B, H, W, 3]`` in [0, 1]; ``z`` and ``x_t`` are ``[B, C, h, w]`` (C = 4 latent
    channels for Stable Diffusion, 3 for pixel priors); timesteps ``t`` are ``[B]`` int64 in [0, T);
    text embeddings are ``[B, L, D]``.
    """

    extra_channels = 0
    """UNet input channels beyond the latents that a subclass appends itself (the video prior's time channel)."""

    def __init__(
        self,
        unet: torch.nn.Module,
        scheduler: Any,
        text_encoder: torch.nn.Module,
        tokenizer: Any,
        vae: torch.nn.Module | None = None,
        *,
        model_name: str = "",
        resolution: int | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "auto",
    ) -> None:
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model_name = model_name
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.scheduler, self.tokenizer = scheduler, tokenizer
        for module in (unet, vae, text_encoder):
            if module is not None:
                module.to(self.device)
                if module.dtype != self.dtype:  # from_pretrained already loaded in self.dtype
                    module.to(dtype=self.dtype)
                _freeze(module)

        in_channels = unet.config.in_channels - self.extra_channels
        if vae is None and in_channels != 3:
            raise PriorNotAvailable(
                f"prior {model_name!r}: the UNet takes {in_channels}-channel latents but there is no vae "
                f"component to encode renders; add the vae/ subfolder to the model folder"
            )
        self.is_latent = vae is not None
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        sample_size = unet.config.sample_size
        sample_size = sample_size[0] if isinstance(sample_size, (tuple, list)) else sample_size
        self.resolution = int(resolution or sample_size * self.vae_scale_factor)
        if self.resolution % self.vae_scale_factor:
            raise ValueError(
                f"prior resolution must be a multiple of the VAE factor {self.vae_scale_factor}, got {self.resolution}"
            )

        config = scheduler.config
        self.num_train_timesteps = int(config.num_train_timesteps)
        self.prediction_type = config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise PriorNotAvailable(
                f"prior {model_name!r}: unsupported prediction_type {self.prediction_type!r} "
                f"(supported: epsilon, v_prediction, sample)"
            )
        alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
        if alphas_cumprod is None:  # a non-DDPM scheduler: rebuild abar_t from the same beta config
            from diffusers import DDPMScheduler

            alphas_cumprod = DDPMScheduler.from_config(config).alphas_cumprod
        self.alphas_cumprod: Tensor = alphas_cumprod.to(self.device, torch.float32)  # [T]
        self._text_cache: dict[str, Tensor] = {}  # prompt -> [L, D]

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        model: str,
        *,
        device: str | torch.device = "cpu",
        dtype: str = "auto",
        download: bool = False,
        resolution: int | None = None,
        cache_dir: str | None = None,
    ) -> "DiffusionPrior":
        """Load a prior from a folder in diffusers pipeline layout or a hub id in the local HF cache.

        model: a folder holding ``model_index.json`` and the ``unet``, ``scheduler``, ``text_encoder``,
            ``tokenizer`` (and for latent priors ``vae``) subfolders, or a hub id such as
            ``stabilityai/stable-diffusion-2-1-base``.
        dtype: "auto" (float16 on CUDA, float32 on CPU), "float32", "float16" or "bfloat16".
        download: allow fetching a hub id that is not cached (off by default: runs stay offline).
        resolution: render size fed to the VAE (latent priors) or UNet (pixel priors); defaults to
            ``unet.config.sample_size * vae_scale_factor``.
        cache_dir: Hugging Face cache to look in (default: the usual HF_HOME / HF_HUB_CACHE).

        Raises PriorNotAvailable with a one-line remedy when the model cannot be found or loaded.
        """
        device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, device)
        folder = _locate(str(model), download, cache_dir)
        index_file = folder / "model_index.json"
        if not index_file.is_file():
            raise PriorNotAvailable(
                f"prior folder {str(folder)!r} has no model_index.json; point prior= at a diffusers "
                f"pipeline folder (model_index.json + unet/, scheduler/, text_encoder/, tokenizer/ and, for "
                f"latent models, vae/), e.g. one saved with DiffusionPipeline.save_pretrained"
            )
        try:
            index = json.loads(index_file.read_text())
        except (OSError, ValueError) as exc:
            raise PriorNotAvailable(f"prior {model!r}: cannot read {index_file}: {_first_line(exc)}") from exc
        parts: dict[str, Any] = {}
        for name in REQUIRED_COMPONENTS + OPTIONAL_COMPONENTS:
            component_cls = _component_class(model, index, name)
            if component_cls is None:
                if name in REQUIRED_COMPONENTS:
                    raise PriorNotAvailable(
                        f"prior {model!r} has no '{name}' component in {index_file}; gen3d needs "
                        f"{', '.join(REQUIRED_COMPONENTS)} (and vae for latent models)"
                    )
                continue
            parts[name] = _load_component(model, folder, name, component_cls, torch_dtype)
        return cls(**parts, model_name=str(model), resolution=resolution, device=device, dtype=torch_dtype)

    # ------------------------------------------------------------------ image <-> z
    @property
    def latent_size(self) -> int:
        """Spatial size h = w of z."""
        return self.resolution // self.vae_scale_factor

    def encode(self, rgb: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Renders ``[B, H, W, 3]`` in [0, 1] -> z ``[B, C, h, w]`` (model dtype), differentiable.

        The render is resized (bilinear) to `resolution`, mapped to [-1, 1] and, for latent priors,
        encoded as ``vae.encode(2x - 1).latent_dist.sample() * scaling_factor`` (the posterior sample
        draws from `generator`).
        """
        if rgb.ndim != 4 or rgb.shape[-1] != 3:
            raise ValueError(f"DiffusionPrior.encode: rgb must be [B, H, W, 3], got {tuple(rgb.shape)}")
        x = rgb.permute(0, 3, 1, 2).to(self.device, self.dtype)  # [B, 3, H, W]
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(x, (self.resolution, self.resolution), mode="bilinear", align_corners=False)
        x = 2.0 * x - 1.0
        if not self.is_latent:
            return x
        posterior = self.vae.encode(x).latent_dist
        return posterior.sample(generator=generator) * self.vae.config.scaling_factor  # [B, 4, h, w]

    def decode(self, z: Tensor) -> Tensor:
        """z ``[B, C, h, w]`` -> images ``[B, H, W, 3]`` in [0, 1] (for debug and validation images)."""
        z = z.to(self.device, self.dtype)
        if self.is_latent:
            x = self.vae.decode(z / self.vae.config.scaling_factor).sample
        else:
            x = z
        return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0).permute(0, 2, 3, 1)

    # ------------------------------------------------------------------ diffusion process
    def _abar(self, t: Tensor) -> Tensor:  # [B] -> [B, 1, 1, 1] float32
        return self.alphas_cumprod[t.to(self.device).long()].view(-1, 1, 1, 1)

    def add_noise(self, z: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """Forward process ``x_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps``; z, eps ``[B, C, h, w]``, t ``[B]``."""
        abar = self._abar(t).to(z.dtype)
        return abar.sqrt() * z + (1.0 - abar).sqrt() * eps

    def output_to_eps(self, output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Turn a raw UNet output ``[B, C or 2C, h, w]`` into an epsilon prediction ``[B, C, h, w]`` float32.

        Learned-variance UNets (DeepFloyd IF) output 2C channels: the first C are the prediction.
        v-prediction (Salimans & Ho 2022, v = sqrt(abar) eps - sqrt(1 - abar) x0):
        ``eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t``.
        x0-prediction: ``eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)``.
        """
        channels = x_t.shape[1]
        if output.shape[1] == 2 * channels:
            output = output[:, :channels]
        output, x_t = output.float(), x_t.float()
        if self.prediction_type == "epsilon":
            return output
        abar = self._abar(t)
        if self.prediction_type == "v_prediction":
            return abar.sqrt() * output + (1.0 - abar).sqrt() * x_t
        return (x_t - abar.sqrt() * output) / (1.0 - abar).sqrt().clamp_min(1e-8)

    def unet_eps(self, x_t: Tensor, t: Tensor, text: Tensor) -> Tensor:
        """One UNet call as epsilon: x_t ``[N, C, h, w]``, t ``[N]``, text ``[N, L, D]`` -> ``[N, C, h, w]`` float32."""
        if not (x_t.shape[0] == t.shape[0] == text.shape[0]):
            raise ValueError(
                f"DiffusionPrior: batch sizes differ: x_t {tuple(x_t.shape)}, t {tuple(t.shape)}, "
                f"text {tuple(text.shape)}"
            )
        out = self.unet(
            x_t.to(self.device, self.dtype), t.to(self.device), encoder_hidden_states=text.to(self.device, self.dtype)
        ).sample
        return self.output_to_eps(out, x_t, t)

    def predict_noise(
        self, x_t: Tensor, t: Tensor, cond: Tensor, uncond: Tensor, guidance_scale: float
    ) -> NoisePrediction:
        """Classifier-free guided epsilon in one batched UNet call on ``[x_t; x_t]``.

        ``eps_guided = eps_u + s * (eps_c - eps_u)`` with s = `guidance_scale` (diffusers convention;
        threestudio's g is s - 1). x_t ``[B, C, h, w]``, t ``[B]``, cond and uncond ``[B, L, D]``.
        Gradients flow only if the caller enables them; guidances call this under ``torch.no_grad()``.
        """
        if cond.shape != uncond.shape:
            raise ValueError(f"predict_noise: cond {tuple(cond.shape)} and uncond {tuple(uncond.shape)} differ")
        B = x_t.shape[0]
        eps = self.unet_eps(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, uncond]))  # [2B, C, h, w]
        eps_c, eps_u = eps[:B], eps[B:]
        return NoisePrediction(eps_u + guidance_scale * (eps_c - eps_u), eps_c, eps_u)

    def predict_noise_perp_neg(
        self, x_t: Tensor, t: Tensor, pos: Tensor, uncond: Tensor, neg: Tensor, neg_weights: Tensor,
        guidance_scale: float,
    ) -> NoisePrediction:
        """Perp-Neg guided epsilon (Armandpour et al. 2023, "Re-imagine the Negative Prompt Algorithm").

        One UNet call on ``(2 + K) B`` inputs: pos ``[B, L, D]``, uncond ``[B, L, D]``, K negative
        embeddings neg ``[B, K, L, D]`` with weights ``[B, K]`` (negative numbers push away).
        ``eps = eps_u + s * (e_pos + sum_i w_i perp(e_i, e_pos))`` with ``e = eps_. - eps_u`` and
        ``perp(x, y) = x - <x, y> / max(|y|^2, 1e-6) y`` per sample: only the part of a negative
        direction orthogonal to the positive one is removed, so the positive content is not cancelled.
        """
        B, K = neg.shape[:2]
        text = torch.cat([pos, uncond, neg.transpose(0, 1).reshape(K * B, *neg.shape[2:])])  # [(2+K)B, L, D]
        eps = self.unet_eps(x_t.repeat(2 + K, 1, 1, 1), t.repeat(2 + K), text)
        eps_pos, eps_u, eps_neg = eps[:B], eps[B:2 * B], eps[2 * B:].view(K, B, *eps.shape[1:])
        e_pos = eps_pos - eps_u  # [B, C, h, w]
        direction = e_pos.clone()
        norm2 = e_pos.flatten(1).pow(2).sum(1).clamp_min(1e-6).view(-1, 1, 1, 1)  # [B, 1, 1, 1]
        for k in range(K):
            e_k = eps_neg[k] - eps_u
            proj = (e_k * e_pos).flatten(1).sum(1).view(-1, 1, 1, 1) / norm2
            direction = direction + neg_weights[:, k].view(-1, 1, 1, 1).float() * (e_k - proj * e_pos)
        return NoisePrediction(eps_u + guidance_scale * direction, eps_pos, eps_u)

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> Tensor:
        """Prompt embeddings ``[P, L, D]`` (model dtype), each prompt string encoded once and cached."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        if missing:
            max_length = min(int(getattr(self.tokenizer, "model_max_length", MAX_TEXT_LENGTH)), MAX_TEXT_LENGTH)
            heads = [leading_words(p, max_length + 1) for p in missing]
            tokens = self.tokenizer(
                heads, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
            )
            for prompt, head, used in zip(missing, heads, tokens.attention_mask.sum(1).tolist()):
                if used >= max_length and len(
                        self.tokenizer(head, truncation=True, max_length=max_length + 1).input_ids) > max_length:
                    _log.warning(f"warning: the prompt {prompt[:60]!r}{'...' if len(prompt) > 60 else ''} is longer "
                                 f"than the {max_length} tokens {self.model_name} reads; the rest is ignored")
            config = self.text_encoder.config
            use_mask = getattr(config, "use_attention_mask", False) or getattr(config, "model_type", "") == "t5"
            mask = tokens.attention_mask.to(self.device) if use_mask else None
            hidden = self.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0]  # [P', L, D]
            for prompt, emb in zip(missing, hidden.to(self.dtype)):
                self._text_cache[prompt] = emb
        return torch.stack([self._text_cache[p] for p in prompts])

    def __repr__(self) -> str:
        kind = "latent" if self.is_latent else "pixel"
        return (
            f"DiffusionPrior({self.model_name!r}, {kind}, resolution={self.resolution}, "
            f"T={self.num_train_timesteps}, {self.prediction_type}, {self.device}, {self.dtype})"
        )

