"""Conversion between representations by distillation: ``gen3d convert RUN to=triplane``.

After Progressive Volume Distillation (Fang et al., 2023, "One is All: Bridging the Gap Between
Neural Radiance Fields Architectures with Progressive Volume Distillation"): a trained model (the
*teacher*, a run's newest checkpoint) is converted into another representation (the *student*) by
optimizing the student to reproduce the teacher's volume and images, not by retraining it from the
prompt. Targets: a hash-grid or triplane field (a new ``dreamfusion`` run) or 3D Gaussians (a new
``dreamgaussian`` run). Sources: ``dreamfusion`` runs (either geometry) and ``dreamgaussian`` runs.

The method, written from the math (not PVD's code; PVD's staged block-wise feature matching needs
matching architectures and is left out):

**Field -> field.** Each step draws P points x, half uniform in the student's box and half near the
teacher's surface (nodes of a G^3 grid where the teacher's opacity a, below, exceeds 0.1, dilated by
one node, jittered by up to one node spacing), and C random cameras from the source's training orbit
(or, with ``convert.views``, among a pool of teacher views rendered once), and minimizes

    L = l_d mean_x (a_S(x) - a_T(x))^2                                      (density)
      + l_a sum_x a_T(x) |c_S(x) - c_T(x)|^2 / (3 sum_x a_T(x))             (albedo)
      + l_rgb mean_pix |rgb_S - rgb_T|^2 + l_alpha mean_pix (A_S - A_T)^2    (renders over white)

where ``a(x) = 1 - exp(-sigma(x) delta)`` is the opacity of one render step (delta = the student
renderer's step size), c the albedo, and rgb, A the albedo renders and their opacity (the student's
with stratified samples through its own occupancy grid, the teacher's deterministic). PVD notes the
numerical instability of matching sigma itself (it spans orders of magnitude and is unbounded);
matching the per-step opacity is bounded in [0, 1], weighs densities by what the renderer can see,
and saturates where any sigma renders opaque. The albedo only matters where there is matter, so it
is weighted by the teacher's opacity. Adam with the target recipe's groups and betas, its learning
rates times ``convert.lr_scale`` (3).

**Field -> 3D Gaussians.** The Gaussians (as many as the target config's ``gaussians.num_points``)
start at points drawn among the G^3 nodes where the teacher's opacity exceeds 0.5 and which lie
within two nodes of an empty one (a shell inside the surface: Gaussians deeper inside are hidden),
jittered within a node spacing, colored with the teacher's albedo there, with opacity
``convert.init_opacity`` (0.5) and 3DGS's nearest-neighbour scales; then ``l_rgb`` and ``l_alpha`` above are
minimized through `render_gaussians` with the model's own Adam groups and learning rates (times
``convert.lr_scale``; the position rate decaying over the distillation). No densification: the number of Gaussians stays
``gaussians.num_points``, so the run resumes into the recipe's freshly built optimizer.

**3D Gaussians -> field** (the same loss): the teacher's opacity is the Gaussians' density clamped to
[0, 1] (the level the mesh export cuts at 0.5) and its albedo their density-weighted color, both
tabulated once on the G^3 grid and interpolated trilinearly; they are approximations (a splat is not
a volume density), which the render terms, exact for any teacher, correct.

The converted model is written as a new run folder (config.yaml, a checkpoint at step 0 with no
optimizer state, so ``gen3d run NEW --resume`` continues with SDS from step 0, ``gen3d export NEW``
and the viewer work on it), a validation image and ``convert.json``: the converted model's PSNR (and
alpha MAE, silhouette IoU at alpha 0.5) against the teacher's renders over white on a held-out orbit
at the source's evaluation settings, at initialization and at the end.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from gen3d.cameras import Cameras, orbit_cameras, sample_orbit
from gen3d.config import apply_overrides, from_dict, read_yaml, to_dict
from gen3d.errors import Gen3dError
from gen3d.io import write_text_atomic
from gen3d.rendering.types import RenderOutput
from gen3d.rendering.volume import BackgroundConfig, MaterialConfig, VolumeRenderer
from gen3d.runs import checkpoint_dirs, new_run_dir, resolve_run, save_checkpoint
from gen3d.systems.base import System, write_config

TARGETS = ("hashgrid", "triplane", "gaussians")
"""What `convert_run` converts to: a hash-grid field, a triplane field (dreamfusion runs) or 3D Gaussians (dreamgaussian)."""

SOURCES = ("dreamfusion", "dreamgaussian")
"""Systems whose runs can be converted."""

# What a converted run inherits from its source when the target is another system: what to make
# (prompt, prior), the run's identity (seed, device, output folder) and the cameras it was seen from.
_INHERITED = ("prompt", "negative_prompt", "prior", "download", "dtype", "view_dependent",
              "seed", "device", "output_dir", "threads", "cameras")


@dataclass
class ConvertConfig:
    """Settings of the distillation itself (the target's own settings come from its config)."""

    render_size: int = 64
    """Pixels per side of the distillation renders (teacher and student)."""
    batch_size: int = 4
    """Random cameras per step, drawn from the source's training orbit."""
    views: int = 0
    """Render this many random teacher views once and draw each step's cameras among them; 0: fresh random cameras
    and teacher renders every step. The teacher's render is ~half of a field step and most of a Gaussian one:
    field -> Gaussians with 128 views took 34 s instead of 341 s for 35.2 instead of 35.7 dB (500 steps)."""
    points: int = 8192
    """Points per step for the density and albedo terms (field targets)."""
    surface_fraction: float = 0.5
    """Fraction of the points drawn near the teacher's surface; the rest are uniform in the box."""
    grid_resolution: int = 64
    """G: nodes per axis of the grid of the teacher's opacity (surface points, Gaussian init, Gaussian teachers)."""
    lambda_density: float = 1.0
    """Weight of the per-step opacity term (field targets)."""
    lambda_albedo: float = 1.0
    """Weight of the opacity-weighted albedo term (field targets)."""
    lambda_rgb: float = 1.0
    """Weight of the L2 between the rgb renders over white."""
    lambda_alpha: float = 1.0
    """Weight of the L2 between the renders' opacities."""
    lr_scale: float = 3.0
    """Multiplier of the target config's learning rates during the distillation (a regression on exact targets
    takes larger steps than SDS's noisy gradients: x3 reached 31 dB in 100 steps where x1 stayed at 25 dB)."""
    init_opacity: float | None = 0.5
    """Initial opacity of the Gaussians (Gaussian targets); None: the target's gaussians.init_opacity. Higher than
    DreamGaussian's 0.1 because the Gaussians start on the teacher's surface, not in a ball of fog."""
    eval_views: int = 8
    """Views of the held-out evaluation orbit (the source's eval elevation, distance and field of view)."""
    eval_size: int | None = None
    """Pixels per side of the evaluation renders; None: the source's cameras.eval_size."""
    progress: bool = True
    """Show a progress bar on stderr."""

    def __post_init__(self) -> None:
        if self.views < 0:
            raise ValueError(f"convert.views must be >= 0, got {self.views}")
        for name in ("render_size", "batch_size", "points", "grid_resolution", "eval_views"):
            if getattr(self, name) < 1:
                raise ValueError(f"convert.{name} must be >= 1, got {getattr(self, name)}")
        if self.render_size < 8 or self.grid_resolution < 4:
            raise ValueError(f"convert.render_size must be >= 8 and grid_resolution >= 4, got "
                             f"{self.render_size} and {self.grid_resolution}")
        if not 0.0 <= self.surface_fraction <= 1.0:
            raise ValueError(f"convert.surface_fraction must be in [0, 1], got {self.surface_fraction}")
        for name in ("lambda_density", "lambda_albedo", "lambda_rgb", "lambda_alpha"):
            if getattr(self, name) < 0:
                raise ValueError(f"convert.{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr_scale > 0:
            raise ValueError(f"convert.lr_scale must be > 0, got {self.lr_scale}")
        if self.init_opacity is not None and not 0.0 < self.init_opacity < 1.0:
            raise ValueError(f"convert.init_opacity must be in (0, 1) or None, got {self.init_opacity}")
        if self.eval_size is not None and self.eval_size < 8:
            raise ValueError(f"convert.eval_size must be >= 8 or None, got {self.eval_size}")


# ------------------------------------------------------------------------------------ teachers


class Teacher:
    """The source model as the distillation sees it: opacity and albedo at points, renders over white.

    occupancy(points [P, 3]) -> [P] in [0, 1]; albedo(points [P, 3]) -> [P, 3]; render(cameras) ->
    RenderOutput over white (no gradients); node_grid(G, bound) -> [G, G, G] opacity at the nodes
    x_i = -bound + i 2 bound / (G - 1) (`gen3d.export.field_mesh.density_grid_of`'s). `device`: where it computes.
    """

    device: torch.device

    def occupancy(self, points: Tensor) -> Tensor:
        raise NotImplementedError

    def albedo(self, points: Tensor) -> Tensor:
        raise NotImplementedError

    def render(self, cameras: Cameras) -> RenderOutput:
        raise NotImplementedError

    def node_grid(self, resolution: int, bound: float) -> Tensor:
        from gen3d.export.field_mesh import density_grid_of

        return density_grid_of(self.occupancy, resolution, bound, device=self.device)


class FieldTeacher(Teacher):
    """A field: exact opacity ``1 - exp(-sigma delta)`` and albedo; albedo renders with the run's occupancy grid."""

    def __init__(self, system: System, delta: float):
        self.field, self.delta, self.device = system.field, float(delta), system.device
        self.renderer = _albedo_renderer(system)

    @torch.no_grad()
    def occupancy(self, points: Tensor) -> Tensor:
        return -torch.expm1(-self.field.density(points) * self.delta)

    @torch.no_grad()
    def albedo(self, points: Tensor) -> Tensor:
        return self.field(points).features

    @torch.no_grad()
    def render(self, cameras: Cameras) -> RenderOutput:
        return self.renderer(self.field, cameras, train=False, shading="albedo")


class GaussianTeacher(Teacher):
    """3D Gaussians: density (clamped to [0, 1]) and color tabulated on a grid, renders by splatting."""

    def __init__(self, system: System, resolution: int, bound: float):
        from gen3d.export.mesh import density_grid

        self.system, self.model, self.device = system, system.model, system.device
        self.bound = float(bound)
        with torch.no_grad():
            self.grid = density_grid(self.model, resolution, bound).clamp(0.0, 1.0)  # [G, G, G]
            self.colors = torch.full((resolution,) * 3 + (3,), 0.5, device=self.device)  # [G, G, G, 3]
            seen = self.grid > 1e-3  # colors only matter where there is matter
            if seen.any():
                self.colors[seen] = self.model.color_at(_nodes_where(seen, bound))

    def _lookup(self, table: Tensor, points: Tensor) -> Tensor:  # table [G, G, G, D] -> [P, D]
        # grid_sample's (x, y, z) index (W, H, D), so the table [i, j, k] = (x, y, z) is read as [D=i, H=j, W=k].
        coords = (points / self.bound).flip(-1).reshape(1, -1, 1, 1, 3)
        volume = table.permute(3, 0, 1, 2)[None]  # [1, D, G, G, G]
        out = F.grid_sample(volume, coords.to(volume.dtype), mode="bilinear", padding_mode="zeros", align_corners=True)
        return out[0, :, :, 0, 0].T  # [P, D]

    @torch.no_grad()
    def occupancy(self, points: Tensor) -> Tensor:
        return self._lookup(self.grid[..., None], points)[:, 0]

    @torch.no_grad()
    def albedo(self, points: Tensor) -> Tensor:
        return self._lookup(self.colors, points)

    @torch.no_grad()
    def render(self, cameras: Cameras) -> RenderOutput:
        return self.system.render(cameras)

    def node_grid(self, resolution: int, bound: float) -> Tensor:
        if resolution == self.grid.shape[0] and bound == self.bound:
            return self.grid
        return super().node_grid(resolution, bound)


def _albedo_renderer(system: System) -> VolumeRenderer:
    """A renderer of `system.field` with the run's sampling and occupancy grid (shared, not copied) but no
    normals, albedo colors and a white background: what the distillation compares."""
    cfg = replace(system.cfg.renderer, normals="none", material=MaterialConfig(kind="albedo"),
                  background=BackgroundConfig(kind="solid", color=(1.0, 1.0, 1.0)))
    renderer = VolumeRenderer(cfg).to(system.device)
    renderer.grid = system.renderer.grid
    return renderer


# ------------------------------------------------------------------------------------ the verb


def convert_run(source_run: str | Path, to: str, steps: int = 500, overrides: Sequence[str] = (),
                settings: ConvertConfig | None = None) -> tuple[Path, dict[str, Any]]:
    """Distill the newest checkpoint of `source_run` into a new run of representation `to`.

    to: one of `TARGETS`. steps: distillation steps. overrides: dotted key=value overrides of the target's
    config (e.g. ``triplane.resolution=128``, ``output_dir=...``). settings: the distillation's own
    settings (`ConvertConfig`). Returns the new run folder and the report also written to its
    ``convert.json`` (see the module docstring).
    """
    from gen3d.systems import get_system

    settings = settings or ConvertConfig()
    check_target(to)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise Gen3dError(f"steps must be a whole number >= 0, got {steps!r}")
    source_run = resolve_run(str(source_run))
    source_data = read_yaml(source_run / "config.yaml")
    source_name = str(source_data.get("system", ""))
    if source_name not in SOURCES:
        raise Gen3dError(f"run '{source_run}' is a '{source_name}' run; convert reads runs of: {', '.join(SOURCES)}")
    if not checkpoint_dirs(source_run):
        raise Gen3dError(f"run '{source_run}' has no checkpoint yet, so there is nothing to convert; wait for its "
                         f"first checkpoint (every checkpoint_every steps) or finish it with `gen3d run {source_run} --resume`")
    source_cls = get_system(source_name)
    source_cfg = from_dict(source_cls.Config, source_data)

    target_cls = get_system("dreamgaussian" if to == "gaussians" else "dreamfusion")
    target_cfg = from_dict(target_cls.Config, apply_overrides(
        target_cls.Config, _target_config(source_name, source_data, to), list(overrides)))
    run_dir = new_run_dir(target_cfg.output_dir, target_cls.name, target_cfg.prompt)
    try:
        write_config(run_dir, target_cfg)
        target = target_cls(target_cfg, run_dir)
        source_cfg.device, source_cfg.progress, source_cfg.threads = str(target.device), False, 0
        source = source_cls(source_cfg, source_run)
        source.resume(model_only=True)
        report = _convert(source, target, to, steps, settings)
    except BaseException:
        if not checkpoint_dirs(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing worth keeping was written
        raise
    return run_dir, report


def check_target(to: str) -> None:
    """Raise `Gen3dError` listing the choices unless `to` is one of `TARGETS`."""
    if to not in TARGETS:
        raise Gen3dError(f"to={to!r} is not a representation convert knows; choose one of: {', '.join(TARGETS)}")


def _target_config(source_name: str, source_data: dict[str, Any], to: str) -> dict[str, Any]:
    """The target's config before overrides: the source's own for field -> field, else the target preset
    with what the source's run says about the prompt, prior, seed, device, output folder and cameras."""
    if source_name == "dreamfusion" and to != "gaussians":
        return {**source_data, "geometry": to}
    preset = {"hashgrid": "dreamfusion", "triplane": "dreamfusion-triplane", "gaussians": "dreamgaussian"}[to]
    data = read_yaml(Path(str(resources.files("gen3d.configs"))) / f"{preset}.yaml")
    data |= {key: source_data[key] for key in _INHERITED if key in source_data}
    return data | ({"geometry": to} if to != "gaussians" else {})


def _convert(source: System, target: System, to: str, steps: int, settings: ConvertConfig) -> dict[str, Any]:
    log, start = target.log, time.perf_counter()
    geometry = getattr(source.cfg, "geometry", "gaussians")
    log.info(f"converting {source.run_dir} ({source.name}, {geometry}, step {source.step}) to {to}: {target.run_dir}")
    gen = torch.Generator().manual_seed(target.cfg.seed)  # every draw of the distillation
    device = target.device
    field_target = to != "gaussians"
    if source.name == "dreamfusion":
        renderer = target.renderer if field_target else source.renderer
        teacher: Teacher = FieldTeacher(source, delta=renderer.cfg.step_size)
    else:
        teacher = GaussianTeacher(source, settings.grid_resolution, bound=_box_bound(source, target))
    bound = _box_bound(source, target)
    nodes = teacher.node_grid(settings.grid_resolution, bound)  # [G, G, G]
    if float(nodes.max()) < 1e-3:
        raise Gen3dError(f"the source run '{source.run_dir}' is empty (its opacity peaks at {float(nodes.max()):.2g}); "
                         "there is nothing to convert")

    o = source.eval_orbit
    eval_size = settings.eval_size or o.eval_size
    eval_cams = orbit_cameras(settings.eval_views, o.eval_elevation, o.eval_distance, o.eval_fovy, eval_size,
                              eval_size).to(device)
    reference = _renders(source.render, eval_cams)

    if field_target:
        if source.name == "dreamfusion":
            _copy_background(source.renderer, target.renderer)
        student = _FieldStudent(target, teacher, nodes, bound, settings, gen)
    else:
        student = _GaussianStudent(target, teacher, nodes, bound, settings, gen, steps)
    initial = _compare(_renders(target.render, eval_cams), reference)
    log.info(f"initial: PSNR {initial['psnr']:.2f} dB, alpha MAE {initial['alpha_mae']:.4f}, "
             f"silhouette IoU {initial['silhouette_iou']:.3f}")

    size = settings.render_size
    t0 = time.perf_counter()
    if settings.views:  # a fixed pool of teacher views
        pool = sample_orbit(replace(source.cfg.cameras, batch_size=settings.views), gen, width=size, height=size).to(device)
        pool_rgb, pool_alpha = _renders(teacher.render, pool)
    orbit = replace(source.cfg.cameras, batch_size=settings.batch_size)
    history = []
    bar = tqdm(total=steps, disable=not settings.progress, dynamic_ncols=True, desc=f"convert to {to}",
               unit="step", file=sys.stderr)
    try:
        for step in range(1, steps + 1):
            if settings.views:
                pick = torch.randperm(settings.views, generator=gen)[:settings.batch_size].to(device)
                cams, ref = pool[pick], RenderOutput(rgb=pool_rgb[pick], alpha=pool_alpha[pick], depth=pool_alpha[pick])
            else:
                cams = sample_orbit(orbit, gen, width=size, height=size).to(device)
                with torch.no_grad():
                    ref = teacher.render(cams)
            terms = student.step(step, cams, ref)
            if not all(math.isfinite(v) for v in terms.values()):
                raise Gen3dError(f"the distillation loss became {terms} at step {step}; lower the target's learning "
                                 "rates or convert.lr_scale")
            bar.update(1)
            bar.set_postfix(loss=f"{terms['loss']:.4g}", refresh=False)
            if step % max(1, steps // 10) == 0 or step == steps:
                history.append({"step": step, **{k: round(v, 6) for k, v in terms.items()}})
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    student.finish()

    final = _compare(_renders(target.render, eval_cams), reference)
    log.info(f"after {steps} steps ({seconds:.1f} s): PSNR {final['psnr']:.2f} dB, alpha MAE {final['alpha_mae']:.4f}, "
             f"silhouette IoU {final['silhouette_iou']:.3f}")
    meta = {"system": target.name, "format": "gen3d-checkpoint-1", "max_steps": target.cfg.max_steps,
            "converted_from": str(source.run_dir)}
    state = {"training": {}, "generator": target.generator.get_state()}  # the optimizer starts fresh on resume
    save_checkpoint(target.run_dir, 0, target.model_tensors(), state, meta, keep=target.cfg.keep_checkpoints)
    target.validate()
    report = {
        "source": str(source.run_dir), "source_system": source.name, "source_geometry": geometry,
        "source_step": source.step, "target": to, "target_system": target.name, "run": str(target.run_dir),
        "steps": steps, "seconds": round(seconds, 2), "total_seconds": round(time.perf_counter() - start, 2),
        "eval": {"views": settings.eval_views, "size": eval_size, "elevation": o.eval_elevation,
                 "distance": o.eval_distance, "fovy": o.eval_fovy, "background": "white"},
        "initial": initial, "final": final, "history": history, "settings": to_dict(settings),
    }
    write_text_atomic(target.run_dir / "convert.json", json.dumps(report, indent=2) + "\n")
    log.info(f"done: {target.run_dir}")
    return report


def _box_bound(source: System, target: System) -> float:
    """Half edge of the box the distillation samples: the larger of the two fields' boxes (1 for Gaussians)."""
    bounds = [float(s.field.bound) for s in (source, target) if hasattr(s, "field")]
    return max(bounds, default=1.0)


def report_line(report: dict[str, Any]) -> str:
    """One line of the report: PSNR vs the source at init and at the end, with the mask figures."""
    a, b = report["initial"], report["final"]
    return (f"PSNR vs source: {a['psnr']:.2f} dB at init -> {b['psnr']:.2f} dB after {report['steps']} steps "
            f"({report['seconds']:.0f} s); alpha MAE {a['alpha_mae']:.4f} -> {b['alpha_mae']:.4f}, "
            f"silhouette IoU {a['silhouette_iou']:.3f} -> {b['silhouette_iou']:.3f}")


# ------------------------------------------------------------------------------------ students


class _FieldStudent:
    """A dreamfusion run's field, distilled with the density, albedo and render terms."""

    def __init__(self, system: System, teacher: Teacher, nodes: Tensor, bound: float, settings: ConvertConfig,
                 gen: torch.Generator):
        self.system, self.teacher, self.settings, self.gen, self.bound = system, teacher, settings, gen, bound
        self.field, self.delta = system.field, system.renderer.cfg.step_size
        self.renderer = _albedo_renderer(system)
        self.near = _node_points(nodes, bound, dilate=1, threshold=0.1)  # [M, 3] nodes near the surface
        self.spacing = 2 * bound / (nodes.shape[0] - 1)
        groups = self.field.param_groups()
        for g in groups:
            g["lr"] *= settings.lr_scale
        self.optimizer = torch.optim.Adam(groups, betas=(0.9, 0.99), eps=1e-15)  # the recipe's (Instant-NGP's)

    def points(self) -> Tensor:
        s, device = self.settings, self.system.device
        n_near = round(s.points * s.surface_fraction) if len(self.near) else 0
        uniform = (torch.rand(s.points - n_near, 3, generator=self.gen) * 2 - 1) * self.bound
        pick = torch.randint(len(self.near), (n_near,), generator=self.gen) if n_near else torch.zeros(0, dtype=torch.long)
        jitter = (torch.rand(n_near, 3, generator=self.gen) * 2 - 1) * self.spacing
        near = self.near.cpu()[pick] + jitter
        return torch.cat([uniform, near]).to(device)  # [P, 3]

    def step(self, step: int, cams: Cameras, ref: RenderOutput) -> dict[str, float]:
        s = self.settings
        x = self.points()
        with torch.no_grad():
            occ_t, albedo_t = self.teacher.occupancy(x), self.teacher.albedo(x)  # [P], [P, 3]
        out = self.field(x)
        occ_s = -torch.expm1(-out.density * self.delta)  # [P] opacity of one render step
        density = (occ_s - occ_t).square().mean()
        albedo = (occ_t[:, None] * (out.features - albedo_t).square()).sum() / (3 * occ_t.sum().clamp_min(1e-6))
        r = self.renderer(self.field, cams, generator=self.gen, step=step, train=True, shading="albedo")
        rgb, alpha = (r.rgb - ref.rgb).square().mean(), (r.alpha - ref.alpha).square().mean()
        loss = s.lambda_density * density + s.lambda_albedo * albedo + s.lambda_rgb * rgb + s.lambda_alpha * alpha
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item(), "density": density.item(), "albedo": albedo.item(), "rgb": rgb.item(),
                "alpha": alpha.item()}

    @torch.no_grad()
    def finish(self) -> None:
        """Rebuild the occupancy grid from the distilled field alone (no decayed trace of the initial blob)."""
        grid = self.system.renderer.grid
        if grid is not None:
            grid.density.zero_()
            grid.update(self.field.density, 0, self.gen)


class _GaussianStudent:
    """A dreamgaussian run's Gaussians, initialized on the teacher's surface and fitted to its renders."""

    def __init__(self, system: System, teacher: Teacher, nodes: Tensor, bound: float, settings: ConvertConfig,
                 gen: torch.Generator, steps: int):
        from gen3d.representations.gaussians import GaussianModel

        cfg = system.cfg
        self.system, self.settings, self.steps = system, settings, max(steps, 1)
        n = cfg.gaussians.num_points
        solid = nodes > 0.5 if bool((nodes > 0.5).any()) else nodes >= 0.5 * nodes.max()
        inner = -F.max_pool3d(-solid[None, None].float(), 5, stride=1, padding=2)[0, 0] > 0  # eroded by 2 nodes
        shell = solid & ~inner
        candidates = _nodes_where(shell if bool(shell.any()) else solid, bound).cpu()
        spacing = 2 * bound / (nodes.shape[0] - 1)
        pick = torch.randint(len(candidates), (n,), generator=gen)
        points = (candidates[pick] + (torch.rand(n, 3, generator=gen) - 0.5) * spacing).to(system.device)
        colors = teacher.albedo(points).clamp(0.0, 1.0)
        gcfg = cfg.gaussians if settings.init_opacity is None else replace(cfg.gaussians, init_opacity=settings.init_opacity)
        system.model = GaussianModel.from_points(points, colors, gcfg).to(system.device)
        system.model.cfg = cfg.gaussians  # learning rates and the rest stay the run's
        self.model = system.model
        groups = self.model.param_groups(cfg.gaussians)
        for g in groups:
            g["lr"] *= settings.lr_scale
        self.optimizer = torch.optim.Adam(groups, lr=0.0, eps=1e-15)  # 3DGS's

    def step(self, step: int, cams: Cameras, ref: RenderOutput) -> dict[str, float]:
        from gen3d.rendering.gaussian import render_gaussians

        s, cfg = self.settings, self.system.cfg
        for g in self.optimizer.param_groups:  # 3DGS's log-linear decay of the position rate, over the distillation
            if g["name"] == "means":
                g["lr"] = cfg.gaussians.position_lr(step, self.steps) * s.lr_scale
        white = torch.ones(len(cams), 3, device=self.system.device)
        r = render_gaussians(self.model, cams, white, backend=cfg.rasterizer)
        rgb, alpha = (r.rgb - ref.rgb).square().mean(), (r.alpha - ref.alpha).square().mean()
        loss = s.lambda_rgb * rgb + s.lambda_alpha * alpha
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item(), "rgb": rgb.item(), "alpha": alpha.item()}

    def finish(self) -> None:
        pass


# ------------------------------------------------------------------------------------ helpers


def _copy_background(source_renderer, target_renderer) -> None:
    """Field -> field: keep the source's learned background MLP when both runs have one of the same shape."""
    src, dst = source_renderer.background_mlp, target_renderer.background_mlp
    if src is not None and dst is not None:
        try:
            dst.load_state_dict(src.state_dict())
        except RuntimeError:
            pass  # a different background.* shape in the overrides: it trains from scratch


def _nodes_where(mask: Tensor, bound: float) -> Tensor:
    """World positions [M, 3] of the nodes of a [G, G, G] grid over [-bound, bound]^3 where `mask` holds."""
    G = mask.shape[0]
    ijk = mask.nonzero().to(torch.float32)  # [M, 3]
    return ijk * (2 * bound / (G - 1)) - bound


def _node_points(nodes: Tensor, bound: float, dilate: int, threshold: float) -> Tensor:
    """Nodes where the opacity grid [G, G, G] exceeds `threshold`, dilated by `dilate` nodes -> [M, 3]."""
    mask = (nodes > threshold).float()[None, None]
    if dilate:
        mask = F.max_pool3d(mask, 2 * dilate + 1, stride=1, padding=dilate)
    return _nodes_where(mask[0, 0] > 0, bound)


@torch.no_grad()
def _renders(render: Callable[[Cameras], RenderOutput], cameras: Cameras, chunk: int = 4) -> tuple[Tensor, Tensor]:
    """rgb [C, H, W, 3] and alpha [C, H, W, 1] of `render` over `cameras`, a few cameras at a time."""
    outs = [render(cameras[i:i + chunk]) for i in range(0, len(cameras), chunk)]
    return torch.cat([o.rgb for o in outs]).clamp(0, 1), torch.cat([o.alpha for o in outs]).clamp(0, 1)


def _compare(student: tuple[Tensor, Tensor], teacher: tuple[Tensor, Tensor]) -> dict[str, float]:
    """PSNR (dB, peak 1) of the rgb renders, mean |alpha difference|, IoU of the alpha > 0.5 silhouettes."""
    (rgb_s, a_s), (rgb_t, a_t) = student, teacher
    mse = float((rgb_s - rgb_t).square().mean())
    m_s, m_t = a_s > 0.5, a_t > 0.5
    union = float((m_s | m_t).sum())
    return {"psnr": round(-10.0 * math.log10(max(mse, 1e-12)), 3),
            "alpha_mae": round(float((a_s - a_t).abs().mean()), 5),
            "silhouette_iou": round(float((m_s & m_t).sum()) / union, 4) if union else 1.0}
