"""Differentiable triangle-mesh rasterization: visible face, barycentrics and depth per pixel.

Cameras follow `gen3d.cameras`: OpenCV axes (x right, y down, z forward), world-to-camera
`viewmats`, K in pixels, pixel (column i, row j) centered at (i + 0.5, j + 0.5), images
[C, H, W, ...] with row 0 at the top.

A vertex p (camera space) projects to the screen point (u, v) = (K[0] . p, K[1] . p) / z. For a
face with screen corners s_0, s_1, s_2 at depths z_0, z_1, z_2 and a pixel center q, the screen
barycentrics are l_k = cross(s_{k+2} - s_{k+1}, q - s_{k+1}) / cross(s_1 - s_0, s_2 - s_0)
(indices mod 3), and since 1/z is affine in screen space the camera-space point seen at q has

    depth = 1 / sum_j (l_j / z_j),   bary_k = (l_k / z_k) * depth      (perspective-correct)

so that sum_k bary_k = 1 and the 3D point is sum_k bary_k p_k. Rasterization is split in two:

1. A discrete pass picks the visible face at every pixel center (no gradient): the backend.
2. An autograd pass recomputes bary and depth of the chosen (pixel, face) pairs from the vertices
   with the formulas above, so they are differentiable w.r.t. vertex positions (and cameras),
   as nvdiffrast's rasterize output is; the face choice itself is piecewise constant.

Backends of the discrete pass (`available_backends`):

- ``"torch"``: pure torch, any device, deterministic. For every (camera, face) pair the pixel
  centers inside the face's screen bounding box are enumerated in chunks; a center q is inside
  when the three edge functions E_k(q) = cross(d_k, q - e_k) (d_k the edge vector, e_k its
  lexicographically smaller endpoint, signs flipped so that the face's area is positive) are all
  > 0, or = 0 on a *top-left* edge: one with d_k.y < 0, or d_k.y = 0 and d_k.x > 0 (after the
  flip; y points down), which is the coverage the center nudged to q + (eps, eps^2) would get.
  Two faces sharing an edge traverse it in opposite directions and compute exactly negated edge
  functions (same endpoint, negated d), so a center on the edge belongs to exactly one of them
  (no cracks, no double coverage), also when vertices on UV seams are duplicated; E is exactly 0
  at a face's own vertices, so a center on a vertex belongs to one face of a closed fan. Depth per
  candidate is 1 / sum(l_j / z_j); the nearest candidate wins, exact depth ties go to the smaller
  face id. The discrete pass runs in float64 (float32 on MPS, which has no float64).
- ``"pytorch3d"``: `pytorch3d.renderer.mesh.rasterize_meshes.rasterize_meshes` on vertices in its
  NDC screen convention (+x left, +y up, the shorter image side spans [-1, 1], z = view depth).
  Its coverage test is strict (centers exactly on an edge are in neither face).
- ``"nvdiffrast"``: `nvdiffrast.torch.rasterize` (CUDA context) on OpenGL clip-space positions
  built from K; CUDA tensors only.
- ``"auto"``: nvdiffrast for CUDA tensors when available, else pytorch3d for CUDA tensors when
  available, else torch (pytorch3d's CPU rasterizer tests every face at every pixel, which is far
  slower than the torch backend on meshes of useful size).

No back-face culling (both sides render). Faces with a vertex closer than `near` (z < near) are
dropped for that camera, not clipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gen3d.cameras import Cameras
from gen3d.errors import Gen3dError, MissingExtra, importable
from gen3d.ops.boxes import box_cells

BACKENDS = ("auto", "torch", "pytorch3d", "nvdiffrast")
_CHUNK = 1 << 16  # candidate (pair, pixel) tests per chunk of the torch backend: ~16 MB of temporaries (cache-friendly)
_NVDIFFRAST_CONTEXTS: dict[torch.device, object] = {}


@dataclass
class MeshRaster:
    """The visible face at every pixel center of C cameras of size H x W."""

    face_id: Tensor  # [C, H, W] int64 index of the visible face, -1 where no face
    bary: Tensor  # [C, H, W, 3] perspective-correct barycentrics (weights of faces[f, 0..2]), 0 where no face
    depth: Tensor  # [C, H, W] camera-space z of the visible point, 0 where no face

    @property
    def mask(self) -> Tensor:  # [C, H, W] bool
        return self.face_id >= 0


def available_backends() -> list[str]:
    """Backends usable here: "torch" always, "pytorch3d" if it imports, "nvdiffrast" if it imports and CUDA is available."""
    names = ["torch"]
    if importable("pytorch3d.renderer.mesh.rasterize_meshes"):
        names.append("pytorch3d")
    if importable("nvdiffrast.torch") and torch.cuda.is_available():
        names.append("nvdiffrast")
    return names


def rasterize_mesh(vertices: Tensor, faces: Tensor, cameras: Cameras, backend: str = "auto",
                   near: float = 1e-2) -> MeshRaster:
    """Rasterize a triangle mesh into every camera (see the module docstring for the math).

    vertices: [V, 3] world positions (float); faces: [F, 3] vertex indices (int64); `cameras` on
    the vertices' device. Faces with a vertex at camera-space z < `near` are dropped for that
    camera. `bary` and `depth` are differentiable w.r.t. `vertices` (and the cameras).
    """
    faces = _check_mesh(vertices, faces, cameras, backend, near)
    backend = _choose_backend(backend, vertices.device)
    pick = {"torch": _face_ids_torch, "pytorch3d": _face_ids_pytorch3d, "nvdiffrast": _face_ids_nvdiffrast}[backend]
    face_id = pick(vertices.detach(), faces, cameras, near)
    bary, depth = _barycentrics(vertices, faces, cameras, face_id)
    return MeshRaster(face_id, bary, depth)


def interpolate(attributes: Tensor, faces: Tensor, raster: MeshRaster) -> Tensor:
    """Per-vertex attributes [V, D] at every pixel: sum_k bary_k attributes[faces[f, k]] -> [C, H, W, D].

    0 where no face is visible. Differentiable w.r.t. `attributes` and, through `raster.bary`,
    the vertex positions.
    """
    if not isinstance(raster, MeshRaster):
        raise ValueError(f"interpolate: raster must be a MeshRaster, got {type(raster).__name__}")
    if not isinstance(attributes, Tensor) or attributes.dim() != 2 or not attributes.is_floating_point():
        raise ValueError(f"interpolate: attributes must be a float [V, D] tensor, got "
                         f"{getattr(attributes, 'dtype', type(attributes).__name__)} {tuple(getattr(attributes, 'shape', ()))}")
    if not isinstance(faces, Tensor) or faces.dim() != 2 or faces.shape[1] != 3 or faces.is_floating_point():
        raise ValueError(f"interpolate: faces must be an integer [F, 3] tensor, got {tuple(getattr(faces, 'shape', ()))}")
    if faces.numel() and (int(faces.min()) < 0 or int(faces.max()) >= attributes.shape[0]):
        raise ValueError(f"interpolate: faces index vertices outside [0, {attributes.shape[0]})")
    if raster.face_id.numel() and int(raster.face_id.max()) >= faces.shape[0]:
        raise ValueError(f"interpolate: raster.face_id reaches face {int(raster.face_id.max())} but faces has {faces.shape[0]}")
    C, H, W = raster.face_id.shape
    D = attributes.shape[1]
    dtype = torch.promote_types(attributes.dtype, raster.bary.dtype)
    flat = raster.face_id.reshape(-1)
    pix = (flat >= 0).nonzero().squeeze(1)
    corners = attributes.to(dtype)[faces.long()[flat[pix]]]  # [n, 3, D]
    bary = raster.bary.reshape(-1, 3)[pix].to(dtype)
    values = (bary[:, :, None] * corners).sum(1)
    out = attributes.new_zeros(C * H * W, D, dtype=dtype).index_put((pix,), values)
    return out.reshape(C, H, W, D)


# --- inputs and backend choice ----------------------------------------------------------------------

def _check_mesh(vertices: Tensor, faces: Tensor, cameras: Cameras, backend: str, near: float) -> Tensor:
    """Validate the arguments of `rasterize_mesh`; returns faces as int64."""
    def fail(msg: str):
        raise ValueError(f"rasterize_mesh: {msg}")

    if not isinstance(vertices, Tensor) or vertices.dim() != 2 or vertices.shape[1] != 3:
        fail(f"vertices must be a [V, 3] tensor, got {tuple(getattr(vertices, 'shape', ()))}")
    if not vertices.is_floating_point():
        fail(f"vertices must be floating point, got {vertices.dtype}")
    if not bool(torch.isfinite(vertices).all()):
        fail("vertices contain NaN or infinite values")
    if not isinstance(faces, Tensor) or faces.dim() != 2 or faces.shape[1] != 3:
        fail(f"faces must be an [F, 3] tensor, got {tuple(getattr(faces, 'shape', ()))}")
    if faces.is_floating_point() or faces.dtype == torch.bool:
        fail(f"faces must hold integer vertex indices, got {faces.dtype}")
    if faces.device != vertices.device:
        fail(f"faces ({faces.device}) and vertices ({vertices.device}) must be on one device")
    if faces.numel() and (int(faces.min()) < 0 or int(faces.max()) >= vertices.shape[0]):
        fail(f"faces index vertices outside [0, {vertices.shape[0]}): min {int(faces.min())}, max {int(faces.max())}")
    if not isinstance(cameras, Cameras):
        fail(f"cameras must be a gen3d.cameras.Cameras, got {type(cameras).__name__}")
    if cameras.device != vertices.device:
        fail(f"cameras ({cameras.device}) and vertices ({vertices.device}) must be on one device")
    if not (near > 0 and near < float("inf")):
        fail(f"near must be a positive finite distance, got {near}")
    if backend not in BACKENDS:
        fail(f"backend must be one of {BACKENDS}, got {backend!r}")
    return faces.long()


def _choose_backend(backend: str, device: torch.device) -> str:
    """The backend to run; imports an optional package only when it may be used."""
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return "torch"
    if backend == "auto":
        usable = available_backends()
        return next((name for name in ("nvdiffrast", "pytorch3d") if name in usable), "torch")
    if backend == "pytorch3d":
        if "pytorch3d" not in available_backends():
            raise MissingExtra(
                "rasterize_mesh: backend='pytorch3d' needs the optional package pytorch3d, which is not installed; "
                "build it from source as its INSTALL.md says "
                "(https://github.com/facebookresearch/pytorch3d/blob/main/INSTALL.md), or use backend='torch', "
                "which works everywhere")
        return backend
    if not importable("nvdiffrast.torch"):
        raise MissingExtra(
            "rasterize_mesh: backend='nvdiffrast' needs the optional package nvdiffrast, which is not installed; "
            "install it with: pip install git+https://github.com/NVlabs/nvdiffrast, or use backend='torch', "
            "which works everywhere")
    if not torch.cuda.is_available():
        raise Gen3dError("rasterize_mesh: backend='nvdiffrast' needs a CUDA GPU and none is available; "
                         "use backend='torch', which works everywhere")
    if device.type != "cuda":
        raise ValueError(f"rasterize_mesh: backend='nvdiffrast' needs CUDA tensors, got device {device}")
    return backend


# --- shared geometry -------------------------------------------------------------------------------

def _to_camera(vertices: Tensor, cameras: Cameras, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Camera-space vertices [C, V, 3] and the rows K[:2] [C, 2, 3] in `dtype` (so u z = K[0] . p, v z = K[1] . p)."""
    viewmats = cameras.viewmats.to(dtype)
    cam = torch.einsum("cij,vj->cvi", viewmats[:, :3, :3], vertices.to(dtype)) + viewmats[:, None, :3, 3]
    return cam, cameras.K[:, :2].to(dtype)


