"""Volume rendering of a neural `Field` from a batch of cameras, with shading and a background.

Per camera batch: one ray per pixel center (`gen3d.ops.volume.camera_rays`), clipped to the field's
box or ball; samples at uniform steps (stratified in training) between the ray's entry and exit,
the empty ones dropped by an Instant-NGP occupancy grid before the field runs
(`gen3d.rendering.occupancy`); the field gives density and albedo at the kept samples; a material
turns albedo into color; the NeRF quadrature composites them (`gen3d.ops.volume.composite`,
[Mildenhall et al. 2020]) over a background.

Materials follow DreamFusion [Poole et al. 2022, "DreamFusion: Text-to-3D using 2D Diffusion"],
Sec. 3.1 and App. A.2: ``color = albedo * (ambient + diffuse * max(n . l, 0))`` with a point light l
sampled around the camera, normals ``n = -grad(sigma) / |grad(sigma)|``; during training a camera
is rendered albedo-only with probability `albedo_only_prob`, else textureless (albedo replaced by
a constant gray) with probability `textureless_prob`, else fully shaded. Backgrounds: a solid
color, a random color per camera, or threestudio's neural environment map (a small MLP on the view
direction; with probability `random_prob` a random solid color instead, its "random_aug").

Outputs (`RenderOutput`): rgb [C, H, W, 3] over the background, alpha [C, H, W, 1], depth
[C, H, W, 1] (expected camera-space z normalized by alpha, 0 where alpha is 0; t along a unit
ray times the ray's cosine to the optical axis), normal [C, H, W, 3] (sum_i w_i n_i: alpha-weighted,
not normalized, 0 on the background; None when normals are off), samples (`SampleRecord`: per-sample
weights, normals, ray directions, ray indices for the orientation and other ray losses).

Speed, measured: one training step (forward + backward of a loss on rgb, and on the normal map when
normals are on) of 4 cameras x 64 x 64 = 16k rays from `gen3d.cameras.sample_orbit`'s default
orbit, 128 samples per box diagonal, a smooth ball of radius 0.5 (the shape SDS starts from); 1
thread, `nice -n 19`, CPU time (the 2-core machine was running other jobs: +-20%). "analytic" is a
closed-form field, so its figures are the renderer's own cost; "MLP" is a 3-64-64-4 ReLU MLP field,
closer to a neural field's per-point cost:

    field     grid  early stop  normals    samples/ray  s/step  rays/s
    analytic  off   -           none       66.2         0.10    160k
    analytic  off   -           analytic   66.2         0.18     90k
    analytic  32^3  off         none        9.5         0.032   520k
    analytic  32^3  1e-4        none        7.2         0.051   320k
    analytic  32^3  1e-4        analytic    7.2         0.059   280k
    MLP       off   -           none       66.2         1.63     10k
    MLP       off   -           analytic   66.2         4.24      4k
    MLP       32^3  off         none        9.8         0.18     93k
    MLP       32^3  1e-4        none        6.7         0.14    121k
    MLP       32^3  off         analytic    9.8         0.50     33k
    MLP       32^3  1e-4        analytic    6.7         0.31     52k

The occupancy grid is the big win (9x with the MLP field); early stopping pays once the field costs
more than the renderer's bookkeeping (1.3-1.6x with the MLP, a loss with the closed-form field);
analytic normals cost 2-3x (a double backward through the field). A 64^3 grid saved ~4% more
samples on this blob, and a full update of it costs 8x more than at 32^3.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from dataclasses import field as dataclass_field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gen3d.cameras import Cameras
from gen3d.ops.sh import sh_basis
from gen3d.ops.volume import (
    Composite,
    RaySamples,
    camera_rays,
    composite,
    ray_box,
    ray_sphere,
    segment_sum,
    uniform_samples,
)
from gen3d.rendering.occupancy import BACKENDS as GRID_BACKENDS
from gen3d.rendering.occupancy import OccupancyGrid
from gen3d.rendering.types import RenderOutput, SampleRecord
from gen3d.representations.fields import Field

SHADINGS = ("albedo", "textureless", "diffuse")
BACKGROUND_KINDS = ("solid", "random", "white_black", "mlp")


@dataclass
class MaterialConfig:
    """How a field's albedo becomes color (DreamFusion's shading, see the module docstring)."""

    kind: str = "albedo"
    """"albedo": color = albedo (no normals needed). "diffuse": ambient + Lambertian point light, with
    DreamFusion's albedo-only / textureless augmentation in training (needs normals)."""
    ambient: float = 0.1
    """Ambient light intensity (gray)."""
    diffuse: float = 0.9
    """Point-light intensity (gray); ambient + diffuse = 1 keeps colors within [0, 1]."""
    albedo_only_prob: float = 0.2
    """Training: probability that a camera is rendered with plain albedo (DreamFusion mixes
    unshaded renders in; raise it to 1 for an albedo-only warm-up)."""
    textureless_prob: float = 0.5
    """Training: probability that a shaded camera uses a constant gray albedo instead of the field's
    (DreamFusion's textureless shading, which forces geometry to explain the image)."""
    textureless_albedo: float = 1.0
    """Gray level of the textureless albedo (DreamFusion: white)."""
    light_distance_range: tuple[float, float] = (0.8, 1.5)
    """Distance of the point light from the origin, in multiples of the camera's distance."""
    light_direction_std: float = 0.5
    """Std of the Gaussian perturbation added to the camera's unit direction to place the light
    (0: light on the camera's axis). Evaluation uses the unperturbed direction and the mean distance."""

    def __post_init__(self) -> None:
        if self.kind not in ("albedo", "diffuse"):
            raise ValueError(f"material.kind must be 'albedo' or 'diffuse', got {self.kind!r}")
        for name in ("albedo_only_prob", "textureless_prob", "textureless_albedo"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"material.{name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.ambient < 0 or self.diffuse < 0 or self.light_direction_std < 0:
            raise ValueError(f"material.ambient, diffuse and light_direction_std must be >= 0, got "
                             f"{self.ambient}, {self.diffuse}, {self.light_direction_std}")
        lo, hi = self.light_distance_range
        if not 0 < lo <= hi:
            raise ValueError(f"material.light_distance_range must be [low, high] with 0 < low <= high, got {list(self.light_distance_range)}")


@dataclass
class BackgroundConfig:
    """What rays see behind the field."""

    kind: str = "solid"
    """"solid" (`color`), "random" (a random color per camera in training, `color` in evaluation),
    "white_black" (white or black per camera in training, as DreamGaussian; `color` in evaluation: for
    priors trained on white and black backgrounds, such as the embedded one) or "mlp" (threestudio's
    neural environment map: a small trainable MLP on the view direction)."""
    color: tuple[float, float, float] = (1.0, 1.0, 1.0)
    """Solid color, and the evaluation color of "random" (white: what the Shapes world renders on)."""
    random_prob: float = 0.0
    """"mlp" only, training only: probability that a camera gets a random solid color instead of the
    MLP (threestudio's random_aug; keeps the MLP from absorbing the object)."""
    random_colors: str = "uniform"
    """The solid colors of "mlp"'s random_prob: "uniform" (any color, threestudio) or "white_black"
    (for priors trained on white and black backgrounds, such as the embedded one)."""
    hidden: int = 32
    """"mlp": width of the hidden layers."""
    layers: int = 2
    """"mlp": number of hidden layers."""
    sh_degree: int = 3
    """"mlp": the view direction enters through real spherical harmonics of this degree ((d+1)^2 inputs)."""

    def __post_init__(self) -> None:
        if self.kind not in BACKGROUND_KINDS:
            raise ValueError(f"background.kind must be one of {BACKGROUND_KINDS}, got {self.kind!r}")
        if len(self.color) != 3 or not all(0.0 <= c <= 1.0 for c in self.color):
            raise ValueError(f"background.color must be 3 values in [0, 1], got {self.color!r}")
        if self.random_colors not in ("uniform", "white_black"):
            raise ValueError(f"background.random_colors must be 'uniform' or 'white_black', got {self.random_colors!r}")
        if not 0.0 <= self.random_prob <= 1.0:
            raise ValueError(f"background.random_prob must be in [0, 1], got {self.random_prob!r}")
        if self.hidden < 1 or self.layers < 0 or not 0 <= self.sh_degree <= 3:
            raise ValueError(f"background: need hidden >= 1, layers >= 0, sh_degree in 0..3, got "
                             f"{self.hidden}, {self.layers}, {self.sh_degree}")


@dataclass
class VolumeRendererConfig:
    """Volume renderer of neural fields (see the module docstring)."""

    bound: float = 1.0
    """Half edge of the rendered box (or radius of the ball); gen3d's objects live in the unit ball."""
    bounds: str = "box"
    """"box": rays march through [-bound, bound]^3, the field's whole domain. "sphere": through the
    ball of radius `bound` (fewer samples per ray; content in the box's corners is not rendered)."""
    samples_per_ray: int = 128
    """Samples along the box's diagonal (2 sqrt(3) bound); sets the step when render_step_size is None
    (threestudio's convention); shorter chords get proportionally fewer samples."""
    render_step_size: float | None = None
    """Marching step in world units; None: 2 sqrt(3) bound / samples_per_ray."""
    occupancy_grid: bool = True
    """Skip empty space with an Instant-NGP occupancy grid (`gen3d.rendering.occupancy`)."""
    grid_resolution: int = 32
    """Occupancy-grid cells per axis (32 on CPU; Instant-NGP uses 128 on a GPU)."""
    grid_update_interval: int = 16
    """Training steps between occupancy-grid updates (Instant-NGP, nerfacc: 16)."""
    grid_warmup_steps: int = 256
    """Updates before this step visit every cell; later ones a random quarter of the cells plus as
    many occupied ones (Instant-NGP, nerfacc: 256)."""
    grid_threshold: float = 0.01
    """A cell is occupied where density * step > min(grid_threshold, mean of it over cells)."""
    grid_dilation: int = 0
    """Also mark cells within this many cells of an occupied one (0: Instant-NGP). 1 removes the
    silhouette erosion of fields sharper than a cell at ~1.6x the samples (`gen3d.rendering.occupancy`)."""
    grid_backend: str = "auto"
    """Occupancy-grid sampler: "auto" (nerfacc on CUDA when installed, else torch), "torch", "nerfacc"."""
    early_stop_eps: float = 1e-4
    """With the occupancy grid: drop samples behind the point where transmittance falls below this
    (nerfacc's default; 0: off). Costs a gradient-free density pass over the kept samples and saves
    the full pass + backward on ~30% of them for an opaque blob (measured: see the module docstring)."""
    normals: str = "none"
    """"none" (fastest: no normal map, no diffuse shading), "analytic" (autograd of the density in the
    same field pass; differentiable in training, so orientation losses train the geometry; needed by
    DreamFusion's shading; ~2x the cost of "none" with an MLP field) or "finite_difference" (central
    differences, 6 extra density evaluations per sample; differentiable as well)."""
    normals_eps: float = 1e-3
    """Step of the finite-difference normals."""
    chunk_rays: int = 1 << 15
    """Rays rendered per field call; bounds the memory of evaluation renders (in training the
    autograd graph of all chunks is kept until backward anyway)."""
    material: MaterialConfig = dataclass_field(default_factory=MaterialConfig)
    """Shading."""
    background: BackgroundConfig = dataclass_field(default_factory=BackgroundConfig)
    """Background."""

    def __post_init__(self) -> None:
        if not self.bound > 0:
            raise ValueError(f"renderer.bound must be > 0, got {self.bound!r}")
        if self.bounds not in ("box", "sphere"):
            raise ValueError(f"renderer.bounds must be 'box' or 'sphere', got {self.bounds!r}")
        if self.samples_per_ray < 1:
            raise ValueError(f"renderer.samples_per_ray must be >= 1, got {self.samples_per_ray!r}")
        if self.render_step_size is not None and not self.render_step_size > 0:
            raise ValueError(f"renderer.render_step_size must be > 0 or None, got {self.render_step_size!r}")
        if (self.grid_resolution < 1 or self.grid_update_interval < 1 or self.grid_warmup_steps < 0
                or self.grid_dilation < 0):
            raise ValueError(f"renderer: need grid_resolution >= 1, grid_update_interval >= 1, grid_warmup_steps >= 0, "
                             f"grid_dilation >= 0, got {self.grid_resolution}, {self.grid_update_interval}, "
                             f"{self.grid_warmup_steps}, {self.grid_dilation}")
        if self.grid_backend not in GRID_BACKENDS:
            raise ValueError(f"renderer.grid_backend must be one of {GRID_BACKENDS}, got {self.grid_backend!r}")
        if not 0.0 <= self.early_stop_eps < 1.0:
            raise ValueError(f"renderer.early_stop_eps must be in [0, 1), got {self.early_stop_eps!r}")
        if self.normals not in ("analytic", "finite_difference", "none"):
            raise ValueError(f"renderer.normals must be 'analytic', 'finite_difference' or 'none', got {self.normals!r}")
        if self.chunk_rays < 1:
            raise ValueError(f"renderer.chunk_rays must be >= 1, got {self.chunk_rays!r}")
        if not self.grid_threshold >= 0 or not self.normals_eps > 0:
            raise ValueError(f"renderer: need grid_threshold >= 0 and normals_eps > 0, got {self.grid_threshold!r} and "
                             f"{self.normals_eps!r}")
        if self.material.kind == "diffuse" and self.normals == "none":
            raise ValueError("renderer: material.kind='diffuse' needs normals, got renderer.normals='none'")

    @property
    def step_size(self) -> float:
        return self.render_step_size or 2 * math.sqrt(3) * self.bound / self.samples_per_ray


class BackgroundMLP(nn.Module):
    """Neural environment map (threestudio): view direction [R, 3] -> color [R, 3] in (0, 1)."""

    def __init__(self, hidden: int = 32, layers: int = 2, sh_degree: int = 3):
        super().__init__()
        self.sh_degree = sh_degree
        dims = [(sh_degree + 1) ** 2] + [hidden] * layers
        mods: list[nn.Module] = []
        for a, b in itertools.pairwise(dims):
            mods += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*mods, nn.Linear(dims[-1], 3))

    def forward(self, directions: Tensor) -> Tensor:  # [R, 3] unit -> [R, 3]
        dtype = self.net[0].weight.dtype
        return torch.sigmoid(self.net(sh_basis(self.sh_degree, directions).to(dtype))).to(directions.dtype)


