"""Text-to-3D with a neural field and SDS: DreamFusion, its triplane variant and Magic3D's coarse stage.

DreamFusion (Poole et al., 2022, "DreamFusion: Text-to-3D using 2D Diffusion") optimizes a NeRF
with Score Distillation Sampling from a text-to-image prior: each step renders the field from
random cameras, shaded by a point light with albedo-only and textureless augmentations, over a
learned background, and pulls the renders toward the prior; an orientation loss keeps normals
facing the camera and a sparsity loss keeps empty space empty. Magic3D's coarse stage (Lin et al.,
2023, "Magic3D: High-Resolution Text-to-3D Content Creation") is the same with an Instant-NGP hash
grid, empty-space skipping by an occupancy grid and uniform timestep weighting.

The recipe wires `gen3d.representations.fields` (hash grid or triplane), `gen3d.rendering.volume`
(occupancy grid, materials, backgrounds), `gen3d.guidance.sds`, and `gen3d.losses`; the presets
``dreamfusion``, ``dreamfusion-triplane`` and ``magic3d-coarse`` choose among them. Deliberate
differences from the references: the density starts as Magic3D's blob (threestudio does the same
for DreamFusion: the paper's blob "does not work very well"), and the mesh's iso-level is chosen
automatically (`gen3d.export.field_mesh.auto_threshold`) instead of a hand-tuned density.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from gen3d.cameras import Cameras, OrbitConfig, sample_orbit
from gen3d.errors import Gen3dError
from gen3d.guidance import GuidanceConfig, build_guidance
from gen3d.losses import LossWeights
from gen3d.rendering.types import RenderOutput
from gen3d.rendering.volume import FieldQuery, VolumeRenderer, VolumeRendererConfig
from gen3d.representations.fields import HashGridConfig, HashGridField, TriplaneConfig, TriplaneField
from gen3d.schedules import Schedule, check_schedule, schedule_value
from gen3d.systems.base import System, TextTo3DConfig, check_prompt, load_text_prior

GEOMETRIES = ("hashgrid", "triplane")


@dataclass
class DreamFusionConfig(TextTo3DConfig):
    """Text-to-3D with a neural field (hash grid or triplane), volume rendering and SDS."""

    system: str = "dreamfusion"
    """Registered system name."""
    geometry: str = "hashgrid"
    """The field: "hashgrid" (Instant-NGP encoding, settings under `hashgrid`) or "triplane" (settings under `triplane`)."""
    hashgrid: HashGridConfig = field(default_factory=HashGridConfig)
    """Hash-grid field (used when geometry is "hashgrid")."""
    triplane: TriplaneConfig = field(default_factory=TriplaneConfig)
    """Triplane field (used when geometry is "triplane")."""
    renderer: VolumeRendererConfig = field(default_factory=lambda: VolumeRendererConfig(normals="analytic"))
    """Volume renderer: sampling, occupancy grid, normals, material and background."""
    render_size: int = 64
    """Training render resolution (DreamFusion: 64)."""
    albedo_only_until: Schedule = 0.0
    """Render albedo only (no shading) before this step (threestudio's ambient_only_steps; a float in [0, 1]
    is a fraction of the run)."""
    lr_background: float = 0.001
    """Adam learning rate of the background MLP (threestudio: 0.001)."""
    lambda_sds: float = 1.0
    """Weight of the SDS loss."""
    loss: LossWeights = field(default_factory=LossWeights)
    """Regularizer weights (schedules): lambda_orient, lambda_sparsity, lambda_opaque, lambda_entropy."""
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    """Score distillation: guidance.type sds | vsd | cds | asd and its settings."""
    cameras: OrbitConfig = field(default_factory=OrbitConfig)
    """Training and evaluation cameras."""
    exports: list[str] = field(default_factory=lambda: ["glb"])
    """Files written at the end of a run, among: glb, obj, ply (mesh), video (a 3DGS splat-ply needs
    `gen3d convert RUN to=gaussians` first)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.geometry not in GEOMETRIES:
            raise ValueError(f"geometry must be one of {list(GEOMETRIES)}, got {self.geometry!r}")
        if self.render_size < 8:
            raise ValueError(f"render_size must be >= 8 pixels, got {self.render_size}")
        for name in ("lambda_sds", "lr_background"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        check_schedule(self.albedo_only_until, "albedo_only_until")


def build_field(cfg: DreamFusionConfig):
    """The field `cfg.geometry` names, from its settings."""
    return HashGridField(cfg.hashgrid) if cfg.geometry == "hashgrid" else TriplaneField(cfg.triplane)


class DreamFusion(System):
    name = "dreamfusion"
    Config = DreamFusionConfig
    cfg: DreamFusionConfig

    def setup(self) -> None:
        cfg = self.cfg
        check_prompt(cfg)
        torch.manual_seed(cfg.seed)  # the MLPs initialize from torch's global generator
        self.field = build_field(cfg).to(self.device)
        self.renderer = VolumeRenderer(cfg.renderer).to(self.device)

    def setup_training(self) -> None:
        cfg = self.cfg
        self.prior, self.prompts = load_text_prior(cfg, self.device)
        self.guidance = build_guidance(self.prior, cfg.guidance, seed=cfg.seed)
        groups = self.field.param_groups()
        if self.renderer.background_mlp is not None:
            groups.append({"params": list(self.renderer.background_mlp.parameters()), "lr": cfg.lr_background,
                           "name": "background"})
        # Instant-NGP's Adam (threestudio uses the same betas and eps for every NeRF recipe)
        self.optimizer = torch.optim.Adam(groups, betas=(0.9, 0.99), eps=1e-15)

    def training_step(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        size = cfg.render_size
        cams = sample_orbit(cfg.cameras, self.generator, width=size, height=size).to(self.device)
        self.last_cameras = cams
        shading = "albedo" if step <= schedule_value(cfg.albedo_only_until, step, cfg.max_steps) else None
        out = self.renderer(self.field, cams, generator=self.generator, step=step, train=True, shading=shading)
        g = self.guide(out.rgb, cams, step)
        terms = cfg.loss.terms(step, cfg.max_steps, alpha=out.alpha, samples=out.samples) | self.extra_losses(step)
        loss = g.loss + sum(terms.values())
        self.optimize(loss, step, f"{cfg.geometry}.lr_encoding, {cfg.geometry}.lr_network, lr_background")
        logs = {"loss": loss.item(), "sds": g.loss.item(), "grad_norm": g.grad_norm, "t": float(g.t.float().mean()),
                "alpha": float(out.alpha.detach().mean()), "samples_per_ray": len(out.samples.weights) / out.samples.n_rays}
        if self.renderer.grid is not None:
            logs["occupied"] = self.renderer.grid.occupied_fraction()
        return logs | g.logs | {name: float(v.detach()) for name, v in terms.items()}

    def guide(self, rgb: torch.Tensor, cams: Cameras, step: int):
        """The score distillation of a step's renders (`GuidanceOutput`, its loss weighted): the text prior's."""
        g = self.guidance(rgb, self.prompts(cams), step, self.cfg.max_steps, generator=self.generator, cameras=cams)
        return replace(g, loss=self.cfg.lambda_sds * g.loss)

    def extra_losses(self, step: int) -> dict[str, torch.Tensor]:
        """Weighted loss terms besides the guidance and regularizers (image-to-3D's reference view)."""
        return {}

    def render(self, cameras: Cameras) -> RenderOutput:
        white = torch.ones(3, device=self.device)
        return self.renderer(self.field, cameras, train=False, background=white, shading="albedo")

    def snapshot(self):
        """A frozen copy of the field and renderer, rendered (albedo over white) by the viewer's thread."""
        import copy

        from gen3d.viewer.protocol import Snapshot

        field, renderer = copy.deepcopy(self.field).requires_grad_(False), copy.deepcopy(self.renderer).requires_grad_(False)
        white = torch.ones(3, device=self.device)

        def render(cameras: Cameras) -> RenderOutput:
            return renderer(field, cameras.to(self.device), train=False, background=white, shading="albedo")

        return Snapshot(step=self.step, render=render)

    def surface_level(self, resolution: int = 64) -> float:
        """The density iso-level of the field's surface: `mesh_threshold`, or the automatic level of
        `gen3d.export.field_mesh.auto_threshold` on a `resolution`^3 grid."""
        from gen3d.export.field_mesh import auto_threshold, density_grid_of

        if self.cfg.mesh_threshold != "auto":
            return float(self.cfg.mesh_threshold)
        bound = self.field.bound
        grid = density_grid_of(self.field.density, resolution, bound)
        return auto_threshold(grid, 2 * bound / (resolution - 1))[0]

    def query(self):
        """The field for the metrics, inside where its density exceeds `surface_level` (the mesh's surface)."""
        return FieldQuery(self.field, self.renderer, thickness=math.log(2.0) / self.surface_level(), shading="albedo")

    def model_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"field.{k}": v for k, v in self.field.state_dict().items()}
        return tensors | {f"renderer.{k}": v for k, v in self.renderer.state_dict().items()}

    def load_model_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v.to(self.device) for k, v in tensors.items() if k.startswith(prefix)}

        self.field.load_state_dict(part("field."))
        self.renderer.load_state_dict(part("renderer."))

    def training_state(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def load_training_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])

    def representation(self):
        return self.field

    def albedo_render(self, cameras: Cameras) -> RenderOutput:
        white = torch.ones(3, device=self.device)
        return self.renderer(self.field, cameras.to(self.device), train=False, background=white, shading="albedo")

    def surface_color(self, points: torch.Tensor) -> torch.Tensor:
        """The field's albedo at points [P, 3] (its features; the material's shading is not baked)."""
        return self.field(points).features[:, :3]

    def export_splats(self, path: Path) -> Path:
        raise Gen3dError(f"a {self.name} run holds a neural field, not 3D Gaussians: convert it first with "
                         f"`gen3d convert {self.run_dir} to=gaussians`, then export that run as splat-ply")