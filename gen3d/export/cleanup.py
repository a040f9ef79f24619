"""Mesh clean-up after extraction: repair, decimation, optional remeshing, outward normals.

`clean_mesh` runs the same steps through one of three libraries (``backend``):

1. repair: merge duplicate vertices, drop degenerate and duplicate faces and unused vertices;
2. floaters: drop connected pieces with fewer faces than ``min_component_ratio`` times the largest;
3. decimation to at most ``faces`` faces by quadric error edge collapse (Garland and Heckbert 1997);
4. optional isotropic remeshing to edge length ``remesh`` (Botsch and Kobbelt 2004), pymeshlab only;
5. orientation: consistent winding, outward normals (trimesh's ``fix_normals`` for every backend).

Backends: ``trimesh`` (the light default: trimesh + fast-simplification, both required by gen3d),
``pymeshlab`` (``pip install gen3d[meshlab]``, +280 MB) and ``open3d`` (``pip install gen3d[open3d]``,
1.1 GB, needs Debian's libusb-1.0-0). ``auto`` takes pymeshlab when it is installed, else trimesh:
measured on Shapes-world surfaces decimated 5x (``benchmarks/bench_export.py``, table in the README),
pymeshlab's edge collapse keeps the surface closest, fast-simplification is close and fastest, and
open3d's ``simplify_quadric_decimation`` strays an order of magnitude further, so open3d is used only
when asked for. Remeshing needs pymeshlab.

Vertex colors and textures are not carried through: color the result again from the representation.
"""

from __future__ import annotations


import numpy as np

from gen3d.errors import Gen3dError, MissingExtra, importable

__all__ = ["MESH_BACKENDS", "available_mesh_backends", "clean_mesh", "decimate"]

MESH_BACKENDS = ("auto", "trimesh", "pymeshlab", "open3d")
_EXTRA = {"pymeshlab": "pip install 'gen3d[meshlab]' (or pip install pymeshlab)",
          "open3d": "pip install 'gen3d[open3d]' (or pip install open3d; on Debian/Ubuntu also apt install libusb-1.0-0)"}


def available_mesh_backends() -> list[str]:
    """The clean-up libraries installed here, trimesh always."""
    return ["trimesh"] + [name for name in ("pymeshlab", "open3d") if importable(name)]


def _resolve(backend: str, remesh: float) -> str:
    if backend not in MESH_BACKENDS:
        raise ValueError(f"mesh backend must be one of {list(MESH_BACKENDS)}, got {backend!r}")
    have = available_mesh_backends()
    if backend == "auto":
        if remesh:
            backend = "pymeshlab"
        else:
            return "pymeshlab" if "pymeshlab" in have else "trimesh"
    if backend not in have:
        raise MissingExtra(f"mesh clean-up with {backend} needs it installed: {_EXTRA[backend]}; "
                         "or use mesh_backend=trimesh (always available; it does everything but remeshing)")
    if remesh and backend != "pymeshlab":
        raise MissingExtra(f"isotropic remeshing (mesh_remesh={remesh}) needs pymeshlab: {_EXTRA['pymeshlab']}; "
                         "or set mesh_remesh=0")
    return backend


def clean_mesh(mesh, faces: int = 0, remesh: float = 0.0, backend: str = "auto", min_component_ratio: float = 0.05):
    """`mesh` repaired, without floaters, decimated to at most `faces` faces (0: keep all), optionally remeshed to
    edge length `remesh` (world units; 0: off) and with outward normals -> a new `trimesh.Trimesh` without colors."""
    import trimesh

    if faces != 0 and faces < 4:
        raise ValueError(f"clean_mesh: faces must be 0 (keep every face) or >= 4, got {faces}")
    if not remesh >= 0:
        raise ValueError(f"clean_mesh: remesh must be an edge length >= 0, got {remesh}")
    if not 0 <= min_component_ratio <= 1:
        raise ValueError(f"clean_mesh: min_component_ratio must be in [0, 1], got {min_component_ratio}")
    backend = _resolve(backend, remesh)
    vertices, triangles = np.asarray(mesh.vertices, np.float64), np.asarray(mesh.faces, np.int64)
    if len(triangles) == 0:
        raise Gen3dError("clean_mesh: the mesh has no faces")
    if backend == "pymeshlab":
        vertices, triangles = _pymeshlab(vertices, triangles, faces, remesh, min_component_ratio)
    elif backend == "open3d":
        vertices, triangles = _open3d(vertices, triangles, faces, min_component_ratio)
    else:
        vertices, triangles = _trimesh(vertices, triangles, faces, min_component_ratio)
    out = trimesh.Trimesh(vertices, triangles, process=False)
    trimesh.repair.fix_normals(out, multibody=True)
    out.metadata["mesh_backend"] = backend
    out.metadata["opened"] = bool(mesh.is_watertight and not out.is_watertight)  # closed before, not after
    return out