class VolumeRenderer(nn.Module):
    """Renders a `Field` from `Cameras` into a `RenderOutput` (see the module docstring).

    Owns the occupancy grid (buffers ``grid.*``) and the background MLP (parameters
    ``background_mlp.*``, when background.kind is "mlp"), so both checkpoint with it.
    """

    def __init__(self, cfg: VolumeRendererConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or VolumeRendererConfig()
        self.grid = OccupancyGrid(
            cfg.bound, cfg.grid_resolution, cfg.step_size, cfg.grid_update_interval, cfg.grid_warmup_steps,
            threshold=cfg.grid_threshold, dilation=cfg.grid_dilation, backend=cfg.grid_backend,
        ) if cfg.occupancy_grid else None
        bg = cfg.background
        self.background_mlp = BackgroundMLP(bg.hidden, bg.layers, bg.sh_degree) if bg.kind == "mlp" else None

    def forward(
        self,
        field: Field,
        cameras: Cameras,
        generator: torch.Generator | None = None,
        step: int | None = None,
        train: bool = False,
        background: Tensor | None = None,  # [3] or [C, 3]: overrides the configured background
        light_positions: Tensor | None = None,  # [C, 3] world: overrides the sampled point lights
        shading: str | None = None,  # "albedo" | "textureless" | "diffuse": overrides the material's choice
    ) -> RenderOutput:
        """Render `field` from `cameras`.

        train: stratified samples, shading and background augmentation drawn from `generator` (torch's
        default generator if None), and, when `step` is given, an occupancy-grid update at that step.
        Otherwise deterministic (midpoint samples, full shading for "diffuse", the configured color).
        """
        cfg = self.cfg
        C, H, W = self._check(field, cameras, step, background, light_positions, shading)
        device, dtype = cameras.device, cameras.c2w.dtype
        if train and generator is None:
            generator = torch.default_generator
        if self.grid is not None and train and step is not None:
            self.grid.update(field.density, step, generator)

        origins, directions = camera_rays(cameras)  # [C, H, W, 3] each
        origins, directions = origins.reshape(-1, 3), directions.reshape(-1, 3)  # [R, 3]
        n_rays, per_cam = C * H * W, H * W
        cos_axis = (directions.view(C, per_cam, 3) * cameras.c2w[:, None, :3, 2]).sum(-1).reshape(-1)  # [R]
        modes, lights = self._shading(cameras, generator if train else None, light_positions, shading)
        bg_cam, use_mlp = self._background_colors(C, device, dtype, generator if train else None, background)

        any_mlp = self.background_mlp is not None and bool(use_mlp.any())
        rgb, alpha, depth, normal, record = [], [], [], [], []
        for r0 in range(0, n_rays, cfg.chunk_rays):
            r1 = min(n_rays, r0 + cfg.chunk_rays)
            comp, samples, normals = self._render_chunk(field, origins[r0:r1], directions[r0:r1],
                                                        generator if train else None, modes, lights, r0, per_cam)
            cam = torch.arange(r0, r1, device=device) // per_cam  # [r] camera of each ray
            bg = bg_cam[cam]  # [r, 3]
            if any_mlp:
                bg = torch.where(use_mlp[cam][:, None], self.background_mlp(directions[r0:r1]), bg)
            rgb.append(comp.colors + (1.0 - comp.alpha)[:, None] * bg)
            alpha.append(comp.alpha)
            depth.append(comp.depth * cos_axis[r0:r1])
            if normals is not None:
                normal.append(segment_sum(comp.weights[:, None] * normals, samples.ray_indices, r1 - r0))
            record.append((comp.weights, normals, directions[r0:r1][samples.ray_indices], samples.ray_indices + r0,
                           samples.t_starts, samples.t_ends))

        weights, normals, dirs, ray_indices, t_starts, t_ends = zip(*record)
        shape = (C, H, W)
        return RenderOutput(
            rgb=torch.cat(rgb).view(*shape, 3),
            alpha=torch.cat(alpha).view(*shape, 1),
            depth=torch.cat(depth).view(*shape, 1),
            normal=torch.cat(normal).view(*shape, 3) if normal else None,
            samples=SampleRecord(
                weights=torch.cat(weights), normals=torch.cat(normals) if normal else None, directions=torch.cat(dirs),
                ray_indices=torch.cat(ray_indices), n_rays=n_rays, t_starts=torch.cat(t_starts), t_ends=torch.cat(t_ends),
            ),
        )

    # ---------------------------------------------------------------------------------------------

    def _check(self, field, cameras, step, background, light_positions, shading) -> tuple[int, int, int]:
        if not isinstance(field, Field):
            raise ValueError(f"VolumeRenderer: field must be a gen3d Field, got {type(field).__name__}")
        if field.feature_dim != 3:
            raise ValueError(f"VolumeRenderer: the field's features must be an albedo (F = 3), got F = {field.feature_dim}")
        if not isinstance(cameras, Cameras):
            raise ValueError(f"VolumeRenderer: cameras must be gen3d Cameras, got {type(cameras).__name__}")
        C = len(cameras)
        if step is not None and (not isinstance(step, int) or step < 0):
            raise ValueError(f"VolumeRenderer: step must be a non-negative int or None, got {step!r}")
        if background is not None and tuple(background.shape) not in ((3,), (C, 3)):
            raise ValueError(f"VolumeRenderer: background must be [3] or [C, 3] with C = {C}, got {tuple(background.shape)}")
        if light_positions is not None and tuple(light_positions.shape) != (C, 3):
            raise ValueError(f"VolumeRenderer: light_positions must be [C, 3] with C = {C}, got {tuple(light_positions.shape)}")
        if shading is not None and shading not in SHADINGS:
            raise ValueError(f"VolumeRenderer: shading must be one of {SHADINGS} or None, got {shading!r}")
        if shading in ("textureless", "diffuse") and self.cfg.normals == "none":
            raise ValueError(f"VolumeRenderer: shading={shading!r} needs normals, but renderer.normals is 'none'")
        return C, cameras.height, cameras.width

    def _shading(self, cameras: Cameras, generator, light_positions, shading) -> tuple[Tensor, Tensor | None]:
        """Per-camera shading mode [C] (index into SHADINGS) and point-light positions [C, 3] (or None)."""
        mat, C, device = self.cfg.material, len(cameras), cameras.device
        if shading is not None:
            modes = torch.full((C,), SHADINGS.index(shading), device=device)
        elif mat.kind == "albedo":
            modes = torch.zeros(C, dtype=torch.long, device=device)
        elif generator is None:
            modes = torch.full((C,), SHADINGS.index("diffuse"), device=device)
        else:
            u = _rand(generator, (2, C), device)
            modes = torch.where(u[0] < mat.albedo_only_prob, 0, torch.where(u[1] < mat.textureless_prob, 1, 2))
        if not bool((modes > 0).any()):
            return modes, None
        if light_positions is not None:
            return modes, light_positions.to(device=device, dtype=cameras.c2w.dtype)
        eyes = cameras.eyes  # [C, 3]
        dist = eyes.norm(dim=-1, keepdim=True)  # [C, 1]
        lo, hi = mat.light_distance_range
        if generator is None:
            return modes, eyes * 0.5 * (lo + hi)
        direction = F.normalize(eyes / dist + mat.light_direction_std * _randn(generator, (C, 3), device).to(eyes.dtype), dim=-1)
        scale = lo + (hi - lo) * _rand(generator, (C, 1), device).to(eyes.dtype)
        return modes, direction * dist * scale

    def _background_colors(self, C, device, dtype, generator, background) -> tuple[Tensor, Tensor]:
        """Per-camera solid colors [C, 3] and whether each camera uses the MLP instead [C] bool."""
        bg = self.cfg.background
        use_mlp = torch.full((C,), bg.kind == "mlp" and background is None, device=device)
        if background is not None:
            return background.to(device=device, dtype=dtype).expand(C, 3), use_mlp
        colors = torch.tensor(bg.color, device=device, dtype=dtype).expand(C, 3)
        if generator is not None and bg.kind == "random":
            colors = _rand(generator, (C, 3), device).to(dtype)
        elif generator is not None and bg.kind == "white_black":
            colors = (_rand(generator, (C, 1), device) < 0.5).to(dtype).expand(C, 3)
        elif generator is not None and bg.kind == "mlp" and bg.random_prob > 0:
            draws = _rand(generator, (C, 4), device).to(dtype)
            use_mlp = draws[:, 0] >= bg.random_prob
            colors = draws[:, 1:] if bg.random_colors == "uniform" else (draws[:, 1:2] < 0.5).to(dtype).expand(C, 3)
        return colors, use_mlp

    def _render_chunk(self, field, origins, directions, generator, modes, lights, r0, per_cam
                      ) -> tuple[Composite, RaySamples, Tensor | None]:
        """Composite rays origins/directions [r, 3] (global ray indices r0...); returns the compositing
        result, the samples and their normals [S, 3] (None when normals are off)."""
        cfg = self.cfg
        near, far, hit = (ray_box if cfg.bounds == "box" else ray_sphere)(origins, directions, cfg.bound)
        if self.grid is not None:
            samples = self.grid.sample(origins, directions, near, far, hit, cfg.step_size, generator,
                                       density_fn=field.density if cfg.early_stop_eps > 0 else None,
                                       early_stop_eps=cfg.early_stop_eps)
        else:
            samples = uniform_samples(near, far, hit, step_size=cfg.step_size, generator=generator)
        points = samples.positions(origins, directions)  # [S, 3]
        sigma, albedo, normals = self._query(field, points)
        colors = albedo  # [S, 3]
        if lights is not None:  # some camera is shaded (normals exist: checked in _check / the config)
            mat = cfg.material
            cam = (samples.ray_indices + r0) // per_cam  # [S] camera of each sample
            mode = modes[cam][:, None]  # [S, 1] index into SHADINGS
            to_light = F.normalize(lights.to(points.dtype)[cam] - points.detach(), dim=-1)  # [S, 3]
            shade = mat.ambient + mat.diffuse * (normals * to_light).sum(-1, keepdim=True).clamp_min(0.0)  # [S, 1]
            base = torch.where(mode == 1, torch.full_like(albedo, mat.textureless_albedo), albedo)
            colors = torch.where(mode > 0, base * shade, albedo)
        return composite(sigma, colors, samples, origins.shape[0]), samples, normals

    def _query(self, field: Field, points: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Density [S], albedo [S, 3] and normals [S, 3] (or None) from one field pass."""
        method = self.cfg.normals
        if method != "analytic":
            out = field(points)
            normals = None if method == "none" else field.normals(points, "finite_difference", self.cfg.normals_eps)
            return out.density, out.features, normals
        # Analytic normals from the same forward pass as the colors: -grad(sigma) / |grad(sigma)|, as
        # Field.normals(method="analytic") defines them, without a second density evaluation.
        outer_grad = torch.is_grad_enabled()
        with torch.enable_grad():
            x = points.detach().requires_grad_(True)
            out = field(x)
            if out.density.requires_grad:
                (grad,) = torch.autograd.grad(out.density.sum(), x, create_graph=outer_grad, retain_graph=outer_grad)
            else:
                grad = torch.zeros_like(x)
        normals = -F.normalize(grad, dim=-1, eps=1e-12)
        if not outer_grad:
            return out.density.detach(), out.features.detach(), normals.detach()
        return out.density, out.features, normals


class FieldQuery:
    """A `Field` seen through the one query interface the Shapes-world metrics use
    (`gen3d.world.metrics.Query`), like `gen3d.rendering.gaussian.GaussianQuery`.

    occupancy(points [P, 3]) -> [P] = 1 - exp(-sigma * thickness): the opacity of a slab of the
    field `thickness` thick. With the default 1/32 (a cell of the metrics' 64^3 grid over [-1, 1]^3)
    the metrics' 0.5 level is sigma = ln 2 * 32 = 22, close to threestudio's density isosurface
    threshold of 25 for mesh export.
    render(cameras): the renderer's evaluation render (deterministic) over white. Without a renderer,
    one with dense sampling (no occupancy grid), albedo colors and no normals.
    """

    def __init__(self, field: Field, renderer: VolumeRenderer | None = None, thickness: float = 1.0 / 32,
                 shading: str | None = None, chunk: int = 1 << 16):
        if not thickness > 0:
            raise ValueError(f"FieldQuery: thickness must be > 0, got {thickness!r}")
        self.field, self.thickness, self.shading, self.chunk = field, thickness, shading, chunk
        self.renderer = renderer or VolumeRenderer(VolumeRendererConfig(occupancy_grid=False, normals="none"))

    def _device(self) -> torch.device:
        p = next(iter(self.field.parameters()), None)
        return p.device if p is not None else torch.device("cpu")

    @torch.no_grad()
    def occupancy(self, points: Tensor) -> Tensor:
        points = points.to(self._device())
        sigma = torch.cat([self.field.density(points[i:i + self.chunk]) for i in range(0, len(points), self.chunk)])
        return -torch.expm1(-sigma * self.thickness)

    @torch.no_grad()
    def render(self, cameras: Cameras) -> RenderOutput:
        device = self._device()
        cameras = cameras.to(device)
        white = torch.ones(3, device=device, dtype=cameras.c2w.dtype)
        return self.renderer(self.field, cameras, train=False, background=white, shading=self.shading)


def _rand(generator: torch.Generator, shape, device) -> Tensor:
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _randn(generator: torch.Generator, shape, device) -> Tensor:
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


__all__ = [
    "SHADINGS",
    "BackgroundConfig",
    "BackgroundMLP",
    "FieldQuery",
    "MaterialConfig",
    "VolumeRenderer",
    "VolumeRendererConfig",
]
