"""Meshes from 3D Gaussians: density grid -> marching cubes -> vertex colors, and mesh files.

DreamGaussian [Tang et al. 2023, Sec. 3.2 "Efficient Mesh Extraction"] samples the Gaussians'
opacity-weighted density d(x) = sum_i o_i exp(-1/2 (x - mu_i)^T Sigma_i^-1 (x - mu_i)) on a
128^3 grid and runs marching cubes at the level `density_thresh = 1`, after rescaling the
Gaussians to fill [-0.9, 0.9]^3 (which leaves d unchanged: it is not normalized by det Sigma).

**Threshold.** DreamGaussian's fixed 1 is the density of a point covered by about one fully opaque
Gaussian center; it suits densely overlapping, well-trained scenes and leaves holes in sparse ones.
gen3d's default is automatic: the level whose solid has the Gaussians' own rendered silhouettes
(`gen3d.export.surface`, shared with neural fields). A fixed level can still be passed.

Unlike DreamGaussian the grid spans the fixed box [-bound, bound]^3 of gen3d's object convention
(objects in the unit ball), so meshes stay in world coordinates. The grid is padded with empty
cells so every surface is closed, small disconnected pieces (floaters) are dropped, and vertices
are colored with the density-weighted DC color of the Gaussians (`GaussianModel.color_at`).
UV texturing comes later; for now colors are per vertex. The grid-to-mesh steps (`isosurface_mesh`,
`vertex_colored`) are shared with the neural-field extractor in gen3d.export.field_mesh.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from gen3d.errors import Gen3dError
from gen3d.io import atomic_path
from gen3d.representations.gaussians import GaussianModel

MESH_FORMATS = (".glb", ".obj", ".ply")

# gen3d world (+z up, front +x) -> glTF (+y up, front +z): (x, y, z) -> (y, z, x), a rotation.
_WORLD_TO_GLTF = np.array([[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)


@torch.no_grad()
def density_grid(model: GaussianModel, resolution: int = 128, bound: float = 1.0, block: int = 16) -> torch.Tensor:
    """The density of `model` at the nodes of a `resolution`^3 grid over [-bound, bound]^3 -> [R, R, R].

    Index [i, j, k] is the point (x_i, y_j, z_k). Nodes are evaluated in cubes of `block`^3, so
    each cube only visits the Gaussians whose 3-sigma boxes reach it.
    """
    device = model.means.device
    axis = torch.linspace(-bound, bound, resolution, device=device)
    R = resolution
    starts = range(0, R, block)
    index, sizes = [], []  # flat grid indices in block order, and the size of each block
    for i in starts:
        for j in starts:
            for k in starts:
                ii, jj, kk = torch.meshgrid(torch.arange(i, min(i + block, R)), torch.arange(j, min(j + block, R)),
                                            torch.arange(k, min(k + block, R)), indexing="ij")
                index.append(((ii * R + jj) * R + kk).reshape(-1))
                sizes.append(index[-1].numel())
    index = torch.cat(index).to(device)  # [R^3]
    ijk = torch.stack([index // (R * R), (index // R) % R, index % R], dim=-1)  # [R^3, 3]
    grid = torch.zeros(R * R * R, device=device)
    if model.num_gaussians:
        grid[index] = model.density(axis[ijk], chunk=sizes)
    return grid.reshape(R, R, R)


@torch.no_grad()
def extract_mesh(
    model: GaussianModel,
    resolution: int = 128,
    bound: float = 1.0,
    threshold: float | str = "auto",
    min_component_ratio: float = 0.05,
):
    """A vertex-colored `trimesh.Trimesh` of the surface where the Gaussians' density equals `threshold`.

    resolution: grid nodes per axis over [-bound, bound]^3 (DreamGaussian: 128).
    threshold: "auto" (the level whose solid has the Gaussians' rendered silhouettes,
        `gen3d.export.surface.silhouette_level`) or a density level > 0 (DreamGaussian: 1).
    min_component_ratio: connected pieces with fewer faces than this fraction of the largest are dropped.
    Faces are oriented outwards. The level used is in ``mesh.metadata["threshold"]`` (and the
    silhouette IoU in ``["threshold_iou"]`` when automatic). Raises `Gen3dError` when there is no
    surface: the Gaussians render nowhere 50% opaque, or the density never reaches a fixed threshold.
    """
    from gen3d.export.surface import gaussian_silhouettes, silhouette_level

    if resolution < 2:
        raise ValueError(f"extract_mesh: resolution must be >= 2, got {resolution}")
    auto = isinstance(threshold, str)
    if auto and threshold != "auto" or not auto and not (threshold > 0):
        raise ValueError(f"extract_mesh: threshold must be 'auto' or a number > 0, got {threshold!r}")
    if not bound > 0:
        raise ValueError(f"extract_mesh: bound must be > 0, got {bound}")
    grid = density_grid(model, resolution, bound)
    peak = float(grid.max()) if grid.numel() else 0.0
    metadata = {}
    if auto:
        opacity = gaussian_silhouettes(model, resolution, bound)
        if not bool((opacity > 0.5).any()):
            raise Gen3dError(
                f"mesh extraction found no surface: the Gaussians render nowhere more than 50% opaque inside "
                f"[-{bound}, {bound}]^3 (the most opaque ray reaches {float(opacity.max()):.1%}); the scene is empty or "
                "too transparent. Train longer, or pass a fixed mesh threshold below the peak density "
                f"{peak:.3g}, or enlarge the bound"
            )
        threshold, metadata["threshold_iou"] = silhouette_level(grid, opacity > 0.5)
    elif not peak >= threshold:
        raise Gen3dError(
            f"mesh extraction found no surface: the Gaussians' density peaks at {peak:.3g} inside [-{bound}, {bound}]^3, "
            f"below the threshold {threshold}; the scene is empty or too transparent. Lower the mesh threshold, "
            "use threshold='auto', enlarge the bound, or train longer"
        )
    mesh = isosurface_mesh(grid.cpu().numpy(), bound, threshold, min_component_ratio)
    colors = model.color_at(torch.as_tensor(mesh.vertices, dtype=torch.float32, device=model.means.device))
    mesh = vertex_colored(mesh, colors)
    mesh.metadata.update(threshold=float(threshold), **metadata)
    return mesh


def isosurface_mesh(grid, bound: float, level: float, min_component_ratio: float = 0.05):
    """The closed, outward-oriented surface where a node grid equals `level`, without floaters -> trimesh.Trimesh.

    grid: [R, R, R] (numpy or torch) values at the nodes of a grid over [-bound, bound]^3, index
    [i, j, k] = (x_i, y_j, z_k), inside where the value exceeds `level` (0 < level < grid.max()).
    Marching cubes (scikit-image, Lewiner et al. 2003) on the grid padded with zeros, so surfaces cut
    by the box are closed; faces are oriented outwards; connected pieces with fewer faces than
    `min_component_ratio` times the largest are dropped. Vertices are in world coordinates.
    """
    import trimesh
    from skimage.measure import marching_cubes

    grid = grid.detach().cpu().numpy() if isinstance(grid, torch.Tensor) else np.asarray(grid)
    resolution = grid.shape[0]
    spacing = 2.0 * bound / (resolution - 1)
    padded = np.pad(grid, 1, mode="constant", constant_values=0.0)  # closes surfaces cut by the box
    verts, faces, _, _ = marching_cubes(padded, level=level, spacing=(spacing,) * 3)
    verts = verts - bound - spacing  # padded index 1 is the grid's first node at -bound
    faces = faces[:, ::-1]  # skimage orients faces towards decreasing values: flip to point outwards
    mesh = trimesh.Trimesh(verts, faces, process=False)

    parts = mesh.split(only_watertight=False)
    if len(parts) > 1:
        largest = max(len(p.faces) for p in parts)
        mesh = trimesh.util.concatenate([p for p in parts if len(p.faces) >= min_component_ratio * largest])
    return mesh


def vertex_colored(mesh, colors):
    """A copy of `mesh` with per-vertex colors: colors [V, 3] in [0, 1] (clamped) -> RGBA uint8, alpha 255."""
    import trimesh

    colors = colors.detach().cpu().numpy() if isinstance(colors, torch.Tensor) else np.asarray(colors)
    rgba = np.concatenate([(np.clip(colors, 0.0, 1.0) * 255.0).round().astype(np.uint8),
                           np.full((len(mesh.vertices), 1), 255, np.uint8)], axis=1)
    return trimesh.Trimesh(mesh.vertices, mesh.faces, vertex_colors=rgba, process=False)


def save_mesh(path: str | os.PathLike, mesh, y_up: bool | None = None) -> Path:
    """Write `mesh` (a trimesh.Trimesh) as .glb, .obj or .ply, chosen by the suffix, atomically.

    y_up: rotate gen3d's +z-up world (front +x) to +y up (front +z). None = only for .glb, whose
    format requires +y up; OBJ and PLY keep gen3d world coordinates.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in MESH_FORMATS:
        raise Gen3dError(f"cannot save a mesh as {path.name!r}: use one of {', '.join(MESH_FORMATS)}")
    if y_up is None:
        y_up = suffix == ".glb"
    if y_up:
        mesh = mesh.copy()
        mesh.apply_transform(_WORLD_TO_GLTF)
    if suffix == ".obj" and getattr(mesh.visual, "kind", None) == "texture":
        return _save_textured_obj(path, mesh)
    data = mesh.export(file_type=suffix[1:])
    with atomic_path(path) as tmp:
        tmp.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def _save_textured_obj(path: Path, mesh) -> Path:
    """OBJ + MTL + PNG side by side (`<stem>.obj`, `<stem>.mtl`, `<stem>.png`), all written to temporary files
    first and renamed into place only once every one is complete (the OBJ last, so that a reader never finds an OBJ
    whose material is missing): a failed write (a full disk) leaves the earlier three files as they were."""
    from contextlib import ExitStack

    from trimesh.exchange.obj import export_obj

    mesh = mesh.copy()
    mesh.visual.material.name = path.stem  # the texture is <stem>.png: OBJs side by side keep their own
    text, files = export_obj(mesh, include_texture=True, return_texture=True, mtl_name=f"{path.stem}.mtl")
    with ExitStack() as stack:  # exits in reverse order: the OBJ, entered first, is renamed last
        obj = stack.enter_context(atomic_path(path))
        for name, data in files.items():
            stack.enter_context(atomic_path(path.parent / name)).write_bytes(data)
        obj.write_text(text)
    return path
