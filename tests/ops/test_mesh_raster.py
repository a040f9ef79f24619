"""Mesh rasterizer: coverage against exact point-in-triangle tests; the top-left tie rule on a grid,
shared edges and vertex fans running through pixel centers (each center in exactly one face);
perspective-correct depth and barycentrics against ray casting; occlusion and a brute-force
z-buffer on an intersecting triangle soup; a crack-free sphere; gradients; edge cases; parity of
the optional backends (skipped when they are not installed)."""

import math

import numpy as np
import pytest
import torch
import trimesh

from gen3d.cameras import Cameras, orbit_cameras
from gen3d.errors import Gen3dError, importable
from gen3d.ops import mesh_raster
from gen3d.ops.mesh_raster import MeshRaster, available_backends, interpolate, rasterize_mesh

F64 = torch.float64


def _cameras(c2w: torch.Tensor, K: torch.Tensor, width: int, height: int) -> Cameras:
    C = c2w.shape[0]
    zeros = torch.zeros(C, dtype=c2w.dtype)
    return Cameras(c2w, K, width, height, zeros, zeros, zeros + 1)


def _pixel_centers(cameras: Cameras) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-center coordinates u [H, W] (column + 0.5) and v [H, W] (row + 0.5)."""
    u, v = np.meshgrid(np.arange(cameras.width) + 0.5, np.arange(cameras.height) + 0.5)
    return u, v


def _project(points: np.ndarray, cameras: Cameras, c: int) -> np.ndarray:
    """Screen positions [N, 2] of world points [N, 3] in camera c, in float64 numpy."""
    viewmat = cameras.viewmats[c].double().numpy()
    cam = points @ viewmat[:3, :3].T + viewmat[:3, 3]
    pix = cam @ cameras.K[c].double().numpy().T
    return pix[:, :2] / pix[:, 2:]


def _cross2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


def _rays(cameras: Cameras, c: int) -> tuple[np.ndarray, np.ndarray]:
    """Eye [3] and world directions [H, W, 3] scaled so that their camera-space z is 1 (t = depth)."""
    u, v = _pixel_centers(cameras)
    pix = np.stack([u, v, np.ones_like(u)], -1)
    d_cam = pix @ np.linalg.inv(cameras.K[c].double().numpy()).T
    c2w = cameras.c2w[c].double().numpy()
    return c2w[:3, 3], d_cam @ c2w[:3, :3].T


# --- coverage ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("triangle", [
    [[0.0, -0.9, -0.6], [0.0, 0.8, -0.3], [0.0, 0.1, 0.7]],  # inside the image
    [[0.0, -3.0, -0.2], [0.0, 1.0, -2.5], [0.0, 0.6, 1.1]],  # cut by the image borders
], ids=["inside", "off-screen-corners"])
def test_single_triangle_coverage_is_exact(triangle):
    cameras = orbit_cameras(1, elevation=0.0, distance=3.0, fovy=50.0, width=96, height=64)  # non-square
    vertices = torch.tensor(triangle, dtype=F64)
    raster = rasterize_mesh(vertices, torch.tensor([[0, 1, 2]]), cameras, backend="torch")

    s = _project(vertices.numpy(), cameras, 0)
    u, v = _pixel_centers(cameras)
    q = np.stack([u, v], -1)
    area = _cross2(s[1] - s[0], s[2] - s[0])
    dist = np.stack([np.sign(area) * _cross2(s[(k + 2) % 3] - s[(k + 1) % 3], q - s[(k + 1) % 3])
                     / np.linalg.norm(s[(k + 2) % 3] - s[(k + 1) % 3]) for k in range(3)], -1)  # [H, W, 3]
    exact = (dist > 0).all(-1)
    near_edge = np.abs(dist).min(-1) < 1e-6
    mask = raster.mask[0].numpy()
    assert exact.sum() > 300
    assert not (mask != exact)[~near_edge].any()
    assert set(raster.face_id.unique().tolist()) == {-1, 0}


def _grid(shared: bool, flip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A 5 x 4 grid of quads at z = 1 whose vertices and diagonals hit pixel centers under `_unit_camera`.

    Quads alternate their diagonal; `shared=False` gives every face its own (coincident) vertices,
    as on UV seams; `flip` [F] reverses the winding of the chosen faces.
    """
    xs, ys = torch.arange(2.5, 13.0, 2.0, dtype=F64), torch.arange(1.5, 10.0, 2.0, dtype=F64)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    vertices = torch.stack([gx, gy, torch.ones_like(gx)], -1).reshape(-1, 3)
    n = len(xs)
    faces = []
    for r in range(len(ys) - 1):
        for c in range(n - 1):
            a, b, d, e = r * n + c, r * n + c + 1, (r + 1) * n + c, (r + 1) * n + c + 1
            faces += [[a, b, e], [a, e, d]] if (r + c) % 2 else [[a, b, d], [b, e, d]]
    faces = torch.tensor(faces)
    if flip is not None:
        faces[flip] = faces[flip].flip(1)
    if not shared:
        vertices, faces = vertices[faces.reshape(-1)], torch.arange(3 * len(faces)).reshape(-1, 3)
    return vertices, faces


