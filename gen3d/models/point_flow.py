"""A text-conditioned velocity model over sets of colored points: the latent of gen3d's few-step 3D generator.

The latent is a set of N points on an object's surface, each ``[xyz ‖ rgb]`` (rgb mapped to [-1, 1]). Measured by
``benchmarks/bench_latents.py`` at an equal budget of 16,384 floats, a point set is closer to the exact surface of
the Shapes-world objects than a 16³ grid of signed distance and color (Chamfer 0.0052 against 0.019, F-score 0.69
against 0.42, color error 0.004 against 0.025), and two of the 32 objects measured vanish from the grid entirely.

The network is a diffusion transformer over the set (Peebles & Xie 2023, "Scalable Diffusion Models with
Transformers", with the point-set input of Nichol et al. 2022, "Point-E"): each point is a token, with no position
embedding, so the model is permutation-equivariant; each block is adaLN-Zero-modulated self-attention (by the flow
time and the pooled text), cross-attention to the text tokens, and an MLP; the output layer is zero-initialized,
so the velocity is 0 at initialization. The text tokens are any encoder's hidden states ``[B, L, text_dim]``; a
learned null sequence stands for "no condition" (``cond=None``), for classifier-free guidance
(`gen3d.models.flow.guided`) and condition dropout in training (`with_dropout`).

Shapes: points ``[B, N, C]``, t ``[B]`` in [0, 1], text ``[B, L, text_dim]``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class PointFlowConfig:
    """Sizes of a `PointFlowTransformer`."""

    channels: int = 6
    """Numbers per point: xyz ‖ rgb."""
    width: int = 128
    """Token width."""
    layers: int = 4
    """Transformer blocks."""
    heads: int = 4
    """Attention heads; must divide `width`."""
    text_dim: int = 64
    """Width of the text encoder's hidden states."""
    text_length: int = 16
    """Tokens of the text condition (and of the learned null sequence)."""
    mlp_ratio: int = 4
    """MLP width / `width`."""

    def __post_init__(self) -> None:
        for name in ("channels", "width", "layers", "heads", "text_dim", "text_length", "mlp_ratio"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"PointFlowConfig.{name} must be an integer >= 1, got {value!r}")
        if self.width % self.heads:
            raise ValueError(f"PointFlowConfig.width ({self.width}) must be divisible by heads ({self.heads})")


