"""Image-to-3D: one input view, Zero-1-to-3 guidance on novel views, reconstruction losses on the input view.

Two recipes share the parts here:

- **zero123** (3D Gaussians): DreamGaussian's image mode (Tang et al. 2023, Sec. 3.1). Each step renders
  the input camera and fits the input image there (RGB and mask MSE), and renders random novel views
  guided by Zero123 SDS (`gen3d.guidance.zero123`). DreamGaussian's weights: 10000 on RGB and 1000 on
  the mask (both ramped in with the step ratio), 1 on Zero123 SDS at CFG 5.
- **magic123** (a neural field): Magic123 (Qian et al. 2023, "Magic123: One Image to High-Quality 3D
  Object Generation Using Both 2D and 3D Diffusion Priors", Sec. 3): the same reference losses plus
  *joint* guidance, λ_2D SDS from a text-to-image prior (the prompt describes the object) and λ_3D
  Zero123 SDS; their coarse stage uses λ_2D = 1, λ_3D = 40, CFG 100 (Stable Diffusion) and 5 (Zero123),
  reference weights rgb 5, mask 0.5.

The input camera is at azimuth 0 (the result's front faces +x, gen3d's convention), at `elevation`
(DreamGaussian's default 0; the image's own elevation when known), `ref_distance` and `ref_fovy`. The
image is read by `gen3d.images.load_reference` (foreground from alpha or a plain background,
recentered to `fill_ratio`); the prepared view is saved as ``reference.png`` in the run folder.
Novel views are drawn by the run's `cameras` orbit; renders are over white (the view prior's
backgrounds). With ``init=tgs`` the zero123 recipe starts from the feed-forward reconstruction of the input view
(`gen3d.models.tgs`, `recon_model`) instead of a random ball; ``gen3d reconstruct`` writes that reconstruction as
a run at step 0, which `gen3d resume` continues. Left out: a monocular depth loss (needs a depth estimator) and Magic123's textual
inversion of the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch

from gen3d.cameras import Cameras, spherical_cameras
from gen3d.errors import Gen3dError
from gen3d.guidance import GuidanceConfig
from gen3d.guidance.base import GuidanceOutput
from gen3d.rendering.types import RenderOutput
from gen3d.schedules import Schedule, check_schedule, schedule_value
from gen3d.systems.dreamfusion import DreamFusion, DreamFusionConfig
from gen3d.systems.dreamgaussian import DreamGaussian, DreamGaussianConfig


@dataclass
class ImageInput:
    """The input view and how it constrains the result (shared by the image-to-3D recipes)."""

    image: str = ""
    """Path of the input image: RGBA, or RGB on a plain background (e.g. image=chair.png)."""
    image_size: int = 256
    """Side in pixels of the prepared input view and of the reference render (DreamGaussian: 256)."""
    fill_ratio: float = 0.85
    """The object's longer side as a fraction of the prepared view (DreamGaussian and Zero123: 0.8-0.85)."""
    recenter: bool = True
    """Center and rescale the object to fill_ratio; false keeps the image's own framing (its camera is then the
    input camera as given: elevation, ref_distance, ref_fovy)."""
    elevation: float = 0.0
    """Elevation in degrees of the camera the image was taken from (DreamGaussian's default 0)."""
    ref_distance: float = 2.0
    """Distance of the input camera from the object's center (DreamGaussian: 2)."""
    ref_fovy: float = 49.1
    """Vertical field of view in degrees of the input camera (DreamGaussian: 49.1)."""
    view_prior: str = "gen3d/shapes-zero123"
    """View-conditioned prior (Zero123 style): the embedded one, or a diffusers folder / hub id."""
    zero123: GuidanceConfig = field(default_factory=lambda: GuidanceConfig(guidance_scale=3.0))
    """Zero123 SDS settings: CFG scale (Zero123's 3, DreamGaussian's 5), timestep range, weighting."""
    lambda_zero123: float = 1.0
    """Weight of the Zero123 SDS loss (DreamGaussian: 1; Magic123's λ_3D: 40)."""
    lambda_rgb: Schedule = 10000.0
    """Weight of the input view's RGB MSE, a schedule (DreamGaussian: 10000, ramped with the step ratio)."""
    lambda_mask: Schedule = 1000.0
    """Weight of the input view's mask MSE on the rendered alpha, a schedule (DreamGaussian: 1000)."""

    def check_image_input(self) -> None:
        if not 16 <= self.image_size <= 2048:
            raise ValueError(f"image_size must be in 16..2048 pixels, got {self.image_size}")
        if not 0.1 <= self.fill_ratio <= 1.0:
            raise ValueError(f"fill_ratio must be in [0.1, 1], got {self.fill_ratio}")
        if not -89.0 <= self.elevation <= 89.0:
            raise ValueError(f"elevation must be in [-89, 89] degrees, got {self.elevation}")
        if not self.ref_distance > 0 or not 1.0 <= self.ref_fovy <= 150.0:
            raise ValueError(f"ref_distance must be > 0 and ref_fovy in [1, 150] degrees, got {self.ref_distance} and "
                             f"{self.ref_fovy}")
        if self.zero123.type != "sds":
            raise ValueError(f"zero123.type must be sds (Zero123 score distillation), got {self.zero123.type!r}")
        for name in ("lambda_rgb", "lambda_mask"):
            check_schedule(getattr(self, name), name)
        if not self.lambda_zero123 >= 0:
            raise ValueError(f"lambda_zero123 must be >= 0, got {self.lambda_zero123}")