def _unit_camera(width: int = 16, height: int = 12) -> Cameras:
    """Identity pose and K = I: a point (x, y, 1) lands exactly at pixel coordinates (x, y)."""
    return _cameras(torch.eye(4, dtype=F64)[None], torch.eye(3, dtype=F64)[None], width, height)


@pytest.mark.parametrize("shared,flip", [(True, False), (False, False), (False, True)],
                         ids=["shared-vertices", "duplicated-vertices", "mixed-winding"])
def test_top_left_rule_covers_edge_pixels_exactly_once(shared, flip):
    cameras = _unit_camera()
    flips = torch.rand(40, generator=torch.Generator().manual_seed(3)) < 0.5 if flip else None
    vertices, faces = _grid(shared, flips)
    raster = rasterize_mesh(vertices, faces, cameras, backend="torch")
    # Each face alone: every pixel center, on interior edges and vertices too, belongs to one face.
    alone = torch.stack([rasterize_mesh(vertices, faces[f:f + 1], cameras, backend="torch").mask[0]
                         for f in range(len(faces))])  # [F, H, W]
    assert alone.sum(0).max() == 1
    u, v = (torch.from_numpy(a) for a in _pixel_centers(cameras))
    # Top and left borders are in, bottom and right borders out: the half-open rectangle.
    expected = (u >= 2.5) & (u < 12.5) & (v >= 1.5) & (v < 9.5)
    assert torch.equal(alone.any(0), expected)
    assert torch.equal(raster.mask[0], expected)
    assert torch.equal(raster.face_id[0][expected], alone.int().argmax(0)[expected])


# Directions with odd components, in angular order: points at non-dyadic multiples of them round in
# both coordinates, so edge functions along them are rounding noise rather than exact zeros.
_DIRECTIONS = torch.tensor([[3, 1], [1, 3], [-2, 3], [-3, 1], [-3, -2], [-1, -3], [2, -3], [3, -1]], dtype=F64)


def _coverage_counts(vertices: torch.Tensor, faces: torch.Tensor, cameras: Cameras) -> torch.Tensor:
    """How many faces, each rasterized alone, cover every pixel center of camera 0 [H, W]."""
    return torch.stack([rasterize_mesh(vertices, faces[f:f + 1], cameras, backend="torch").mask[0]
                        for f in range(len(faces))]).sum(0)


def _lift(points: torch.Tensor) -> torch.Tensor:
    """Screen points [N, 2] -> vertices [N, 3] at z = 1, which `_unit_camera` maps back exactly."""
    return torch.cat([points, torch.ones(len(points), 1, dtype=points.dtype)], 1)


