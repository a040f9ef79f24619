"""Feed-forward single-image reconstruction into 3D Gaussians through a point cloud and a triplane
[Zou et al. 2024, "Triplane Meets Gaussian Splatting: Fast and Generalizable Single-View 3D
Reconstruction with Transformers" (TGS)].

One RGBA image (object composited on white, alpha = mask) and its camera go through:

1. **Camera embedding**: the 25-d condition ``[K_norm (3x3) ‖ c2w (4x4)]`` (intrinsics with rows 0 and
   1 divided by the image width and height, `camera_condition`) -> ``Linear, SiLU, Linear`` -> ``[B, D_img]``.
2. **Image tokenizer** (`ImageTokenizer`): a DINOv2 ViT (`transformers.Dinov2Model`, random init; the
   pretrained weights load into it by name) whose every ``norm1``/``norm2`` is a `ModulatedLayerNorm`:
   ``h -> LN(h) (1 + scale) + shift`` with ``(scale, shift) = Linear(SiLU(cam_emb))``, zero-initialized,
   so at init the tokenizer is exactly the plain ViT. -> tokens ``[B, 1 + P, D_img]``.
3. **Point decoder**: ``N_pt`` learnable tokens -> `Transformer1D` (self-attention, cross-attention to
   the image tokens, GEGLU feed-forward) -> zero-initialized ``Linear(D, 3)``: coarse points ``[B, N_pt, 3]``.
4. **Upsampling** (`PointUpsampler`, a simplified stand-in for the paper's Snowflake SPD stages): per
   stage i with factor ``u_i``, every parent point p spawns ``u_i`` children
   ``p + tanh(offset_k) * r_i``, ``r_i = up_radius / 2^i``, the offsets an MLP of
   ``[xyz ‖ projected feature ‖ max-pooled feature of all points]``. -> ``N = N_pt * prod(u_i)`` points.
5. **Projection-aware features** (`projected_features`): each point is projected into the input
   camera and ``[rgb (3) ‖ patch-token features (D_img) ‖ mask (1)]`` is sampled bilinearly there
   (0 outside the image or behind the camera). The paper also rasterizes the points to drop occluded
   ones; here there is no visibility test, so a point behind the object reads the front surface's feature.
6. **Triplane**: learnable planes ``[3, D, R, R]`` plus a PointNet of ``[xyz ‖ projected features]``
   scatter-averaged onto the planes xy, xz, yz (over ``[-bound, bound]``); their ``3 R^2`` tokens go
   through a second `Transformer1D` attending to the image tokens, then ``ConvTranspose2d(D, C, 2, 2)``
   -> planes ``[B, 3, C, 2R, 2R]``.
7. **Gaussian decoding** (`GaussianHeads`): per point, the three plane samples ``[3C]`` ‖ projected
   features -> MLP -> zero-initialized heads with biases giving, at init: offset 0, scale e^-5,
   identity rotation, opacity 0.1 and SH 0 (gray).

Triplane axes follow `gen3d.ops.triplane` (planes xy, xz, yz; the first axis along the width), but
texels are *cells* (``align_corners=False``): texel j of a plane of R covers
``[-1 + 2j/R, -1 + 2(j+1)/R]`` after scaling by ``bound``, so that the 2x2 texels the transposed
convolution makes from texel j subdivide exactly its cell, and scattering (at R) and sampling (at 2R)
use the same grid. Cameras follow `gen3d.cameras` (OpenCV axes, K in pixels, pixel centers at +0.5).

Deliberate simplifications of the paper's model:

- upsampling: the per-parent offset MLP of step 4 instead of Snowflake's SPD stages (which add
  point-transformer "skip" features and a learned split deconvolution); same up-factors and point counts;
- no visibility test for the projected features (the paper rasterizes the points for it);
- one camera embedder and one image tokenizer feed both the point decoder and the triplane;
- the point features are averaged into the texel each point falls in (no local pooling around it);
- the input is resized to `TGSConfig.image_size` (a multiple of the patch size, see `TGSConfig.paper`).

`TGSConfig.paper()` has the paper's sizes, `TGSConfig.small()` the embedded model's (``gen3d/shapes-tgs``, trained
by `gen3d world train-recon`) and `TGSConfig.tiny()` a test-sized one, all with the same code. `load_tgs` reads a
trained model, `reconstruct` turns one view into a trainable `GaussianModel` (what ``gen3d reconstruct`` and
``init=tgs`` runs use).
Shapes: images ``[B, H, W, 4]`` in [0, 1], points ``[B, N, 3]`` world units, tokens ``[B, L, D]``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import Dinov2Config, Dinov2Model

from gen3d.cameras import Cameras
from gen3d.errors import Gen3dError, PriorNotAvailable
from gen3d.ops.sh import MAX_DEGREE, num_sh_bases
from gen3d.ops.triplane import PLANE_AXES
from gen3d.representations.gaussians import PARAM_NAMES, GaussianConfig, GaussianModel

CAMERA_DIM = 25
"""Size of the camera condition: normalized intrinsics 3x3 ‖ c2w 4x4, both flattened row-major."""
EMBEDDED_TGS = {
    # id -> folder inside the installed package; trained by `gen3d world train-recon`
    "gen3d/shapes-tgs": Path(__file__).resolve().parents[1] / "assets" / "shapes-tgs",
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
"""DINOv2's input normalization (its pretrained weights expect it)."""