def timestep_embedding(t: Tensor, dim: int, scale: float = 1000.0) -> Tensor:
    """Sinusoidal embedding [B, dim] of t [B] in [0, 1] (scaled by 1000, as TRELLIS calls its networks)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = scale * t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], -1)


class Block(nn.Module):
    """adaLN-Zero self-attention over the points, cross-attention to the text, MLP."""

    def __init__(self, cfg: PointFlowConfig) -> None:
        super().__init__()
        D = cfg.width
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False)
        self.self_attn = nn.MultiheadAttention(D, cfg.heads, batch_first=True)
        self.norm2 = nn.LayerNorm(D)
        self.cross_attn = nn.MultiheadAttention(D, cfg.heads, kdim=cfg.text_dim, vdim=cfg.text_dim, batch_first=True)
        self.norm3 = nn.LayerNorm(D, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(D, cfg.mlp_ratio * D), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.mlp_ratio * D, D))
        self.modulation = nn.Linear(D, 6 * D)  # shift, scale, gate for attention and for the MLP
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: Tensor, c: Tensor, text: Tensor) -> Tensor:  # [B, N, D], [B, D], [B, L, text_dim]
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(c))[:, None].chunk(6, -1)
        h = self.norm1(x) * (1 + scale1) + shift1
        x = x + gate1 * self.self_attn(h, h, h, need_weights=False)[0]
        x = x + self.cross_attn(self.norm2(x), text, text, need_weights=False)[0]
        h = self.norm3(x) * (1 + scale2) + shift2
        return x + gate2 * self.mlp(h)


class PointFlowTransformer(nn.Module):
    """Velocity model ``(x [B, N, C], t [B], text [B, L, text_dim] | None) -> v [B, N, C]`` (see the module docstring)."""

    def __init__(self, cfg: PointFlowConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or PointFlowConfig()
        D = cfg.width
        self.input = nn.Linear(cfg.channels, D)
        self.time = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, D))
        self.text_pool = nn.Linear(cfg.text_dim, D)
        self.null_text = nn.Parameter(torch.randn(cfg.text_length, cfg.text_dim) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.final_norm = nn.LayerNorm(D, elementwise_affine=False)
        self.final_modulation = nn.Linear(D, 2 * D)
        self.output = nn.Linear(D, cfg.channels)
        for layer in (self.final_modulation, self.output):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def null(self, batch: int) -> Tensor:
        """The learned "no condition" sequence [batch, L, text_dim]."""
        return self.null_text.expand(batch, -1, -1)

    def with_dropout(self, text: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
        """`text` with each row replaced by the null sequence with probability p (for classifier-free guidance)."""
        drop = torch.rand(text.shape[0], generator=generator).to(text.device) < p
        return torch.where(drop[:, None, None], self.null(text.shape[0]).to(text), text)

    def forward(self, x: Tensor, t: Tensor, text: Tensor | None = None) -> Tensor:
        B = x.shape[0]
        if x.dim() != 3 or x.shape[-1] != self.cfg.channels:
            raise ValueError(f"PointFlowTransformer: x must be [B, N, {self.cfg.channels}], got {list(x.shape)}")
        text = self.null(B).to(x) if text is None else text
        if text.dim() != 3 or text.shape[0] != B or text.shape[-1] != self.cfg.text_dim:
            raise ValueError(f"PointFlowTransformer: text must be [B={B}, L, {self.cfg.text_dim}], got {list(text.shape)}")
        c = self.time(timestep_embedding(t.to(x.device), self.cfg.width).to(x)) + self.text_pool(text.mean(1))
        h = self.input(x)
        for block in self.blocks:
            h = block(h, c, text)
        shift, scale = self.final_modulation(F.silu(c))[:, None].chunk(2, -1)
        return self.output(self.final_norm(h) * (1 + scale) + shift)


# ---- the latent ----------------------------------------------------------------------------------------
def to_latent(points: Tensor, colors: Tensor) -> Tensor:
    """[.., N, 3] positions and [.., N, 3] colors in [0, 1] -> the latent [.., N, 6]: xyz ‖ 2 rgb - 1."""
    return torch.cat([points, 2 * colors - 1], -1)


def from_latent(latent: Tensor) -> tuple[Tensor, Tensor]:
    """The latent [.., N, 6] -> (positions, colors clamped to [0, 1])."""
    return latent[..., :3], ((latent[..., 3:] + 1) / 2).clamp(0, 1)


class TextEncoder:
    """A prior's frozen tokenizer + CLIP text encoder: captions -> hidden states [B, L, D], cached per caption."""

    def __init__(self, model: str = "gen3d/shapes-t2i"):
        from transformers import AutoTokenizer, CLIPTextModel

        from gen3d.priors.diffusion import _locate

        folder = _locate(model, download=False, cache_dir=None)  # embedded id, folder or cached hub id
        self.tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
        self.encoder = CLIPTextModel.from_pretrained(folder / "text_encoder").eval().requires_grad_(False)
        self.length = min(int(self.tokenizer.model_max_length), 77)
        self.dim = self.encoder.config.hidden_size
        self.cache: dict[str, Tensor] = {}

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if missing:
            ids = self.tokenizer(missing, padding="max_length", max_length=self.length, truncation=True,
                                 return_tensors="pt").input_ids
            for caption, hidden in zip(missing, self.encoder(ids)[0]):
                self.cache[caption] = hidden
        return torch.stack([self.cache[c] for c in captions])


# ---- trained generators ----------------------------------------------------------------------------------
_ASSETS = Path(__file__).resolve().parents[1] / "assets"
EMBEDDED_FLOW = {
    # id -> folder inside the installed package
    "gen3d/shapes-flow": _ASSETS / "shapes-flow",  # the 1-2-step MDT-dist student (`gen3d world distill-flow`)
    "gen3d/shapes-flow-teacher": _ASSETS / "shapes-flow-teacher",  # its 25-step teacher (`gen3d world train-flow`)
}


