"""The training loop every optimization recipe shares.

A recipe subclasses `System` and fills in what is its own: `setup` (build the representation,
prior, guidance and optimizer), `training_step`, `render` (for validation and the turntable),
its checkpointed state, and `export`. `System.fit` owns the rest: the progress bar, metrics and
log, validation renders, atomic checkpoints, Ctrl-C, resume, the turntable video and exports.

Determinism: every random draw of a run comes from `self.generator` (seeded by ``seed``), whose
state is checkpointed, so a seeded run that is interrupted and resumed ends with exactly the
parameters of an uninterrupted one.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from gen3d.cameras import Cameras, OrbitConfig, orbit_cameras
from gen3d.config import clean_text, to_dict
from gen3d.errors import CheckpointError, Gen3dError
from gen3d.export.refine import TextureRefineConfig
from gen3d.io import write_text_atomic
from gen3d.losses import grads_finite
from gen3d.rendering.types import RenderOutput
from gen3d.runs import checkpoint_dirs, latest_checkpoint, save_checkpoint

import yaml

EXPORT_FORMATS = ("splat-ply", "glb", "obj", "ply", "video")
"""splat-ply: 3D Gaussians in the standard 3DGS PLY layout; glb / obj / ply: the surface mesh (textured glb and obj,
vertex colors in ply); video: the turntable."""
MESH_FORMATS = ("glb", "obj", "ply")
FORMAT_ALIASES = {"mesh-ply": "ply", "gaussians": "splat-ply", "3dgs": "splat-ply", "mp4": "video"}


def export_format(name: str) -> str:
    """The canonical export format of `name` (an alias such as mesh-ply is accepted); ValueError when unknown."""
    fmt = FORMAT_ALIASES.get(name, name)
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {name!r}; choose among {list(EXPORT_FORMATS)}")
    return fmt


@dataclass
class ViewerConfig:
    """The live browser viewer (`gen3d run ... --viewer`)."""

    enabled: bool = False
    """Start a viser server for this run and print its URL (also: the --viewer flag)."""
    host: str = "127.0.0.1"
    """Interface to listen on: 127.0.0.1 keeps it on this machine; 0.0.0.0 opens it to the network."""
    port: int = 8080
    """First port to try; the next free one is taken when it is in use."""
    refresh_every: int = 10
    """Send the browser a new snapshot of the result every this many steps..."""
    refresh_seconds: float = 2.0
    """...but not more often than this (each snapshot is a copy of the result, sent to and redrawn by every browser)."""
    resolution: int = 256
    """Height in pixels of server-side renders (fields; depth / alpha / normal modes); a quarter while the camera moves."""
    keep_open: bool = False
    """After the run ends, keep the viewer open until Ctrl-C."""

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ValueError(f"viewer.port must be in 1..65535, got {self.port}")
        if self.refresh_every < 1:
            raise ValueError(f"viewer.refresh_every must be >= 1, got {self.refresh_every}")
        if not self.refresh_seconds >= 0:
            raise ValueError(f"viewer.refresh_seconds must be >= 0, got {self.refresh_seconds}")
        if not 16 <= self.resolution <= 2048:
            raise ValueError(f"viewer.resolution must be in 16..2048 pixels, got {self.resolution}")


@dataclass
class RunConfig:
    """Settings every system shares: steps, seed, device, output and what to write."""

    system: str = ""
    """Registered system name (set by the preset's `system:` key)."""
    seed: int = 0
    """Seed of every random draw in the run (initialization, cameras, noise, densification)."""
    max_steps: int = 500
    """Optimization steps."""
    device: str = "auto"
    """'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'."""
    output_dir: str = "outputs"
    """Root of run folders: <output_dir>/<system>/<prompt-slug>@<timestamp>/."""
    val_every: int = 100
    """Write validation renders every this many steps (0: only at the end)."""
    checkpoint_every: int = 100
    """Write a checkpoint every this many steps (0: only at the end and on Ctrl-C)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""
    log_every: int = 10
    """Append to metrics.jsonl every this many steps."""
    val_views: int = 4
    """Views in each validation image (evenly spaced in azimuth, starting at the front)."""
    turntable_frames: int = 60
    """Frames of the final turntable video (0: no video)."""
    turntable_fps: int = 24
    """Frame rate of the turntable video."""
    exports: list[str] = field(default_factory=lambda: ["splat-ply", "glb"])
    """Files written at the end of a run, among: splat-ply (3DGS), glb, obj, ply (mesh), video."""
    progress: bool = True
    """Show a progress bar (step, it/s, loss)."""
    threads: int = 0
    """CPU threads for torch (0: torch's default)."""
    max_nonfinite_steps: int = 10
    """Steps with a NaN/Inf loss or gradient are skipped (no update); stop after more than this many in a row
    (0: at the first)."""
    viewer: ViewerConfig = field(default_factory=ViewerConfig)
    """Live browser viewer."""

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        for name in ("val_every", "checkpoint_every", "log_every", "turntable_frames", "keep_checkpoints", "seed",
                     "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("val_views", "turntable_fps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        bad = [f for f in self.exports if FORMAT_ALIASES.get(f, f) not in EXPORT_FORMATS]
        if bad:
            raise ValueError(f"exports: unknown format(s) {bad}; choose among {list(EXPORT_FORMATS)}")
        self.exports = [export_format(f) for f in self.exports]
        if self.max_nonfinite_steps < 0:
            raise ValueError(f"max_nonfinite_steps must be >= 0 (0: stop at the first), got {self.max_nonfinite_steps}")


@dataclass
class TextTo3DConfig(RunConfig):
    """What every text-to-3D recipe adds to `RunConfig`: the prompt and the text-to-image prior."""

    prompt: str = ""
    """What to generate, e.g. "a hamburger"."""
    negative_prompt: str = ""
    """Text the prior should steer away from (the unconditional branch of CFG)."""
    prior: str = "stabilityai/stable-diffusion-2-1-base"
    """Diffusion prior: a hub id in the local Hugging Face cache or a diffusers pipeline folder."""
    download: bool = False
    """Allow downloading `prior` from the hub when it is not in the local cache."""
    dtype: str = "auto"
    """Prior precision: auto (float16 on CUDA, float32 on CPU), float32 or float16."""
    view_dependent: bool = True
    """Append 'front/side/back/overhead view' to the prompt by camera direction."""
    mesh_resolution: int = 128
    """Grid nodes per axis of the marching-cubes surface (DreamGaussian and threestudio: 128)."""
    mesh_threshold: str = "auto"
    """Density iso-level of the surface: "auto" (the level whose solid has the result's own rendered silhouettes,
    `gen3d.export.surface`) or a number (DreamGaussian's Gaussians: 1; threestudio's fields: 25)."""
    mesh_backend: str = "auto"
    """Mesh clean-up library: auto (pymeshlab when installed, else trimesh), trimesh, pymeshlab or open3d."""
    mesh_faces: int = 100000
    """Decimate exported meshes to at most this many faces (quadric error; DreamGaussian: 1e5); 0 keeps every face."""
    mesh_remesh: float = 0.0
    """Isotropic remeshing to this edge length in world units after decimation (0: off; needs pymeshlab)."""
    texture_size: int = 1024
    """Side in texels of the albedo texture baked into glb and obj exports on an xatlas UV atlas (0: per-vertex
    colors instead)."""
    texture_refine: TextureRefineConfig = field(default_factory=TextureRefineConfig)
    """Refinement of the baked texture through the differentiable mesh renderer (DreamGaussian's second stage)."""
    use_perp_neg: bool = False
    """Perp-Neg (Armandpour et al. 2023) against multi-face objects: interpolated view prompts, the other views
    as perpendicular negatives (needs view_dependent; scale the negatives with guidance.perp_neg_scale)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.prompt = clean_text("prompt", self.prompt)
        self.negative_prompt = clean_text("negative_prompt", self.negative_prompt)
        if self.mesh_threshold != "auto":
            try:
                ok = float(self.mesh_threshold) > 0
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"mesh_threshold must be 'auto' or a positive number, got {self.mesh_threshold!r}")
        if self.mesh_resolution < 8:
            raise ValueError(f"mesh_resolution must be >= 8, got {self.mesh_resolution}")
        from gen3d.export.cleanup import MESH_BACKENDS

        if self.mesh_backend not in MESH_BACKENDS:
            raise ValueError(f"mesh_backend must be one of {list(MESH_BACKENDS)}, got {self.mesh_backend!r}")
        if not self.mesh_remesh >= 0:
            raise ValueError(f"mesh_remesh must be an edge length >= 0 (0: off), got {self.mesh_remesh}")
        if self.mesh_faces != 0 and self.mesh_faces < 4:
            raise ValueError(f"mesh_faces must be 0 (keep every face) or >= 4, got {self.mesh_faces}")
        if self.texture_size != 0 and not 16 <= self.texture_size <= 8192:
            raise ValueError(f"texture_size must be 0 (vertex colors) or 16..8192 texels, got {self.texture_size}")
        if self.use_perp_neg and not self.view_dependent:
            raise ValueError("use_perp_neg=true needs view_dependent=true (Perp-Neg mixes the view prompts)")


def check_prompt(cfg: TextTo3DConfig) -> None:
    if not cfg.prompt.strip():
        raise Gen3dError('prompt is empty; pass prompt="a hamburger" (or set prompt: in the config)')


def load_text_prior(cfg: TextTo3DConfig, device: torch.device):
    """The `DiffusionPrior` of `cfg.prior` and a `PromptProcessor` for `cfg.prompt` on it."""
    from gen3d.priors.diffusion import DiffusionPrior
    from gen3d.priors.prompts import PromptConfig, PromptProcessor

    prior = DiffusionPrior.from_pretrained(cfg.prior, device=device, dtype=cfg.dtype, download=cfg.download)
    prompts = PromptProcessor(prior, PromptConfig(
        prompt=cfg.prompt, negative_prompt=cfg.negative_prompt, view_dependent=cfg.view_dependent,
        use_perp_neg=cfg.use_perp_neg))
    return prior, prompts



class Interrupted(Exception):
    """Raised by `fit` after SIGINT (Ctrl-C) or SIGTERM, once the checkpoint is safely written (or, after a second
    signal, once the write in progress was abandoned); the message says what was saved and how to go on."""

    def __init__(self, message: str, step: int, run_dir: Path, signum: int = signal.SIGINT):
        super().__init__(message)
        self.step, self.run_dir = step, run_dir
        self.exit_status = 128 + int(signum)  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise Gen3dError(f"device={name} was asked for but CUDA is not available here; pass device=cpu or device=auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise Gen3dError(f"device '{name}' is not a torch device; use auto, cpu or cuda") from None


class System:
    """Base class of optimization recipes; see the module docstring."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = RunConfig

    def __init__(self, cfg: RunConfig, run_dir: Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.device = pick_device(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.generator = torch.Generator().manual_seed(cfg.seed)  # CPU generator: reproducible on any device
        self.step = 0
        self.log = _run_logger(self.run_dir, progress=cfg.progress)
        self._interrupt = False
        self._training_ready = False
        self.setup()

    # ---- what a recipe provides -------------------------------------------------------------
    def setup(self) -> None:
        """Build the representation (cheap: export and view need only this)."""
        raise NotImplementedError

    def setup_training(self) -> None:
        """Build what training needs on top of `setup`: prior, guidance, optimizer."""
        raise NotImplementedError

    def ensure_training(self) -> None:
        if not self._training_ready:
            self.setup_training()
            self._training_ready = True

    def training_step(self, step: int) -> dict[str, float]:
        """One optimization step (forward, backward, optimizer step); returns scalars to log."""
        raise NotImplementedError

    def render(self, cameras: Cameras) -> RenderOutput:
        """Render for validation and turntables (called under no_grad)."""
        raise NotImplementedError

    def model_tensors(self) -> dict[str, torch.Tensor]:
        """The representation's tensors, saved as safetensors."""
        raise NotImplementedError

    def load_model_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def training_state(self) -> dict[str, Any]:
        """Optimizer and other training state (besides the generator, saved by the base)."""
        return {}

    def load_training_state(self, state: dict[str, Any]) -> None:
        pass

    nonfinite_steps: int = 0
    """Steps skipped so far for a NaN/Inf loss or gradient (in this process)."""
    _nonfinite_run: int = 0  # of them, the ones in a row up to the last step
    _skipped: str = ""  # why the last step was skipped ("" when it was not)

    def optimize(self, loss: torch.Tensor, step: int, learning_rates: str,
                 optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Backward and `optimizer.step()` (default: `self.optimizer`), unless the loss or a gradient is NaN/Inf:
        then the step is skipped (no update; the caller skips its gradient statistics too), counted and logged,
        and more than `max_nonfinite_steps` skipped in a row stop the run with advice (`learning_rates` names
        the config keys to lower). Returns whether the update was made."""
        optimizer = optimizer if optimizer is not None else self.optimizer
        optimizer.zero_grad(set_to_none=True)
        self._skipped = ""
        if not bool(torch.isfinite(loss.detach()).all()):
            self._skipped = f"the loss is {loss.detach().sum().item()}"
        else:
            loss.backward()
            bad = [group.get("name", str(i)) for i, group in enumerate(optimizer.param_groups)
                   if not grads_finite(group["params"])]
            if bad:
                self._skipped = f"the gradient of {', '.join(bad)} is not finite"
        if not self._skipped:
            optimizer.step()
            self._nonfinite_run = 0
            return True
        optimizer.zero_grad(set_to_none=True)  # nothing of this step reaches the parameters
        self.nonfinite_steps += 1
        self._nonfinite_run += 1
        limit = self.cfg.max_nonfinite_steps
        self.log.warning(f"step {step} skipped: {self._skipped} ({self._nonfinite_run} in a row, "
                         f"{self.nonfinite_steps} in all; the run stops at {limit + 1} in a row: max_nonfinite_steps)")
        if self._nonfinite_run > limit:
            ckpt = checkpoint_dirs(self.run_dir)
            kept = (f"the last checkpoint ({ckpt[-1]}) is intact" if ckpt else "no checkpoint was written")
            raise Gen3dError(
                f"stopped at step {step}: {self._nonfinite_run} step(s) in a row had a non-finite loss or gradient "
                f"(last: {self._skipped}; max_nonfinite_steps={limit}); {kept}; lower the learning rates "
                f"({learning_rates}) or guidance.guidance_scale and resume, or rerun")
        return False

    def query(self):
        """The representation through the one query interface of the quality metrics
        (`gen3d.world.metrics.Query`: occupancy at points, renders over white)."""
        raise NotImplementedError

    def export(self, fmt: str, path: Path) -> Path:
        """Write the result in `fmt` (one of EXPORT_FORMATS but 'video', or an alias) to `path`; return the path."""
        fmt = export_format(fmt)
        if fmt in MESH_FORMATS:
            return self.save_surface(self.mesh(), path)
        if fmt == "splat-ply":
            return self.export_splats(path)
        raise Gen3dError(f"'{fmt}' is not a file export; the turntable is written by write_turntable")

    def export_splats(self, path: Path) -> Path:
        """Write the result as 3D Gaussians in the standard 3DGS PLY layout."""
        raise Gen3dError(f"a {self.name} run holds no 3D Gaussians")

    def representation(self):
        """The result as `gen3d.export.surface.extract_surface` takes it: a GaussianModel or a Field."""
        raise NotImplementedError

    def mesh(self):
        """The result's surface as a vertex-colored trimesh (`gen3d.export.surface`), at the configured level."""
        from gen3d.export.surface import extract_surface

        cfg = self.cfg
        threshold = "auto" if cfg.mesh_threshold == "auto" else float(cfg.mesh_threshold)
        with torch.no_grad():
            mesh = extract_surface(self.representation(), resolution=cfg.mesh_resolution, threshold=threshold)
        iou = mesh.metadata.get("threshold_iou")
        self.log.info(f"mesh: density iso-level {mesh.metadata['threshold']:.4g} ({cfg.mesh_threshold}"
                      + (f", silhouette IoU {iou:.3f}" if iou is not None else "") + f"), {len(mesh.faces):,} faces")
        return mesh

    def surface_color(self, points: torch.Tensor) -> torch.Tensor:
        """The result's albedo [P, 3] in [0, 1] at surface points [P, 3], for baking textures."""
        raise NotImplementedError

    def save_surface(self, mesh, path: Path) -> Path:
        """Save a mesh of the result as glb / obj / ply: cleaned up (`gen3d.export.cleanup`: repaired, decimated to
        `mesh_faces`, optionally remeshed, outward normals), then for glb and obj with a baked albedo texture
        (`texture_size` texels; 0: vertex colors), for ply with vertex colors, both from the result."""
        from gen3d.export.mesh import save_mesh

        return save_mesh(path, self.finish_surface(mesh, Path(path).suffix.lower(), self.surface_color))

    def finish_surface(self, mesh, suffix: str, color, refine: bool = True):
        """`save_surface`'s mesh before saving, for a file of type `suffix`, colored by ``color(points [P, 3])``;
        `refine` allows the texture refinement (`texture_refine`)."""
        from gen3d.export.cleanup import clean_mesh
        from gen3d.export.mesh import vertex_colored

        cfg = self.cfg
        before = len(mesh.faces)
        mesh = clean_mesh(mesh, faces=cfg.mesh_faces, remesh=cfg.mesh_remesh, backend=cfg.mesh_backend)
        self.log.info(f"mesh: cleaned up with {mesh.metadata['mesh_backend']}: {before:,} -> {len(mesh.faces):,} faces "
                      f"(mesh_faces={cfg.mesh_faces}" + (f", remeshed to edges of {cfg.mesh_remesh}" if cfg.mesh_remesh else "") + ")")
        if mesh.metadata["opened"]:
            self.log.warning(f"mesh: {mesh.metadata['mesh_backend']}'s decimation opened holes in the closed surface; "
                             "mesh_backend=pymeshlab (pip install 'gen3d[meshlab]') or a larger mesh_faces keeps it closed")
        with torch.no_grad():
            if cfg.texture_size and suffix in (".glb", ".obj"):
                from gen3d.export.texture import bake, textured_mesh

                parts = bake(mesh.vertices, mesh.faces, color, size=cfg.texture_size, device=self.device)
                if refine and cfg.texture_refine.steps:
                    parts = parts[:3] + (self.refine_texture(*parts),)
                return textured_mesh(*parts)
            points = torch.as_tensor(mesh.vertices, dtype=torch.float32, device=self.device)
            return vertex_colored(mesh, color(points))

    def albedo_render(self, cameras: Cameras) -> RenderOutput:
        """The result's unlit albedo over white from `cameras` (the texture refinement's ``render`` target)."""
        return self.render(cameras)

    def refine_texture(self, vertices, faces, uv, texture):
        """The baked `texture` refined by `cfg.texture_refine` (`gen3d.export.refine`) -> uint8 [S, S, 3]."""
        from gen3d.cameras import sample_orbit
        from gen3d.export.refine import refine_texture, render_loss

        cfg, rc = self.cfg, self.cfg.texture_refine
        generator = torch.Generator().manual_seed(cfg.seed)  # its own draws: an export never moves the run's
        orbit = replace(cfg.cameras, batch_size=rc.batch_size)

        def cameras(step: int) -> Cameras:
            return sample_orbit(orbit, generator, width=rc.resolution, height=rc.resolution)

        if rc.mode == "render":
            loss_fn = render_loss(self.albedo_render)
        else:  # plain SDS with the run's prior and guidance settings, at the end of their schedules
            from gen3d.guidance import build_guidance

            if getattr(self, "prior", None) is None:  # `gen3d export` builds no training state
                self.prior, self.prompts = load_text_prior(cfg, self.device)
            guidance = build_guidance(self.prior, replace(cfg.guidance, type="sds"), seed=cfg.seed)

            def loss_fn(out: RenderOutput, cams: Cameras) -> torch.Tensor:
                return guidance(out.rgb, self.prompts(cams), cfg.max_steps, cfg.max_steps, generator=generator,
                                cameras=cams).loss

        t0 = time.perf_counter()
        with torch.enable_grad():
            texture, losses = refine_texture(vertices, faces, uv, texture, loss_fn, cameras, rc, self.device,
                                             progress=cfg.progress)
        self.log.info(f"texture refined ({rc.mode}, {rc.steps} steps, {time.perf_counter() - t0:.1f} s): loss "
                      f"{losses[0]:.4g} -> {losses[-1]:.4g}")
        return texture

    def snapshot(self):
        """A frozen copy of the result for the viewer (`gen3d.viewer.protocol.Snapshot`), taken between steps."""
        raise NotImplementedError

    def export_now(self) -> list[Path]:
        """Write the run's configured exports (not the video) now, e.g. from the viewer's "Export now" button."""
        paths = []
        for fmt in self.cfg.exports:
            if fmt != "video":
                paths.append(self.export(fmt, self.run_dir / "export" / default_export_name(fmt)))
                self.log.info(f"exported {fmt}: {paths[-1]}")
        return paths

    def start_viewer(self):
        """The viser viewer of this run (`gen3d.viewer.server.Viewer`), showing the current result."""
        from gen3d.viewer.server import Viewer

        v = self.cfg.viewer
        prompt = getattr(self.cfg, "prompt", "")
        viewer = Viewer(host=v.host, port=v.port, title=f"gen3d {self.name}", description=f"*{prompt}*" if prompt else "",
                        max_steps=self.cfg.max_steps, resolution=v.resolution, log=self.log.info)
        viewer.publish(self.snapshot())
        self.log.info(f"viewer: {viewer.url}")
        return viewer

    @property
    def eval_orbit(self) -> OrbitConfig:
        return getattr(self.cfg, "cameras", OrbitConfig())

    # ---- the shared loop ----------------------------------------------------------------------
    def fit(self, stop_at: int | None = None) -> Path:
        """Train from `self.step` to `max_steps` (or `stop_at`, for tests), then write the outputs."""
        cfg = self.cfg
        end = min(cfg.max_steps, stop_at) if stop_at is not None else cfg.max_steps
        self.ensure_training()
        viewer = self.viewer = self.start_viewer() if cfg.viewer.enabled else None
        if viewer is not None:
            viewer.training = True
        self._published = time.perf_counter()
        previous = _install_stop_signals(self)
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not cfg.progress, dynamic_ncols=True,
                   desc=f"{self.name}", unit="step", file=sys.stderr)
        try:
            metrics_file = (self.run_dir / "metrics.jsonl").open("a")
        except OSError as exc:
            bar.close()
            raise (self._write_error(exc) or exc) from None
        try:
            t0 = time.perf_counter()
            while self.step < end:
                step = self.step + 1
                self._skipped = ""
                out = self.training_step(step)
                self.step = step
                bar.update(1)
                bar.set_postfix({k: f"{v:.4g}" for k, v in out.items() if k in ("loss", "n_gaussians")}, refresh=False)
                if self._skipped:  # every skipped step is recorded, whatever log_every (NaN is not JSON: left out)
                    finite = {k: v for k, v in out.items() if not (isinstance(v, float) and not math.isfinite(v))}
                    record = {"step": step, "time": round(time.perf_counter() - t0, 3), "skipped": self._skipped,
                              "nonfinite_steps": self.nonfinite_steps, **finite}
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                elif cfg.log_every and (step % cfg.log_every == 0 or step == end):
                    record = {"step": step, "time": round(time.perf_counter() - t0, 3), **out}
                    if self.nonfinite_steps:
                        record["nonfinite_steps"] = self.nonfinite_steps
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                if cfg.val_every and step % cfg.val_every == 0:
                    self.validate()
                if viewer is not None:
                    self._serve_viewer(viewer, step, out)
                if self._interrupt:
                    self.save()
                    go_on = (f"resume with: gen3d run {self.run_dir} --resume" if step < cfg.max_steps
                             else f"write the outputs with: gen3d export {self.run_dir}")
                    raise Interrupted(f"interrupted by {self._signal_name()} at step {step}; checkpoint saved; {go_on}",
                                      step, self.run_dir, self._stop_signal)
                if step % TRIM_EVERY == 0:
                    trim_heap()
                # no periodic checkpoint while steps are being skipped: the last one stays the last good state
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and not self._nonfinite_run:
                    self.save()
            if self.step >= cfg.max_steps:
                self.save()
                self.finish()
                if viewer is not None and cfg.viewer.keep_open:
                    viewer.training = False
                    viewer.publish(self.snapshot())
                    self.log.info(f"training done; the viewer stays open at {viewer.url} until Ctrl-C")
                    while viewer.wait_while_paused(forever=True, stop=lambda: self._interrupt, timeout=0.2):
                        if viewer.pop_export_request():
                            self.export_now()
        except OSError as exc:
            error = self._write_error(exc)
            if error is None:
                raise
            raise error from None
        except KeyboardInterrupt:
            if not self._interrupt:  # not ours (e.g. a KeyboardInterrupt raised by a test or a debugger)
                raise
            # a second signal: whatever was being written was abandoned (atomic writes leave the old file)
            raise Interrupted(f"aborted by a second {self._signal_name()} at step {self.step}; "
                              + self._resume_hint(), self.step, self.run_dir, self._stop_signal) from None
        finally:
            bar.close()
            try:
                metrics_file.close()
            except OSError:  # the write error it repeats is being raised already
                pass
            if previous is not None:
                for signum, handler in previous.items():
                    signal.signal(signum, handler)
            if viewer is not None:
                viewer.close()
        return self.run_dir

    _stop_signal: int = signal.SIGINT  # the signal that set `_interrupt`

    def _signal_name(self) -> str:
        return signal.Signals(self._stop_signal).name

    def _resume_hint(self) -> str:
        """What was kept and how to go on, from the newest checkpoint on disk."""
        ckpt = checkpoint_dirs(self.run_dir)
        if not ckpt:
            return "no checkpoint was written yet: start the run again"
        step = int(ckpt[-1].name.split("-")[-1])
        if step >= self.cfg.max_steps:
            return f"the final checkpoint (step {step}) is intact; write the outputs with: gen3d export {self.run_dir}"
        return f"the checkpoint at step {step} is intact; resume with: gen3d run {self.run_dir} --resume"

    def _write_error(self, exc: OSError) -> Gen3dError | None:
        """A full disk or an unwritable run folder met while training (the metrics file): `gen3d.io.write_error`'s
        message and how to go on; None for other errors."""
        from gen3d.io import write_error

        error = write_error(exc, exc.filename or self.run_dir / "metrics.jsonl")
        return None if error is None else Gen3dError(f"{error}; at step {self.step}: {self._resume_hint()}")

    def _serve_viewer(self, viewer, step: int, out: dict[str, float]) -> None:
        """Between two steps: scalars to the viewer, a snapshot every refresh_every steps, its pause and export."""
        v = self.cfg.viewer
        refresh = step % v.refresh_every == 0 and time.perf_counter() - self._published >= v.refresh_seconds
        viewer.update(step, out, cameras=getattr(self, "last_cameras", None), plot=refresh)
        if refresh:
            viewer.publish(self.snapshot())
            self._published = time.perf_counter()
        while True:  # paused: wait here, still answering "Export now"
            if viewer.pop_export_request():
                self.export_now()
            if not viewer.wait_while_paused(stop=lambda: self._interrupt, timeout=0.2):
                break

    def finish(self) -> None:
        """Final validation image, turntable video and exports; a stop signal (`fit`) is obeyed between them."""
        stages = [self.validate]
        if self.cfg.turntable_frames:
            stages.append(self.write_turntable)
        stages += [partial(self._export_default, fmt) for fmt in self.cfg.exports if fmt != "video"]
        for i, stage in enumerate(stages):
            if i and self._interrupt:
                raise Interrupted(f"interrupted by {self._signal_name()} while writing the final outputs; "
                                  + self._resume_hint(), self.step, self.run_dir, self._stop_signal)
            stage()
        self.log.info(f"done: {self.run_dir}")

    def _export_default(self, fmt: str) -> None:
        path = self.export(fmt, self.run_dir / "export" / default_export_name(fmt))
        self.log.info(f"exported {fmt}: {path}")

    @torch.no_grad()
    def render_orbit(self, n: int, size: int | None = None) -> RenderOutput:
        o = self.eval_orbit
        size = size or o.eval_size
        cams = orbit_cameras(n, o.eval_elevation, o.eval_distance, o.eval_fovy, size, size).to(self.device)
        outs = [self.render(cams[i:i + 8]) for i in range(0, n, 8)]
        cat = lambda name: torch.cat([getattr(r, name) for r in outs])  # noqa: E731
        return RenderOutput(rgb=cat("rgb"), alpha=cat("alpha"), depth=cat("depth"))

    def validate(self) -> Path:
        from gen3d.export.video import image_grid, save_image

        r = self.render_orbit(self.cfg.val_views)
        top = r.rgb.clamp(0, 1).cpu()
        bottom = r.alpha.expand_as(r.rgb).clamp(0, 1).cpu()
        grid = image_grid(torch.cat([top, bottom]), nrow=self.cfg.val_views)
        path = self.run_dir / "val" / f"step-{self.step:06d}.png"
        save_image(path, grid)
        return path

    def write_turntable(self, path: Path | None = None) -> Path:
        """Render the turntable orbit and write it as mp4 (gif where no encoder); returns the path written."""
        from gen3d.export.video import write_video

        frames = self.render_orbit(self.cfg.turntable_frames or 60).rgb.clamp(0, 1).cpu()
        path = write_video(path or self.run_dir / "video" / "turntable.mp4", frames, fps=self.cfg.turntable_fps)
        self.log.info(f"turntable: {path}")
        return path

    # ---- checkpoints ----------------------------------------------------------------------------
    def save(self) -> Path:
        """Checkpoint the run (atomically); refuses, leaving the previous checkpoint, when a tensor is NaN/Inf."""
        model = self.model_tensors()
        bad = [k for k, v in model.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise Gen3dError(f"the model holds NaN/Inf in {bad[:3]} at step {self.step}: no checkpoint written; "
                             + self._resume_hint())
        state = {"training": self.training_state(), "generator": self.generator.get_state()}
        guidance_state = self.guidance.state_dict() if getattr(self, "guidance", None) is not None else {}
        if guidance_state:  # VSD's estimator, CDS's fixed noise
            state["guidance"] = guidance_state
        meta = {"system": self.name, "format": "gen3d-checkpoint-1", "max_steps": self.cfg.max_steps}
        path = save_checkpoint(self.run_dir, self.step, model, state, meta, keep=self.cfg.keep_checkpoints)
        self.log.debug(f"checkpoint: {path}")
        return path

    def resume(self, model_only: bool = False) -> int:
        """Load the newest usable checkpoint of the run; returns its step (0 if there is none).

        With `model_only`, only the representation is loaded (for export and viewing), so no
        prior is needed.
        """
        ckpt = latest_checkpoint(self.run_dir, warn=self.log.warning)
        if ckpt is None:
            if model_only:
                raise CheckpointError(f"run '{self.run_dir}' has no checkpoint yet; wait for one or resume it with --resume")
            self.log.warning("no checkpoint in this run yet; starting from step 0")
            return 0
        if ckpt.meta.get("system") != self.name:
            raise CheckpointError(f"checkpoint '{ckpt.path}' belongs to system '{ckpt.meta.get('system')}', not "
                                  f"'{self.name}'; resume it with its own run's config (without system=...), or "
                                  "start a new run")
        try:
            self.load_model_tensors(ckpt.model)
            if not model_only:
                self.ensure_training()
                if ckpt.state.get("training"):
                    self.load_training_state(ckpt.state["training"])
                else:  # a model without optimizer state, e.g. written by `gen3d convert`
                    self.log.info(f"checkpoint '{ckpt.path}' holds no optimizer state: the optimizer starts fresh")
                self.generator.set_state(ckpt.state["generator"])
                if "guidance" in ckpt.state:
                    self.guidance.load_state_dict(ckpt.state["guidance"])
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise CheckpointError(
                f"checkpoint '{ckpt.path}' does not fit this config ({type(exc).__name__}: {str(exc)[:200]}); "
                "resume with the run's own config.yaml or start a new run"
            ) from None
        self.step = ckpt.step
        self.log.info(f"resumed from {ckpt.path} at step {self.step}")
        return self.step


TRIM_EVERY = 100
"""Steps between two `trim_heap` calls in `fit`."""


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's malloc_trim, or None (another C library, another system)."""
    import ctypes

    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def trim_heap() -> None:
    """Give the C heap's free pages back to the system. glibc keeps memory freed by torch's temporary tensors in its
    arenas, so without this a run's resident memory rose by about 7 MB per 1000 steps with nothing held
    (`benchmarks/bench_memory.py`; README, Reliability)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def default_export_name(fmt: str) -> str:
    return {"splat-ply": "model.ply", "glb": "mesh.glb", "obj": "mesh.obj", "ply": "mesh.ply",
            "video": "turntable.mp4"}[export_format(fmt)]


def write_config(run_dir: Path, cfg: Any) -> Path:
    path = run_dir / "config.yaml"
    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
"""Ctrl-C, and what kill, systemd, docker stop and job schedulers send: both stop a run the same way."""


def _install_stop_signals(system: System) -> dict[int, Any] | None:
    """First SIGINT or SIGTERM: finish the step, checkpoint, exit. A second: stop at once. Returns the previous
    handlers (None off the main thread, where Python delivers no signals)."""
    from threading import current_thread, main_thread

    if current_thread() is not main_thread():
        return None

    def handler(signum, frame):
        if system._interrupt:
            raise KeyboardInterrupt
        system._interrupt = True
        system._stop_signal = signum
        what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        system.log.warning(f"{what}: finishing this step and saving a checkpoint (again to abort now)")

    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    for signum in STOP_SIGNALS:
        signal.signal(signum, handler)
    return previous


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def _run_logger(run_dir: Path, progress: bool) -> logging.Logger:
    log = logging.getLogger(f"gen3d.run.{run_dir}")
    log.setLevel(logging.DEBUG)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    try:
        fh = logging.FileHandler(run_dir / "log.txt")
    except OSError as exc:  # e.g. `gen3d export --output elsewhere` on a run folder this user cannot write
        fh, unwritable = None, exc
    if fh is not None:
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(fh)
    sh = _TqdmHandler()
    sh.setLevel(logging.INFO)
    sh.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(sh)
    if fh is None:
        log.warning(f"warning: cannot write {run_dir / 'log.txt'} ({unwritable.strerror or unwritable}); "
                    f"logging to the console only")
    return log