def _cross(a: Tensor, b: Tensor) -> Tensor:
    """2D cross product a.x b.y - a.y b.x over the last dimension."""
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


def _barycentrics(vertices: Tensor, faces: Tensor, cameras: Cameras, face_id: Tensor) -> tuple[Tensor, Tensor]:
    """Perspective-correct bary [C, H, W, 3] and depth [C, H, W] of the chosen faces, by autograd."""
    C, H, W = face_id.shape
    flat = face_id.reshape(-1)
    pix = (flat >= 0).nonzero().squeeze(1)
    c, y, x = pix // (H * W), pix % (H * W) // W, pix % W
    cam, K2 = _to_camera(vertices, cameras, vertices.dtype)
    p = cam[c[:, None], faces[flat[pix]]]  # [n, 3, 3] camera-space corners
    z = p[..., 2]
    s = torch.einsum("nij,nkj->nki", K2[c], p) / z[..., None]  # [n, 3, 2] screen corners
    q = torch.stack([x, y], -1).to(vertices.dtype)[:, None, :] + 0.5  # [n, 1, 2] pixel centers
    nxt, prv = s.roll(-1, 1), s.roll(-2, 1)  # s_{k+1}, s_{k+2}
    area = _cross(s[:, 1] - s[:, 0], s[:, 2] - s[:, 0])
    lam = _cross(prv - nxt, q - nxt) / area[:, None]  # [n, 3] screen barycentrics
    w = lam / z
    inv_depth = w.sum(1)
    bary = w / inv_depth[:, None]
    out_bary = vertices.new_zeros(C * H * W, 3).index_put((pix,), bary).reshape(C, H, W, 3)
    out_depth = vertices.new_zeros(C * H * W).index_put((pix,), 1.0 / inv_depth).reshape(C, H, W)
    return out_bary, out_depth


