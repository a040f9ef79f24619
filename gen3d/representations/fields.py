"""Neural fields: the one interface the volume renderer, regularizers, mesh extraction and metrics use.

A field maps world points ``[P, 3]`` (gen3d's convention: +z up, objects inside the unit ball) to a
non-negative volume density ``[P]`` and a feature vector ``[P, F]`` (for the fields here the albedo,
F = 3, in [0, 1]). It lives in the box ``[-bound, bound]^3``; outside it the density is 0.

Concrete fields subclass `Field` and implement `forward`; `density` and `normals` come with the
base class. Two are here, both "encoding + small MLPs" fields as in Instant-NGP [Müller et al. 2022]
and threestudio's implicit volume:

- `HashGridField` (`HashGridConfig`): a multi-resolution hash encoding (`gen3d.ops.hash_encoding`);
- `TriplaneField` (`TriplaneConfig`): three axis-aligned feature planes [Chan et al. 2022, EG3D]
  (`gen3d.ops.triplane`).

Both map a world point x in ``[-bound, bound]^3`` to the encoding's domain, and then

    sigma(x)  = act(density_mlp(enc(x)) + bias(x))   (0 outside the box)
    albedo(x) = sigmoid(feature_mlp(enc(x)))          ([P, 3])

with two MLPs (hidden width 64, one hidden layer, ReLU; as threestudio's separate density and
feature networks on one shared encoding), so that `density` (occupancy-grid updates, normals, mesh
extraction) skips the feature MLP. `act` is softplus (default) or the truncated exponential of
Instant-NGP (`trunc_exp`). The density bias "blob" is Magic3D's [Lin et al. 2023]
``blob_scale (1 - |x| / blob_radius)`` (threestudio "blob_magic3d"): the untrained field is a soft
ball of radius ~blob_radius around the origin, which SDS then carves. "none" adds nothing.

Optimizer: `param_groups()` gives the encoding (tables or planes) and the MLPs their own learning
rates (threestudio: 0.01 and 0.001); Instant-NGP's Adam is ``betas=(0.9, 0.99), eps=1e-15``:
``torch.optim.Adam(field.param_groups(), betas=(0.9, 0.99), eps=1e-15)``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gen3d.ops.hash_encoding import BACKENDS as HASH_BACKENDS
from gen3d.ops.hash_encoding import grid_resolutions, hash_encode
from gen3d.ops.triplane import REDUCTIONS, sample_triplane

DENSITY_ACTIVATIONS = ("softplus", "exp")
DENSITY_BIASES = ("blob", "none")


@dataclass
class FieldOutput:
    """What a field returns for P points."""

    density: Tensor  # [P] volume density sigma >= 0 (after the activation), 0 outside the box
    features: Tensor  # [P, F] features; the albedo in [0, 1] when F = 3


class Field(nn.Module):
    """Base class of neural fields; see the module docstring."""

    bound: float = 1.0
    """Half edge of the axis-aligned box ``[-bound, bound]^3`` the field is defined in."""
    feature_dim: int = 3
    """F, the width of `FieldOutput.features`."""

    def forward(self, points: Tensor) -> FieldOutput:  # points [P, 3] world
        raise NotImplementedError

    def density(self, points: Tensor) -> Tensor:
        """Volume density at `points` ``[P, 3]`` -> ``[P]`` (subclasses may skip the feature head)."""
        return self(points).density

    def normals(self, points: Tensor, method: str = "analytic", eps: float = 1e-3) -> Tensor:
        """Unit outward normals ``[P, 3]``: ``-∇σ / |∇σ|``.

        method: "analytic" (autograd of the density; differentiable, so a loss on the normals trains
        the field) or "finite_difference" (central differences with step `eps`, 6 extra density
        evaluations; what threestudio calls "finite_difference").
        """
        if method == "analytic":
            with torch.enable_grad():
                x = points if points.requires_grad else points.detach().requires_grad_(True)
                sigma = self.density(x)
                (grad,) = torch.autograd.grad(sigma.sum(), x, create_graph=torch.is_grad_enabled() and self.training)
        elif method == "finite_difference":
            offsets = torch.eye(3, device=points.device, dtype=points.dtype) * eps  # [3, 3]
            probe = torch.cat([points[:, None] + offsets, points[:, None] - offsets], 1)  # [P, 6, 3]
            sigma = self.density(probe.reshape(-1, 3)).view(-1, 2, 3)  # [P, 2, 3]
            grad = (sigma[:, 0] - sigma[:, 1]) / (2 * eps)
        else:
            raise ValueError(f"normals: method must be 'analytic' or 'finite_difference', got {method!r}")
        return -torch.nn.functional.normalize(grad, dim=-1, eps=1e-12)


def check_points(points: Tensor, who: str) -> None:
    """Raise ValueError unless `points` is a float ``[P, 3]`` tensor."""
    if points.dim() != 2 or points.shape[-1] != 3 or not points.is_floating_point():
        raise ValueError(f"{who}: points must be a float tensor [P, 3], got {tuple(points.shape)} {points.dtype}")


# ---------------------------------------------------------------------------------- activations


class _TruncExp(torch.autograd.Function):
    """exp(x) whose gradient uses exp(min(x, 15)): Instant-NGP's density activation, which keeps a large
    raw density from blowing up the gradient. Its backward is differentiable (double backward works)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * torch.exp(x.clamp(max=15.0))


