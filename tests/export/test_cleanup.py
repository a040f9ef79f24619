"""Mesh clean-up through every installed backend, and the mesh metrics it is judged by."""

import numpy as np
import pytest
import trimesh

from gen3d.errors import Gen3dError
from gen3d.export import cleanup
from gen3d.export.cleanup import available_mesh_backends, clean_mesh
from gen3d.world.metrics import mesh_distance, point_to_mesh

BACKENDS = available_mesh_backends()


def sphere(subdivisions: int = 5, radius: float = 0.5):
    return trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)


def test_point_to_mesh_is_the_distance_to_the_surface():
    mesh = sphere(5)
    rng = np.random.default_rng(0)
    directions = rng.normal(size=(500, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    radii = rng.uniform(0.2, 0.9, size=(500, 1))
    dist, face = point_to_mesh(directions * radii, mesh)
    # the icosphere's faces sit within 1e-3 of the sphere of radius 0.5
    assert np.abs(dist - np.abs(radii[:, 0] - 0.5)).max() < 2e-3
    centers = mesh.triangles_center[face]
    assert (np.einsum("ij,ij->i", centers / np.linalg.norm(centers, axis=1, keepdims=True), directions) > 0.99).all()


def test_mesh_distance_sees_a_shift():
    mesh = sphere(4)
    same = mesh_distance(mesh, mesh, samples=4000)
    assert same.chamfer < 1e-9 and same.normal_consistency > 0.999 and same.f_score == 1.0
    moved = mesh.copy()
    moved.apply_translation([0.05, 0, 0])
    far = mesh_distance(moved, mesh, samples=4000)
    assert 0.015 < far.chamfer < 0.05 and far.f_score < 0.6


@pytest.mark.parametrize("backend", BACKENDS)
def test_decimation_keeps_a_closed_outward_surface(backend):
    mesh = sphere(5)  # 20480 faces
    out = clean_mesh(mesh, faces=2000, backend=backend)
    assert 1000 <= len(out.faces) <= 2000 and out.metadata["mesh_backend"] == backend
    assert out.is_watertight and out.volume > 0  # outward
    assert mesh_distance(out, mesh, samples=4000).chamfer < 3e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_repair_drops_floaters_degenerate_and_duplicate_faces_and_fixes_winding(backend):
    body = sphere(3)
    floater = sphere(0, radius=0.05)
    floater.apply_translation([0.9, 0, 0])
    faces = body.faces.copy()
    rng = np.random.default_rng(1)
    flip = rng.random(len(faces)) < 0.3
    faces[flip] = faces[flip][:, ::-1]  # inconsistent winding
    vertices = np.concatenate([body.vertices, floater.vertices])
    faces = np.concatenate([faces, floater.faces + len(body.vertices), faces[:5], [[0, 0, 1]]])  # duplicates, degenerate
    out = clean_mesh(trimesh.Trimesh(vertices, faces, process=False), backend=backend)
    assert len(out.faces) == len(body.faces)
    assert out.is_watertight and out.is_winding_consistent and out.volume > 0
    assert np.linalg.norm(out.vertices, axis=1).max() < 0.6  # the floater is gone


@pytest.mark.skipif("pymeshlab" not in BACKENDS, reason="remeshing needs pymeshlab (pip install gen3d[meshlab])")
def test_isotropic_remeshing_evens_the_edges():
    mesh = trimesh.creation.cylinder(radius=0.3, height=0.8, sections=64)  # long thin triangles
    out = clean_mesh(mesh, remesh=0.05, backend="pymeshlab")
    lengths = out.edges_unique_length
    assert abs(np.median(lengths) - 0.05) < 0.015 and np.percentile(lengths, 95) < 0.08
    assert np.percentile(mesh.edges_unique_length, 95) > 0.3  # before: edges as long as the cylinder
    assert out.is_watertight and out.volume > 0


def test_remeshing_without_pymeshlab_and_missing_backends_say_what_to_install(monkeypatch):
    with pytest.raises(Gen3dError, match="remeshing .* needs pymeshlab"):
        clean_mesh(sphere(2), remesh=0.05, backend="trimesh")
    monkeypatch.setattr(cleanup, "available_mesh_backends", lambda: ["trimesh"])
    for backend in ("pymeshlab", "open3d"):
        with pytest.raises(Gen3dError, match=f"pip install 'gen3d\\[{'meshlab' if backend == 'pymeshlab' else 'open3d'}\\]'"):
            clean_mesh(sphere(2), backend=backend)
    assert clean_mesh(sphere(2), faces=100).metadata["mesh_backend"] == "trimesh"  # auto falls back


def test_bad_arguments():
    for kwargs, match in [({"faces": 2}, "faces"), ({"remesh": -1.0}, "remesh"), ({"backend": "blender"}, "backend"),
                          ({"min_component_ratio": 2.0}, "min_component_ratio")]:
        with pytest.raises(ValueError, match=match):
            clean_mesh(sphere(1), **kwargs)
