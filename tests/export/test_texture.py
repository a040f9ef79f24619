"""UV atlas and texture baking: texels land on the surface, the texture reproduces the color field, seams are padded."""

import numpy as np
import pytest
import torch
import trimesh

from gen3d.errors import Gen3dError
from gen3d.export.texture import bake, pad_texture, rasterize_uv, textured_mesh, unwrap


def color_of(points):
    """A smooth color field over space: rgb = (p + 1) / 2."""
    return (points + 1) / 2


def sample(texture, uv):
    """Bilinear lookup of texture [H, W, 3] at uv [N, 2] (row 0 is v = 1), in [0, 1]."""
    H, W = texture.shape[:2]
    x, y = uv[:, 0] * W - 0.5, (1 - uv[:, 1]) * H - 0.5
    x0, y0 = np.clip(np.floor(x).astype(int), 0, W - 2), np.clip(np.floor(y).astype(int), 0, H - 2)
    fx, fy = np.clip(x - x0, 0, 1)[:, None], np.clip(y - y0, 0, 1)[:, None]
    t = texture.astype(np.float64) / 255
    top = t[y0, x0] * (1 - fx) + t[y0, x0 + 1] * fx
    bottom = t[y0 + 1, x0] * (1 - fx) + t[y0 + 1, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def test_rasterize_uv_covers_a_triangle_exactly():
    uv = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    texel, face, bary = rasterize_uv(uv, torch.tensor([[0, 1, 2]]), 16)
    assert len(texel) == 16 * 17 // 2  # texel centers (x + 0.5, y + 0.5) with x + y <= 15: on or below the diagonal
    torch.testing.assert_close(bary.sum(1), torch.ones(len(texel)))
    assert (face == 0).all() and (bary >= -1e-6).all()
    rows, cols = texel // 16, texel % 16
    assert ((15 - rows) + cols <= 15).all()  # below the diagonal u + v <= 1 (row 0 is v = 1)


def test_bake_reproduces_the_color_field_on_a_sphere():
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.5)
    vertices, faces, uv, texture = bake(sphere.vertices, sphere.faces, color_of, size=256)
    assert texture.shape == (256, 256, 3) and len(uv) == len(vertices) >= len(sphere.vertices)
    assert uv.min() >= 0 and uv.max() <= 1
    # every output vertex is an input vertex (charts only split vertices)
    assert np.abs(np.linalg.norm(vertices, axis=1) - 0.5).max() < 1e-5
    # the texture at each face's uv centroid is the color field at its 3D centroid
    centroid_uv = uv[faces].mean(1)
    centroid_xyz = vertices[faces].mean(1)
    error = np.abs(sample(texture, centroid_uv) - color_of(centroid_xyz)).max(1)
    assert np.median(error) < 0.01 and np.quantile(error, 0.99) < 0.03
    # padding: no texel is left black (the color field is never black on this sphere)
    assert texture.reshape(-1, 3).astype(int).sum(1).min() > 0


def test_pad_texture_copies_the_nearest_covered_texel():
    image = np.zeros((4, 4, 1))
    image[0, 0], image[3, 3] = 1.0, 2.0
    covered = np.zeros((4, 4), bool)
    covered[0, 0] = covered[3, 3] = True
    out = pad_texture(image, covered)
    assert out[0, 1, 0] == 1.0 and out[3, 2, 0] == 2.0 and out[1, 0, 0] == 1.0


def test_textured_glb_round_trip(tmp_path):
    from gen3d.export.mesh import save_mesh

    sphere = trimesh.creation.icosphere(subdivisions=2, radius=0.5)
    mesh = textured_mesh(*bake(sphere.vertices, sphere.faces, color_of, size=64))
    path = save_mesh(tmp_path / "m.glb", mesh)
    back = trimesh.load(path, force="mesh")
    assert back.visual.kind == "texture" and back.visual.material.baseColorTexture.size == (64, 64)
    assert len(back.faces) == len(sphere.faces)


def test_unwrap_without_faces_is_an_error():
    with pytest.raises(Gen3dError, match="without faces"):
        unwrap(np.zeros((3, 3)), np.zeros((0, 3), int))


def test_baked_gaussian_mesh_passes_the_khronos_gltf_validator(tmp_path):
    from gen3d.export.mesh import extract_mesh, save_mesh
    from tests.export.test_mesh_export import blobs, validate_gltf

    model = blobs()
    with torch.no_grad():
        mesh = extract_mesh(model, resolution=24)
    baked = bake(mesh.vertices, mesh.faces, model.color_at, size=128)
    path = save_mesh(tmp_path / "textured.glb", textured_mesh(*baked))
    issues = validate_gltf(path)
    assert issues["numErrors"] == 0, issues["messages"]
    # the texture carries the Gaussians' colors: red, green and blue blobs
    texture = baked[3].reshape(-1, 3).astype(int)
    for channel in range(3):
        assert (texture[:, channel] > 200).mean() > 0.05


def test_textured_obj_writes_mtl_and_png(tmp_path):
    from gen3d.export.mesh import save_mesh

    sphere = trimesh.creation.icosphere(subdivisions=2, radius=0.5)
    save_mesh(tmp_path / "m.obj", textured_mesh(*bake(sphere.vertices, sphere.faces, color_of, size=64)))
    assert (tmp_path / "m.mtl").is_file() and "m.mtl" in (tmp_path / "m.obj").read_text()
    pngs = list(tmp_path.glob("*.png"))
    assert len(pngs) == 1 and pngs[0].name in (tmp_path / "m.mtl").read_text()
    back = trimesh.load(tmp_path / "m.obj", force="mesh")
    assert back.visual.kind == "texture" and len(back.faces) == len(sphere.faces)


def test_decimation_keeps_the_shape():
    from gen3d.export.cleanup import decimate

    sphere = trimesh.creation.icosphere(subdivisions=5, radius=0.5)  # 20,480 faces
    small = decimate(sphere, 2000)
    assert 1500 <= len(small.faces) <= 2000 and small.is_watertight
    radius = np.linalg.norm(small.vertices, axis=1)
    assert np.abs(radius - 0.5).max() < 0.01  # every vertex stays on the sphere (within 2%)
    assert abs(small.volume - sphere.volume) / sphere.volume < 0.03
    assert decimate(sphere, 100000) is sphere
    with pytest.raises(ValueError, match="face_count"):
        decimate(sphere, 2)


def test_run_exports_decimated_recolored_meshes(tiny_pixel_prior, tmp_path):
    from gen3d.cli import main
    from gen3d.runs import resolve_run
    from tests.systems.conftest import fast_overrides

    out = tmp_path / "outputs"
    o = fast_overrides(tiny_pixel_prior, out, steps=2) + ["mesh_faces=300", "exports=[ply,glb]", "turntable_frames=0"]
    assert main(["run", "dreamgaussian", "prompt=a red mug", *o]) == 0
    run = resolve_run("@last", out)
    ply = trimesh.load(run / "export" / "mesh.ply", force="mesh")
    assert 0 < len(ply.faces) <= 300 and ply.visual.kind == "vertex"
    assert len(np.unique(ply.visual.vertex_colors[:, :3], axis=0)) > 1  # recolored from the Gaussians, not blank
    assert len(trimesh.load(run / "export" / "mesh.glb", force="mesh").faces) <= 300
