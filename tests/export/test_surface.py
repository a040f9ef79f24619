"""The one surface interface: Gaussians and fields through `extract_surface`, and the automatic level."""

import math

import numpy as np
import pytest
import torch

from gen3d.cameras import spherical_cameras
from gen3d.errors import Gen3dError
from gen3d.export.mesh import extract_mesh
from gen3d.export.surface import extract_surface, gaussian_silhouettes, silhouette_level
from gen3d.rendering.gaussian import render_gaussians
from gen3d.representations.fields import HashGridConfig, HashGridField
from gen3d.representations.gaussians import GaussianModel


def ball(n: int, radius: float, scale: float, opacity: float, seed: int = 0) -> GaussianModel:
    """n isotropic Gaussians of std `scale` with centers uniform in a ball."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(n, 3, generator=g)
    points = d / d.norm(dim=1, keepdim=True) * radius * torch.rand(n, 1, generator=g) ** (1 / 3)
    return GaussianModel.from_values(points, torch.full((n, 3), scale), opacity, 0.5)


def test_gaussian_silhouettes_are_what_the_rasterizer_renders():
    # A far camera with a narrow field of view is nearly orthographic; its pixel centers are the grid's columns.
    R, bound = 48, 1.0
    model = ball(400, 0.5, 0.06, 0.6)
    model.means.data += torch.tensor([0.0, 0.1, -0.15])  # off-center, so a flipped axis would show
    spacing = 2 * bound / (R - 1)
    distance = 400.0
    fovy = math.degrees(2 * math.atan(R * spacing / 2 / distance))
    cams = spherical_cameras(torch.zeros(1), torch.zeros(1), torch.tensor([distance]), torch.tensor([fovy]), R, R)
    alpha = render_gaussians(model, cams, backend="torch").alpha[0, ..., 0]  # [H, W]; camera at +x: right = +y, down = -z
    ortho = gaussian_silhouettes(model, R, bound)[0]  # [y, z]
    assert torch.abs(ortho - alpha.T.flip(1)).mean() < 0.01
    assert torch.abs(ortho - alpha.T).mean() > 0.05  # the comparison can tell orientations apart


@pytest.mark.parametrize("n, scale, opacity", [(3000, 0.04, 0.9), (300, 0.08, 0.5), (120, 0.1, 0.3)])
def test_auto_level_matches_the_rendered_silhouettes_from_dense_to_sparse(n, scale, opacity):
    model = ball(n, 0.5, scale, opacity)
    auto = extract_mesh(model, resolution=48, threshold="auto")
    assert auto.metadata["threshold_iou"] > 0.95
    # The level is the one the sweep picked, and the mesh reaches the rendered 50% opacity contour:
    # along each axis the solid's extent matches the rendered silhouette's to within about a cell.
    opacity_x = gaussian_silhouettes(model, 48, 1.0)[0] > 0.5
    axis = torch.linspace(-1, 1, 48)
    rendered = float(axis[opacity_x.any(1)].abs().max())
    assert abs(np.abs(auto.vertices[:, 1]).max() - rendered) < 2 * 2 / 47
    assert auto.is_watertight


def test_sparse_faint_gaussians_need_the_auto_level():
    model = ball(150, 0.5, 0.08, 0.12)  # renders opaque in the middle, but its density peaks at 0.56
    with pytest.raises(Gen3dError, match="Lower the mesh threshold"):
        extract_mesh(model, resolution=32, threshold=1.0)  # DreamGaussian's fixed level
    mesh = extract_mesh(model, resolution=32)
    assert len(mesh.faces) > 100 and mesh.metadata["threshold_iou"] > 0.85


def test_transparent_gaussians_have_no_surface():
    model = ball(20, 0.5, 0.05, 0.05)
    with pytest.raises(Gen3dError, match="nowhere more than 50% opaque"):
        extract_mesh(model, resolution=32)


def test_silhouette_level_maximizes_iou_exactly():
    g = torch.Generator().manual_seed(0)
    grid = torch.rand(10, 10, 10, generator=g)
    covered = torch.rand(3, 10, 10, generator=g) > 0.5
    tau, iou = silhouette_level(grid, covered)
    peaks = torch.stack([grid.amax(a) for a in range(3)])

    def iou_at(level):
        solid = peaks > level
        return float((solid & covered).sum() / (solid | covered).sum())

    best = max(iou_at(float(v) - 1e-7) for v in peaks.flatten())
    assert iou == pytest.approx(best) and iou_at(tau) == pytest.approx(best)
    with pytest.raises(ValueError, match="covered must be"):
        silhouette_level(grid, covered[:2])


def test_extract_surface_takes_every_representation():
    gaussians = extract_surface(ball(300, 0.5, 0.08, 0.8), resolution=32)
    field = HashGridField(HashGridConfig(num_levels=4, log2_hashmap_size=12, base_resolution=4, finest_resolution=16))
    surface = extract_surface(field, resolution=32)
    for mesh in (gaussians, surface):
        assert len(mesh.faces) > 100 and mesh.visual.vertex_colors.shape == (len(mesh.vertices), 4)
        assert mesh.metadata["threshold"] > 0 and 0 < mesh.metadata["threshold_iou"] <= 1
    with pytest.raises(ValueError, match="GaussianModel or a Field"):
        extract_surface(torch.zeros(3))
