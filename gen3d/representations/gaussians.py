"""3D Gaussians: the parameters of a Gaussian-splatting scene and their optimizer setup.

Each Gaussian i has a mean mu_i, a covariance Sigma_i = R_i S_i S_i^T R_i^T built from a rotation
quaternion q_i (w, x, y, z) and per-axis scales s_i, an opacity o_i and view-dependent color as real
spherical-harmonics coefficients [Kerbl et al. 2023, "3D Gaussian Splatting for Real-Time Radiance
Field Rendering"]. Parameters are stored unconstrained, as in the reference: log-scales, opacity
logits, unnormalized quaternions, and SH coefficients split into the DC term `sh0` [N, 1, 3] and
the rest `shN` [N, K-1, 3] (K = (sh_degree + 1)^2), so the two can have different learning rates.
The color convention is 3DGS's: rgb = SH sum + 0.5, clamped (see `gen3d.ops.sh`).

Initialization and learning rates follow DreamGaussian [Tang et al. 2023, "DreamGaussian:
Generative Gaussian Splatting for Efficient 3D Content Creation"]: points uniform in a ball of
radius 0.5, near-gray colors, opacity 0.1, isotropic scales from the distance to the 3 nearest
neighbours, and Adam with per-parameter learning rates where the position rate decays
log-linearly.

Parameters change shape during training (densification, see `strategy.py`), so
`load_state_dict` resizes them to the checkpoint's N before loading. Build the optimizer *after*
loading a checkpoint, from `param_groups()`, so that it holds the resized parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from gen3d.errors import CheckpointError
from gen3d.ops._projection import quat_to_rotmat
from gen3d.ops.sh import MAX_DEGREE, num_sh_bases, rgb_to_sh, sh_to_rgb

PARAM_NAMES = ("means", "log_scales", "quats", "opacity_logits", "sh0", "shN")
"""Names of the parameters of a `GaussianModel`, which are also the names of its optimizer groups."""

INIT_METHODS = ("ball", "points")


@dataclass
class GaussianConfig:
    """3D Gaussians: initialization and per-parameter learning rates (DreamGaussian defaults)."""

    sh_degree: int = 0
    """Spherical-harmonics degree of the view-dependent color (0..3); DreamGaussian uses 0 (no view dependence)."""
    init: str = "ball"
    """Initialization: 'ball' (random points uniform in a ball, DreamGaussian) or 'points' (a point cloud the system supplies, e.g. from a feed-forward reconstruction)."""
    num_points: int = 4096
    """Number of Gaussians of a 'ball' initialization (DreamGaussian: 5000)."""
    init_radius: float = 0.5
    """Radius of the 'ball' initialization, in world units (objects live in the unit ball)."""
    init_opacity: float = 0.1
    """Initial opacity of every Gaussian, in (0, 1)."""
    init_scale: float | None = None
    """Initial isotropic scale (standard deviation, world units); None = per point, the RMS distance to its 3 nearest neighbours (3DGS)."""
    position_lr_init: float = 0.001
    """Learning rate of the means at step 0 (before `spatial_lr_scale`)."""
    position_lr_final: float = 0.00002
    """Learning rate of the means at the end of the decay (before `spatial_lr_scale`); the rate decays log-linearly from init to final."""
    position_lr_max_steps: int | None = None
    """Steps over which the position learning rate decays; None = the whole run (DreamGaussian's text config: 300 of 500)."""
    spatial_lr_scale: float = 10.0
    """Multiplier of both position learning rates; DreamGaussian uses 10 for its random-ball init, so means move at 1e-2 -> 2e-4."""
    feature_lr: float = 0.01
    """Learning rate of the DC color coefficients; the higher SH bands use feature_lr / 20 (3DGS)."""
    opacity_lr: float = 0.05
    """Learning rate of the opacity logits."""
    scaling_lr: float = 0.005
    """Learning rate of the log-scales."""
    rotation_lr: float = 0.005
    """Learning rate of the quaternions."""

    def __post_init__(self) -> None:
        if not (isinstance(self.sh_degree, int) and 0 <= self.sh_degree <= MAX_DEGREE):
            raise ValueError(f"gaussians.sh_degree must be an integer in 0..{MAX_DEGREE}, got {self.sh_degree!r}")
        if self.init not in INIT_METHODS:
            raise ValueError(f"gaussians.init must be one of {INIT_METHODS}, got {self.init!r}")
        if self.num_points < 1:
            raise ValueError(f"gaussians.num_points must be >= 1, got {self.num_points}")
        if not self.init_radius > 0:
            raise ValueError(f"gaussians.init_radius must be > 0, got {self.init_radius}")
        if not 0.0 < self.init_opacity < 1.0:
            raise ValueError(f"gaussians.init_opacity must be in (0, 1), got {self.init_opacity}")
        if self.init_scale is not None and not self.init_scale > 0:
            raise ValueError(f"gaussians.init_scale must be > 0 or None (automatic), got {self.init_scale}")
        if not (self.position_lr_init > 0 and self.position_lr_final > 0):
            raise ValueError(
                "gaussians.position_lr_init and position_lr_final must be > 0 (the decay is log-linear), "
                f"got {self.position_lr_init} and {self.position_lr_final}"
            )
        if self.position_lr_max_steps is not None and self.position_lr_max_steps < 1:
            raise ValueError(f"gaussians.position_lr_max_steps must be >= 1 or None (whole run), got {self.position_lr_max_steps}")
        if not self.spatial_lr_scale > 0:
            raise ValueError(f"gaussians.spatial_lr_scale must be > 0, got {self.spatial_lr_scale}")
        for name in ("feature_lr", "opacity_lr", "scaling_lr", "rotation_lr"):
            if getattr(self, name) < 0:
                raise ValueError(f"gaussians.{name} must be >= 0, got {getattr(self, name)}")

    def position_lr(self, step: int, max_steps: int | None = None) -> float:
        """Learning rate of the means at `step`: log-linear from init to final, then constant (3DGS).

        lr(t) = spatial_lr_scale * exp((1 - t) log(lr_init) + t log(lr_final)), t = clip(step / T, 0, 1)
        with T = `position_lr_max_steps`, or `max_steps` (the run length) when that is None.
        """
        T = self.position_lr_max_steps if self.position_lr_max_steps is not None else max_steps
        if T is None or T < 1:
            raise ValueError(
                "GaussianConfig.position_lr: position_lr_max_steps is None (decay over the whole run), "
                f"so pass the run length as max_steps (got {max_steps!r})"
            )
        t = min(max(step / T, 0.0), 1.0)
        log_lr = (1.0 - t) * math.log(self.position_lr_init) + t * math.log(self.position_lr_final)
        return self.spatial_lr_scale * math.exp(log_lr)


def knn_scales(points: Tensor, k: int = 3, chunk: int = 2048) -> Tensor:
    """Per point the RMS distance to its `k` nearest other points [N] (3DGS's initial scale)."""
    N = points.shape[0]
    k = min(k, N - 1)
    if k < 1:
        return points.new_full((N,), 0.01)
    out = []
    for start in range(0, N, chunk):
        d2 = torch.cdist(points[start:start + chunk], points).square()  # [n, N]
        nearest = d2.topk(k + 1, dim=1, largest=False).values[:, 1:]  # drop the point itself
        out.append(nearest.mean(1))
    return torch.cat(out).clamp_min(1e-7).sqrt()


class GaussianModel(nn.Module):
    """N 3D Gaussians with parameters `means` [N,3], `log_scales` [N,3], `quats` [N,4] (w,x,y,z),
    `opacity_logits` [N], `sh0` [N,1,3] and `shN` [N,K-1,3].

    `GaussianModel(cfg)` is an empty model (N = 0) to `load_state_dict` a checkpoint into; build
    populated ones with `random_ball`, `from_points`, `from_values` or `from_tensors`.
    """

    def __init__(self, cfg: GaussianConfig | None = None, num_gaussians: int = 0) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else GaussianConfig()
        N, K = num_gaussians, num_sh_bases(self.cfg.sh_degree)
        self.means = nn.Parameter(torch.zeros(N, 3))
        self.log_scales = nn.Parameter(torch.zeros(N, 3))
        self.quats = nn.Parameter(torch.zeros(N, 4).index_fill_(1, torch.tensor([0]), 1.0))
        self.opacity_logits = nn.Parameter(torch.zeros(N))
        self.sh0 = nn.Parameter(torch.zeros(N, 1, 3))
        self.shN = nn.Parameter(torch.zeros(N, K - 1, 3))

    # ----------------------------------------------------------------------------- constructors

    @classmethod
    def from_tensors(
        cls,
        means: Tensor,  # [N, 3]
        log_scales: Tensor,  # [N, 3]
        quats: Tensor,  # [N, 4] (w, x, y, z), need not be normalized
        opacity_logits: Tensor,  # [N]
        sh: Tensor,  # [N, K, 3] all SH coefficients, DC first
        cfg: GaussianConfig | None = None,
    ) -> GaussianModel:
        """A model holding copies of raw (unconstrained) parameters; the SH degree comes from K.

        `cfg` supplies learning rates; its `sh_degree` is replaced by the one of `sh`.
        """
        N = means.shape[0]
        expected = {"means": (N, 3), "log_scales": (N, 3), "quats": (N, 4), "opacity_logits": (N,)}
        got = {"means": means, "log_scales": log_scales, "quats": quats, "opacity_logits": opacity_logits}
        for name, shape in expected.items():
            if tuple(got[name].shape) != shape:
                raise ValueError(f"GaussianModel.from_tensors: {name} must be {list(shape)}, got {list(got[name].shape)}")
        K = sh.shape[1] if sh.dim() == 3 else -1
        degree = round(math.sqrt(K)) - 1 if K > 0 else -1
        if sh.dim() != 3 or sh.shape[0] != N or sh.shape[2] != 3 or num_sh_bases(degree) != K or degree > MAX_DEGREE:
            raise ValueError(
                f"GaussianModel.from_tensors: sh must be [N={N}, K, 3] with K in (1, 4, 9, 16), got {list(sh.shape)}"
            )
        cfg = replace(cfg if cfg is not None else GaussianConfig(), sh_degree=degree)
        model = cls(cfg)
        dtype = means.dtype if means.is_floating_point() else torch.float32
        for name, value in (("means", means), ("log_scales", log_scales), ("quats", quats),
                            ("opacity_logits", opacity_logits), ("sh0", sh[:, :1]), ("shN", sh[:, 1:])):
            setattr(model, name, nn.Parameter(value.detach().to(dtype).clone().contiguous()))
        return model

    @classmethod
    def from_values(
        cls,
        means: Tensor,  # [N, 3]
        scales: Tensor | float,  # [N, 3], [N] or a number: standard deviations
        opacities: Tensor | float,  # [N] or a number in (0, 1)
        colors: Tensor | float = 0.5,  # [N, 3] or a number, rgb in [0, 1]
        quats: Tensor | None = None,  # [N, 4] (w, x, y, z); identity when None
        cfg: GaussianConfig | None = None,
    ) -> GaussianModel:
        """A model from activated values (scales, opacities, colors); higher SH bands are zero."""
        N, dev, dt = means.shape[0], means.device, means.dtype
        scales = torch.as_tensor(scales, device=dev, dtype=dt)
        scales = scales.expand(N, 3) if scales.dim() == 0 else (scales[:, None].expand(N, 3) if scales.dim() == 1 else scales)
        opacities = torch.as_tensor(opacities, device=dev, dtype=dt).expand(N)
        colors = torch.as_tensor(colors, device=dev, dtype=dt).expand(N, 3)
        if quats is None:
            quats = torch.tensor([1.0, 0.0, 0.0, 0.0], device=dev, dtype=dt).expand(N, 4)
        cfg = cfg if cfg is not None else GaussianConfig()
        sh = torch.zeros(N, num_sh_bases(cfg.sh_degree), 3, device=dev, dtype=dt)
        sh[:, 0] = rgb_to_sh(colors)
        return cls.from_tensors(means, scales.log(), quats, torch.logit(opacities.clamp(1e-6, 1 - 1e-6)), sh, cfg)

    @classmethod
    def from_points(
        cls,
        points: Tensor,  # [N, 3]
        colors: Tensor | None = None,  # [N, 3] rgb in [0, 1]; mid-gray when None
        cfg: GaussianConfig | None = None,
    ) -> GaussianModel:
        """Gaussians at `points` with the config's initial opacity and scale (3DGS's point-cloud init)."""
        cfg = cfg if cfg is not None else GaussianConfig()
        if points.dim() != 2 or points.shape[1] != 3 or points.shape[0] < 1:
            raise ValueError(f"GaussianModel.from_points: points must be [N>=1, 3], got {list(points.shape)}")
        scales = knn_scales(points) if cfg.init_scale is None else points.new_full((points.shape[0],), cfg.init_scale)
        return cls.from_values(points, scales, cfg.init_opacity, 0.5 if colors is None else colors, cfg=cfg)

    @classmethod
    def random_ball(cls, cfg: GaussianConfig | None = None, generator: torch.Generator | None = None) -> GaussianModel:
        """DreamGaussian's initialization: `num_points` Gaussians uniform in a ball of `init_radius`.

        Colors are mid-gray with a small random jitter (rgb in 0.5 +- 0.02): DreamGaussian's
        random SH init (uniform in [0, 1/255]) amounts to the same near-gray start.
        """
        cfg = cfg if cfg is not None else GaussianConfig()
        n = cfg.num_points
        direction = torch.nn.functional.normalize(torch.randn(n, 3, generator=generator), dim=-1)  # [n, 3]
        radius = cfg.init_radius * torch.rand(n, generator=generator).pow(1.0 / 3.0)  # uniform in volume
        colors = 0.5 + 0.04 * (torch.rand(n, 3, generator=generator) - 0.5)
        return cls.from_points(direction * radius[:, None], colors, cfg)

    # ------------------------------------------------------------------------ activated values

    @property
    def num_gaussians(self) -> int:
        return self.means.shape[0]

    @property
    def sh_degree(self) -> int:
        return round(math.sqrt(self.shN.shape[1] + 1)) - 1

    @property
    def scales(self) -> Tensor:  # [N, 3] standard deviations along the local axes
        return self.log_scales.exp()

    @property
    def opacities(self) -> Tensor:  # [N] in (0, 1)
        return torch.sigmoid(self.opacity_logits)

    @property
    def sh(self) -> Tensor:  # [N, K, 3]
        return torch.cat([self.sh0, self.shN], dim=1)

    @property
    def rotations(self) -> Tensor:  # [N, 3, 3]
        return quat_to_rotmat(self.quats)

    @property
    def base_colors(self) -> Tensor:  # [N, 3] view-independent (DC) color, clamped to [0, 1]
        return sh_to_rgb(self.sh0[:, 0]).clamp(0.0, 1.0)

    # ------------------------------------------------------------------------------- optimizer

    def param_groups(self, cfg: GaussianConfig | None = None) -> list[dict]:
        """Adam parameter groups, one per parameter, each with a `name` (the parameter's name).

        Use them as 3DGS does: ``torch.optim.Adam(model.param_groups(), lr=0.0, eps=1e-15)``.
        The means start at `position_lr(0)`; call `update_learning_rate` every step for the decay.
        """
        cfg = cfg if cfg is not None else self.cfg
        lrs = {
            "means": cfg.spatial_lr_scale * cfg.position_lr_init,
            "log_scales": cfg.scaling_lr,
            "quats": cfg.rotation_lr,
            "opacity_logits": cfg.opacity_lr,
            "sh0": cfg.feature_lr,
            "shN": cfg.feature_lr / 20.0,
        }
        return [{"params": [getattr(self, name)], "lr": lrs[name], "name": name} for name in PARAM_NAMES]

    def update_learning_rate(self, optimizer: torch.optim.Optimizer, step: int, max_steps: int | None = None) -> float:
        """Set the position learning rate for `step` (see `GaussianConfig.position_lr`) and return it."""
        lr = self.cfg.position_lr(step, max_steps)
        for group in optimizer.param_groups:
            if group.get("name") == "means":
                group["lr"] = lr
        return lr

    # ------------------------------------------------------------------------------ checkpoints

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load a checkpoint whose number of Gaussians may differ from this model's (after densification).

        Parameters are first resized to the checkpoint's N (their other dimensions must match: a
        different SH degree raises `CheckpointError`), then loaded. Any optimizer built before this
        call holds the old parameters: build it afterwards and then load its state.
        """
        for name in PARAM_NAMES:
            if name not in state_dict:
                continue
            value, current = state_dict[name], getattr(self, name)
            if tuple(value.shape[1:]) != tuple(current.shape[1:]):
                if name == "shN":
                    theirs = round(math.sqrt(value.shape[1] + 1)) - 1
                    raise CheckpointError(
                        f"the checkpoint's Gaussians have SH degree {theirs} but the model has {self.sh_degree}; "
                        f"set the representation's sh_degree to {theirs}"
                    )
                raise CheckpointError(
                    f"checkpoint parameter {name} has shape {list(value.shape)}, the model expects [N, *{list(current.shape[1:])}]"
                )
            if value.shape[0] != current.shape[0]:
                resized = torch.empty(value.shape, dtype=current.dtype, device=current.device)
                setattr(self, name, nn.Parameter(resized, requires_grad=current.requires_grad))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # ------------------------------------------------------------------- fields for mesh export

    def density(self, points: Tensor, chunk: int | list[int] = 1024, cutoff: float = 3.0) -> Tensor:
        """Opacity-weighted Gaussian density at `points` [P, 3] -> [P].

        density(x) = sum_i o_i exp(-1/2 (x - mu_i)^T Sigma_i^-1 (x - mu_i)), the field DreamGaussian
        thresholds for mesh extraction. Each Gaussian is truncated at Mahalanobis distance `cutoff`
        (3 sigma, where its weight has fallen to 1.1% of o_i), which lets every chunk of points
        visit only the Gaussians whose bounding boxes overlap the chunk's. `chunk` is a chunk size
        or a list of sizes summing to P (e.g. one per spatial block of a grid). With a chunk size, the
        points are first sorted into the cells of a 32^3 grid over them, so each chunk is spatially
        compact (baking a 1024^2 texture: 2x faster); the result does not depend on the chunking. Chunks of
        1024 points were 2.5-6x faster than 4096 on a 64^3 grid (4k-20k Gaussians of scale 0.01-0.1).
        """
        return self._splat(points, None, chunk, cutoff)[0]

    def color_at(self, points: Tensor, chunk: int | list[int] = 1024, cutoff: float = 3.0) -> Tensor:
        """Density-weighted DC color at `points` [P, 3] -> [P, 3] in [0, 1].

        color(x) = sum_i w_i(x) c_i / sum_i w_i(x) with w_i the terms of `density` and
        c_i = clamp(C0 sh0_i + 0.5, 0, 1). Points no Gaussian reaches take the nearest Gaussian's color.
        """
        weight, weighted = self._splat(points, self.base_colors, chunk, cutoff)
        colors = weighted / weight.clamp_min(1e-12)[:, None]
        empty = weight <= 1e-12
        if empty.any() and self.num_gaussians > 0:
            nearest = torch.cat([torch.cdist(p, self.means).argmin(1) for p in points[empty].split(4096)])
            colors[empty] = self.base_colors[nearest]
        return colors.clamp(0.0, 1.0)

    def _splat(self, points: Tensor, values: Tensor | None, chunk: int | list[int], cutoff: float) -> tuple[Tensor, Tensor | None]:
        """sum_i w_i(x) [P] and, if `values` [N, D] is given, sum_i w_i(x) values_i [P, D]."""
        if points.dim() != 2 or points.shape[1] != 3:
            raise ValueError(f"GaussianModel.density: points must be [P, 3], got {list(points.shape)}")
        points = points.to(self.means)
        if isinstance(chunk, int) and len(points) > chunk:  # chunks of spatially close points visit fewer Gaussians
            lo, hi = points.amin(0), points.amax(0)
            cell = ((points - lo) / (hi - lo).clamp_min(1e-12) * 31.999).long()  # a 32^3 grid over the points
            order = torch.argsort(_morton_code(cell))  # Z-order: consecutive cells make compact blocks, not slabs
            sizes = [chunk] * (len(points) // chunk) + ([len(points) % chunk] if len(points) % chunk else [])
            w, v = self._splat(points[order], values, sizes, cutoff)
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(len(order), device=order.device)
            return w[inverse], (v[inverse] if v is not None else None)
        R, s = self.rotations, self.scales  # [N, 3, 3], [N, 3]
        precision = (R / s[:, None, :].square()) @ R.transpose(1, 2)  # [N, 3, 3] Sigma^-1 = R S^-2 R^T
        # The cutoff ellipsoid's bounding box: half-width cutoff * sqrt(Sigma_kk) along world axis k.
        half = cutoff * (R * s[:, None, :]).square().sum(-1).sqrt()  # [N, 3]
        lo_g, hi_g = self.means - half, self.means + half
        opacities = self.opacities
        total_w, total_v = [], []
        for pts in points.split(chunk):
            w_sum = pts.new_zeros(pts.shape[0])
            v_sum = pts.new_zeros(pts.shape[0], values.shape[1]) if values is not None else None
            lo, hi = pts.amin(0), pts.amax(0)
            hit = ((hi_g >= lo) & (lo_g <= hi)).all(-1).nonzero().squeeze(1)  # Gaussians touching this chunk
            # The quadratic form (x - mu)^T P (x - mu) as one matmul of monomials of x [p, 10] with
            # per-Gaussian coefficients [10, g]; centered on the chunk and in float64 against cancellation.
            center = (lo + hi) / 2
            x = (pts - center).double()  # [p, 3]
            monomials = torch.cat([x.square(), 2 * x[:, [0, 0, 1]] * x[:, [1, 2, 2]], x, torch.ones_like(x[:, :1])], 1)
            g_chunk = max(1, (1 << 22) // pts.shape[0])  # bound the [p, g] temporaries
            for idx in hit.split(g_chunk):
                P = precision[idx].double()  # [g, 3, 3]
                mu = (self.means[idx] - center).double()  # [g, 3]
                P_mu = (P @ mu[:, :, None])[:, :, 0]  # [g, 3]
                coeffs = torch.cat([
                    P[:, [0, 1, 2], [0, 1, 2]], P[:, [0, 0, 1], [1, 2, 2]], -2 * P_mu, (mu * P_mu).sum(1, keepdim=True),
                ], 1)  # [g, 10]
                m2 = (monomials @ coeffs.T).to(pts.dtype)  # [p, g] squared Mahalanobis distances
                inside = m2 <= cutoff * cutoff
                # Clamping before exp keeps far pairs out of the (very slow) denormal range; they are masked anyway.
                w = opacities[idx] * torch.exp(-0.5 * m2.clamp(0.0, cutoff * cutoff + 1.0)) * inside  # [p, g]
                w_sum = w_sum + w.sum(1)
                if values is not None:
                    v_sum = v_sum + w @ values[idx]
            total_w.append(w_sum)
            total_v.append(v_sum)
        if not total_w:
            empty = points.new_zeros(0)
            return empty, (points.new_zeros(0, values.shape[1]) if values is not None else None)
        return torch.cat(total_w), (torch.cat(total_v) if values is not None else None)

    def extra_repr(self) -> str:
        return f"num_gaussians={self.num_gaussians}, sh_degree={self.sh_degree}"


def _morton_code(cell: Tensor, bits: int = 5) -> Tensor:
    """Z-order (Morton) codes [P] of integer cells [P, 3] in [0, 2^bits): the bits of x, y, z interleaved, so that
    sorting by them walks the grid block by block."""
    code = torch.zeros_like(cell[:, 0])
    for b in range(bits):
        for axis in range(3):
            code |= ((cell[:, axis] >> b) & 1) << (3 * b + 2 - axis)
    return code
