import itertools
import math

import numpy as np
import pytest
import torch

from gen3d.errors import Gen3dError
from gen3d.export.field_mesh import auto_threshold, density_grid_of, extract_field_mesh
from gen3d.representations.fields import Field, FieldOutput

RES = 48
CELL = 2.0 / (RES - 1)


class RadialField(Field):
    """A ball: density profile(|x|) [P], albedo (0.5 + 0.5 x, 0.5 + 0.5 y, 0.2) [P, 3] (or `albedo(x)`)."""

    def __init__(self, profile, albedo=None, feature_dim=3):
        super().__init__()
        self.profile, self.albedo, self.feature_dim = profile, albedo, feature_dim

    def forward(self, points):
        r = points.norm(dim=-1)
        if self.albedo is not None:
            features = self.albedo(points)
        else:
            features = torch.stack([0.5 + 0.5 * points[:, 0], 0.5 + 0.5 * points[:, 1], torch.full_like(r, 0.2)], -1)
        return FieldOutput(self.profile(r), features[:, : self.feature_dim])


# density profiles sigma(r) at scale s
PROFILES = {
    # constant 50 inside r = 0.5 with a soft edge 0.01 wide (a well-trained solid)
    "soft_ball": lambda s: lambda r: s * 50.0 * torch.sigmoid((0.5 - r) / 0.01),
    # a cone 20 (1 - r / 0.8): the opaque disk grows with the density
    "cone": lambda s: lambda r: s * 20.0 * (1.0 - r / 0.8).clamp_min(0.0),
    # a power-law halo 40 / (1 + (r / 0.1)^4): fog whose 50%-opacity edge moves far out with the scale
    "halo": lambda s: lambda r: s * 40.0 / (1.0 + (r / 0.1) ** 4),
}


def opaque_radius(profile) -> float:
    """Radius of the disk where the ball's projection is >= 50% opaque: integral of sigma along the chord = ln 2."""
    z = torch.linspace(-1.0, 1.0, 20001, dtype=torch.float64)

    def depth(p):
        return torch.trapezoid(profile(torch.sqrt(p * p + z * z)), z).item()

    lo, hi = 0.0, 1.0
    assert depth(lo) > math.log(2)
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if depth(mid) > math.log(2) else (lo, mid)
    return lo


def radius(mesh) -> float:
    return (3.0 * mesh.volume / (4.0 * math.pi)) ** (1.0 / 3.0)


def test_density_grid_is_indexed_xyz_and_chunked():
    fn = lambda p: p[:, 0] + 10.0 * p[:, 1] + 100.0 * p[:, 2]
    grid = density_grid_of(fn, resolution=5, bound=2.0)  # nodes -2, -1, 0, 1, 2
    assert grid.shape == (5, 5, 5)
    assert grid[4, 1, 2].item() == pytest.approx(2.0 - 10.0 + 0.0)
    assert grid[0, 3, 4].item() == pytest.approx(-2.0 + 10.0 + 200.0)
    assert torch.equal(density_grid_of(fn, 5, 2.0, chunk=7), grid)
    with pytest.raises(ValueError, match="values \\[P\\]"):
        density_grid_of(lambda p: p, resolution=4)
    with pytest.raises(ValueError, match="resolution"):
        density_grid_of(fn, resolution=1)
    with pytest.raises(ValueError, match="chunk"):
        density_grid_of(fn, resolution=4, chunk=0)


# (the halo at x 0.1 is left out: its opaque core is 1.5 cells wide at this resolution)
@pytest.mark.parametrize("name, scale", [(n, s) for n in PROFILES for s in (0.1, 1.0, 100.0)
                                         if (n, s) != ("halo", 0.1)])
def test_auto_threshold_recovers_the_ball_that_renders_50_percent_opaque(name, scale):
    profile = PROFILES[name](scale)
    mesh = extract_field_mesh(RadialField(profile), resolution=RES)
    assert mesh.is_watertight and mesh.volume > 0 and len(mesh.split(only_watertight=False)) == 1
    assert mesh.metadata["threshold_iou"] > 0.99  # the solid's silhouettes reproduce the rendered ones
    assert abs(radius(mesh) - opaque_radius(profile)) < CELL, (radius(mesh), opaque_radius(profile))
    r = np.linalg.norm(mesh.vertices, axis=1)
    assert r.max() - r.min() < 2.5 * CELL  # a ball, not a box or a shell


def test_a_fixed_threshold_tuned_at_one_scale_fails_at_others():
    # tuned on the first run: the automatic level at scale 1
    tuned = {name: extract_field_mesh(RadialField(mk(1.0)), resolution=RES).metadata["threshold"]
             for name, mk in PROFILES.items()}
    # x 0.1: the solid ball's density (5) never reaches the level, though it renders opaque
    with pytest.raises(Gen3dError, match="Lower the mesh threshold or use threshold='auto'"):
        extract_field_mesh(RadialField(PROFILES["soft_ball"](0.1)), resolution=RES, threshold=tuned["soft_ball"])
    # x 0.1: the cone's mesh is far smaller than what renders opaque
    cone = PROFILES["cone"](0.1)
    fixed = extract_field_mesh(RadialField(cone), resolution=RES, threshold=tuned["cone"])
    assert radius(fixed) < opaque_radius(cone) - 5 * CELL
    # x 100: the halo renders opaque much further out than the fixed level reaches
    halo = PROFILES["halo"](100.0)
    fixed = extract_field_mesh(RadialField(halo), resolution=RES, threshold=tuned["halo"])
    assert radius(fixed) < opaque_radius(halo) - 4 * CELL
    auto = extract_field_mesh(RadialField(halo), resolution=RES)
    assert auto.metadata["threshold"] != pytest.approx(tuned["halo"], rel=0.3)  # the level moved with the field