@dataclass
class TGSConfig:
    """Every size of a TGS model; `paper()` and `tiny()` are the two presets."""

    image_size: int = 32
    """Side of the square input image fed to the ViT, in pixels; a multiple of `patch_size`."""
    patch_size: int = 8
    """ViT patch side in pixels (DINOv2: 14)."""
    image_width: int = 64
    """ViT width D_img, also the camera-embedding width (DINOv2-base: 768)."""
    image_layers: int = 2
    """ViT depth (DINOv2-base: 12)."""
    image_heads: int = 4
    """ViT attention heads (DINOv2-base: 12)."""
    image_mlp_ratio: int = 4
    """ViT feed-forward width / D_img."""
    pos_embed_image_size: int | None = None
    """Image size the ViT's position embeddings are laid out for (None = `image_size`); DINOv2 checkpoints have 518 (37x37 patches) and are interpolated to the input by `Dinov2Model`."""
    width: int = 64
    """Token width D of the point decoder and the triplane transformer; must equal heads * head_dim."""
    heads: int = 4
    """Attention heads of both `Transformer1D`s."""
    head_dim: int = 16
    """Width of one attention head."""
    point_layers: int = 2
    """Blocks of the point decoder's `Transformer1D`."""
    triplane_layers: int = 2
    """Blocks of the triplane's `Transformer1D`."""
    norm_groups: int = 8
    """Groups of the `Transformer1D` input GroupNorm (32 in the paper); must divide `width`."""
    num_points: int = 128
    """N_pt, learnable point tokens = coarse points."""
    up_factors: tuple[int, ...] = (2, 2)
    """Children per point of each upsampling stage; N = N_pt * prod(up_factors)."""
    up_hidden: int = 32
    """Hidden width of the upsampling MLPs."""
    up_radius: float = 0.25
    """Largest child offset of the first upsampling stage, world units; halved at each further stage."""
    triplane_resolution: int = 8
    """R, plane side of the triplane tokens (3 R^2 tokens); the output planes are 2R."""
    triplane_channels: int = 16
    """C_plane, channels of the output planes."""
    pointnet_hidden: int = 32
    """Hidden width of the PointNet that writes point features onto the planes."""
    mlp_hidden: int = 32
    """Hidden width H of the Gaussian decoder MLP."""
    sh_degree: int = 0
    """SH degree of the decoded colors (0: 3 coefficients per Gaussian)."""
    bound: float = 1.0
    """The triplane spans [-bound, bound]^3 (world units); points outside read the plane edges."""
    max_offset: float = 0.1
    """Largest Gaussian offset from its point: (sigmoid(o) - 0.5) * max_offset per axis."""
    max_scale: float = 0.2
    """Upper clamp of the Gaussian scales (standard deviations, world units)."""

    def __post_init__(self) -> None:
        self.up_factors = tuple(self.up_factors)
        positive = ("image_size", "patch_size", "image_width", "image_layers", "image_heads", "image_mlp_ratio", "width", "heads",
                    "head_dim", "point_layers", "triplane_layers", "norm_groups", "num_points", "up_hidden",
                    "triplane_resolution", "triplane_channels", "pointnet_hidden", "mlp_hidden")
        for name in positive:
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"TGSConfig.{name} must be an integer >= 1, got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"TGSConfig.image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})"
            )
        if self.pos_embed_image_size is not None and (
                self.pos_embed_image_size < self.patch_size or self.pos_embed_image_size % self.patch_size):
            raise ValueError(
                f"TGSConfig.pos_embed_image_size ({self.pos_embed_image_size}) must be None or a positive "
                f"multiple of patch_size ({self.patch_size})"
            )
        if self.image_width % self.image_heads:
            raise ValueError(
                f"TGSConfig.image_width ({self.image_width}) must be divisible by image_heads ({self.image_heads})"
            )
        if self.width != self.heads * self.head_dim:
            raise ValueError(
                f"TGSConfig.width ({self.width}) must equal heads * head_dim ({self.heads} * {self.head_dim})"
            )
        if self.width % self.norm_groups:
            raise ValueError(f"TGSConfig.width ({self.width}) must be divisible by norm_groups ({self.norm_groups})")
        if not self.up_factors or not all(isinstance(u, int) and u >= 1 for u in self.up_factors):
            raise ValueError(f"TGSConfig.up_factors must be a non-empty list of integers >= 1, got {list(self.up_factors)}")
        if not (isinstance(self.sh_degree, int) and 0 <= self.sh_degree <= MAX_DEGREE):
            raise ValueError(f"TGSConfig.sh_degree must be an integer in 0..{MAX_DEGREE}, got {self.sh_degree!r}")
        for name in ("up_radius", "bound", "max_offset", "max_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"TGSConfig.{name} must be > 0, got {getattr(self, name)}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_gaussians(self) -> int:
        return self.num_points * math.prod(self.up_factors)

    @property
    def feature_dim(self) -> int:
        """Width of a projected feature: rgb 3 ‖ D_img ‖ mask 1."""
        return self.image_width + 4

    @classmethod
    def paper(cls, **overrides) -> TGSConfig:
        """The paper's sizes: DINOv2-base tokenizer, 2048 -> 16384 points, a 10-layer 512-wide decoder
        for points and triplane, 32^2 triplane tokens upsampled to 64^2 x 80 channels, SH degree 3.

        TGS feeds 512-pixel images, which DINOv2's stride-14 patch convolution cuts to 36 x 36 patches;
        here the input is 504 = 36 * 14, the same patches without the dropped border.
        """
        sizes = {"image_size": 504, "patch_size": 14, "image_width": 768, "image_layers": 12, "image_heads": 12,
                 "pos_embed_image_size": 518, "width": 512, "heads": 8, "head_dim": 64, "point_layers": 10,
                 "triplane_layers": 10, "norm_groups": 32, "num_points": 2048, "up_factors": (2, 4),
                 "up_hidden": 128, "triplane_resolution": 32, "triplane_channels": 80, "pointnet_hidden": 512,
                 "mlp_hidden": 64, "sh_degree": 3}
        return cls(**{**sizes, **overrides})

    @classmethod
    def small(cls, **overrides) -> TGSConfig:
        """The embedded model's size (``gen3d/shapes-tgs``): 64-pixel images in 64 patches, 128-wide ViT and
        decoders of 3-4 layers, 256 -> 2048 Gaussians, 16^2 x 32 output planes."""
        sizes = {"image_size": 64, "image_width": 128, "image_layers": 4, "image_heads": 4, "width": 128, "heads": 4,
                 "head_dim": 32, "point_layers": 3, "triplane_layers": 3, "num_points": 256, "up_factors": (2, 4),
                 "up_hidden": 64, "triplane_channels": 32, "pointnet_hidden": 64, "mlp_hidden": 64}
        return cls(**{**sizes, **overrides})

    @classmethod
    def tiny(cls, **overrides) -> TGSConfig:
        """A CPU-sized model: 32-pixel images, 16 patches, 64-wide, 2 layers, 128 -> 512 Gaussians."""
        return cls(**overrides)


# ------------------------------------------------------------------------------------- cameras


def camera_condition(cameras: Cameras) -> Tensor:
    """The 25-d camera condition [C, 25]: intrinsics normalized by the image size ‖ c2w, flattened."""
    K = cameras.K.clone()
    K[:, 0] /= cameras.width
    K[:, 1] /= cameras.height
    return torch.cat([K.flatten(1), cameras.c2w.flatten(1)], 1)


def project_points(
    points: Tensor,  # [B, N, 3] world
    c2w: Tensor,  # [B, 4, 4] camera-to-world, OpenCV axes
    K: Tensor,  # [B, 3, 3] intrinsics in pixels
) -> tuple[Tensor, Tensor]:  # ([B, N, 2] pixel coordinates (x right, y down), [B, N] camera-space depth z)
    """Pinhole projection (gen3d convention: the center of pixel (i, j) is at (i + 0.5, j + 0.5)).

    x_cam = R^T (x - t) with c2w = [R t]; (u, v) = (K x_cam)_{xy} / z. Differentiable w.r.t. `points`.
    """
    R, t = c2w[:, :3, :3], c2w[:, :3, 3]
    cam = (points - t[:, None]) @ R  # [B, N, 3] = R^T (x - t) per point
    z = cam[..., 2]
    pix = cam @ K.transpose(1, 2)  # [B, N, 3]
    return pix[..., :2] / z.clamp_min(1e-8)[..., None], z


def projected_features(
    points: Tensor,  # [B, N, 3]
    image: Tensor,  # [B, H, W, 4] rgb on white ‖ alpha
    patch_tokens: Tensor,  # [B, P, D_img] with P = h * w patches in row-major order
    cameras: Cameras,  # B input cameras (any image size: coordinates are normalized by it)
    near: float = 1e-4,
) -> Tensor:  # [B, N, 3 + D_img + 1]
    """Bilinear samples of [rgb ‖ patch features ‖ mask] at the points' projections into the input view.

    The image (any resolution) and the patch grid are both sampled at the normalized coordinate
    (u / W_cam, v / H_cam) with ``align_corners=False`` (pixel and patch centers at +0.5), which is
    the continuous form of upsampling the patch features bilinearly to the image and sampling there,
    without building the [D_img, H, W] map. Points behind the camera (depth <= `near`) or projecting
    outside the image get 0. No visibility test (see the module docstring).
    """
    B = points.shape[0]
    uv, z = project_points(points, cameras.c2w, cameras.K)
    uv = uv / uv.new_tensor([cameras.width, cameras.height])  # [B, N, 2] in [0, 1] inside the image
    valid = (z > near) & (uv >= 0).all(-1) & (uv <= 1).all(-1)  # [B, N]
    grid = torch.where(valid[..., None], 2 * uv - 1, torch.zeros_like(uv))[:, None]  # [B, 1, N, 2]
    side = math.isqrt(patch_tokens.shape[1])
    feat_map = patch_tokens.transpose(1, 2).reshape(B, -1, side, side)  # [B, D_img, h, w]
    pixels = image.permute(0, 3, 1, 2).to(points.dtype)  # [B, 4, H, W]
    sample = lambda m: F.grid_sample(m, grid, mode="bilinear", padding_mode="border", align_corners=False)[:, :, 0]
    rgba, feats = sample(pixels), sample(feat_map)  # [B, 4, N], [B, D_img, N]
    out = torch.cat([rgba[:, :3], feats, rgba[:, 3:]], 1).transpose(1, 2)  # [B, N, 3 + D_img + 1]
    return out * valid[..., None]


# ------------------------------------------------------------------------------- image tokenizer


class ModulatedLayerNorm(nn.LayerNorm):
    """A LayerNorm followed by adaptive modulation from a camera embedding (TGS, like DiT's adaLN).

    y = LN(h) * (1 + scale) + shift, (scale, shift) = `modulation`(SiLU(condition)), per batch item.
    `modulation` is zero-initialized, so the layer starts as the plain LayerNorm. Being a LayerNorm
    subclass, its weight and bias keep the names of the DINOv2 module it replaces.

    The ViT's forward passes no extra arguments to its layers, so the camera embedding [B, D_cond]
    comes in through the attribute `condition`, which `ImageTokenizer.forward` sets on every
    modulated norm before calling the ViT and clears afterwards.
    """

    def __init__(self, norm: nn.LayerNorm, cond_dim: int) -> None:
        super().__init__(norm.normalized_shape, eps=norm.eps, elementwise_affine=norm.elementwise_affine)
        self.load_state_dict(norm.state_dict())
        width = norm.normalized_shape[0]
        self.modulation = nn.Linear(cond_dim, 2 * width)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)
        self.condition: Tensor | None = None  # [B, cond_dim], set by ImageTokenizer for one forward

    def forward(self, h: Tensor) -> Tensor:  # [B, L, D] -> [B, L, D]
        if self.condition is None:
            raise RuntimeError("ModulatedLayerNorm: no camera condition set; call it through ImageTokenizer")
        scale, shift = self.modulation(F.silu(self.condition)).chunk(2, dim=-1)  # [B, D] each
        return super().forward(h) * (1 + scale[:, None]) + shift[:, None]