@pytest.mark.parametrize("seed", range(4))
def test_shared_edges_through_pixel_centers_with_inexact_endpoints(seed):
    """Pairs of faces whose shared edge passes (in real arithmetic) through pixel centers but ends at
    coordinates floats cannot hold: there the edge functions are pure rounding noise, and only
    exactly negated evaluations on the two sides keep every center in exactly one face."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[10.5 + 20 * i, 10.5 + 20 * j] for j in range(4) for i in range(4)], dtype=F64)
    directions = _DIRECTIONS.repeat(2, 1)
    before, after = (1.3 + 1.4 * torch.rand(2, 16, generator=g, dtype=F64)).unbind(0)
    a, b = centers - before[:, None] * directions, centers + after[:, None] * directions
    side = torch.stack([-directions[:, 1], directions[:, 0]], 1) * (0.7 + 0.2 * torch.rand(16, 1, generator=g, dtype=F64))
    vertices = _lift(torch.stack([a, b, centers + side, centers - side], 1).reshape(-1, 2))
    faces = torch.tensor([[4 * i, 4 * i + 1, 4 * i + 2] for i in range(16)] + [[4 * i + 1, 4 * i, 4 * i + 3] for i in range(16)])
    flip = torch.rand(len(faces), generator=g) < 0.5  # mixed windings
    faces[flip] = faces[flip].flip(1)
    count = _coverage_counts(vertices, faces, _unit_camera(82, 82))
    assert count.max() == 1
    for i in range(16):
        for k in range(-int(before[i]), int(after[i]) + 1):  # the pixel centers on the shared edge
            x, y = (centers[i] + k * directions[i]).floor().long().tolist()
            assert count[y, x] == 1


@pytest.mark.parametrize("seed", range(3))
def test_fans_around_pixel_centers_cover_each_center_once(seed):
    """Closed fans around vertices sitting on pixel centers, with inexact spokes through more centers:
    the edge functions of both spokes of a face vanish exactly at its hub, and the tie rule alone
    picks the one face of each fan that covers it."""
    g = torch.Generator().manual_seed(seed)
    n = len(_DIRECTIONS)
    hubs = torch.tensor([[10.5 + 20 * i, 10.5 + 20 * j] for j in range(4) for i in range(4)], dtype=F64)
    scale = 1.3 + 1.4 * torch.rand(16, n, generator=g, dtype=F64)
    rings = hubs[:, None] + scale[..., None] * _DIRECTIONS  # [16, n, 2]
    vertices = _lift(torch.cat([hubs[:, None], rings], 1).reshape(-1, 2))
    fan = torch.tensor([[0, 1 + i, 1 + (i + 1) % n] for i in range(n)])
    faces = (fan + (n + 1) * torch.arange(16)[:, None, None]).reshape(-1, 3)
    flip = torch.rand(len(faces), generator=g) < 0.5  # mixed windings
    faces[flip] = faces[flip].flip(1)
    cameras = _unit_camera(82, 82)
    count = _coverage_counts(vertices, faces, cameras)
    assert count.max() == 1
    for hub, fan_scale in zip(hubs, scale):
        for k in (0, 1, 2):  # the hub, then the pixel centers on its spokes
            for dx, dy in _DIRECTIONS[fan_scale > k].long().tolist():
                x, y = (hub + torch.tensor([k * dx, k * dy], dtype=F64)).floor().long().tolist()
                assert count[y, x] == 1
    raster = rasterize_mesh(vertices, faces, cameras, backend="torch")
    assert torch.equal(raster.mask[0], count == 1)


# --- depth and barycentrics -----------------------------------------------------------------------

def _cube() -> tuple[torch.Tensor, torch.Tensor]:
    mesh = trimesh.creation.box(extents=(1.0, 1.2, 0.8))
    return torch.tensor(mesh.vertices, dtype=F64), torch.tensor(mesh.faces)


@pytest.mark.parametrize("shape", ["tilted-triangle", "cube"])
def test_depth_and_perspective_correct_barycentrics(shape):
    if shape == "cube":
        vertices, faces = _cube()
    else:
        vertices = torch.tensor([[0.6, -0.9, -0.5], [-0.7, 0.8, -0.2], [0.2, 0.1, 0.8]], dtype=F64)
        faces = torch.tensor([[0, 1, 2]])
    cameras = orbit_cameras(3, elevation=25.0, distance=3.2, fovy=45.0, width=64, height=48, start_azimuth=20.0)
    raster = rasterize_mesh(vertices, faces, cameras, backend="torch")
    points = interpolate(vertices, faces, raster)  # [C, H, W, 3] world points from the barycentrics
    assert raster.bary.dtype == F64 and raster.mask.sum() > 500

    for c in range(len(cameras)):
        mask = raster.mask[c].numpy()
        eye, dirs = _rays(cameras, c)
        depth = raster.depth[c].numpy()[mask]
        unprojected = eye + depth[:, None] * dirs[mask]
        np.testing.assert_allclose(unprojected, points[c].numpy()[mask], atol=1e-4)

        tri = vertices.numpy()[faces.numpy()[raster.face_id[c].numpy()[mask]]]  # [n, 3, 3]
        normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
        np.testing.assert_allclose(((unprojected - tri[:, 0]) * normal).sum(-1), 0.0, atol=1e-4)
        t_plane = ((tri[:, 0] - eye) * normal).sum(-1) / (dirs[mask] * normal).sum(-1)  # ray-plane intersection
        np.testing.assert_allclose(depth, t_plane, rtol=1e-5)
        bary = raster.bary[c].numpy()[mask]
        np.testing.assert_allclose(bary.sum(-1), 1.0, atol=1e-9)
        assert bary.min() > -1e-6

        if shape == "cube":  # the visible point is the ray's entry into the box (slab test)
            half = np.array([0.5, 0.6, 0.4])
            with np.errstate(divide="ignore"):
                t0, t1 = (-half - eye) / dirs[mask], (half - eye) / dirs[mask]
            t_enter = np.minimum(t0, t1).max(-1)
            assert (t_enter <= np.maximum(t0, t1).min(-1) + 1e-9).all()
            np.testing.assert_allclose(depth, t_enter, rtol=1e-5)


def test_float32_vertices_give_float32_outputs():
    vertices, faces = _cube()
    raster = rasterize_mesh(vertices.float(), faces, orbit_cameras(1, width=32, height=32), backend="torch")
    assert raster.bary.dtype == torch.float32 and raster.depth.dtype == torch.float32
    assert raster.face_id.dtype == torch.int64 and raster.mask.dtype == torch.bool


# --- occlusion ------------------------------------------------------------------------------------

@pytest.mark.parametrize("near_first", [True, False])
def test_nearer_triangle_wins_regardless_of_order(near_first):
    cameras = orbit_cameras(1, elevation=0.0, distance=3.0, width=64, height=64)  # eye at +x
    near_tri = [[0.5, -0.8, -0.6], [0.5, 0.6, -0.5], [0.5, -0.1, 0.7]]
    far_tri = [[-0.5, -0.3, -0.9], [-0.5, 0.9, 0.0], [-0.5, -0.4, 0.9]]
    vertices = torch.tensor(near_tri + far_tri if near_first else far_tri + near_tri, dtype=F64)
    faces = torch.tensor([[0, 1, 2], [3, 4, 5]])
    near_id = 0 if near_first else 1
    raster = rasterize_mesh(vertices, faces, cameras, backend="torch")
    near_alone = rasterize_mesh(vertices, faces[near_id:near_id + 1], cameras, backend="torch").mask[0]
    far_alone = rasterize_mesh(vertices, faces[1 - near_id:2 - near_id], cameras, backend="torch").mask[0]
    assert (near_alone & far_alone).sum() > 200  # they overlap
    assert (raster.face_id[0][near_alone] == near_id).all()
    assert (raster.face_id[0][far_alone & ~near_alone] == 1 - near_id).all()
    assert torch.equal(raster.mask[0], near_alone | far_alone)
    assert torch.allclose(raster.depth[0][near_alone], torch.tensor(2.5, dtype=F64))


@pytest.mark.parametrize("distance", [3.5, 1.2], ids=["outside", "inside-the-soup"])
def test_matches_brute_force_on_an_intersecting_triangle_soup(distance):
    """Every pixel against every face in float64 numpy: strict inside test, perspective-correct depth,
    faces with a vertex before the near plane skipped; pixels within 1e-6 of any edge or with a
    depth tie within 1e-9 are left out."""
    g = np.random.default_rng(0)
    F, near = 60, 0.01
    centers = g.uniform(-0.8, 0.8, (F, 1, 3))
    vertices = torch.from_numpy((centers + g.uniform(-0.6, 0.6, (F, 3, 3))).reshape(-1, 3))
    faces = torch.arange(3 * F).reshape(F, 3)
    cameras = orbit_cameras(3, elevation=15.0, distance=distance, fovy=50.0, width=40, height=30)
    raster = rasterize_mesh(vertices, faces, cameras, backend="torch", near=near)
    u, v = _pixel_centers(cameras)
    q = np.stack([u, v], -1)[:, :, None]  # [H, W, 1, 2]
    for c in range(len(cameras)):
        viewmat = cameras.viewmats[c].double().numpy()
        z = (vertices.numpy() @ viewmat[:3, :3].T + viewmat[:3, 3])[:, 2].reshape(F, 3)
        s = _project(vertices.numpy(), cameras, c).reshape(F, 3, 2)
        a, b, d = s[:, 0], s[:, 1], s[:, 2]
        area = _cross2(b - a, d - a)
        lam = np.stack([_cross2(s[:, (k + 2) % 3] - s[:, (k + 1) % 3], q - s[:, (k + 1) % 3]) for k in range(3)], -1) / area[:, None]
        edge = np.linalg.norm(np.stack([s[:, (k + 2) % 3] - s[:, (k + 1) % 3] for k in range(3)], 1), axis=-1)
        margin = np.abs(lam * area[:, None] / edge).min(-1)  # [H, W, F] distance to the nearest edge line
        inside = (lam > 0).all(-1) & (z >= near).all(-1)
        depth = np.where(inside, 1 / (lam / z).sum(-1), np.inf)
        order = np.sort(depth, -1)
        expected = np.where(np.isfinite(order[..., 0]), depth.argmin(-1), -1)
        tie = np.isfinite(order[..., 1]) & (np.where(np.isfinite(order[..., 1]), order[..., 1], 0) - order[..., 0] < 1e-9)
        clear = (margin > 1e-6).all(-1) & ~tie
        assert clear.mean() > 0.99 and (expected >= 0).mean() > 0.2
        np.testing.assert_array_equal(raster.face_id[c].numpy()[clear], expected[clear])


def test_exact_depth_ties_go_to_the_smaller_face_id():
    vertices, faces = _cube()
    doubled = torch.cat([faces, faces])  # every face twice: equal depths everywhere
    raster = rasterize_mesh(vertices, doubled, orbit_cameras(2, width=48, height=48), backend="torch")
    single = rasterize_mesh(vertices, faces, orbit_cameras(2, width=48, height=48), backend="torch")
    assert torch.equal(raster.face_id, single.face_id)


# --- no cracks ------------------------------------------------------------------------------------

def test_closed_sphere_has_no_cracks_and_the_analytic_silhouette():
    r, d, size = 1.0, 2.75, 128
    mesh = trimesh.creation.icosphere(subdivisions=4, radius=r)
    vertices, faces = torch.tensor(mesh.vertices, dtype=torch.float32), torch.tensor(mesh.faces)
    cameras = orbit_cameras(4, elevation=35.0, distance=d, fovy=45.0, width=size, height=size, start_azimuth=10.0)
    raster = rasterize_mesh(vertices, faces, cameras, backend="torch")
    u, v = _pixel_centers(cameras)
    for c in range(len(cameras)):
        K = cameras.K[c].double().numpy()
        radius_px = K[1, 1] * r / math.sqrt(d * d - r * r)  # the silhouette of a sphere seen from its axis
        rho = np.hypot(u - K[0, 2], v - K[1, 2])
        mask = raster.mask[c].numpy()
        assert mask[rho < radius_px - 1].all()
        assert not mask[rho > radius_px + 1].any()
        assert abs(mask.sum() / (math.pi * radius_px**2) - 1) < 0.01
        # The front surface is the one seen: depth matches the ray's first hit of the sphere.
        eye, dirs = _rays(cameras, c)
        inner = rho < 0.9 * radius_px
        a, b = (dirs[inner] ** 2).sum(-1), 2 * (dirs[inner] @ eye)
        t_hit = (-b - np.sqrt(b * b - 4 * a * (eye @ eye - r * r))) / (2 * a)
        np.testing.assert_allclose(raster.depth[c].numpy()[inner], t_hit, atol=0.01)


def test_chunking_does_not_change_the_result(monkeypatch):
    mesh = trimesh.creation.icosphere(subdivisions=2)
    vertices, faces = torch.tensor(mesh.vertices, dtype=F64), torch.tensor(mesh.faces)
    cameras = orbit_cameras(2, width=40, height=30)
    reference = rasterize_mesh(vertices, faces, cameras, backend="torch")
    monkeypatch.setattr(mesh_raster, "_CHUNK", 97)
    chunked = rasterize_mesh(vertices, faces, cameras, backend="torch")
    assert torch.equal(reference.face_id, chunked.face_id)
    assert torch.equal(reference.bary, chunked.bary) and torch.equal(reference.depth, chunked.depth)


# --- gradients ------------------------------------------------------------------------------------

def _octahedron() -> tuple[torch.Tensor, torch.Tensor]:
    vertices = torch.tensor([[0.9, 0, 0], [-0.8, 0.1, 0], [0, 0.85, 0], [0.1, -0.9, 0], [0, 0, 0.8], [0, 0.1, -0.9]], dtype=F64)
    faces = torch.tensor([[0, 2, 4], [2, 1, 4], [1, 3, 4], [3, 0, 4], [2, 0, 5], [1, 2, 5], [3, 1, 5], [0, 3, 5]])
    return vertices, faces


def _interior_pixels(raster: MeshRaster, n: int = 8) -> torch.Tensor:
    """Flat indices of n pixels well inside their face (every barycentric > 0.15)."""
    inner = (raster.bary.reshape(-1, 3).min(-1).values > 0.15).nonzero().squeeze(1)
    assert len(inner) >= n
    return inner[torch.linspace(0, len(inner) - 1, n).long()]


def test_gradcheck_interpolate_wrt_attributes_and_vertices():
    vertices, faces = _octahedron()
    cameras = orbit_cameras(2, elevation=20.0, distance=2.5, width=24, height=20, start_azimuth=30.0)
    attributes = torch.rand(len(vertices), 2, dtype=F64)
    raster = rasterize_mesh(vertices, faces, cameras, backend="torch")
    pixels = _interior_pixels(raster)

    def of_attributes(attr):
        return interpolate(attr, faces, raster).reshape(-1, 2)[pixels]

    def of_vertices(verts):
        r = rasterize_mesh(verts, faces, cameras, backend="torch")
        assert torch.equal(r.face_id, raster.face_id)  # the face choice is fixed under the perturbation
        return torch.cat([interpolate(attributes, faces, r).reshape(-1, 2), r.depth.reshape(-1, 1)], 1)[pixels]

    assert torch.autograd.gradcheck(of_attributes, (attributes.requires_grad_(),))
    assert torch.autograd.gradcheck(of_vertices, (vertices.clone().requires_grad_(),))


def test_vertex_colors_fit_a_target_image():
    mesh = trimesh.creation.icosphere(subdivisions=1)
    vertices, faces = torch.tensor(mesh.vertices, dtype=torch.float32), torch.tensor(mesh.faces)
    cameras = orbit_cameras(4, elevation=20.0, width=32, height=32)
    raster = rasterize_mesh(vertices, faces, cameras)
    target = interpolate(torch.rand(len(vertices), 3, generator=torch.Generator().manual_seed(1)), faces, raster)
    colors = torch.full((len(vertices), 3), 0.5, requires_grad=True)
    optimizer = torch.optim.Adam([colors], lr=0.05)
    losses = []
    for _ in range(150):
        loss = (interpolate(colors, faces, raster) - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 1e-3 * losses[0]


# --- edge cases -----------------------------------------------------------------------------------

def test_empty_faces_render_nothing_and_stay_differentiable():
    cameras = orbit_cameras(2, width=20, height=10)
    vertices = torch.rand(5, 3, dtype=F64, requires_grad=True)
    raster = rasterize_mesh(vertices, torch.zeros(0, 3, dtype=torch.long), cameras)
    assert raster.face_id.shape == (2, 10, 20) and (raster.face_id == -1).all()
    assert raster.bary.shape == (2, 10, 20, 3) and (raster.bary == 0).all() and (raster.depth == 0).all()
    attributes = torch.rand(5, 4, dtype=F64, requires_grad=True)
    image = interpolate(attributes, torch.zeros(0, 3, dtype=torch.long), raster)
    assert image.shape == (2, 10, 20, 4) and (image == 0).all()
    (image.sum() + raster.depth.sum()).backward()
    assert (attributes.grad == 0).all()


def test_camera_looking_away_sees_nothing():
    vertices, faces = _cube()
    c2w = torch.eye(4, dtype=F64)[None]
    c2w[0, :3, 3] = torch.tensor([0.0, 0.0, -3.0])  # eye at z = -3 looking along +z: the cube is in front
    K = torch.tensor([[[20.0, 0, 16], [0, 20.0, 16], [0, 0, 1]]], dtype=F64)
    assert rasterize_mesh(vertices, faces, _cameras(c2w, K, 32, 32)).mask.any()
    c2w[0, :3, :3] = torch.diag(torch.tensor([-1.0, 1.0, -1.0], dtype=F64))  # turned around: looks along -z
    raster = rasterize_mesh(vertices, faces, _cameras(c2w, K, 32, 32))
    assert (raster.face_id == -1).all()


def test_faces_with_a_vertex_before_the_near_plane_are_dropped():
    cameras = _unit_camera(16, 16)  # eye at the origin looking along +z
    in_front = [[2.0, 2.0, 1.0], [14.0, 3.0, 1.0], [6.0, 14.0, 1.0]]
    straddling = [[2.0, 2.0, 1.0], [14.0, 3.0, 1.0], [0.0, 0.0, -1.0]]
    close = [[0.02, 0.02, 0.01], [0.14, 0.03, 0.01], [0.06, 0.14, 0.01]]  # at z = 0.01, same screen triangle
    faces = torch.tensor([[0, 1, 2]])
    assert rasterize_mesh(torch.tensor(in_front, dtype=F64), faces, cameras).mask.sum() > 20
    assert not rasterize_mesh(torch.tensor(straddling, dtype=F64), faces, cameras).mask.any()
    assert rasterize_mesh(torch.tensor(close, dtype=F64), faces, cameras, near=0.005).mask.sum() > 20
    assert not rasterize_mesh(torch.tensor(close, dtype=F64), faces, cameras, near=0.02).mask.any()


@pytest.mark.parametrize("case", ["vertices-2d", "vertices-int", "nan-vertex", "faces-4", "faces-float",
                                  "face-too-large", "face-negative", "near-zero", "not-cameras"])
def test_bad_inputs_raise(case):
    vertices, faces = _cube()
    cameras = orbit_cameras(1, width=8, height=8)
    args = {"vertices": vertices, "faces": faces, "cameras": cameras, "near": 0.01}
    if case == "vertices-2d":
        args["vertices"] = vertices[:, :2]
    elif case == "vertices-int":
        args["vertices"] = vertices.long()
    elif case == "nan-vertex":
        args["vertices"] = vertices.clone().index_fill_(0, torch.tensor([3]), float("nan"))
    elif case == "faces-4":
        args["faces"] = torch.zeros(2, 4, dtype=torch.long)
    elif case == "faces-float":
        args["faces"] = faces.double()
    elif case == "face-too-large":
        args["faces"] = faces.clone().index_fill_(0, torch.tensor([0]), len(vertices))
    elif case == "face-negative":
        args["faces"] = faces.clone().index_fill_(0, torch.tensor([0]), -1)
    elif case == "near-zero":
        args["near"] = 0.0
    else:
        args["cameras"] = (cameras.viewmats, cameras.K)
    with pytest.raises(ValueError, match="rasterize_mesh"):
        rasterize_mesh(**args)


def test_interpolate_rejects_mismatched_inputs():
    vertices, faces = _cube()
    raster = rasterize_mesh(vertices, faces, orbit_cameras(1, width=16, height=16))
    with pytest.raises(ValueError, match="attributes"):
        interpolate(torch.rand(len(vertices)), faces, raster)
    with pytest.raises(ValueError, match="outside"):
        interpolate(torch.rand(3, 2), faces, raster)
    with pytest.raises(ValueError, match="face_id"):
        interpolate(vertices, faces[:2], raster)
    with pytest.raises(ValueError, match="MeshRaster"):
        interpolate(vertices, faces, raster.face_id)


def test_backend_choice():
    vertices, faces = _cube()
    cameras = orbit_cameras(1, width=16, height=16)
    assert "torch" in available_backends()
    with pytest.raises(ValueError, match="backend must be one of"):
        rasterize_mesh(vertices, faces, cameras, backend="opengl")
    auto, torch_ = (rasterize_mesh(vertices, faces, cameras, backend=b) for b in ("auto", "torch"))
    assert torch.equal(auto.face_id, torch_.face_id)  # CPU tensors: auto is the torch backend


@pytest.mark.parametrize("backend,hint", [
    ("pytorch3d", "INSTALL.md"),
    ("nvdiffrast", "pip install git+https://github.com/NVlabs/nvdiffrast"),
])
def test_unavailable_backend_says_how_to_get_it(backend, hint):
    if backend in available_backends():
        pytest.skip(f"{backend} is available here")
    vertices, faces = _cube()
    with pytest.raises(Gen3dError) as info:
        rasterize_mesh(vertices, faces, orbit_cameras(1, width=16, height=16), backend=backend)
    message = str(info.value)
    assert backend in message and "backend='torch'" in message and "works everywhere" in message
    installed = backend == "nvdiffrast" and importable("nvdiffrast.torch")
    assert ("CUDA GPU" if installed else hint) in message


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_torch_backend_runs_on_cuda():
    mesh = trimesh.creation.icosphere(subdivisions=3)
    vertices, faces = torch.tensor(mesh.vertices, dtype=torch.float32), torch.tensor(mesh.faces)
    cameras = orbit_cameras(2, width=48, height=40)
    cpu = rasterize_mesh(vertices, faces, cameras, backend="torch")
    gpu = rasterize_mesh(vertices.cuda(), faces.cuda(), cameras.to("cuda"), backend="torch")
    assert torch.equal(cpu.face_id, gpu.face_id.cpu())
    assert torch.allclose(cpu.bary, gpu.bary.cpu(), atol=1e-5)


# --- optional backends ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["pytorch3d", "nvdiffrast"])
def test_optional_backend_matches_torch(backend):
    if backend == "pytorch3d":
        pytest.importorskip("pytorch3d.renderer.mesh.rasterize_meshes")
    else:
        pytest.importorskip("nvdiffrast.torch")
        if not torch.cuda.is_available():
            pytest.skip("nvdiffrast needs a CUDA GPU")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = trimesh.creation.icosphere(subdivisions=3)
    noise = 1 + 0.1 * torch.rand(len(mesh.vertices), 1, generator=torch.Generator().manual_seed(0), dtype=F64)
    vertices = (torch.tensor(mesh.vertices) * noise).float().to(device)  # bumpy: self-occlusion
    faces = torch.tensor(mesh.faces).to(device)
    cameras = orbit_cameras(3, elevation=20.0, width=100, height=60).to(device)  # not multiples of 8
    reference = rasterize_mesh(vertices, faces, cameras, backend="torch")
    other = rasterize_mesh(vertices, faces, cameras, backend=backend)
    agree = reference.face_id == other.face_id
    assert agree.float().mean() >= 0.995
    assert (reference.bary - other.bary)[agree].abs().max() < 1e-4
