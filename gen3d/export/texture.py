"""UV atlas and baked albedo texture for a mesh: xatlas unwrapping, texel rasterization, seam padding.

The texture of a mesh extracted from a representation is baked by asking the representation for
its color at each texel's surface point:

1. `unwrap`: xatlas (Young, "xatlas", a port of thekla_atlas) cuts the mesh into charts and packs
   them into [0, 1]^2; vertices on a cut are split, so the returned mesh has one uv per vertex.
2. `rasterize_uv`: every texel center of a `size` x `size` image is located in the chart triangle
   that covers it (barycentric coordinates from the triangle's uv corners), giving its 3D point.
3. `bake`: colors from `color_fn(points)` fill the covered texels; then every empty texel takes the
   color of its nearest covered texel (a Euclidean distance transform), so bilinear filtering and
   mipmaps at chart borders never blend in the empty background: no seams.

Image convention: row 0 is v = 1 (glTF and OBJ put v = 0 at the bottom of the image).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor

from gen3d.errors import Gen3dError
from gen3d.ops.boxes import box_cells


def unwrap(vertices: np.ndarray, faces: np.ndarray, resolution: int = 1024, padding: int = 2):
    """xatlas charts of a triangle mesh -> (vmapping [V'], faces [F, 3], uv [V', 2] in [0, 1]).

    vmapping[i] is the input vertex of output vertex i (vertices on chart cuts are duplicated);
    `resolution` and `padding` (texels between charts) tell the packer the texture it packs for.
    """
    try:
        import xatlas
    except ImportError:
        raise Gen3dError("UV unwrapping needs xatlas: pip install xatlas") from None
    if len(faces) == 0:
        raise Gen3dError("cannot unwrap a mesh without faces")
    atlas = xatlas.Atlas()
    atlas.add_mesh(np.ascontiguousarray(vertices, np.float32), np.ascontiguousarray(faces, np.uint32))
    pack = xatlas.PackOptions()
    pack.resolution, pack.padding, pack.bilinear = resolution, padding, True
    atlas.generate(pack_options=pack)
    vmapping, new_faces, uv = atlas[0]
    return vmapping.astype(np.int64), new_faces.astype(np.int64), uv.astype(np.float32)


def rasterize_uv(uv: Tensor, faces: Tensor, size: int, chunk: int = 1 << 22) -> tuple[Tensor, Tensor, Tensor]:
    """The texels of a `size` x `size` image covered by the uv triangles.

    uv: [V, 2] in [0, 1]; faces: [F, 3]. Returns (texel index [T] into the flattened image (row 0 is
    v = 1), face [T], barycentric weights [T, 3]) for every covered texel center; a texel covered by
    two triangles (only on shared edges) keeps the first.
    """
    uv = uv.double()
    tri = uv[faces] * size  # [F, 3, 2] in texel units, x = u * size, y = v * size
    lo = tri.min(1).values.floor().clamp(0, size - 1).long()  # [F, 2]
    hi = tri.max(1).values.ceil().clamp(0, size - 1).long()
    texels, face_ids, weights = [], [], []
    for f, x, y in box_cells(lo, hi - lo + 1, chunk):  # candidates in chunks: (face, texel-in-bbox) pairs
        p = torch.stack([x.double() + 0.5, y.double() + 0.5], -1)  # texel centers
        a, b, c = tri[f, 0], tri[f, 1], tri[f, 2]
        v0, v1, v2 = b - a, c - a, p - a
        den = v0[:, 0] * v1[:, 1] - v1[:, 0] * v0[:, 1]
        ok = den.abs() > 1e-12
        den = torch.where(ok, den, torch.ones_like(den))
        l1 = (v2[:, 0] * v1[:, 1] - v1[:, 0] * v2[:, 1]) / den
        l2 = (v0[:, 0] * v2[:, 1] - v2[:, 0] * v0[:, 1]) / den
        l0 = 1 - l1 - l2
        inside = ok & (l0 >= -1e-9) & (l1 >= -1e-9) & (l2 >= -1e-9)
        row = (size - 1) - y  # row 0 is v = 1
        texels.append((row * size + x)[inside])
        face_ids.append(f[inside])
        weights.append(torch.stack([l0, l1, l2], -1)[inside])
    texel, face, bary = torch.cat(texels), torch.cat(face_ids), torch.cat(weights)
    texel, first = _first_occurrence(texel)
    return texel, face[first], bary[first].float()


def _first_occurrence(values: Tensor) -> tuple[Tensor, Tensor]:
    """Unique values and the index of the first occurrence of each."""
    unique, inverse = torch.unique(values, return_inverse=True)
    first = torch.full((len(unique),), len(values), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(len(values)), reduce="amin")
    return unique, first


def pad_texture(image: np.ndarray, covered: np.ndarray) -> np.ndarray:
    """Every texel outside `covered` [H, W] takes the value of its nearest covered texel (image [H, W, C])."""
    from scipy.ndimage import distance_transform_edt

    if not covered.any():
        return image
    _, (rows, cols) = distance_transform_edt(~covered, return_indices=True)
    return image[rows, cols]


@torch.no_grad()
def bake(vertices: np.ndarray, faces: np.ndarray, color_fn: Callable[[Tensor], Tensor], size: int = 1024,
         device: torch.device | str = "cpu", chunk: int = 65536) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unwrap a mesh and bake `color_fn` into a texture.

    vertices [V, 3] and faces [F, 3] of the mesh; color_fn: points [P, 3] (torch, on `device`) -> rgb
    [P, 3] in [0, 1]. Returns (vertices [V', 3], faces [F, 3], uv [V', 2], texture [size, size, 3]
    uint8) of the unwrapped mesh.
    """
    vmapping, new_faces, uv = unwrap(vertices, faces, resolution=size)
    new_vertices = np.asarray(vertices, np.float32)[vmapping]
    texel, face, bary = rasterize_uv(torch.from_numpy(uv), torch.from_numpy(new_faces), size)
    corners = torch.from_numpy(new_vertices)[torch.from_numpy(new_faces)[face]]  # [T, 3, 3]
    points = (bary[:, :, None] * corners).sum(1)  # [T, 3] surface point of each texel
    colors = torch.cat([color_fn(p.to(device)).float().clamp(0, 1).cpu() for p in points.split(chunk)]) \
        if len(points) else torch.zeros(0, 3)
    image = np.zeros((size * size, 3), np.float32)
    image[texel.numpy()] = colors.numpy()
    covered = np.zeros(size * size, bool)
    covered[texel.numpy()] = True
    image = pad_texture(image.reshape(size, size, 3), covered.reshape(size, size))
    return new_vertices, new_faces, uv, (image * 255).round().astype(np.uint8)


def textured_mesh(vertices: np.ndarray, faces: np.ndarray, uv: np.ndarray, texture: np.ndarray):
    """A trimesh.Trimesh with uv coordinates and a PBR material whose base color is `texture` [H, W, 3] uint8."""
    import trimesh
    from PIL import Image

    material = trimesh.visual.material.PBRMaterial(baseColorTexture=Image.fromarray(texture), metallicFactor=0.0,
                                                   roughnessFactor=1.0)
    visual = trimesh.visual.TextureVisuals(uv=uv, material=material)
    return trimesh.Trimesh(vertices, faces, visual=visual, process=False)