def test_auto_threshold_is_the_exact_iou_maximizer():
    g = torch.Generator().manual_seed(0)
    grid = torch.rand(9, 9, 9, generator=g) ** 4 * 30.0 * (torch.rand(9, 9, 9, generator=g) > 0.4)
    spacing = 0.1
    tau, iou = auto_threshold(grid, spacing)

    target = [(grid.sum(a) * spacing > math.log(2)) for a in range(3)]
    peaks = [grid.amax(a) for a in range(3)]

    def iou_at(t):
        inter = sum(int(((p > t) & m).sum()) for p, m in zip(peaks, target))
        union = sum(int(((p > t) | m).sum()) for p, m in zip(peaks, target))
        return inter / union

    levels = torch.cat([p.flatten() for p in peaks]).unique().tolist()  # ascending
    candidates = [levels[0] / 2] + [(a + b) / 2 for a, b in itertools.pairwise(levels)]
    best = max(iou_at(t) for t in candidates)
    assert 0.3 < best < 1.0  # a non-trivial case
    assert iou == pytest.approx(best) and iou_at(tau) == pytest.approx(best)
    assert tau in [pytest.approx(c) for c in candidates]


def test_empty_or_transparent_fields_raise_a_clear_error():
    for profile in (lambda r: torch.zeros_like(r), lambda r: 0.3 * (r < 0.5)):  # the second peaks at 26% opacity
        with pytest.raises(Gen3dError, match="no ray .* reaches 50% opacity"):
            extract_field_mesh(RadialField(profile), resolution=24)


def test_vertex_colors_are_the_albedo_at_the_vertices_clamped():
    mesh = extract_field_mesh(RadialField(PROFILES["soft_ball"](1.0)), resolution=32)
    v = mesh.vertices
    expected = np.stack([0.5 + 0.5 * v[:, 0], 0.5 + 0.5 * v[:, 1], np.full(len(v), 0.2)], -1) * 255
    colors = mesh.visual.vertex_colors
    assert colors.shape == (len(v), 4) and (colors[:, 3] == 255).all()
    assert np.abs(colors[:, :3] - expected).max() <= 1.0
    loud = RadialField(PROFILES["soft_ball"](1.0), albedo=lambda p: 3.0 * p)  # outside [0, 1]
    mesh = extract_field_mesh(loud, resolution=32)
    colors, v = mesh.visual.vertex_colors[:, :3].astype(float), mesh.vertices
    assert np.abs(colors - np.clip(3.0 * v, 0, 1) * 255).max() <= 1.0
    assert colors.min() == 0 and colors.max() == 255


def test_color_fn_maps_other_features():
    latent = RadialField(PROFILES["soft_ball"](1.0), albedo=lambda p: torch.cat([p, p], -1), feature_dim=6)
    with pytest.raises(ValueError, match="color_fn"):
        extract_field_mesh(latent, resolution=16)
    mesh = extract_field_mesh(latent, resolution=16, color_fn=lambda f: f[:, 3:].abs())
    assert np.abs(mesh.visual.vertex_colors[:, :3] / 255.0 - np.abs(mesh.vertices)).max() < 0.01


class TwoBalls(Field):
    """A solid ball of radius 0.5 and a small one of radius 0.08 around (0.8, 0.8, 0.8), gray."""

    def forward(self, points):
        density = 50.0 * torch.sigmoid((0.5 - points.norm(dim=-1)) / 0.01) \
            + 50.0 * torch.sigmoid((0.08 - (points - 0.8).norm(dim=-1)) / 0.01)
        return FieldOutput(density, torch.full((len(points), 3), 0.5))


def test_fixed_threshold_and_floaters():
    kept = extract_field_mesh(TwoBalls(), resolution=RES, threshold=25.0, min_component_ratio=0.0)
    assert kept.metadata["threshold"] == 25.0 and "threshold_iou" not in kept.metadata
    assert len(kept.split(only_watertight=False)) == 2
    cleaned = extract_field_mesh(TwoBalls(), resolution=RES)
    assert len(cleaned.split(only_watertight=False)) == 1 and cleaned.vertices.max() < 0.6


@pytest.mark.parametrize("kwargs, match", [
    ({"threshold": "median"}, "threshold"),
    ({"threshold": 0.0}, "threshold"),
    ({"threshold": True}, "threshold"),
    ({"resolution": 1}, "resolution"),
    ({"bound": -1.0}, "bound"),
    ({"min_component_ratio": 2.0}, "min_component_ratio"),
])
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        extract_field_mesh(RadialField(PROFILES["soft_ball"](1.0)), **{"resolution": 16, **kwargs})


def test_bad_field_or_grid_raise_value_error():
    with pytest.raises(ValueError, match="Field"):
        extract_field_mesh(lambda p: p, resolution=16)
    with pytest.raises(ValueError, match="grid"):
        auto_threshold(torch.zeros(4, 4), 0.1)