class ImageTokenizer(nn.Module):
    """DINOv2 ViT with camera-modulated norms: images [B, H, W, 4] + camera embedding -> [B, 1 + P, D_img].

    The ViT is `transformers.Dinov2Model` built from a `Dinov2Config` with random weights; a DINOv2
    checkpoint loads into `vit` by name with ``vit.load_state_dict(state, strict=False)`` (only the
    `modulation` layers are new; loaders that re-initialize missing weights would undo their zero init).
    It sees the rgb channels normalized with the ImageNet statistics; the output is the final
    LayerNorm'ed hidden state (CLS token first, then the patches in row-major order).
    """

    def __init__(self, cfg: TGSConfig) -> None:
        super().__init__()
        self.image_size = cfg.image_size
        vit_cfg = Dinov2Config(
            hidden_size=cfg.image_width, num_hidden_layers=cfg.image_layers, num_attention_heads=cfg.image_heads,
            mlp_ratio=cfg.image_mlp_ratio, patch_size=cfg.patch_size, num_channels=3,
            image_size=cfg.pos_embed_image_size or cfg.image_size,
        )
        self.vit = Dinov2Model(vit_cfg)
        self.modulated: list[ModulatedLayerNorm] = []
        for layer in self.vit.encoder.layer:
            layer.norm1 = ModulatedLayerNorm(layer.norm1, cfg.image_width)
            layer.norm2 = ModulatedLayerNorm(layer.norm2, cfg.image_width)
            self.modulated += [layer.norm1, layer.norm2]
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: Tensor, cam_emb: Tensor) -> Tensor:  # [B, H, W, 4], [B, D_img] -> [B, 1 + P, D_img]
        x = image[..., :3].permute(0, 3, 1, 2)  # [B, 3, H, W]
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, (self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=True)
        x = (x - self.mean) / self.std
        for norm in self.modulated:
            norm.condition = cam_emb
        try:
            return self.vit(pixel_values=x).last_hidden_state
        finally:
            for norm in self.modulated:
                norm.condition = None


