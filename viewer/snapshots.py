"""Snapshots: of 3D Gaussians (for systems and files), and of finished results for `gen3d view` (a run folder,
a 3DGS .ply, or a mesh file)."""

from __future__ import annotations

from pathlib import Path

from gen3d.errors import Gen3dError
from gen3d.viewer.protocol import Snapshot

MESH_SUFFIXES = (".glb", ".gltf", ".obj", ".ply", ".stl", ".off")


def snapshot_of(target: str, output_dir: str = "outputs") -> tuple[Snapshot, str, str]:
    """(snapshot, title, description) of `target`: a run folder or @last, a Gaussian .ply, or a mesh file."""
    path = Path(target)
    if target.startswith("@") or (path / "config.yaml").is_file():
        return _run_snapshot(target, output_dir)
    if not path.exists():
        raise Gen3dError(f"'{target}' does not exist; pass a run folder, @last, a 3DGS .ply or a mesh (.glb, .obj, .ply)")
    if path.is_dir():
        raise Gen3dError(f"'{target}' is a folder but not a run folder (no config.yaml); pass a run folder or a file")
    if path.suffix.lower() == ".ply" and _is_gaussian_ply(path):
        return _gaussian_file_snapshot(path), path.name, "3DGS PLY"
    if path.suffix.lower() in MESH_SUFFIXES:
        return _mesh_snapshot(path), path.name, "mesh"
    raise Gen3dError(f"'{target}': gen3d view shows run folders, 3DGS .ply files and meshes "
                     f"({', '.join(MESH_SUFFIXES)}), not '{path.suffix or 'files without a suffix'}'")


def _is_gaussian_ply(path: Path) -> bool:
    head = path.open("rb").read(4096)
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


def _mesh_snapshot(path: Path) -> Snapshot:
    import trimesh

    try:
        mesh = trimesh.load(path, force="mesh")
    except Exception as exc:  # trimesh raises many kinds for unreadable files
        raise Gen3dError(f"cannot read mesh '{path}' ({type(exc).__name__}: {str(exc)[:120]})") from None
    if not len(mesh.faces):
        raise Gen3dError(f"'{path}' holds no faces (a point cloud?); gen3d view shows meshes and 3DGS .ply files")
    return Snapshot(mesh=mesh, info={"faces": f"{len(mesh.faces):,}"})


def gaussian_snapshot(model, step: int = 0, rasterizer: str = "auto") -> Snapshot:
    """A `Snapshot` of a `GaussianModel`: splats (center, covariance R S S^T R^T, DC color, opacity) for the browser,
    and a render of a frozen copy over white for the server-side modes."""
    import copy

    import torch

    from gen3d.ops._projection import covariance_factor
    from gen3d.rendering.gaussian import render_gaussians
    from gen3d.viewer.protocol import Splats

    with torch.no_grad():
        frozen = copy.deepcopy(model).requires_grad_(False)
        M = covariance_factor(frozen.quats, frozen.scales)  # [N, 3, 3] R S
        cov = M @ M.transpose(1, 2)
        splats = Splats(centers=frozen.means.detach().cpu().float().numpy(), covariances=cov.cpu().float().numpy(),
                        rgbs=frozen.base_colors.cpu().float().numpy(),
                        opacities=frozen.opacities.cpu().float().numpy()[:, None])

    def render(cameras):
        white = torch.ones(len(cameras), 3, device=frozen.means.device)
        return render_gaussians(frozen, cameras.to(frozen.means.device), white, backend=rasterizer)

    return Snapshot(step=step, render=render, splats=splats, info={"Gaussians": f"{len(splats):,}"})