def trunc_exp(x: Tensor) -> Tensor:
    """``exp(x)`` with the gradient ``exp(min(x, 15))`` (Instant-NGP's truncated exponential)."""
    return _TruncExp.apply(x)


# ---------------------------------------------------------------------------------- configs


@dataclass
class FieldConfig:
    """What every encoding + MLP field shares: its box, the MLPs, the density head, the learning rates."""

    bound: float = 1.0
    """Half edge of the box [-bound, bound]^3 the field lives in (objects sit in the unit ball); density is 0 outside."""
    hidden_dim: int = 64
    """Width of the hidden layers of the density and feature MLPs (Instant-NGP: 64)."""
    num_hidden_layers: int = 1
    """Hidden layers of each MLP (Instant-NGP's density MLP: 1)."""
    density_activation: str = "softplus"
    """'softplus' or 'exp' (Instant-NGP's truncated exponential: exp with the gradient of exp(min(x, 15)))."""
    density_bias: str = "blob"
    """'blob' (Magic3D: blob_scale * (1 - |x| / blob_radius) added before the activation, so training starts from a ball) or 'none'."""
    blob_scale: float = 10.0
    """Height of the blob bias at the origin (Magic3D, threestudio: 10)."""
    blob_radius: float = 0.5
    """Radius, in world units, where the blob bias crosses 0 (Magic3D, threestudio: 0.5)."""
    lr_encoding: float = 0.01
    """Adam learning rate of the encoding's parameters (hash tables or planes; threestudio: 0.01)."""
    lr_network: float = 0.001
    """Adam learning rate of the MLPs (threestudio: 0.001)."""

    def __post_init__(self) -> None:
        name = type(self).__name__
        if not self.bound > 0:
            raise ValueError(f"{name}.bound must be > 0, got {self.bound}")
        if not (isinstance(self.hidden_dim, int) and self.hidden_dim >= 1):
            raise ValueError(f"{name}.hidden_dim must be an int >= 1, got {self.hidden_dim!r}")
        if not (isinstance(self.num_hidden_layers, int) and self.num_hidden_layers >= 0):
            raise ValueError(f"{name}.num_hidden_layers must be an int >= 0, got {self.num_hidden_layers!r}")
        if self.density_activation not in DENSITY_ACTIVATIONS:
            raise ValueError(f"{name}.density_activation must be one of {DENSITY_ACTIVATIONS}, got {self.density_activation!r}")
        if self.density_bias not in DENSITY_BIASES:
            raise ValueError(f"{name}.density_bias must be one of {DENSITY_BIASES}, got {self.density_bias!r}")
        if not self.blob_radius > 0:
            raise ValueError(f"{name}.blob_radius must be > 0, got {self.blob_radius}")
        for lr in ("lr_encoding", "lr_network"):
            if getattr(self, lr) < 0:
                raise ValueError(f"{name}.{lr} must be >= 0, got {getattr(self, lr)}")


