"""Every file a run exports, read back by independent tools: the Khronos glTF validator, trimesh, open3d, plyfile."""

import numpy as np
import pytest
import trimesh

from tests.export.test_mesh_export import validate_gltf

FORMATS = ["glb", "obj", "ply", "splat-ply"]


@pytest.fixture(scope="module")
def exports(tiny_pixel_prior, tmp_path_factory):
    """{(system, variant): path} of every export of a short dreamgaussian and dreamfusion run."""
    from gen3d.cli import main
    from gen3d.runs import resolve_run
    from tests.systems.conftest import fast_overrides

    tmp = tmp_path_factory.mktemp("exports")
    files = {}
    for system in ("dreamgaussian", "dreamfusion"):
        out = tmp / system
        o = fast_overrides(tiny_pixel_prior, out, steps=2, system=system) + ["turntable_frames=0", "exports=[]"]
        assert main(["run", system, "prompt=a red mug", *o]) == 0
        run = resolve_run("@last", out)
        for fmt in FORMATS if system == "dreamgaussian" else FORMATS[:3]:
            target = tmp / f"{system}-{fmt}.{'ply' if fmt == 'splat-ply' else fmt}"
            assert main(["export", str(run), "--format", fmt, "--output", str(target)]) == 0
            files[system, fmt] = target
        target = tmp / f"{system}-vertex.glb"
        assert main(["export", str(run), "--format", "glb", "--output", str(target), "texture_size=0"]) == 0
        files[system, "vertex-glb"] = target
    return files


def test_every_glb_passes_the_khronos_validator(exports):
    for key, path in exports.items():
        if path.suffix == ".glb":
            issues = validate_gltf(path)
            assert issues["numErrors"] == 0, (key, issues["messages"])


def test_trimesh_reads_every_mesh_with_its_colors(exports):
    for (system, fmt), path in exports.items():
        if fmt == "splat-ply":
            continue
        mesh = trimesh.load(path, force="mesh")
        shape = trimesh.Trimesh(mesh.vertices, mesh.faces)  # merges the vertices UV seams split
        assert len(mesh.faces) > 0 and shape.is_watertight and shape.volume > 0, (system, fmt)
        if fmt in ("glb", "obj"):
            assert mesh.visual.kind == "texture" and mesh.visual.uv.shape == (len(mesh.vertices), 2), (system, fmt)
            image = getattr(mesh.visual.material, "baseColorTexture", None) or mesh.visual.material.image
            assert image.size == (64, 64)  # texture_size of the test runs
        else:
            colors = mesh.visual.vertex_colors
            assert len(np.unique(colors[:, :3], axis=0)) > 1, (system, fmt)


def test_open3d_reads_every_output(exports):
    o3d = pytest.importorskip("open3d", reason="open3d is an optional extra (pip install 'gen3d[open3d]')")
    for (system, fmt), path in exports.items():
        if fmt == "splat-ply":
            cloud = o3d.io.read_point_cloud(str(path))
            assert len(cloud.points) > 0
            continue
        mesh = o3d.io.read_triangle_mesh(str(path), enable_post_processing=True)
        assert len(mesh.triangles) > 0 and len(mesh.vertices) > 0, (system, fmt)
        if fmt in ("glb", "obj"):
            assert mesh.has_triangle_uvs() and len(mesh.textures) >= 1, (system, fmt)
        elif fmt in ("ply", "vertex-glb"):
            assert mesh.has_vertex_colors(), (system, fmt)


def test_the_splat_ply_has_exactly_the_3dgs_properties(exports):
    plyfile = pytest.importorskip("plyfile")
    data = plyfile.PlyData.read(str(exports["dreamgaussian", "splat-ply"]))
    names = [p.name for p in data["vertex"].properties]
    assert names == ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
                     "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]  # sh_degree 0: no f_rest
    assert all(p.val_dtype in ("f4", "float32", "float") for p in data["vertex"].properties)