# ----------------------------------------------------------------------------- Transformer1D


class Attention(nn.Module):
    """Multi-head attention of queries [B, L, D] to a context [B, S, D_ctx] (self-attention if None)."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [B, heads, L, head_dim]
        out = F.scaled_dot_product_attention(split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context)))
        return self.to_out(out.transpose(1, 2).flatten(2))  # [B, L, dim]


class GEGLUFeedForward(nn.Module):
    """x -> Linear(a * GELU(g)) with [a ‖ g] = Linear(x) [Shazeer 2020, "GLU Variants Improve Transformer"]."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.proj_in = nn.Linear(dim, 2 * mult * dim)
        self.proj_out = nn.Linear(mult * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        a, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(a * F.gelu(gate))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: self-attention, cross-attention to the image tokens, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int) -> None:
        super().__init__()
        self.norm1, self.attn1 = nn.LayerNorm(dim), Attention(dim, heads, head_dim)
        self.norm2, self.attn2 = nn.LayerNorm(dim), Attention(dim, heads, head_dim, context_dim)
        self.norm3, self.ff = nn.LayerNorm(dim), GEGLUFeedForward(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:  # [B, L, dim], [B, S, context_dim]
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer1D(nn.Module):
    """Tokens [B, L, D] -> GroupNorm -> Linear -> blocks -> Linear, plus the input (residual)."""

    def __init__(self, dim: int, heads: int, head_dim: int, layers: int, context_dim: int, groups: int) -> None:
        super().__init__()
        inner = heads * head_dim
        self.norm = nn.GroupNorm(groups, dim, eps=1e-6)
        self.proj_in = nn.Linear(dim, inner)
        self.blocks = nn.ModuleList(TransformerBlock(inner, heads, head_dim, context_dim) for _ in range(layers))
        self.proj_out = nn.Linear(inner, dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:  # [B, L, D], [B, S, D_ctx] -> [B, L, D]
        h = self.proj_in(self.norm(x.transpose(1, 2)).transpose(1, 2))
        for block in self.blocks:
            h = block(h, context)
        return x + self.proj_out(h)


# ----------------------------------------------------------------------------------- points


def mlp(dims: list[int]) -> nn.Sequential:
    """Linear layers of widths `dims` with SiLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers += [nn.Linear(dims[i], dims[i + 1])] + ([nn.SiLU()] if i < len(dims) - 2 else [])
    return nn.Sequential(*layers)


class PointUpsampler(nn.Module):
    """Stages of point splitting, a simplified version of the paper's Snowflake SPD stages.

    Stage i: f_p = MLP_a([p ‖ feat(p)]), g = max_p f_p (a PointNet global feature), then per parent
    p the offsets o = MLP_b([f_p ‖ g]) [u_i, 3] give the children p + tanh(o_k) r_i,
    r_i = up_radius / 2^i. feat(p) are the projection-aware features at p (`projected_features`).
    Children of one parent are contiguous: child k of parent j is point j * u_i + k.
    """

    def __init__(self, cfg: TGSConfig) -> None:
        super().__init__()
        self.factors = cfg.up_factors
        self.radii = [cfg.up_radius / 2 ** i for i in range(len(cfg.up_factors))]
        H = cfg.up_hidden
        self.local = nn.ModuleList(mlp([3 + cfg.feature_dim, H, H]) for _ in cfg.up_factors)
        self.split = nn.ModuleList(mlp([2 * H, H, 3 * u]) for u in cfg.up_factors)

    def forward(self, points: Tensor, features) -> Tensor:  # [B, N, 3], f(points) -> [B, N, F]; -> [B, N * prod(u), 3]
        for local, split, u, radius in zip(self.local, self.split, self.factors, self.radii):
            f = local(torch.cat([points, features(points)], -1))  # [B, N, H]
            g = f.amax(1, keepdim=True).expand_as(f)  # [B, N, H]
            offsets = split(torch.cat([f, g], -1)).unflatten(-1, (u, 3))  # [B, N, u, 3]
            points = (points[:, :, None] + torch.tanh(offsets) * radius).flatten(1, 2)  # [B, N * u, 3]
        return points


# --------------------------------------------------------------------------------- triplane


def plane_coordinates(points: Tensor, bound: float) -> Tensor:
    """Points [B, N, 3] -> per-plane (width, height) coordinates [B, 3, N, 2] in [-1, 1] (xy, xz, yz)."""
    x = (points / bound).clamp(-1.0, 1.0)
    return torch.stack([x[..., list(axes)] for axes in PLANE_AXES], 1)


def scatter_to_planes(points: Tensor, features: Tensor, resolution: int, bound: float) -> Tensor:
    """Average of the point features falling in each texel (cell) of the three planes.

    points [B, N, 3], features [B, N, F] -> planes [B, 3, F, R, R] (0 where no point falls).
    The texel of a point is not differentiable w.r.t. its position; its features are.
    """
    B, N, nf = features.shape
    R = resolution
    cell = ((plane_coordinates(points.detach(), bound) + 1) / 2 * R).long().clamp(0, R - 1)  # [B, 3, N, 2]
    flat = cell[..., 1] * R + cell[..., 0]  # [B, 3, N] row (height) major
    flat = flat + (torch.arange(B * 3, device=points.device) * R * R).view(B, 3, 1)  # one index space per plane
    flat = flat.reshape(-1)
    values = features[:, None].expand(B, 3, N, nf).reshape(-1, nf)  # [B * 3 * N, F]
    sums = features.new_zeros(B * 3 * R * R, nf).index_add_(0, flat, values)
    counts = features.new_zeros(B * 3 * R * R).index_add_(0, flat, features.new_ones(flat.shape[0]))
    mean = sums / counts.clamp_min(1.0)[:, None]
    return mean.view(B, 3, R, R, nf).permute(0, 1, 4, 2, 3)


def sample_planes(planes: Tensor, points: Tensor, bound: float) -> Tensor:
    """Bilinear samples of planes [B, 3, C, S, S] at points [B, N, 3] -> [B, N, 3C] (xy, xz, yz features)."""
    B = planes.shape[0]
    grid = plane_coordinates(points, bound).flatten(0, 1)[:, None]  # [B * 3, 1, N, 2]
    samples = F.grid_sample(planes.flatten(0, 1), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return samples[:, :, 0].unflatten(0, (B, 3)).permute(0, 3, 1, 2).flatten(2)  # [B, N, 3C]


class TriplaneDecoder(nn.Module):
    """Learnable planes + scattered point features -> Transformer1D with image cross-attention -> 2x upsample."""

    def __init__(self, cfg: TGSConfig) -> None:
        super().__init__()
        D, R = cfg.width, cfg.triplane_resolution
        self.resolution, self.bound = R, cfg.bound
        self.embeddings = nn.Parameter(torch.randn(3, D, R, R) / math.sqrt(D))
        self.pointnet = mlp([3 + cfg.feature_dim, cfg.pointnet_hidden, cfg.pointnet_hidden, D])
        self.transformer = Transformer1D(D, cfg.heads, cfg.head_dim, cfg.triplane_layers, cfg.image_width, cfg.norm_groups)
        self.upsample = nn.ConvTranspose2d(D, cfg.triplane_channels, kernel_size=2, stride=2)

    def forward(self, points: Tensor, features: Tensor, tokens: Tensor) -> Tensor:
        """points [B, N, 3], their projected features [B, N, F], image tokens [B, L, D_img] -> [B, 3, C, 2R, 2R]."""
        B, R = points.shape[0], self.resolution
        point_planes = scatter_to_planes(points, self.pointnet(torch.cat([points, features], -1)), R, self.bound)
        planes = self.embeddings + point_planes  # [B, 3, D, R, R]
        x = planes.permute(0, 1, 3, 4, 2).reshape(B, 3 * R * R, -1)  # [B, 3 R^2, D] plane-major, row-major
        x = self.transformer(x, tokens)
        planes = x.reshape(B * 3, R, R, -1).permute(0, 3, 1, 2)  # [B * 3, D, R, R]
        return self.upsample(planes).unflatten(0, (B, 3))  # [B, 3, C, 2R, 2R]


# -------------------------------------------------------------------------------- Gaussians


class GaussianHeads(nn.Module):
    """Per-point features -> MLP -> zero-initialized heads -> raw `GaussianModel` parameters.

    mean  = point + (sigmoid(o) - 0.5) * max_offset        (offset 0 at init)
    log-scale = min(s, log(max_scale))                      (bias -5: scale e^-5 ~ 0.0067 at init)
    quat  = normalize(q)                                    (bias (1, 0, 0, 0): identity)
    opacity logit                                           (bias logit(0.1))
    sh    [K, 3], K = (sh_degree + 1)^2                     (bias 0: rgb 0.5)
    """

    def __init__(self, cfg: TGSConfig) -> None:
        super().__init__()
        H = cfg.mlp_hidden
        self.max_offset, self.log_max_scale = cfg.max_offset, math.log(cfg.max_scale)
        self.K = num_sh_bases(cfg.sh_degree)
        self.mlp = mlp([3 * cfg.triplane_channels + cfg.feature_dim, H, H, H])
        sizes = {"offset": 3, "scale": 3, "rotation": 4, "opacity": 1, "sh": 3 * self.K}
        biases = {"scale": [-5.0] * 3, "rotation": [1.0, 0.0, 0.0, 0.0], "opacity": [math.log(0.1 / 0.9)]}
        self.heads = nn.ModuleDict({name: nn.Linear(H, size) for name, size in sizes.items()})
        for name, head in self.heads.items():
            nn.init.zeros_(head.weight)
            with torch.no_grad():
                head.bias.copy_(torch.tensor(biases.get(name, [0.0] * sizes[name])))

    def forward(self, points: Tensor, features: Tensor) -> dict[str, Tensor]:  # [B, N, 3], [B, N, F_in]
        h = self.mlp(features)  # [B, N, H]
        out = {name: head(h) for name, head in self.heads.items()}
        return {
            "means": points + (torch.sigmoid(out["offset"]) - 0.5) * self.max_offset,  # [B, N, 3]
            "log_scales": out["scale"].clamp_max(self.log_max_scale),  # [B, N, 3]
            "quats": F.normalize(out["rotation"], dim=-1),  # [B, N, 4]
            "opacity_logits": out["opacity"][..., 0],  # [B, N]
            "sh": out["sh"].unflatten(-1, (self.K, 3)),  # [B, N, K, 3]
        }


@dataclass
class TGSOutput:
    """A batch of reconstructions; the Gaussian parameters are raw, as `GaussianModel` stores them."""

    coarse_points: Tensor  # [B, N_pt, 3] point decoder output
    points: Tensor  # [B, N, 3] upsampled points, one Gaussian each
    planes: Tensor  # [B, 3, C, 2R, 2R] triplane xy, xz, yz
    means: Tensor  # [B, N, 3]
    log_scales: Tensor  # [B, N, 3]
    quats: Tensor  # [B, N, 4] (w, x, y, z), normalized
    opacity_logits: Tensor  # [B, N]
    sh: Tensor  # [B, N, K, 3] DC first
    gaussian_cfg: GaussianConfig = field(default_factory=GaussianConfig)

    def gaussians(self, b: int, detach: bool = False) -> GaussianModel:
        """Batch item `b` as a `GaussianModel`.

        detach=False: a view whose parameters are the (non-leaf) tensors of this output, so that
        ``render_gaussians(model, cameras, background)`` is differentiable w.r.t. the network; it has
        no `nn.Parameter`s (no optimizer groups, not for densification). detach=True: an independent
        trainable copy (`GaussianModel.from_tensors`), e.g. to refine the reconstruction by optimization.
        """
        values = (self.means[b], self.log_scales[b], self.quats[b], self.opacity_logits[b], self.sh[b])
        if detach:
            return GaussianModel.from_tensors(*values, cfg=self.gaussian_cfg)
        model = GaussianModel(replace(self.gaussian_cfg, sh_degree=round(math.sqrt(self.sh.shape[2])) - 1))
        sh = values[-1]
        for name, value in zip(PARAM_NAMES, values[:-1] + (sh[:, :1], sh[:, 1:])):
            delattr(model, name)  # drop the registered Parameter, then keep the tensor as a plain attribute
            setattr(model, name, value)
        return model


class TGS(nn.Module):
    """Triplane-Gaussian reconstruction from one image: `forward(image, cameras)` -> `TGSOutput`."""

    def __init__(self, cfg: TGSConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg if cfg is not None else TGSConfig.tiny()
        self.camera_embedder = mlp([CAMERA_DIM, cfg.image_width, cfg.image_width])
        self.tokenizer = ImageTokenizer(cfg)
        self.point_tokens = nn.Embedding(cfg.num_points, cfg.width)
        self.point_decoder = Transformer1D(cfg.width, cfg.heads, cfg.head_dim, cfg.point_layers, cfg.image_width,
                                           cfg.norm_groups)
        self.point_head = nn.Linear(cfg.width, 3)
        nn.init.zeros_(self.point_head.weight)
        nn.init.zeros_(self.point_head.bias)
        self.upsampler = PointUpsampler(cfg)
        self.triplane = TriplaneDecoder(cfg)
        self.gaussian_heads = GaussianHeads(cfg)

    def forward(self, image: Tensor, cameras: Cameras) -> TGSOutput:
        """image [B, H, W, 4] in [0, 1] (rgb on white ‖ alpha), `cameras` the B input cameras."""
        B = image.shape[0]
        if image.dim() != 4 or image.shape[-1] != 4:
            raise ValueError(f"TGS: image must be [B, H, W, 4] (RGBA), got {list(image.shape)}")
        if len(cameras) != B:
            raise ValueError(f"TGS: {B} images but {len(cameras)} cameras")
        cam_emb = self.camera_embedder(camera_condition(cameras).to(image.dtype))  # [B, D_img]
        tokens = self.tokenizer(image, cam_emb)  # [B, 1 + P, D_img]
        features = lambda pts: projected_features(pts, image, tokens[:, 1:], cameras)  # [B, N, F]

        x = self.point_tokens.weight.expand(B, -1, -1)  # [B, N_pt, D]
        coarse = self.point_head(self.point_decoder(x, tokens))  # [B, N_pt, 3]
        points = self.upsampler(coarse, features)  # [B, N, 3]
        point_features = features(points)  # [B, N, F]
        planes = self.triplane(points, point_features, tokens)  # [B, 3, C, 2R, 2R]
        plane_features = sample_planes(planes, points, self.cfg.bound)  # [B, N, 3C]
        g = self.gaussian_heads(points, torch.cat([plane_features, point_features], -1))
        return TGSOutput(coarse, points, planes, g["means"], g["log_scales"], g["quats"], g["opacity_logits"], g["sh"],
                         GaussianConfig(sh_degree=self.cfg.sh_degree))

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by part: tokenizer (with the camera embedder), point decoder (with upsampling), triplane, heads."""
        parts = {
            "tokenizer": [self.camera_embedder, self.tokenizer],
            "point_decoder": [self.point_tokens, self.point_decoder, self.point_head, self.upsampler],
            "triplane": [self.triplane],
            "heads": [self.gaussian_heads],
        }
        return {name: [p for m in modules for p in m.parameters()] for name, modules in parts.items()}


def count_parameters(cfg: TGSConfig) -> int:
    """Number of parameters of `TGS(cfg)`, built on the meta device (no memory, no initialization cost)."""
    with torch.device("meta"):
        return sum(p.numel() for p in TGS(cfg).parameters())


# ------------------------------------------------------------------------------------- loading and use


def load_tgs(model: str | Path = "gen3d/shapes-tgs", device: str | torch.device = "cpu") -> TGS:
    """A trained `TGS` in eval mode: the embedded ``gen3d/shapes-tgs`` or a folder holding ``model.safetensors``
    and ``config.json`` (its `TGSConfig`), as `gen3d world train-recon` exports it."""
    folder = EMBEDDED_TGS.get(str(model), Path(model))
    missing = [name for name in ("config.json", "model.safetensors") if not (folder / name).is_file()]
    if missing:
        raise PriorNotAvailable(
            f"TGS model '{model}' not found ({folder} has no {' or '.join(missing)}): pass a folder written by "
            "`gen3d world train-recon output=FOLDER`, or the embedded gen3d/shapes-tgs (offline, CPU). The paper's "
            "released checkpoint has another layout and is not read.")
    try:
        cfg = TGSConfig(**json.loads((folder / "config.json").read_text()))
    except (TypeError, ValueError) as exc:
        raise Gen3dError(f"TGS model '{model}': config.json is not a TGSConfig ({str(exc)[:200]}); re-export it with "
                         "`gen3d world train-recon`") from None
    from gen3d.models.weights import load_weights

    return load_weights(TGS(cfg), folder, f"TGS model '{model}'").to(device).eval()


def prepare_input(rgb: Tensor, mask: Tensor, camera: Cameras, size: int) -> tuple[Tensor, Cameras]:
    """A view (rgb [H, W, 3] on white, mask [H, W] or [H, W, 1], its one camera) as the model's input:
    ``[1, size, size, 4]`` (area-averaged, as the training renders) and the camera resized with it."""
    rgba = torch.cat([rgb, mask.reshape(*mask.shape[:2], 1)], -1).permute(2, 0, 1)[None].float()  # [1, 4, H, W]
    if rgba.shape[-1] != size or rgba.shape[-2] != size:
        rgba = F.interpolate(rgba, size=(size, size), mode="area")
    return rgba.permute(0, 2, 3, 1).clamp(0, 1), camera.resized(size, size)


@torch.no_grad()
def reconstruct(net: TGS, rgb: Tensor, mask: Tensor, camera: Cameras,
                gaussian_cfg: GaussianConfig | None = None) -> tuple[GaussianModel, float]:
    """One view -> a trainable `GaussianModel` and the seconds the network took (input preparation and
    forward pass). With `gaussian_cfg`, the model takes its learning rates and its SH degree: higher
    bands than the network decodes start at 0, bands above the config's degree are dropped."""
    device = next(net.parameters()).device
    t0 = time.perf_counter()
    image, cams = prepare_input(rgb.to(device), mask.to(device), camera.to(device), net.cfg.image_size)
    out = net(image, cams)
    seconds = time.perf_counter() - t0
    sh = out.sh[0]  # [N, K, 3]
    if gaussian_cfg is not None:
        K = num_sh_bases(gaussian_cfg.sh_degree)
        sh = F.pad(sh, (0, 0, 0, max(K - sh.shape[1], 0)))[:, :K]
    model = GaussianModel.from_tensors(out.means[0], out.log_scales[0], out.quats[0], out.opacity_logits[0], sh,
                                       cfg=gaussian_cfg)
    return model, seconds