# --- backends: the visible face per pixel ----------------------------------------------------------

@torch.no_grad()
def _face_ids_torch(vertices: Tensor, faces: Tensor, cameras: Cameras, near: float) -> Tensor:
    """Visible face [C, H, W] by edge functions and a z-buffer (see the module docstring)."""
    C, H, W = len(cameras), cameras.height, cameras.width
    device = vertices.device
    dtype = torch.float32 if device.type == "mps" else torch.float64
    face_id = torch.full((C * H * W,), -1, dtype=torch.long, device=device)

    cam, K2 = _to_camera(vertices, cameras, dtype)
    z = cam[..., 2]
    screen = torch.einsum("cij,cvj->cvi", K2, cam) / z.clamp_min(near)[..., None]  # [C, V, 2]
    pair_cam, pair_face = (z[:, faces] >= near).all(-1).nonzero(as_tuple=True)  # kept (camera, face) pairs
    corners = faces[pair_face]
    s = screen[pair_cam[:, None], corners]  # [N, 3, 2]
    inv_z = 1.0 / z[pair_cam[:, None], corners]  # [N, 3]

    # Pixel centers i + 0.5 within the screen bounding box, clamped to the image.
    lo, hi = s.amin(1), s.amax(1)
    size = s.new_tensor([W, H])
    first = (lo - 0.5).ceil().clamp(min=s.new_zeros(2), max=size).long()  # [N, 2]
    last = (hi - 0.5).floor().clamp(min=s.new_full((2,), -1.0), max=size - 1).long()
    extent = (last - first + 1).clamp_min(0)
    area = _cross(s[:, 1] - s[:, 0], s[:, 2] - s[:, 0])
    ok = (area != 0) & (extent[:, 0] * extent[:, 1] > 0)
    s, inv_z, area, first, extent = s[ok], inv_z[ok], area[ok], first[ok], extent[ok]
    pair_cam, pair_face = pair_cam[ok], pair_face[ok]
    if len(area) == 0:
        return face_id.reshape(C, H, W)

    # Edge k runs from s_{k+1} to s_{k+2}: E_k(q) = cross(d, q - e) = d.x (q.y - e.y) - d.y (q.x - e.x),
    # d = sign(area) (s_{k+2} - s_{k+1}) and e the edge's lexicographically smaller endpoint. Both
    # faces of a shared edge then evaluate exactly negated values, and E is exactly 0 at a vertex.
    # Inside: every E_k > 0, or = 0 on a top-left edge; sum_k E_k = |area|.
    start, end = s.roll(-1, 1), s.roll(-2, 1)
    d = (end - start) * area.sign()[:, None, None]
    start_first = (start[..., 0] < end[..., 0]) | ((start[..., 0] == end[..., 0]) & (start[..., 1] < end[..., 1]))
    e = torch.where(start_first[..., None], start, end)
    top_left = (d[..., 1] < 0) | ((d[..., 1] == 0) & (d[..., 0] > 0))
    depth_w = inv_z / area.abs()[:, None]  # 1/z at q = sum_k E_k(q) inv_z_k / |area|
    table = torch.cat([d[..., 0], d[..., 1], e[..., 0], e[..., 1], top_left.to(dtype)], 1)  # [N, 15]
    image_start = pair_cam * (H * W)  # [N] first pixel of each pair's image

    pixels, face_list, inv_depths = [], [], []
    for pair, x, y in box_cells(first, extent, _CHUNK):  # candidates (pair, pixel in its box) in chunks
        t = table.index_select(0, pair)
        qx, qy = x.to(dtype)[:, None] + 0.5, y.to(dtype)[:, None] + 0.5
        E = t[:, 0:3] * (qy - t[:, 9:12]) - t[:, 3:6] * (qx - t[:, 6:9])
        inside = ((E > 0) | ((E == 0) & (t[:, 12:15] > 0))).all(1).nonzero().squeeze(1)
        pixels.append((image_start.index_select(0, pair) + y * W + x).index_select(0, inside))
        pair = pair.index_select(0, inside)
        face_list.append(pair_face.index_select(0, pair))
        inv_depths.append((E.index_select(0, inside) * depth_w.index_select(0, pair)).sum(1))
    pix, face, inv_depth = torch.cat(pixels), torch.cat(face_list), torch.cat(inv_depths)

    # z-buffer: the largest 1/z per pixel wins, then the smallest face id among exact ties.
    best = torch.zeros(C * H * W, dtype=dtype, device=device).scatter_reduce(
        0, pix, inv_depth, "amax", include_self=False)
    win = inv_depth == best[pix]
    face_id.scatter_reduce_(0, pix[win], face[win], "amin", include_self=False)
    return face_id.reshape(C, H, W)