@dataclass
class GeneratorInfo:
    """What `latent.json` says about an exported generator."""

    points: int
    """Points per set it was trained on."""
    text_encoder: str
    """Prior whose text encoder embeds its prompts."""
    steps: int = 25
    """Default sampling steps (Euler)."""
    guidance: float = 3.0
    """Default classifier-free guidance scale w (0 for a distilled student)."""
    kind: str = "teacher"
    """teacher (flow matching) or student (distilled; its output is the average velocity to t = 0)."""
    layout: str = "xyz, 2 rgb - 1"
    """The latent's channels."""


class PointFlowGenerator:
    """A trained text-to-point-set generator: ``generator(["a red mug"], steps, seed) -> latents [B, N, 6]``.

    Load one with `load_point_flow`. Sampling is `gen3d.models.flow.euler_sample` from noise with the model's
    default steps and guidance (a distilled student: 1 step, no guidance, ``x0 = eps - u(eps, 1)``). The model
    has no position embedding, so `points` may differ from the training size.
    """

    def __init__(self, model: PointFlowTransformer, info: GeneratorInfo, text: TextEncoder | None = None,
                 name: str = ""):
        self.model, self.info, self.name = model.eval(), info, name
        self.text = text if text is not None else TextEncoder(info.text_encoder)

    @torch.no_grad()
    def __call__(self, prompts: list[str], steps: int | None = None, guidance: float | None = None, seed: int = 0,
                 points: int | None = None, rescale_t: float = 1.0) -> Tensor:
        from gen3d.models.flow import euler_sample

        steps = self.info.steps if steps is None else steps
        guidance = self.info.guidance if guidance is None else guidance
        n = self.info.points if points is None else points
        if steps < 1 or n < 1:
            raise ValueError(f"PointFlowGenerator: steps and points must be >= 1, got {steps} and {n}")
        noise = torch.randn(len(prompts), n, self.model.cfg.channels, generator=torch.Generator().manual_seed(seed))
        return euler_sample(self.model, noise, self.text(list(prompts)), steps=steps, guidance=guidance,
                            rescale_t=rescale_t)


def load_point_flow(model: str | Path = "gen3d/shapes-flow", text: TextEncoder | None = None) -> PointFlowGenerator:
    """A trained generator: the embedded ``gen3d/shapes-flow`` (distilled, 1-2 steps), ``gen3d/shapes-flow-teacher``
    (25 steps) or a folder with ``model.safetensors``, ``config.json`` and ``latent.json`` as `gen3d world
    train-flow` / `distill-flow` export them."""
    from gen3d.errors import Gen3dError, PriorNotAvailable
    from gen3d.models.weights import load_weights

    folder = EMBEDDED_FLOW.get(str(model), Path(model))
    missing = [n for n in ("config.json", "model.safetensors", "latent.json") if not (folder / n).is_file()]
    if missing:
        raise PriorNotAvailable(
            f"point-set generator '{model}' not found ({folder} has no {' or '.join(missing)}): pass a folder written "
            f"by `gen3d world train-flow` or `gen3d world distill-flow`, or the embedded {' / '.join(EMBEDDED_FLOW)} "
            "(offline, CPU).")
    try:
        cfg = PointFlowConfig(**json.loads((folder / "config.json").read_text()))
        info = GeneratorInfo(**json.loads((folder / "latent.json").read_text()))
    except (TypeError, ValueError) as exc:
        raise Gen3dError(f"point-set generator '{model}': config.json or latent.json is not one gen3d writes "
                         f"({str(exc)[:200]}); re-export it with `gen3d world train-flow`") from None
    net = load_weights(PointFlowTransformer(cfg), folder, f"point-set generator '{model}'")
    return PointFlowGenerator(net, info, text, name=str(model))


def to_gaussians(latent: Tensor, cfg=None, opacity: float = 0.9, scale: float = 0.7):
    """A generated set [N, 6] as a `GaussianModel`: one Gaussian per point with its color, isotropic with
    `scale` x the RMS distance to its 3 nearest neighbours (the gaps between surface points closed), `opacity`;
    `cfg` (a `GaussianConfig`) gives the SH degree and learning rates of the run it starts."""
    from gen3d.representations.gaussians import GaussianModel, knn_scales

    if latent.dim() != 2 or latent.shape[-1] != 6:
        raise ValueError(f"to_gaussians: latent must be [N, 6], got {list(latent.shape)}")
    points, colors = from_latent(latent.float())
    return GaussianModel.from_values(points, scale * knn_scales(points), opacity, colors, cfg=cfg)
