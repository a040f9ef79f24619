"""Snapshots: of 3D Gaussians (for systems and files), of dynamic (4D) Gaussians, and of finished results for
`gen3d view` (a run folder, a 3DGS .ply, a folder of 3DGS .ply frames, or a mesh file).

Static and dynamic snapshots share one conversion, `_frozen_gaussians`: a frozen set of Gaussians (a
`GaussianModel` or a `GaussianFrame`) to the browser's splats plus a server-side render. A dynamic snapshot is
that conversion applied to each frame, gathered into a `Timeline`.
"""

from __future__ import annotations

import re
from pathlib import Path

from gen3d.errors import Gen3dError
from gen3d.viewer.protocol import Snapshot, Splats, Timeline

MESH_SUFFIXES = (".glb", ".gltf", ".obj", ".ply", ".stl", ".off")
FRAME_NAME = re.compile(r"frame_(\d+)\.ply", re.IGNORECASE)
"""A frame of a 4D result's PLY sequence (`save_ply_sequence`: frame_000.ply, frame_001.ply, ...)."""


def snapshot_of(target: str, output_dir: str = "outputs") -> tuple[Snapshot, str, str]:
    """(snapshot, title, description) of `target`: a run folder or @last, a Gaussian .ply, a folder of Gaussian .ply
    frames (a 4D result's `export/frames`), or a mesh file."""
    path = Path(target)
    if target.startswith("@") or (path / "config.yaml").is_file():
        return _run_snapshot(target, output_dir)
    if not path.exists():
        raise Gen3dError(f"'{target}' does not exist; pass a run folder, @last, a 3DGS .ply or a mesh (.glb, .obj, .ply)")
    if path.is_dir():
        if _frame_files(path):
            return _ply_sequence_snapshot(path), path.name, "3DGS PLY sequence"
        raise Gen3dError(f"'{target}' is a folder but not a run folder (no config.yaml) nor a folder of 4D frames "
                         f"(no frame_000.ply, frame_001.ply, ...); pass a run folder, a frames folder or a file")
    if path.suffix.lower() == ".ply" and _is_gaussian_ply(path):
        return _gaussian_file_snapshot(path), path.name, "3DGS PLY"
    if path.suffix.lower() in MESH_SUFFIXES:
        return _mesh_snapshot(path), path.name, "mesh"
    raise Gen3dError(f"'{target}': gen3d view shows run folders, 3DGS .ply files and meshes "
                     f"({', '.join(MESH_SUFFIXES)}), not '{path.suffix or 'files without a suffix'}'")


