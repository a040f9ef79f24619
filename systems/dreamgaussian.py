"""Text-to-3D with 3D Gaussians and SDS, DreamGaussian's generation stage.

DreamGaussian (Tang et al., 2023, "DreamGaussian: Generative Gaussian Splatting for Efficient 3D
Content Creation") optimizes 3D Gaussians initialized in a ball with Score Distillation Sampling
(Poole et al., 2022) from a text-to-image diffusion prior, densifying as 3DGS does, at a render
resolution that grows during the run, against a background that flips between white and black.

Deliberate differences from the reference: timesteps follow our `GuidanceConfig` schedules (the
preset anneals t linearly from 0.98 to 0.02 of the range like DreamGaussian); the first mesh is
a density-grid isosurface with vertex colors (the texture-refinement stage arrives with the mesh
issue).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch

from gen3d.cameras import Cameras, OrbitConfig, sample_orbit
from gen3d.guidance import GuidanceConfig, build_guidance
from gen3d.losses import binary_entropy
from gen3d.ops.rasterize import BACKENDS
from gen3d.rendering.gaussian import render_gaussians
from gen3d.rendering.types import RenderOutput
from gen3d.representations.gaussians import GaussianConfig, GaussianModel
from gen3d.representations.strategy import DensifyConfig, DensifyStrategy
from gen3d.systems.base import System, TextTo3DConfig, check_prompt, load_text_prior

BACKGROUNDS = ("random", "white", "black")


@dataclass
class DreamGaussianConfig(TextTo3DConfig):
    """Text-to-3D with 3D Gaussians and score distillation (DreamGaussian's generation stage)."""

    system: str = "dreamgaussian"
    """Registered system name."""
    background: str = "random"
    """Background behind the Gaussians during training: random (white or black per step), white or black."""
    render_sizes: list[int] = field(default_factory=lambda: [128, 256, 512])
    """Training render resolutions, switched at `render_size_milestones` (fractions of the run)."""
    render_size_milestones: list[float] = field(default_factory=lambda: [0.3, 0.6])
    """Fractions of max_steps at which the next entry of `render_sizes` takes over."""
    lambda_sds: float = 1.0
    """Weight of the SDS loss."""
    lambda_opaque: float = 0.0
    """Weight of the binary-entropy loss on rendered alpha, -(a log a + (1-a) log(1-a)), which pushes every
    pixel to fully opaque or fully empty (threestudio's 'opaque' regularizer) against SDS's semi-transparent fog."""
    rasterizer: str = "auto"
    """Gaussian rasterizer backend: auto, torch (tile-based reference), cpp (compiled CPU kernel, stops a pixel at
    transmittance 1e-4 like 3DGS), dense or gsplat (CUDA); auto picks gsplat on CUDA, else cpp when it builds."""
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    """Score distillation settings."""
    gaussians: GaussianConfig = field(default_factory=GaussianConfig)
    """3D Gaussians: initialization, SH degree and learning rates."""
    densify: DensifyConfig = field(default_factory=DensifyConfig)
    """Densify / prune / opacity-reset schedule (3DGS)."""
    cameras: OrbitConfig = field(default_factory=OrbitConfig)
    """Training and evaluation cameras."""
    init: str = "random"
    """Initial Gaussians: random (a ball, `gaussians.init_*`) or flow (a sample of the few-step text-to-3D generator
    `flow_model` for the prompt, which SDS then refines; `gen3d sample` stops there)."""
    flow_model: str = "gen3d/shapes-flow"
    """Generator for init=flow: the embedded distilled gen3d/shapes-flow, its teacher gen3d/shapes-flow-teacher, or a
    folder from `gen3d world train-flow` / `distill-flow`."""
    flow_steps: int = 0
    """Sampling steps of init=flow (0: the generator's own, 1 for gen3d/shapes-flow and 25 for its teacher)."""
    flow_points: int = 0
    """Points (Gaussians) the generator samples for init=flow (0: as many as it was trained on)."""

    INITS: ClassVar[tuple[str, ...]] = ("random", "flow")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init not in self.INITS:
            raise ValueError(f"init must be one of {list(self.INITS)}, got {self.init!r}")
        for name in ("flow_steps", "flow_points"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
                raise ValueError(f"{name} must be a whole number >= 0, got {value!r}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {list(BACKGROUNDS)}, got {self.background!r}")
        if self.rasterizer not in BACKENDS:
            raise ValueError(f"rasterizer must be one of {list(BACKENDS)}, got {self.rasterizer!r}")
        if len(self.render_sizes) != len(self.render_size_milestones) + 1 or not self.render_sizes:
            raise ValueError(
                f"render_sizes needs one more entry than render_size_milestones, got {self.render_sizes} "
                f"and {self.render_size_milestones}"
            )
        if any(s < 8 for s in self.render_sizes):
            raise ValueError(f"render_sizes must be >= 8 pixels, got {self.render_sizes}")
        for name in ("lambda_sds", "lambda_opaque"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


class DreamGaussian(System):
    name = "dreamgaussian"
    Config = DreamGaussianConfig
    cfg: DreamGaussianConfig

    def setup(self) -> None:
        cfg = self.cfg
        self._restored = False  # set when a checkpoint's model is loaded
        self.check_inputs()
        init_gen = torch.Generator().manual_seed(cfg.seed)
        self.model = GaussianModel.random_ball(cfg.gaussians, generator=init_gen).to(self.device)

    def check_inputs(self) -> None:
        """Fail early on a run that cannot start: here, an empty prompt."""
        check_prompt(self.cfg)

    def setup_guidance(self) -> None:
        """The prior(s) and guidance of `guide`: the text prior and its score distillation."""
        self.prior, self.prompts = load_text_prior(self.cfg, self.device)
        self.guidance = build_guidance(self.prior, self.cfg.guidance, seed=self.cfg.seed)

    def setup_training(self) -> None:
        cfg = self.cfg
        self.setup_guidance()
        if cfg.init != "random" and not self._restored:  # a checkpoint loaded before training holds the result
            self.model = self.initial_model()
        self.optimizer = self._optimizer()
        # DreamGaussian's camera extent for the densify thresholds (percent_dense, prune size) is 4.
        self.strategy = DensifyStrategy(cfg.densify, scene_extent=4.0, max_steps=cfg.max_steps, seed=cfg.seed)

    def initial_model(self) -> GaussianModel:
        """The model the run starts from when `init` is not random: init=flow's generated sample."""
        return self.generate()

    def generate(self) -> GaussianModel:
        """The few-step generator's (`gen3d.models.point_flow`) sample for the prompt, as trainable Gaussians with
        this run's Gaussian settings; its time in `self.generate_seconds`."""
        import time

        from gen3d.models.point_flow import load_point_flow, to_gaussians

        cfg = self.cfg
        check_prompt(cfg)
        generator = load_point_flow(cfg.flow_model)
        start = time.perf_counter()
        latent = generator([cfg.prompt], steps=cfg.flow_steps or None, seed=cfg.seed, points=cfg.flow_points or None)
        self.generate_seconds = time.perf_counter() - start
        steps = cfg.flow_steps or generator.info.steps
        model = to_gaussians(latent[0], cfg.gaussians)
        self.log.info(f"{cfg.flow_model}: {model.num_gaussians} Gaussians for {cfg.prompt!r} in {steps} step"
                      f"{'s' if steps > 1 else ''}, {self.generate_seconds * 1000:.0f} ms")
        return model.to(self.device)

    def render_size(self, step: int) -> int:
        frac = step / self.cfg.max_steps
        return self.cfg.render_sizes[sum(frac >= m for m in self.cfg.render_size_milestones)]

    def background_for(self, n: int) -> torch.Tensor:
        bg = self.cfg.background
        if bg == "random":
            bg = "white" if torch.rand((), generator=self.generator).item() < 0.5 else "black"
        return torch.full((n, 3), 1.0 if bg == "white" else 0.0, device=self.device)

    def training_step(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        self.model.update_learning_rate(self.optimizer, step, max_steps=cfg.max_steps)
        size = self.render_size(step)
        cams = sample_orbit(cfg.cameras, self.generator, width=size, height=size).to(self.device)
        self.last_cameras = cams
        out = render_gaussians(self.model, cams, self.background_for(len(cams)), backend=cfg.rasterizer)
        if out.means2d is not None and out.means2d.requires_grad:
            out.means2d.retain_grad()
        g = self.guide(out.rgb, cams, step)
        extra = self.extra_losses(step)
        loss = g.loss + sum(extra.values())
        if cfg.lambda_opaque:
            loss = loss + cfg.lambda_opaque * binary_entropy(out.alpha)
        if self.optimize(loss, step, "gaussians.*_lr"):  # a skipped (NaN/Inf) step leaves the Gaussians as they are
            self.strategy.update_stats(out.means2d, out.radii, width=size, height=size, step=step)
            self.strategy.maybe_densify(self.model, self.optimizer, step, generator=self.generator)
        return {"loss": loss.item(), "grad_norm": g.grad_norm, "t": float(g.t.float().mean()),
                "n_gaussians": float(self.model.num_gaussians), "size": float(size),
                **({"nonfinite": float(g.nonfinite)} if g.nonfinite else {}), **g.logs,
                **{name: float(v.detach()) for name, v in extra.items()}}

    def guide(self, rgb: torch.Tensor, cams: Cameras, step: int):
        """The score distillation of a step's renders (`GuidanceOutput`, its loss weighted): the text prior's."""
        g = self.guidance(rgb, self.prompts(cams), step, self.cfg.max_steps, generator=self.generator, cameras=cams)
        return replace(g, loss=self.cfg.lambda_sds * g.loss)

    def extra_losses(self, step: int) -> dict[str, torch.Tensor]:
        """Weighted loss terms besides the guidance (image-to-3D's reference view); none for text-to-3D."""
        return {}

    def render(self, cameras: Cameras) -> RenderOutput:
        white = torch.ones(len(cameras), 3, device=self.device)
        return render_gaussians(self.model, cameras, white, backend=self.cfg.rasterizer)

    def snapshot(self):
        """The Gaussians as splats for the browser, and a frozen copy for server renders (depth, alpha)."""
        from gen3d.viewer.snapshots import gaussian_snapshot

        return gaussian_snapshot(self.model, self.step, self.cfg.rasterizer)

    def query(self):
        from gen3d.rendering.gaussian import GaussianQuery

        return GaussianQuery(self.model, self.cfg.rasterizer)

    def model_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.model.state_dict())

    def load_model_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        current = self.model.state_dict()
        for k, v in tensors.items():  # the number of Gaussians may differ; nothing else may
            if k in current and v.shape[1:] != current[k].shape[1:]:
                raise ValueError(f"'{k}' has per-Gaussian shape {tuple(v.shape[1:])} in the checkpoint but "
                                 f"{tuple(current[k].shape[1:])} here (was gaussians.sh_degree changed?)")
        self.model.load_state_dict({k: v.to(self.device) for k, v in tensors.items()})
        self._restored = True
        if self._training_ready:  # the optimizer holds the parameters replaced by the resize: point it at the new ones
            self.optimizer = self._optimizer()

    def _optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.model.param_groups(self.cfg.gaussians), lr=0.0, eps=1e-15)

    def training_state(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "strategy": self.strategy.state_dict()}

    def load_training_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.strategy.load_state_dict(state["strategy"])

    def export_splats(self, path: Path) -> Path:
        from gen3d.export.ply import save_gaussian_ply

        return save_gaussian_ply(path, self.model)

    def representation(self):
        return self.model

    def surface_color(self, points: torch.Tensor) -> torch.Tensor:
        return self.model.color_at(points)

