"""A time-conditioned deformation field for dynamic 3D Gaussians (issue 12: 4D generation), and its regularizers.

Static Gaussians (canonical space) are moved at time t in [0, 1] by a field of (x, t): position offsets and,
optionally, rotation and log-scale offsets, as in 4D Gaussian Splatting (Wu et al. 2024, "4D Gaussian Splatting
for Real-Time Dynamic Scene Rendering"), the deformation DreamGaussian4D and 4DGen use. The field is a HexPlane /
K-planes factorization (Cao & Johnson 2023, "HexPlane"; Fridovich-Keil et al. 2023, "K-Planes"): six feature
planes, three spatial (xy, xz, yz) and three space-time (xt, yt, zt), sampled bilinearly and multiplied together
(the Hadamard product makes a feature depend jointly on x, y, z and t), at several spatial resolutions whose
features are concatenated, then a small MLP and one linear head per deformed quantity.

Initialization makes the field the identity at every time: space-time planes are all ones (so the product does
not depend on t), spatial planes uniform in [0.1, 0.5] (K-planes' initialization) and the heads zero.

Regularizers:

- `time_smoothness`: the squared second difference of the space-time planes along t (K-planes' temporal smoothness:
  motion without jitter between neighbouring times);
- `rigidity_loss`: each Gaussian's distances to its k nearest canonical neighbours kept at every time (a local
  as-rigid-as-possible term, as in Dynamic 3D Gaussians, Luiten et al. 2024, and STAG4D): zero for any rigid motion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SPATIAL_AXES = ((0, 1), (0, 2), (1, 2))
"""(width, height) axes of the spatial planes xy, xz, yz."""


@dataclass
class DeformationConfig:
    """Sizes of a `DeformationField` (defaults after 4D Gaussian Splatting's HexPlane, scaled down for CPU)."""

    resolutions: list[int] = field(default_factory=lambda: [16, 32])
    """Spatial resolution of each level's planes (4DGS: 64 and 128)."""
    time_resolution: int = 8
    """Texels along t of the space-time planes (4DGS: half the frames)."""
    features: int = 16
    """Features per plane and level (4DGS: 32)."""
    hidden: int = 64
    """Width of the MLP after the planes (4DGS: 64)."""
    bound: float = 1.0
    """Half side of the world box mapped onto the planes ([-bound, bound]^3; outside reads the border)."""
    rotation: bool = True
    """Also deform rotations (a quaternion offset added to the canonical one)."""
    scale: bool = True
    """Also deform scales (an offset of the log-scales)."""

    def __post_init__(self) -> None:
        if not self.resolutions or any(not (isinstance(r, int) and r >= 2) for r in self.resolutions):
            raise ValueError(f"DeformationConfig.resolutions must be integers >= 2, got {self.resolutions!r}")
        for name, low in (("time_resolution", 2), ("features", 1), ("hidden", 1)):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
                raise ValueError(f"DeformationConfig.{name} must be an integer >= {low}, got {value!r}")
        if not (math.isfinite(self.bound) and self.bound > 0):
            raise ValueError(f"DeformationConfig.bound must be > 0, got {self.bound}")


class DeformationField(nn.Module):
    """``field(means [N, 3], t) -> (d_means [N, 3], d_quats [N, 4] | None, d_log_scales [N, 3] | None)``, t a number
    or ``[N]`` in [0, 1]."""

    def __init__(self, cfg: DeformationConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or DeformationConfig()
        F_, T = cfg.features, cfg.time_resolution
        self.spatial = nn.ParameterList(nn.Parameter(torch.empty(3, F_, r, r).uniform_(0.1, 0.5))
                                        for r in cfg.resolutions)
        self.temporal = nn.ParameterList(nn.Parameter(torch.ones(3, F_, T, r)) for r in cfg.resolutions)
        self.mlp = nn.Sequential(nn.Linear(F_ * len(cfg.resolutions), cfg.hidden), nn.ReLU(),
                                 nn.Linear(cfg.hidden, cfg.hidden), nn.ReLU())
        self.heads = nn.ModuleDict({"means": nn.Linear(cfg.hidden, 3)})
        if cfg.rotation:
            self.heads["quats"] = nn.Linear(cfg.hidden, 4)
        if cfg.scale:
            self.heads["log_scales"] = nn.Linear(cfg.hidden, 3)
        for head in self.heads.values():
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def features(self, means: Tensor, t: Tensor | float) -> Tensor:
        """The K-planes features [N, features x levels] at (means, t)."""
        N = means.shape[0]
        x = (means / self.cfg.bound).clamp(-1, 1)
        t = torch.as_tensor(t, dtype=means.dtype, device=means.device).expand(N)
        tc = 2 * t.clamp(0, 1) - 1  # [N] in [-1, 1]
        spatial_grid = torch.stack([x[:, list(a)] for a in SPATIAL_AXES])[:, None]  # [3, 1, N, 2]
        temporal_grid = torch.stack([torch.stack([x[:, i], tc], -1) for i in range(3)])[:, None]  # width x_i, height t
        levels = []
        for space, time in zip(self.spatial, self.temporal):
            s = F.grid_sample(space, spatial_grid, mode="bilinear", padding_mode="border", align_corners=True)
            m = F.grid_sample(time, temporal_grid, mode="bilinear", padding_mode="border", align_corners=True)
            levels.append((s.prod(0) * m.prod(0))[:, 0].t())  # [N, F]
        return torch.cat(levels, -1)

    def forward(self, means: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor | None, Tensor | None]:
        if means.dim() != 2 or means.shape[1] != 3:
            raise ValueError(f"DeformationField: means must be [N, 3], got {list(means.shape)}")
        h = self.mlp(self.features(means, t))
        out = {name: head(h) for name, head in self.heads.items()}
        return out["means"], out.get("quats"), out.get("log_scales")

    def deform(self, means: Tensor, quats: Tensor, log_scales: Tensor, t: Tensor | float
               ) -> tuple[Tensor, Tensor, Tensor]:
        """Canonical (means, quats, log_scales) moved to time t."""
        d_means, d_quats, d_scales = self(means, t)
        return (means + d_means, quats if d_quats is None else quats + d_quats,
                log_scales if d_scales is None else log_scales + d_scales)


def time_smoothness(field: DeformationField) -> Tensor:
    """Mean squared second difference of the space-time planes along t (0 for planes constant or linear in t)."""
    terms = [(p[:, :, 2:] - 2 * p[:, :, 1:-1] + p[:, :, :-2]).square().mean() for p in field.temporal
             if p.shape[2] >= 3]
    return torch.stack(terms).mean() if terms else field.temporal[0].new_zeros(())


def knn_indices(points: Tensor, k: int = 8) -> Tensor:
    """Each point's k nearest other points [N, k] (computed once, on the canonical Gaussians)."""
    k = min(k, points.shape[0] - 1)
    d = torch.cdist(points, points)
    d.fill_diagonal_(float("inf"))
    return d.topk(k, dim=1, largest=False).indices


def rigidity_loss(canonical: Tensor, moved: Tensor, neighbours: Tensor) -> Tensor:
    """Mean squared change of each point's distance to its canonical neighbours ([N, k] from `knn_indices`): zero for
    any rotation + translation of the whole set, positive for a stretch."""
    before = (canonical[:, None] - canonical[neighbours]).norm(dim=-1)
    after = (moved[:, None] - moved[neighbours]).norm(dim=-1)
    return (after - before).square().mean()