def _is_gaussian_ply(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(4096)
    return head.startswith(b"ply") and b"property float f_dc_0" in head and b"property float opacity" in head


def _run_snapshot(target: str, output_dir: str) -> tuple[Snapshot, str, str]:
    import yaml

    from gen3d.cli import load_run_config
    from gen3d.runs import resolve_run

    run_dir = resolve_run(target, output_dir)
    system_cls, cfg = load_run_config(str(run_dir), ["progress=false"])
    system = system_cls(cfg, run_dir)
    system.resume(model_only=True)
    snapshot = system.snapshot()
    videos = sorted((run_dir / "video").glob("turntable.*")) if (run_dir / "video").is_dir() else []
    exports = sorted(p.name for p in (run_dir / "export").iterdir()) if (run_dir / "export").is_dir() else []
    config = yaml.safe_dump({k: getattr(cfg, k) for k in ("system", "prompt", "max_steps", "seed") if hasattr(cfg, k)},
                            sort_keys=False).strip()
    lines = [f"*{getattr(cfg, 'prompt', '')}*", f"step {system.step} of {cfg.max_steps}", f"`{run_dir}`",
             "exports: " + (", ".join(exports) or "none"), "turntable: " + (str(videos[0]) if videos else "none"),
             "```\n" + config + "\n```"]
    snapshot.info["run"] = str(run_dir)
    if videos:
        snapshot.info["turntable"] = str(videos[0])
    return snapshot, f"gen3d {system_cls.name}", "  \n".join(lines)


def _gaussian_file_snapshot(path: Path) -> Snapshot:
    from gen3d.export.ply import load_gaussian_ply

    return gaussian_snapshot(load_gaussian_ply(path))


def _frame_files(folder: Path) -> list[Path]:
    """The frame_<i>.ply files of `folder`, in the order of their numbers."""
    frames = [(int(m.group(1)), p) for p in folder.iterdir() if (m := FRAME_NAME.fullmatch(p.name)) and p.is_file()]
    return [p for _, p in sorted(frames)]


def _ply_sequence_snapshot(folder: Path, rasterizer: str = "auto") -> Snapshot:
    """A timeline snapshot of a folder of 3DGS PLY frames, at evenly spaced times in [0, 1] (as they were written)."""
    from gen3d.export.ply import load_gaussian_ply

    files = _frame_files(folder)
    not_gaussian = [p.name for p in files if not _is_gaussian_ply(p)]
    if not_gaussian:
        raise Gen3dError(f"'{folder}': frames {', '.join(not_gaussian[:3])}{' ...' if len(not_gaussian) > 3 else ''} "
                         f"are not 3D Gaussian Splatting PLYs; a frames folder holds one 3DGS .ply per frame")
    models = [load_gaussian_ply(p).requires_grad_(False) for p in files]
    times = [i / (len(files) - 1) for i in range(len(files))] if len(files) > 1 else [0.0]

    def render(cameras, t: float):
        return _render_frozen(models[timeline.index_at(t)], cameras, rasterizer)

    timeline = Timeline(times, [_splats_of(m) for m in models], render)
    return _timeline_snapshot(timeline, step=0)


def _timeline_snapshot(timeline: Timeline, step: int) -> Snapshot:
    """A snapshot of `timeline` whose own splats and render are the first frame's (for code that ignores time)."""
    first = timeline.times[0]
    render = None if timeline.render is None else (lambda cameras: timeline.render(cameras, first))
    return Snapshot(step=step, render=render, splats=timeline.splats[0], timeline=timeline,
                    info={"Gaussians": f"{len(timeline.splats[0]):,}", "frames": f"{len(timeline)}"})


def _mesh_snapshot(path: Path) -> Snapshot:
    import trimesh

    try:
        mesh = trimesh.load(path, force="mesh")
    except Exception as exc:  # trimesh raises many kinds for unreadable files
        raise Gen3dError(f"cannot read mesh '{path}' ({type(exc).__name__}: {str(exc)[:120]})") from None
    if not len(mesh.faces):
        raise Gen3dError(f"'{path}' holds no faces (a point cloud?); gen3d view shows meshes and 3DGS .ply files")
    return Snapshot(mesh=mesh, info={"faces": f"{len(mesh.faces):,}"})


def _splats_of(frozen) -> Splats:
    """The browser's splats of Gaussians that nothing trains any more: a `GaussianModel` or a `GaussianFrame` (means,
    quats, scales, opacities, sh): center, covariance R S S^T R^T, DC color, opacity."""
    import torch

    from gen3d.ops._projection import covariance_factor
    from gen3d.ops.sh import sh_to_rgb

    with torch.no_grad():
        M = covariance_factor(frozen.quats, frozen.scales)  # [N, 3, 3] R S
        cov = M @ M.transpose(1, 2)
        rgbs = sh_to_rgb(frozen.sh[:, 0]).clamp(0.0, 1.0)  # [N, 3] the DC color, as GaussianModel.base_colors
        return Splats(centers=frozen.means.detach().cpu().float().numpy(), covariances=cov.cpu().float().numpy(),
                      rgbs=rgbs.cpu().float().numpy(), opacities=frozen.opacities.cpu().float().numpy()[:, None])


def _render_frozen(frozen, cameras, rasterizer: str = "auto"):
    """A render of frozen Gaussians (as in `_splats_of`) over white: the server-side modes' image."""
    import torch

    from gen3d.rendering.gaussian import render_gaussians

    white = torch.ones(len(cameras), 3, device=frozen.means.device)
    return render_gaussians(frozen, cameras.to(frozen.means.device), white, backend=rasterizer)


def gaussian_snapshot(model, step: int = 0, rasterizer: str = "auto") -> Snapshot:
    """A `Snapshot` of a `GaussianModel`: splats for the browser and a render of a frozen copy, so that training
    may go on while the viewer's thread reads it."""
    import copy

    import torch

    with torch.no_grad():
        frozen = copy.deepcopy(model).requires_grad_(False)
    splats = _splats_of(frozen)
    return Snapshot(step=step, render=lambda cameras: _render_frozen(frozen, cameras, rasterizer), splats=splats,
                    info={"Gaussians": f"{len(splats):,}"})


def dynamic_snapshot(dynamic, step: int = 0, rasterizer: str = "auto", frames: int = 8) -> Snapshot:
    """A timeline `Snapshot` of `DynamicGaussians`: the splats of `frames` evenly spaced times (`dynamic.times`),
    and a render at any time t of a frozen copy's `at(t)`. Its own splats / render are frame 0's."""
    import copy

    import torch

    if frames < 1:
        raise ValueError(f"dynamic_snapshot: frames must be >= 1, got {frames}")
    with torch.no_grad():
        frozen = copy.deepcopy(dynamic).requires_grad_(False)
        times = frozen.times(frames)
        splats = [_splats_of(frozen.at(t)) for t in times]

    def render(cameras, t: float):
        with torch.no_grad():
            return _render_frozen(frozen.at(float(t)), cameras, rasterizer)

    return _timeline_snapshot(Timeline(times, splats, render), step)