class ImageTo3D:
    """What both image recipes add to their text-to-3D base: the input view, its losses and Zero123 guidance."""

    cfg: ImageInput

    def check_image(self) -> None:
        if not self.cfg.image:
            raise Gen3dError("no input image: pass image=path/to/object.png (RGBA, or RGB on a plain background), "
                             "e.g. `gen3d run image-to-3d image=chair.png`")

    def setup_reference(self) -> None:
        """Read and prepare the input image (`load_reference`), then the view prior and Zero123 SDS."""
        from gen3d.guidance.zero123 import Zero123Guidance
        from gen3d.priors.zero123 import load_view_prior

        cfg = self.cfg
        if getattr(self, "ref_rgb", None) is None:
            self.load_reference()
        self.view_prior = load_view_prior(cfg.view_prior, device=self.device, dtype=cfg.dtype, download=cfg.download)
        self.zero123 = Zero123Guidance(self.view_prior, self.ref_rgb, cfg.elevation, 0.0, cfg.ref_distance, cfg.zero123)

    def load_reference(self) -> None:
        """Read and prepare the input image, save it in the run folder as reference.png, build the input camera."""
        from gen3d.export.video import save_image
        from gen3d.images import load_reference

        cfg = self.cfg
        ref = load_reference(cfg.image, size=cfg.image_size, fill_ratio=cfg.fill_ratio, recenter=cfg.recenter,
                             warn=self.log.warning)
        self.ref_rgb = ref.rgb[None].to(self.device)  # [1, S, S, 3] over white
        self.ref_mask = ref.mask[None, ..., None].to(self.device)  # [1, S, S, 1]
        save_image(self.run_dir / "reference.png", ref.rgb)
        self.log.info(f"input image: {cfg.image} ({ref.source_size[0]}x{ref.source_size[1]}, mask from {ref.mask_from}), "
                      f"prepared at {cfg.image_size}x{cfg.image_size} filling {ref.fill_ratio:.0%}"
                      + ("" if cfg.recenter else " (its own framing)"))
        self.ref_camera = self.input_camera()

    def input_camera(self) -> Cameras:
        """The camera of the input view: azimuth 0, `elevation`, `ref_distance`, `ref_fovy`, `image_size` pixels."""
        cfg = self.cfg
        one = lambda v: torch.tensor([float(v)])  # noqa: E731
        return spherical_cameras(one(0.0), one(cfg.elevation), one(cfg.ref_distance), one(cfg.ref_fovy),
                                 cfg.image_size, cfg.image_size).to(self.device)

    def reference_losses(self, out: RenderOutput, step: int, rgb: torch.Tensor | None = None,
                         mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The weighted RGB and mask MSE of a render `out` from the input camera against the input view (or against
        `rgb` / `mask`, another frame of an input video)."""
        cfg = self.cfg
        rgb = self.ref_rgb if rgb is None else rgb
        mask = self.ref_mask if mask is None else mask
        return {"ref_rgb": schedule_value(cfg.lambda_rgb, step, cfg.max_steps) * (out.rgb - rgb).square().mean(),
                "ref_mask": schedule_value(cfg.lambda_mask, step, cfg.max_steps) * (out.alpha - mask).square().mean()}

    @staticmethod
    def joint(text: GuidanceOutput, image: GuidanceOutput) -> GuidanceOutput:
        """Text (2D) and Zero123 (3D) guidance as one output, the losses summed (each already weighted)."""
        return replace(text, loss=text.loss + image.loss, logs={**text.logs, **image.logs, "sds_2d": float(text.loss.detach())})

    def zero123_guidance(self, rgb: torch.Tensor, cams: Cameras, step: int) -> GuidanceOutput:
        g = self.zero123(rgb, cams, step, self.cfg.max_steps, generator=self.generator)
        return replace(g, loss=self.cfg.lambda_zero123 * g.loss, logs={**g.logs, "zero123": float(g.loss.detach())})


# ---------------------------------------------------------------------------------------------------- zero123


@dataclass
class Zero123Config(DreamGaussianConfig, ImageInput):
    """Image-to-3D with 3D Gaussians and Zero123 SDS (DreamGaussian's image mode)."""

    system: str = "zero123"
    """Registered system name."""
    background: str = "white"
    """Background of the novel views (the view prior's renders are on white)."""
    lambda_sds: float = 0.0
    """Weight of a text prior's SDS next to Zero123's (DreamGaussian's lambda_sd; 0: the image alone). When > 0,
    `prompt` describes the object and `prior` / `guidance` configure the text prior, as in dreamgaussian."""
    init: str = "random"
    """Initial Gaussians: random (a ball, `gaussians.init_*`) or tgs (the feed-forward reconstruction of the input
    view by `recon_model`, which SDS then refines; `gen3d reconstruct` stops there)."""
    recon_model: str = "gen3d/shapes-tgs"
    """Feed-forward reconstructor for init=tgs: the embedded one or a folder from `gen3d world train-recon`."""

    INITS: ClassVar[tuple[str, ...]] = ("random", "tgs")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_image_input()


class Zero123(ImageTo3D, DreamGaussian):
    """DreamGaussian's image mode: Gaussians fitted to the input view, Zero123 SDS on novel views."""

    name = "zero123"
    Config = Zero123Config
    cfg: Zero123Config

    def check_inputs(self) -> None:
        self.check_image()
        if self.cfg.lambda_sds:
            super().check_inputs()  # a text prior needs a prompt

    def setup_guidance(self) -> None:
        if self.cfg.lambda_sds:
            super().setup_guidance()  # the text prior and its guidance too
        self.setup_reference()

    def initial_model(self):
        return self.reconstruct()  # init=tgs

    def reconstruct(self):
        """The feed-forward reconstruction (`gen3d.models.tgs`) of the input view from the input camera, as a
        trainable `GaussianModel` with this run's Gaussian settings."""
        from gen3d.models.tgs import load_tgs, reconstruct

        cfg = self.cfg
        if getattr(self, "ref_rgb", None) is None:
            self.load_reference()
        net = load_tgs(cfg.recon_model, device=self.device)
        model, seconds = reconstruct(net, self.ref_rgb[0], self.ref_mask[0], self.ref_camera, cfg.gaussians)
        self.recon_seconds = seconds
        self.log.info(f"TGS ({cfg.recon_model}): {model.num_gaussians} Gaussians from the input view in "
                      f"{seconds * 1000:.0f} ms")
        return model.to(self.device)

    def guide(self, rgb: torch.Tensor, cams: Cameras, step: int) -> GuidanceOutput:
        image = self.zero123_guidance(rgb, cams, step)
        if not self.cfg.lambda_sds:
            return image
        text = super().guide(rgb, cams, step)
        return self.joint(text, image)

    def extra_losses(self, step: int) -> dict[str, torch.Tensor]:
        from gen3d.rendering.gaussian import render_gaussians

        white = torch.ones(1, 3, device=self.device)
        return self.reference_losses(render_gaussians(self.model, self.ref_camera, white, backend=self.cfg.rasterizer), step)

    def refine_texture(self, vertices, faces, uv, texture):
        if self.cfg.texture_refine.mode == "sds" and not self.cfg.prompt:
            raise Gen3dError("texture_refine.mode=sds needs a text prior and a prompt; without them refine with "
                             "texture_refine.mode=render")
        return super().refine_texture(vertices, faces, uv, texture)


# ---------------------------------------------------------------------------------------------------- magic123


@dataclass
class Magic123Config(DreamFusionConfig, ImageInput):
    """Image-to-3D with a neural field and joint 2D (text) + 3D (Zero123) guidance (Magic123's coarse stage)."""

    system: str = "magic123"
    """Registered system name."""
    lambda_sds: float = 1.0
    """λ_2D: weight of the text prior's SDS (Magic123: 1)."""
    lambda_zero123: float = 40.0
    """λ_3D: weight of the Zero123 SDS (Magic123: 40)."""
    lambda_rgb: Schedule = 5.0
    """Weight of the input view's RGB MSE (Magic123: 5)."""
    lambda_mask: Schedule = 0.5
    """Weight of the input view's mask MSE (Magic123: 0.5)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_image_input()


class Magic123(ImageTo3D, DreamFusion):
    """Magic123's coarse stage: a field fitted to the input view under joint text and Zero123 guidance."""

    name = "magic123"
    Config = Magic123Config
    cfg: Magic123Config

    def setup(self) -> None:
        self.check_image()
        super().setup()  # checks the prompt: the 2D prior's text describes the object

    def setup_training(self) -> None:
        super().setup_training()
        self.setup_reference()

    def guide(self, rgb: torch.Tensor, cams: Cameras, step: int) -> GuidanceOutput:
        """λ_2D L_2D + λ_3D L_3D: the text prior's SDS (weighted by lambda_sds) and Zero123's (lambda_zero123)."""
        image = self.zero123_guidance(rgb, cams, step)
        text = super().guide(rgb, cams, step)
        return self.joint(text, image)

    def extra_losses(self, step: int) -> dict[str, torch.Tensor]:
        out = self.renderer(self.field, self.ref_camera, generator=self.generator, step=step, train=True,
                            background=torch.ones(3, device=self.device), shading="albedo")
        return self.reference_losses(out, step)