@dataclass
class HashGridConfig(FieldConfig):
    """A hash-grid field (Instant-NGP encoding), sized for CPU score distillation at 64 x 64 renders.

    Defaults: 16 levels x 2 features (Instant-NGP's), resolutions 16..512 over the box (for bound 1
    a finest cell of 1/256 world units, finer than a 64-px render's pixel footprint, ~1/30 at the
    usual camera distance), and a table of 2^16 rows instead of Instant-NGP's 2^19: on this CPU an
    Adam step over the 2^19 x 16 x 2 = 16.8 M table parameters takes 30-80 ms (plus up to ~25 ms to
    allocate a zero gradient that size) against ~3 ms for 2^16 (1 thread, 2-core machine under load;
    benchmarks/bench_hash_encoding.py measures it), as much as the whole encoding's forward and
    backward for 2^16 samples (~60 ms), and a 64 x 64 SDS render does not need the capacity.
    """

    num_levels: int = 16
    """L, the number of resolution levels."""
    features_per_level: int = 2
    """F, the features per level (the encoding has L * F features)."""
    log2_hashmap_size: int = 16
    """log2 of T, the rows of each level's table (Instant-NGP: 19; 16 here, see the class docstring)."""
    base_resolution: int = 16
    """N_min, the cells per axis of the coarsest level over the box."""
    finest_resolution: int = 512
    """N_max, the cells per axis of the finest level over the box; levels grow geometrically in between."""
    init_scale: float = 1e-4
    """Tables start uniform in [-init_scale, init_scale] (Instant-NGP: 1e-4)."""
    backend: str = "auto"
    """Backend of `hash_encode`: 'auto' (the compiled C++ kernel on CPU when it builds, else torch), 'torch' or 'cpp'."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("num_levels", "features_per_level", "base_resolution", "finest_resolution"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"HashGridConfig.{name} must be an int >= 1, got {value!r}")
        if not self.base_resolution <= self.finest_resolution:
            raise ValueError(f"HashGridConfig: base_resolution must be <= finest_resolution, got "
                             f"{self.base_resolution} and {self.finest_resolution}")
        if not (isinstance(self.log2_hashmap_size, int) and 1 <= self.log2_hashmap_size <= 26):
            raise ValueError(f"HashGridConfig.log2_hashmap_size must be an int in 1..26, got {self.log2_hashmap_size!r}")
        if not self.init_scale >= 0:
            raise ValueError(f"HashGridConfig.init_scale must be >= 0, got {self.init_scale}")
        if self.backend not in HASH_BACKENDS:
            raise ValueError(f"HashGridConfig.backend must be one of {HASH_BACKENDS}, got {self.backend!r}")


@dataclass
class TriplaneConfig(FieldConfig):
    """A triplane field: three R x R planes of F features (EG3D), summed (EG3D) or multiplied (K-Planes).

    Defaults: 32 features at 64^2 per plane, 3 x 32 x 64^2 = 393 k parameters (a texel every 1/32
    world unit for bound 1, about a pixel of a 64-px render), summed as in EG3D.
    """

    num_features: int = 32
    """F, the features per plane."""
    resolution: int = 64
    """R, the texels per side of each plane (spanning [-bound, bound])."""
    reduce: str = "sum"
    """How the three planes' samples combine: 'sum' (EG3D), 'product' (K-Planes) or 'concat' (3F features)."""
    init_scale: float = 1e-4
    """Planes start uniform in [-init_scale, init_scale], or in [1 - init_scale, 1 + init_scale] for 'product' (so that the product neither vanishes nor its gradient)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.num_features, int) and self.num_features >= 1):
            raise ValueError(f"TriplaneConfig.num_features must be an int >= 1, got {self.num_features!r}")
        if not (isinstance(self.resolution, int) and self.resolution >= 2):
            raise ValueError(f"TriplaneConfig.resolution must be an int >= 2, got {self.resolution!r}")
        if self.reduce not in REDUCTIONS:
            raise ValueError(f"TriplaneConfig.reduce must be one of {REDUCTIONS}, got {self.reduce!r}")
        if not self.init_scale >= 0:
            raise ValueError(f"TriplaneConfig.init_scale must be >= 0, got {self.init_scale}")


# ---------------------------------------------------------------------------------- fields


def _mlp(in_dim: int, hidden_dim: int, num_hidden_layers: int, out_dim: int) -> nn.Sequential:
    """Linear layers with ReLU between them: in -> hidden (x num_hidden_layers) -> out."""
    dims = [in_dim] + [hidden_dim] * num_hidden_layers + [out_dim]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class EncodedField(Field):
    """An encoding followed by a density MLP and an albedo MLP (see the module docstring).

    Subclasses set `encoding_dim` and implement `encode(points)` (world points inside the box ->
    ``[P, encoding_dim]``) and `encoding_parameters()`.
    """

    feature_dim = 3

    def __init__(self, cfg: FieldConfig, encoding_dim: int):
        super().__init__()
        self.cfg = cfg
        self.bound = float(cfg.bound)
        self.density_net = _mlp(encoding_dim, cfg.hidden_dim, cfg.num_hidden_layers, 1)
        self.feature_net = _mlp(encoding_dim, cfg.hidden_dim, cfg.num_hidden_layers, self.feature_dim)

    def encode(self, points: Tensor) -> Tensor:  # [P, 3] world -> [P, E]
        raise NotImplementedError

    def encoding_parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def density_bias(self, points: Tensor) -> Tensor:  # [P, 3] -> [P]
        """The bias added to the raw density before the activation (see `FieldConfig.density_bias`)."""
        if self.cfg.density_bias == "none":
            return points.new_zeros(points.shape[0])
        # |x| with a tiny floor under the root: the same value, but finite second derivatives at the origin
        radius = torch.sqrt(points.square().sum(-1) + 1e-12)
        return self.cfg.blob_scale * (1.0 - radius / self.cfg.blob_radius)

    def _activate(self, raw: Tensor) -> Tensor:
        return nn.functional.softplus(raw) if self.cfg.density_activation == "softplus" else trunc_exp(raw)

    def _density_from(self, enc: Tensor, points: Tensor) -> Tensor:  # -> [P]
        raw = self.density_net(enc)[:, 0] + self.density_bias(points)
        sigma = self._activate(raw)
        inside = (points.abs() <= self.bound).all(-1)  # [P]
        return torch.where(inside, sigma, torch.zeros_like(sigma))

    def forward(self, points: Tensor) -> FieldOutput:  # points [P, 3] world
        check_points(points, type(self).__name__)
        enc = self.encode(points)  # [P, E]
        albedo = torch.sigmoid(self.feature_net(enc))  # [P, 3]
        return FieldOutput(self._density_from(enc, points), albedo)

    def density(self, points: Tensor) -> Tensor:  # [P, 3] -> [P]
        check_points(points, f"{type(self).__name__}.density")
        return self._density_from(self.encode(points), points)

    def param_groups(self, lr_encoding: float | None = None, lr_network: float | None = None) -> list[dict]:
        """Adam parameter groups ``encoding`` and ``network`` with their learning rates (the config's by default).

        ``torch.optim.Adam(field.param_groups(), betas=(0.9, 0.99), eps=1e-15)`` is Instant-NGP's optimizer.
        """
        lr_encoding = self.cfg.lr_encoding if lr_encoding is None else lr_encoding
        lr_network = self.cfg.lr_network if lr_network is None else lr_network
        encoding = self.encoding_parameters()
        ids = {id(p) for p in encoding}
        network = [p for p in self.parameters() if id(p) not in ids]
        return [{"params": encoding, "lr": lr_encoding, "name": "encoding"},
                {"params": network, "lr": lr_network, "name": "network"}]


class HashGridField(EncodedField):
    """A neural field on a multi-resolution hash encoding [Müller et al. 2022]; see `HashGridConfig`.

    World points in ``[-bound, bound]^3`` map to the encoding's ``[0, 1]^3`` by ``(x + bound) / (2 bound)``.
    `tables` ``[L, T, F]`` is the parameter `hash_encode` reads.
    """

    def __init__(self, cfg: HashGridConfig | None = None):
        cfg = cfg if cfg is not None else HashGridConfig()
        if not isinstance(cfg, HashGridConfig):
            raise ValueError(f"HashGridField: cfg must be a HashGridConfig, got {type(cfg).__name__}")
        super().__init__(cfg, cfg.num_levels * cfg.features_per_level)
        self.resolutions = grid_resolutions(cfg.num_levels, cfg.base_resolution, cfg.finest_resolution)
        table = torch.empty(cfg.num_levels, 2**cfg.log2_hashmap_size, cfg.features_per_level)
        self.tables = nn.Parameter(table.uniform_(-cfg.init_scale, cfg.init_scale))  # [L, T, F]

    def encode(self, points: Tensor) -> Tensor:  # [P, 3] world -> [P, L F]
        unit = (points + self.bound) / (2.0 * self.bound)  # [P, 3] in [0, 1] inside the box
        return hash_encode(unit, self.tables, self.resolutions, backend=self.cfg.backend)

    def encoding_parameters(self) -> list[nn.Parameter]:
        return [self.tables]


class TriplaneField(EncodedField):
    """A neural field on three feature planes [Chan et al. 2022, EG3D]; see `TriplaneConfig`.

    World points in ``[-bound, bound]^3`` map to the planes' ``[-1, 1]^3`` by ``x / bound``. `planes`
    ``[3, F, R, R]`` holds the xy, xz and yz planes (`gen3d.ops.triplane.sample_triplane`).
    """

    def __init__(self, cfg: TriplaneConfig | None = None):
        cfg = cfg if cfg is not None else TriplaneConfig()
        if not isinstance(cfg, TriplaneConfig):
            raise ValueError(f"TriplaneField: cfg must be a TriplaneConfig, got {type(cfg).__name__}")
        width = cfg.num_features * (3 if cfg.reduce == "concat" else 1)
        super().__init__(cfg, width)
        planes = torch.empty(3, cfg.num_features, cfg.resolution, cfg.resolution)
        center = 1.0 if cfg.reduce == "product" else 0.0
        self.planes = nn.Parameter(planes.uniform_(center - cfg.init_scale, center + cfg.init_scale))

    def encode(self, points: Tensor) -> Tensor:  # [P, 3] world -> [P, F] or [P, 3F]
        return sample_triplane(self.planes, points / self.bound, self.cfg.reduce)

    def encoding_parameters(self) -> list[nn.Parameter]:
        return [self.planes]