@torch.no_grad()
def _face_ids_pytorch3d(vertices: Tensor, faces: Tensor, cameras: Cameras, near: float) -> Tensor:
    """Visible face [C, H, W] from pytorch3d's rasterizer, one mesh per camera holding its kept faces.

    pytorch3d's NDC: +x left, +y up, the shorter image side spans [-1, 1]; its output pixel (row
    j, column i) is centered at ((W - 2 (i + 0.5)) / S, (H - 2 (j + 0.5)) / S), S = min(H, W), so a
    screen point (u, v) maps to ((W - 2u) / S, (H - 2v) / S) and rows need no flip.
    """
    from pytorch3d.renderer.mesh.rasterize_meshes import rasterize_meshes
    from pytorch3d.structures import Meshes

    C, H, W = len(cameras), cameras.height, cameras.width
    cam, K2 = _to_camera(vertices, cameras, torch.float32)
    z = cam[..., 2]
    screen = torch.einsum("cij,cvj->cvi", K2, cam) / z.clamp_min(near)[..., None]
    S = min(H, W)
    ndc = torch.stack([(W - 2 * screen[..., 0]) / S, (H - 2 * screen[..., 1]) / S, z], -1)  # [C, V, 3]
    kept = [k.nonzero().squeeze(1) for k in (z[:, faces] >= near).all(-1)]
    lookup = torch.cat(kept)  # packed face index -> face id
    if len(lookup) == 0:
        return torch.full((C, H, W), -1, dtype=torch.long, device=vertices.device)
    meshes = Meshes(verts=list(ndc), faces=[faces[k] for k in kept])
    pix_to_face, _, _, _ = rasterize_meshes(meshes, image_size=(H, W), blur_radius=0.0, faces_per_pixel=1,
                                            perspective_correct=True)
    packed = pix_to_face[..., 0]
    return torch.where(packed >= 0, lookup[packed.clamp_min(0)], -1)


