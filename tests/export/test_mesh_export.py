import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from gen3d.errors import Gen3dError
from gen3d.export.mesh import density_grid, extract_mesh, save_mesh
from gen3d.representations.gaussians import GaussianModel

REPO = Path(__file__).resolve().parents[2]
GLTF_VALIDATOR_VERSION = "2.0.0-dev.3.10"
GLTF_VALIDATOR_INSTALL = f"npm install --prefix .cache/node gltf-validator@{GLTF_VALIDATOR_VERSION}"
_VALIDATE_JS = """
const fs = require('fs');
const validator = require('gltf-validator');
const data = new Uint8Array(fs.readFileSync(process.argv[1]));
validator.validateBytes(data, {maxIssues: 100})
  .then(report => console.log(JSON.stringify(report.issues)))
  .catch(err => { console.error(String(err)); process.exit(1); });
"""


def gltf_validator() -> tuple[str | None, str]:
    """(node executable, NODE_PATH) of the Khronos glTF validator, or (None, why it is unavailable).

    Looked up in $GEN3D_GLTF_VALIDATOR_DIR, then <repo>/.cache/node (the folder of an
    `npm install --prefix`), then node's own module resolution.
    """
    node = shutil.which("node")
    if node is None:
        return None, "node is not installed"
    for folder in (os.environ.get("GEN3D_GLTF_VALIDATOR_DIR"), REPO / ".cache" / "node"):
        if folder and (Path(folder) / "node_modules" / "gltf-validator" / "package.json").is_file():
            return node, str(Path(folder) / "node_modules")
    found = subprocess.run([node, "-e", "require.resolve('gltf-validator')"], capture_output=True, timeout=30, check=False)
    if found.returncode == 0:
        return node, os.environ.get("NODE_PATH", "")
    return None, f"the npm package gltf-validator is not installed (run: {GLTF_VALIDATOR_INSTALL})"


def validate_gltf(path: Path) -> dict:
    node, node_path = gltf_validator()
    if node is None:
        pytest.skip(f"glTF validator unavailable: {node_path}")
    env = {**os.environ, "NODE_PATH": node_path}
    done = subprocess.run([node, "-e", _VALIDATE_JS, str(path)], capture_output=True, text=True, timeout=120, env=env,
                          check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def blobs(floater: bool = False) -> GaussianModel:
    """Three overlapping big Gaussians (red, green, blue), optionally with a small far floater."""
    means = [[-0.2, 0.0, 0.0], [0.2, 0.0, 0.0], [0.0, 0.0, 0.25]]
    scales = [[0.2, 0.15, 0.15], [0.15, 0.2, 0.15], [0.15, 0.15, 0.15]]
    colors = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    if floater:
        means.append([0.7, 0.7, 0.7])
        scales.append([0.05, 0.05, 0.05])
        colors.append([1.0, 1.0, 1.0])
    t = lambda v: torch.tensor(v, dtype=torch.float32)
    return GaussianModel.from_values(t(means), t(scales), 0.95, t(colors))


def test_density_grid_is_indexed_xyz():
    model = GaussianModel.from_values(torch.tensor([[0.5, -0.5, 0.0]]), 0.1, 0.9)
    grid = density_grid(model, resolution=9, bound=1.0)  # nodes at -1, -0.75, ..., 1
    assert grid.shape == (9, 9, 9)
    assert tuple(int(i) for i in np.unravel_index(grid.argmax().item(), grid.shape)) == (6, 2, 4)
    assert grid.max().item() == pytest.approx(0.9, rel=1e-5)


def test_extract_mesh_gives_a_closed_colored_outward_mesh():
    with torch.no_grad():
        mesh = extract_mesh(blobs(), resolution=40, threshold=0.5)
    assert len(mesh.faces) > 500
    assert mesh.is_watertight and mesh.volume > 0  # closed, faces oriented outwards
    assert len(mesh.split(only_watertight=False)) == 1
    assert np.abs(mesh.vertices).max() < 1.0
    colors = mesh.visual.vertex_colors
    assert colors.shape == (len(mesh.vertices), 4) and (colors[:, 3] == 255).all()
    # the vertex farthest towards -x sits on the red Gaussian, towards +y on the green one
    assert colors[mesh.vertices[:, 0].argmin(), 0] > 200 and colors[mesh.vertices[:, 0].argmin(), 1] < 60
    assert colors[mesh.vertices[:, 1].argmax(), 1] > 150


def test_small_floaters_are_dropped():
    with torch.no_grad():
        kept = extract_mesh(blobs(floater=True), resolution=40, min_component_ratio=0.0)
        cleaned = extract_mesh(blobs(floater=True), resolution=40)
    assert len(kept.split(only_watertight=False)) == 2
    assert len(cleaned.split(only_watertight=False)) == 1
    assert cleaned.vertices.max() < 0.6


def test_empty_scene_raises_a_clear_error():
    faint = GaussianModel.from_values(torch.zeros(3, 3), 0.1, 0.2)
    with pytest.raises(Gen3dError, match="Lower the mesh threshold"):
        extract_mesh(faint, resolution=16, threshold=0.5)


def test_glb_round_trip_with_vertex_colors_and_y_up(tmp_path):
    with torch.no_grad():
        mesh = extract_mesh(blobs(), resolution=32)
    path = save_mesh(tmp_path / "mesh.glb", mesh)
    loaded = trimesh.load(path, force="mesh", process=False)
    assert len(loaded.vertices) == len(mesh.vertices) and len(loaded.faces) == len(mesh.faces)
    assert loaded.visual.kind == "vertex"
    assert np.array_equal(loaded.visual.vertex_colors, mesh.visual.vertex_colors)
    # glTF is +y up with the front towards +z: (x, y, z) of gen3d becomes (y, z, x)
    assert np.allclose(loaded.vertices, mesh.vertices[:, [1, 2, 0]], atol=1e-6)


@pytest.mark.parametrize("suffix", [".obj", ".ply"])
def test_obj_and_ply_keep_world_coordinates_and_colors(tmp_path, suffix):
    with torch.no_grad():
        mesh = extract_mesh(blobs(), resolution=24)
    path = save_mesh(tmp_path / f"mesh{suffix}", mesh)
    loaded = trimesh.load(path, force="mesh", process=False)
    assert len(loaded.faces) == len(mesh.faces)
    assert np.allclose(loaded.vertices, mesh.vertices, atol=1e-5)
    assert loaded.visual.kind == "vertex"
    assert np.abs(loaded.visual.vertex_colors.astype(int) - mesh.visual.vertex_colors.astype(int)).max() <= 1
    with pytest.raises(Gen3dError, match="glb"):
        save_mesh(tmp_path / "mesh.stl", mesh)


def test_glb_passes_the_khronos_gltf_validator(tmp_path):
    with torch.no_grad():
        path = save_mesh(tmp_path / "mesh.glb", extract_mesh(blobs(), resolution=24))
    issues = validate_gltf(path)
    assert issues["numErrors"] == 0, issues["messages"]


def test_failed_export_leaves_the_existing_file_intact(tmp_path, monkeypatch):
    with torch.no_grad():
        mesh = extract_mesh(blobs(), resolution=16)
    path = save_mesh(tmp_path / "mesh.glb", mesh)
    before = path.read_bytes()

    def half_then_fail(self, data):  # a disk that fills up midway
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError("No space left on device")

    monkeypatch.setattr(Path, "write_bytes", half_then_fail)
    with pytest.raises(OSError, match="No space"):
        save_mesh(path, mesh)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["mesh.glb"]