def _component_floor(face_counts: np.ndarray, ratio: float) -> int:
    return int(np.ceil(ratio * face_counts.max())) if len(face_counts) else 0


def _trimesh(vertices, triangles, faces, ratio):
    import trimesh

    mesh = trimesh.Trimesh(vertices, triangles, process=True)  # merges duplicate vertices
    mesh.update_faces(mesh.nondegenerate_faces() & mesh.unique_faces())
    mesh.remove_unreferenced_vertices()
    parts = mesh.split(only_watertight=False)
    if len(parts) > 1:
        floor = _component_floor(np.array([len(p.faces) for p in parts]), ratio)
        mesh = trimesh.util.concatenate([p for p in parts if len(p.faces) >= floor])
    if faces:
        mesh = decimate(mesh, faces)
    return mesh.vertices, mesh.faces


def decimate(mesh, face_count: int):
    """`mesh` simplified to at most `face_count` faces by quadric error decimation (trimesh and
    fast-simplification); the mesh itself when it already has no more."""
    if face_count < 4:
        raise ValueError(f"decimate: face_count must be >= 4, got {face_count}")
    if len(mesh.faces) <= face_count:
        return mesh
    import trimesh

    simple = mesh.simplify_quadric_decimation(face_count=face_count)
    return trimesh.Trimesh(simple.vertices, simple.faces, process=False)


def _pymeshlab(vertices, triangles, faces, remesh, ratio):
    import pymeshlab

    ms = pymeshlab.MeshSet()
    ms.add_mesh(pymeshlab.Mesh(vertex_matrix=vertices, face_matrix=triangles.astype(np.int32)))
    ms.meshing_remove_duplicate_vertices()
    ms.meshing_remove_duplicate_faces()
    ms.meshing_remove_null_faces()
    ms.meshing_remove_unreferenced_vertices()
    if ratio > 0:
        ms.compute_selection_by_small_disconnected_components_per_face(nbfaceratio=ratio)
        ms.meshing_remove_selected_vertices_and_faces()
    if faces and ms.current_mesh().face_number() > faces:
        ms.meshing_decimation_quadric_edge_collapse(targetfacenum=faces, optimalplacement=True, preservenormal=True,
                                                    planarquadric=True, autoclean=True)
    if remesh:
        ms.meshing_isotropic_explicit_remeshing(iterations=10, targetlen=pymeshlab.PureValue(remesh))
    m = ms.current_mesh()
    return m.vertex_matrix(), m.face_matrix().astype(np.int64)


def _open3d(vertices, triangles, faces, ratio):
    import open3d as o3d

    mesh = o3d.geometry.TriangleMesh(o3d.utility.Vector3dVector(vertices), o3d.utility.Vector3iVector(triangles))
    mesh.remove_duplicated_vertices()
    mesh.remove_duplicated_triangles()
    mesh.remove_degenerate_triangles()
    mesh.remove_unreferenced_vertices()
    if ratio > 0:
        cluster, counts, _ = mesh.cluster_connected_triangles()
        counts = np.asarray(counts)
        mesh.remove_triangles_by_mask(counts[np.asarray(cluster)] < _component_floor(counts, ratio))
        mesh.remove_unreferenced_vertices()
    if faces and len(mesh.triangles) > faces:
        mesh = mesh.simplify_quadric_decimation(target_number_of_triangles=faces)
        mesh.remove_degenerate_triangles()
        mesh.remove_unreferenced_vertices()
    return np.asarray(mesh.vertices), np.asarray(mesh.triangles, np.int64)