@torch.no_grad()
def _face_ids_nvdiffrast(vertices: Tensor, faces: Tensor, cameras: Cameras, near: float) -> Tensor:
    """Visible face [C, H, W] from nvdiffrast's CUDA rasterizer, one call per camera with its kept faces.

    Clip space from K for an image padded to multiples of 8 (W8 x H8; the CUDA rasterizer needs
    that): x = 2 (K[0] . p) / W8 - z, y = z - 2 (K[1] . p) / H8, w = z, so x/w = 2u/W8 - 1 and y/w =
    1 - 2v/H8 (OpenGL: y up, nvdiffrast's row 0 at the bottom: rows are flipped, then cropped to
    H x W); z maps [n, f] to [-1, 1] with n, f bracketing the camera's vertex depths.
    """
    import nvdiffrast.torch as dr

    C, H, W = len(cameras), cameras.height, cameras.width
    H8, W8 = -(-H // 8) * 8, -(-W // 8) * 8
    cam, K2 = _to_camera(vertices, cameras, torch.float32)
    z = cam[..., 2]
    uz, vz = torch.einsum("cij,cvj->cvi", K2, cam).unbind(-1)
    keep = (z[:, faces] >= near).all(-1)
    context = _NVDIFFRAST_CONTEXTS.get(vertices.device)
    if context is None:
        context = _NVDIFFRAST_CONTEXTS[vertices.device] = dr.RasterizeCudaContext(device=vertices.device)
    face_id = torch.full((C, H, W), -1, dtype=torch.long, device=vertices.device)
    for c in range(C):
        kept = keep[c].nonzero().squeeze(1)
        if len(kept) == 0:
            continue
        zc = z[c]
        n = torch.clamp(0.5 * zc[zc >= near].amin(), min=near)
        f = 2.0 * zc.amax() + 1.0
        clip = torch.stack([2 * uz[c] / W8 - zc, zc - 2 * vz[c] / H8, (f + n) / (f - n) * zc - 2 * f * n / (f - n), zc], -1)
        rast, _ = dr.rasterize(context, clip[None].contiguous(), faces[kept].int().contiguous(), resolution=[H8, W8])
        tri = rast[0, :, :, 3].flip(0)[:H, :W].round().long() - 1  # triangle id + 1, 0 where empty
        face_id[c] = torch.where(tri >= 0, kept[tri.clamp_min(0)], -1)
    return face_id
