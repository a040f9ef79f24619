"""4D generation: static 3D Gaussians first, then a deformation field that moves them over time.

Two recipes share the dynamic stage here (issue 12; ALGORITHMS.md section 9):

- **dream4d** (text-to-4D, after Align Your Gaussians, Ling et al. 2024): the static stage is DreamGaussian's
  text-to-3D (`gen3d.systems.dreamgaussian`) on the prompt ("a red mug"); the dynamic stage freezes those Gaussians
  and trains a HexPlane deformation field (`gen3d.representations.deformation`) with **video SDS**
  (`gen3d.guidance.video`: clips of `frames` frames from one random camera, scored by a text-to-video prior on
  "<prompt>, <motion>") for the motion, and per-frame **image SDS** with the text-to-image prior at random
  (camera, time) pairs for the look of every frame.
- **dreamgaussian4d** (image- and video-to-4D, after DreamGaussian4D, Ren et al. 2023): the static stage is
  DreamGaussian's image mode (`gen3d.systems.image_to_3d.Zero123`) on the first frame of the input video (or the
  input image); the dynamic stage fits the deformation to every frame of the video from the input camera (RGB and
  mask MSE, DreamGaussian4D's 10^4 and 10^3) with Zero123 SDS on novel views at random times, each conditioned on
  its own frame. With an image and no video, only time 0 has a reference and the motion comes from video SDS on
  `prompt` + `motion` (`lambda_video`), the two recipes' guidance combined.

Both regularize the field with K-planes' temporal smoothness and a local rigidity term on a random subset of
Gaussians (`lambda_smoothness`, `lambda_rigidity`). Deliberate simplifications: the canonical Gaussians are frozen
in the dynamic stage (DreamGaussian4D also keeps the static Gaussians and learns only the deformation), and there
is no densification there. Time t runs over [0, 1]; frame i of a clip of F frames is at t = i / (F - 1).

Outputs at the end of a run: ``export/frames/frame_000.ply ...`` (one standard 3DGS PLY per frame) with
``export/model.ply`` (frame 0), the mesh sequence ``export/mesh.glb`` (one node per frame, played as a flip-book),
``video/turntable.mp4`` (the camera orbits while the clip loops) and ``video/clip.mp4`` (the clip from the front).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from gen3d.cameras import Cameras, orbit_cameras, sample_orbit
from gen3d.config import clean_text
from gen3d.errors import Gen3dError
from gen3d.guidance import GuidanceConfig
from gen3d.rendering.gaussian import render_gaussians
from gen3d.rendering.types import RenderOutput
from gen3d.representations.deformation import DeformationConfig, DeformationField, rigidity_loss, time_smoothness
from gen3d.representations.dynamic import DynamicGaussians
from gen3d.systems.dreamgaussian import DreamGaussian, DreamGaussianConfig
from gen3d.systems.image_to_3d import Zero123, Zero123Config


@dataclass
class MotionStage:
    """The dynamic stage of a 4D recipe (shared by dream4d and dreamgaussian4d)."""

    static_steps: int = 400
    """Steps of the static stage (the 3D recipe); the remaining max_steps - static_steps train the deformation."""
    frames: int = 8
    """Frames of a clip: the video prior's length, the input video's frames used, the exported frames."""
    motion: str = ""
    """How the object moves, for the video prior: its prompt is "<prompt>, <motion>" (e.g. motion=bouncing)."""
    video_prior: str = "gen3d/shapes-t2v"
    """Text-to-video prior: the embedded one, or a diffusers text-to-video folder / hub id (UNet3DConditionModel)."""
    video_guidance: GuidanceConfig = field(default_factory=lambda: GuidanceConfig(
        guidance_scale=5.0, min_step_percent=0.02, max_step_percent=0.98))
    """Video SDS settings (CFG scale, timestep range, weighting); schedules run over the dynamic stage."""
    lambda_video: float = 1.0
    """Weight of video SDS (0: no video prior)."""
    video_rest: bool = True
    """Show a video prior that takes the object at rest (`VideoDiffusionPrior.at_rest`: one trained with
    `gen3d world train-video-prior rest_frame=true`) the static stage from each clip's camera, so that it only has to
    say how that object moves (False: the caption alone). Priors without that input (the shipped gen3d/shapes-t2v,
    hub text-to-video models) ignore it."""
    lambda_frame: float = 1.0
    """Weight of the per-frame image guidance (text SDS in dream4d, Zero123 SDS in dreamgaussian4d)."""
    video_views: int = 1
    """Clips (cameras) per step for video SDS."""
    frame_views: int = 2
    """Random (camera, time) renders per step for the per-frame guidance."""
    lambda_smoothness: float = 5.0
    """Weight of the space-time planes' temporal smoothness (STAG4D: 5)."""
    lambda_rigidity: float = 100.0
    """Weight of the local rigidity term (squared change of neighbour distances)."""
    rigidity_points: int = 1024
    """Gaussians drawn per step for the rigidity term (their 8 nearest neighbours among themselves)."""
    deformation: DeformationConfig = field(default_factory=DeformationConfig)
    """Size of the HexPlane deformation field."""
    deformation_lr: float = 6.4e-4
    """Adam learning rate of the field's MLP (DreamGaussian4D: 6.4e-4)."""
    grid_lr: float = 6.4e-3
    """Adam learning rate of the field's planes (DreamGaussian4D: 6.4e-3)."""

    def check_motion(self, max_steps: int) -> None:
        self.motion = clean_text("motion", self.motion)
        if not 1 <= self.static_steps < max_steps:
            raise ValueError(f"static_steps must be in [1, max_steps) so that a dynamic stage remains, got "
                             f"{self.static_steps} with max_steps={max_steps}")
        if not 2 <= self.frames <= 64:
            raise ValueError(f"frames must be in 2..64, got {self.frames}")
        for name in ("lambda_video", "lambda_frame", "lambda_smoothness", "lambda_rigidity"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("video_views", "frame_views", "rigidity_points"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.deformation_lr > 0 and self.grid_lr > 0):
            raise ValueError(f"deformation_lr and grid_lr must be > 0, got {self.deformation_lr} and {self.grid_lr}")
        if self.video_guidance.type != "sds":
            raise ValueError(f"video_guidance.type must be sds, got {self.video_guidance.type!r}")


class Dynamic4D:
    """The dynamic stage, mixed into a 3D Gaussian recipe (`DreamGaussian` or `Zero123`) that is the static stage."""

    cfg: Any
    model: Any

    # ---- setup -------------------------------------------------------------------------------
    def setup(self) -> None:
        super().setup()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed + 7)
            self.field = DeformationField(self.cfg.deformation).to(self.device)
        self.stage = "static"
        self.video_guidance = None

    @property
    def dynamic(self) -> DynamicGaussians:
        return DynamicGaussians(self.model, self.field)

    def times(self) -> list[float]:
        return self.dynamic.times(self.cfg.frames)

    def setup_video_prior(self, prompt: str, prior=None) -> None:
        """The text-to-video prior (`cfg.video_prior`, or `prior`: a `VideoDiffusionPrior` made by the caller, such
        as the benchmark's `gen3d.world.oracle.ExactVideoDenoiser`) and video SDS for `prompt` (skipped when
        lambda_video is 0)."""
        from gen3d.guidance.video import VideoSDSGuidance
        from gen3d.priors.prompts import PromptConfig, PromptProcessor
        from gen3d.priors.video import VideoDiffusionPrior

        cfg = self.cfg
        if not cfg.lambda_video:
            return
        if prior is None:
            prior = VideoDiffusionPrior.from_pretrained(cfg.video_prior, device=self.device, dtype=cfg.dtype,
                                                        download=cfg.download)
        self.video_prior = prior
        self.video_prompts = PromptProcessor(self.video_prior, PromptConfig(prompt=prompt, view_dependent=cfg.view_dependent))
        self.video_guidance = VideoSDSGuidance(self.video_prior, cfg.video_guidance)
        if self.video_prior.num_frames != cfg.frames:
            self.log.warning(f"{cfg.video_prior} was trained on clips of {self.video_prior.num_frames} frames; this run "
                             f"renders {cfg.frames} (frames={self.video_prior.num_frames} matches it)")

    def start_dynamic(self) -> None:
        """Freeze the static Gaussians and optimize the deformation field from here on."""
        cfg = self.cfg
        self.model.requires_grad_(False)
        mlp = [p for n, p in self.field.named_parameters() if not n.startswith(("spatial", "temporal"))]
        grids = [*self.field.spatial.parameters(), *self.field.temporal.parameters()]
        self.optimizer = torch.optim.Adam([{"params": mlp, "lr": cfg.deformation_lr, "name": "deformation"},
                                           {"params": grids, "lr": cfg.grid_lr, "name": "grid"}], eps=1e-15)
        self.stage = "dynamic"
        self.log.info(f"dynamic stage: {self.model.num_gaussians:,} Gaussians frozen, deformation field "
                      f"{sum(p.numel() for p in self.field.parameters()):,} parameters, {cfg.frames} frames")

    # ---- training --------------------------------------------------------------------------------
    @contextmanager
    def static_stage(self):
        """Within: `cfg.max_steps` is `static_steps`, so the static stage is exactly the 3D recipe's run of that
        many steps (its learning-rate, timestep, densification and loss-weight schedules end with the stage)."""
        cfg = self.cfg
        self.cfg = copy.copy(cfg)
        self.cfg.max_steps = cfg.static_steps
        try:
            yield
        finally:
            self.cfg = cfg

    def setup_training(self) -> None:
        with self.static_stage():
            super().setup_training()

    def training_step(self, step: int) -> dict[str, float]:
        if step <= self.cfg.static_steps:
            with self.static_stage():
                return super().training_step(step)
        if self.stage != "dynamic":
            self.start_dynamic()
        return self.dynamic_step(step)

    def render_at(self, cams: Cameras, t: float, background: torch.Tensor) -> RenderOutput:
        return render_gaussians(self.dynamic.at(t), cams, background, backend=self.cfg.rasterizer)

    def dynamic_step(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        r, total = step - cfg.static_steps, cfg.max_steps - cfg.static_steps
        size = self.render_size(step)
        losses: dict[str, torch.Tensor] = {}
        logs: dict[str, float] = {}
        if self.video_guidance is not None:
            cams = sample_orbit(replace(cfg.cameras, batch_size=cfg.video_views), self.generator, width=size,
                                height=size).to(self.device)
            self.last_cameras = cams
            bg = self.background_for(len(cams))
            clip = torch.stack([self.render_at(cams, t, bg).rgb for t in self.times()], 1)  # [B, F, H, W, 3]
            rest = None
            if cfg.video_rest and self.video_prior.rest_frame:
                with torch.no_grad():
                    rest = render_gaussians(self.model, cams, bg, backend=cfg.rasterizer).rgb  # the static stage
            with self.video_prior.at_rest(rest):
                g = self.video_guidance(clip, self.video_prompts(cams), r, total, generator=self.generator,
                                        cameras=cams)
            losses["video"] = cfg.lambda_video * g.loss
            logs["video_grad"] = g.grad_norm
        if cfg.lambda_frame:
            losses.update(self.frame_losses(step, size))
        losses.update(self.reference_clip_losses(step))
        if cfg.lambda_smoothness:
            losses["smoothness"] = cfg.lambda_smoothness * time_smoothness(self.field)
        if cfg.lambda_rigidity:
            losses["rigidity"] = cfg.lambda_rigidity * self.rigidity()
        loss = sum(losses.values())
        self.optimize(loss, step, "deformation_lr, grid_lr")
        return {"loss": loss.item(), "n_gaussians": float(self.model.num_gaussians), "size": float(size),
                **logs, **{k: float(v.detach()) for k, v in losses.items()}}

    def random_frames(self, size: int) -> tuple[Cameras, list[int], RenderOutput]:
        """`frame_views` random cameras, each at a random frame of the clip, rendered (for per-frame guidance)."""
        cfg = self.cfg
        cams = sample_orbit(replace(cfg.cameras, batch_size=cfg.frame_views), self.generator, width=size,
                            height=size).to(self.device)
        frames = torch.randint(0, cfg.frames, (cfg.frame_views,), generator=self.generator).tolist()
        times = self.times()
        bg = self.background_for(1)
        outs = [self.render_at(cams[i:i + 1], times[f], bg) for i, f in enumerate(frames)]
        out = RenderOutput(rgb=torch.cat([o.rgb for o in outs]), alpha=torch.cat([o.alpha for o in outs]),
                           depth=torch.cat([o.depth for o in outs]))
        return cams, frames, out

    def frame_losses(self, step: int, size: int) -> dict[str, torch.Tensor]:
        """Per-frame image guidance at random (camera, time) pairs, at the static stage's final guidance settings;
        the recipe's own."""
        raise NotImplementedError

    def reference_clip_losses(self, step: int) -> dict[str, torch.Tensor]:
        """Reconstruction of an input video (dreamgaussian4d); none for text-to-4D."""
        return {}

    def rigidity(self) -> torch.Tensor:
        """Local rigidity at a random time on `rigidity_points` random Gaussians and their 8 nearest neighbours."""
        from gen3d.representations.deformation import knn_indices

        means = self.model.means.detach()
        n = min(self.cfg.rigidity_points, len(means))
        idx = torch.randperm(len(means), generator=self.generator)[:n].to(self.device)
        t = torch.rand((), generator=self.generator).item()
        canonical = means[idx]
        moved = canonical + self.field(canonical, t)[0]
        return rigidity_loss(canonical, moved, knn_indices(canonical, 8))

    # ---- outputs -------------------------------------------------------------------------------
    def render(self, cameras: Cameras) -> RenderOutput:
        white = torch.ones(len(cameras), 3, device=self.device)
        return self.render_at(cameras, 0.0, white)

    @torch.no_grad()
    def clip_frames(self, cameras: Cameras, times: list[float] | None = None) -> torch.Tensor:
        """rgb [F, C, H, W, 3] over white of the clip at `times` (default: the run's frames) from `cameras`."""
        white = torch.ones(len(cameras), 3, device=self.device)
        return torch.stack([self.render_at(cameras, t, white).rgb for t in (times or self.times())])

    def validate(self) -> Path:
        """A grid: one column per frame; rows from the front and from the side (azimuth 90)."""
        from gen3d.export.video import image_grid, save_image

        o = self.eval_orbit
        front = orbit_cameras(1, o.eval_elevation, o.eval_distance, o.eval_fovy, o.eval_size, o.eval_size)
        side = orbit_cameras(1, o.eval_elevation, o.eval_distance, o.eval_fovy, o.eval_size, o.eval_size,
                             start_azimuth=90.0)
        rows = [self.clip_frames(c.to(self.device))[:, 0].clamp(0, 1).cpu() for c in (front, side)]
        path = self.run_dir / "val" / f"step-{self.step:06d}.png"
        save_image(path, image_grid(torch.cat(rows), nrow=self.cfg.frames))
        return path

    def write_turntable(self, path: Path | None = None) -> Path:
        """video/turntable.mp4 (the camera orbits once while the clip loops twice) and video/clip.mp4 (the front)."""
        from gen3d.export.sequence import animated_turntable
        from gen3d.export.video import write_video

        cfg, o = self.cfg, self.eval_orbit
        white = lambda n: torch.ones(n, 3, device=self.device)  # noqa: E731

        def render(cams: Cameras, t: float) -> RenderOutput:
            cams = cams.to(self.device)
            return self.render_at(cams, t, white(len(cams)))

        with torch.no_grad():
            frames = animated_turntable(render, cfg.turntable_frames or 60, o.eval_elevation, o.eval_distance,
                                        o.eval_fovy, o.eval_size, cycles=2)
        path = write_video(path or self.run_dir / "video" / "turntable.mp4", frames.clamp(0, 1).cpu(),
                           fps=cfg.turntable_fps)
        front = orbit_cameras(1, o.eval_elevation, o.eval_distance, o.eval_fovy, o.eval_size, o.eval_size)
        clip = self.clip_frames(front.to(self.device))[:, 0].clamp(0, 1).cpu()
        write_video(path.parent / "clip.mp4", clip, fps=max(1, cfg.frames // 2))
        self.log.info(f"turntable: {path}")
        return path

    def export(self, fmt: str, path: Path) -> Path:
        """splat-ply: frame 0 at `path` and every frame in `frames/` beside it; glb / obj / ply: the mesh sequence."""
        from gen3d.systems.base import MESH_FORMATS, export_format

        fmt = export_format(fmt)
        path = Path(path)
        if fmt == "splat-ply":
            from gen3d.export.ply import save_gaussian_ply
            from gen3d.io import atomic_folder

            with atomic_folder(path.parent / "frames") as tmp, torch.no_grad():
                for i, t in enumerate(self.times()):
                    save_gaussian_ply(tmp / f"frame_{i:03d}.ply", self.dynamic.at(t).to_model())
            with torch.no_grad():
                return save_gaussian_ply(path, self.dynamic.at(0.0).to_model())
        if fmt in MESH_FORMATS:
            if path.suffix.lower() not in (".glb", ".obj"):
                raise Gen3dError(f"a 4D result's meshes are a sequence, written as glb (one node per frame) or obj "
                                 f"(one file per frame), not {path.suffix or fmt}; use --format glb or obj")
            return self.save_mesh_sequence(path)
        return super().export(fmt, path)

    def save_mesh_sequence(self, path: Path) -> Path:
        """One mesh per frame (each cleaned up and colored like a 3D run's mesh) in one glb, or an obj / ply
        sequence."""
        from gen3d.export.sequence import save_mesh_sequence
        from gen3d.export.surface import extract_surface

        cfg = self.cfg
        threshold = "auto" if cfg.mesh_threshold == "auto" else float(cfg.mesh_threshold)
        meshes = []
        for i, t in enumerate(self.times()):
            with torch.no_grad():
                frame = self.dynamic.at(t).to_model()
                mesh = extract_surface(frame, resolution=cfg.mesh_resolution, threshold=threshold)
            meshes.append(self.finish_surface(mesh, Path(path).suffix.lower(), frame.color_at, refine=False))
        out = save_mesh_sequence(meshes, path, fps=max(1, cfg.frames // 2))
        self.log.info(f"mesh sequence: {len(meshes)} frames, {sum(len(m.faces) for m in meshes):,} faces in all")
        return out

    def model_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().model_tensors(), **{f"field.{k}": v for k, v in self.field.state_dict().items()}}

    def load_model_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        field_state = {k[len("field."):]: v for k, v in tensors.items() if k.startswith("field.")}
        super().load_model_tensors({k: v for k, v in tensors.items() if not k.startswith("field.")})
        if field_state:
            self.field.load_state_dict({k: v.to(self.device) for k, v in field_state.items()})

    def training_state(self) -> dict[str, Any]:
        if self.stage == "dynamic":
            return {"stage": "dynamic", "optimizer": self.optimizer.state_dict()}
        return {"stage": "static", **super().training_state()}

    def load_training_state(self, state: dict[str, Any]) -> None:
        if state.get("stage") == "dynamic":
            self.start_dynamic()
            self.optimizer.load_state_dict(state["optimizer"])
        else:
            super().load_training_state({k: v for k, v in state.items() if k != "stage"})

    def snapshot(self):
        from gen3d.viewer.snapshots import dynamic_snapshot

        return dynamic_snapshot(self.dynamic, self.step, self.cfg.rasterizer, frames=self.cfg.frames)

    def query(self, t: float = 0.0):
        """The frame at time t through the metrics' query interface (occupancy, renders)."""
        from gen3d.rendering.gaussian import GaussianQuery

        with torch.no_grad():
            return GaussianQuery(self.dynamic.at(t).to_model(), self.cfg.rasterizer)


# ---------------------------------------------------------------------------------------------------- dream4d


@dataclass
class Dream4DConfig(DreamGaussianConfig, MotionStage):
    """Text-to-4D: DreamGaussian text-to-3D, then a deformation field under video SDS and per-frame image SDS."""

    system: str = "dream4d"
    """Registered system name."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_motion(self.max_steps)
        if self.lambda_video and not self.motion.strip():
            raise ValueError('motion is empty; say how the object moves, e.g. motion=bouncing (the video prior\'s '
                             'prompt is "<prompt>, <motion>"), or set lambda_video=0')


class Dream4D(Dynamic4D, DreamGaussian):
    name = "dream4d"
    Config = Dream4DConfig
    cfg: Dream4DConfig

    def setup_guidance(self) -> None:
        super().setup_guidance()
        self.setup_video_prior(f"{self.cfg.prompt}, {self.cfg.motion}")

    def frame_losses(self, step: int, size: int) -> dict[str, torch.Tensor]:
        cams, _, out = self.random_frames(size)
        end = self.cfg.static_steps  # the static stage's final guidance settings (its smallest timesteps)
        g = self.guidance(out.rgb, self.prompts(cams), end, end, generator=self.generator, cameras=cams)
        return {"frame_sds": self.cfg.lambda_frame * g.loss}


# ---------------------------------------------------------------------------------------------------- dreamgaussian4d


@dataclass
class DreamGaussian4DConfig(Zero123Config, MotionStage):
    """Image- or video-to-4D: DreamGaussian's image mode on the first frame, then the deformation fitted to the
    video (or video SDS on `prompt` + `motion` when only an image is given)."""

    system: str = "dreamgaussian4d"
    """Registered system name."""
    video: str = ""
    """Input video: an mp4 / gif / animated webp, or a folder of frames (sorted by name); its first frame is the
    static stage's input image and `frames` evenly spaced frames are fitted."""
    lambda_video: float = 0.0
    """Weight of video SDS on "<prompt>, <motion>" (needed when only an image is given)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_motion(self.max_steps)
        if self.video and self.image:
            raise ValueError("pass either video= (video-to-4D) or image= (image-to-4D), not both")
        if self.lambda_video and not (self.prompt.strip() and self.motion.strip()):
            raise ValueError('lambda_video > 0 needs prompt= and motion= (the video prior\'s prompt is '
                             '"<prompt>, <motion>", e.g. prompt="a red mug" motion=bouncing)')


class DreamGaussian4D(Dynamic4D, Zero123):
    name = "dreamgaussian4d"
    Config = DreamGaussian4DConfig
    cfg: DreamGaussian4DConfig

    def check_inputs(self) -> None:
        cfg = self.cfg
        if not (cfg.video or cfg.image):
            raise Gen3dError("no input: pass video=path/to/clip.mp4 (video-to-4D: an mp4, gif or folder of frames) or "
                             "image=object.png with prompt= and motion= (image-to-4D), e.g. "
                             "`gen3d run video-to-4d video=clip.mp4`")
        if cfg.image and not cfg.lambda_video:
            raise Gen3dError("image-to-4D has no motion to follow without the video prior: pass prompt=\"...\" "
                             "motion=... lambda_video=1 (or give a video with video=)")
        if cfg.lambda_sds:
            DreamGaussian.check_inputs(self)

    def setup(self) -> None:
        super().setup()
        self.clip_rgb = None
        if self.cfg.video:
            self.load_reference()  # fail early on an unreadable video

    def load_reference(self) -> None:
        """The input image, or the video's frames prepared as one clip (frame 0 is the static stage's input)."""
        if not self.cfg.video:
            return super().load_reference()
        from gen3d.export.video import image_grid, save_image
        from gen3d.images import load_clip

        cfg = self.cfg
        clip = load_clip(cfg.video, cfg.frames, size=cfg.image_size, fill_ratio=cfg.fill_ratio, recenter=cfg.recenter)
        self.clip_rgb = torch.stack([c.rgb for c in clip]).to(self.device)  # [F, S, S, 3]
        self.clip_mask = torch.stack([c.mask for c in clip])[..., None].to(self.device)  # [F, S, S, 1]
        self.ref_rgb, self.ref_mask = self.clip_rgb[:1], self.clip_mask[:1]
        save_image(self.run_dir / "reference.png", clip[0].rgb)
        save_image(self.run_dir / "reference_clip.png", image_grid(self.clip_rgb.cpu(), nrow=cfg.frames))
        self.log.info(f"input video: {cfg.video}, {cfg.frames} frames prepared at {cfg.image_size}x{cfg.image_size}")
        self.ref_camera = self.input_camera()

    def setup_guidance(self) -> None:
        super().setup_guidance()
        self.frame_zero123: dict[int, Any] = {}
        self.setup_video_prior(f"{self.cfg.prompt}, {self.cfg.motion}")

    def zero123_for(self, frame: int):
        """Zero123 SDS conditioned on the input video's frame (the input image when there is no video)."""
        from gen3d.guidance.zero123 import Zero123Guidance

        cfg = self.cfg
        if self.clip_rgb is None or frame == 0:
            return self.zero123
        if frame not in self.frame_zero123:
            self.frame_zero123[frame] = Zero123Guidance(self.view_prior, self.clip_rgb[frame:frame + 1], cfg.elevation,
                                                        0.0, cfg.ref_distance, cfg.zero123)
        return self.frame_zero123[frame]

    def frame_losses(self, step: int, size: int) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        cams, frames, out = self.random_frames(size)
        loss = 0.0
        for i, f in enumerate(frames):  # each view guided by its own frame's condition
            g = self.zero123_for(f)(out.rgb[i:i + 1], cams[i:i + 1], cfg.static_steps, cfg.static_steps,
                                    generator=self.generator)
            loss = loss + g.loss / len(frames)
        return {"frame_zero123": cfg.lambda_frame * cfg.lambda_zero123 * loss}

    def reference_clip_losses(self, step: int) -> dict[str, torch.Tensor]:
        """Every frame of the input video from the input camera (only frame 0 for an input image)."""
        white = torch.ones(1, 3, device=self.device)
        if self.clip_rgb is None:
            return self.reference_losses(self.render_at(self.ref_camera, 0.0, white), step)
        times = self.times()
        total: dict[str, torch.Tensor] = {}
        for i, t in enumerate(times):
            out = self.render_at(self.ref_camera, t, white)
            for k, v in self.reference_losses(out, step, self.clip_rgb[i:i + 1], self.clip_mask[i:i + 1]).items():
                total[k] = total.get(k, 0.0) + v / len(times)
        return total

