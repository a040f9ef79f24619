"""Ground-truth renderer: analytic depth and normals of a sphere, coverage, shading bounds, fronts."""

import math

import pytest
import torch

from gen3d.cameras import orbit_cameras, spherical_cameras
from gen3d.world import SHAPES, WorldObject, contact_sheet, render_object
from gen3d.world.render import AMBIENT, camera_rays

SPHERE_RADIUS = 0.5  # the catalog's sphere


def _cams(azimuth, elevation, size=48, distance=2.75, fovy=45.0):
    n = len(azimuth)
    return spherical_cameras(torch.tensor(azimuth, dtype=torch.float32), torch.tensor(elevation, dtype=torch.float32),
                             torch.full((n,), distance), torch.full((n,), fovy), size, size)


def test_sphere_depth_normals_and_coverage_are_analytic():
    cams = _cams([0.0, 70.0, -150.0], [0.0, 30.0, -10.0])
    out = render_object(WorldObject("sphere", "red"), cams)
    origins, dirs, z_per_t = camera_rays(cams)
    # analytic ray-sphere intersection
    b = (origins * dirs).sum(-1)
    disc = b**2 - ((origins**2).sum(-1) - SPHERE_RADIUS**2)
    hit = disc > 0
    t = -b - disc.clamp_min(0).sqrt()
    # pixels whose centers hit the sphere are foreground, except perhaps a few grazing ones
    alpha = out.alpha[..., 0] > 0.5
    assert (alpha != hit).float().mean() < 0.003
    both = alpha & hit
    points = origins + t[..., None] * dirs
    radial = torch.nn.functional.normalize(points, dim=-1)
    # sphere tracing stops within eps = 3e-4 of the surface: along a grazing ray that is eps / cos
    facing = both & (-(radial * dirs).sum(-1) > 0.3)
    assert torch.allclose(out.depth[..., 0][facing], (t * z_per_t)[facing], atol=1.5e-3)
    assert ((out.depth[..., 0] - t * z_per_t)[both].abs() < 0.02).all()
    assert (out.depth[~alpha] == 0).all() and (out.normal[~alpha] == 0).all()
    assert (out.normal[both] * radial[both]).sum(-1).min() > 0.999
    # coverage of the centered sphere's disk: pi * (f * tan(asin(r / d)))^2 pixels
    f = cams.K[0, 0, 0]
    disk = math.pi * (f * math.tan(math.asin(SPHERE_RADIUS / 2.75))) ** 2
    assert alpha.flatten(1).sum(1).float().div(disk).sub(1).abs().max() < 0.03


def test_main_color_is_the_albedo_scaled_by_shading():
    obj = WorldObject("cube", "purple")
    out = render_object(obj, orbit_cameras(6, elevation=30.0, width=40, height=40))
    fg = out.alpha[..., 0] > 0.5
    albedo = torch.tensor(obj.rgb)
    scale = out.rgb[fg] / albedo  # [P, 3]: one shading factor per pixel, the same in every channel
    assert (scale.amax(-1) - scale.amin(-1)).max() < 1e-5
    assert scale.min() >= AMBIENT - 1e-5 and scale.max() <= 1.0
    assert scale.max() - scale.min() > 0.2  # faces are shaded differently: the render carries 3D cues


def test_background_and_supersampling():
    obj = WorldObject("torus", "yellow")
    cams = orbit_cameras(2, width=32, height=32)
    out = render_object(obj, cams, background=torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]))
    assert out.rgb.shape == (2, 32, 32, 3) and out.alpha.shape == (2, 32, 32, 1) and out.depth.shape == (2, 32, 32, 1)
    assert out.rgb[0, 0, 0].tolist() == [0, 0, 0] and out.rgb[1, 0, 0].tolist() == [1, 1, 1]
    ss = render_object(obj, cams, supersample=3)
    edge = (ss.alpha > 0.05) & (ss.alpha < 0.95)
    assert edge.any()  # antialiased edges
    assert ss.alpha.mean() == pytest.approx(float(out.alpha.mean()), rel=0.05)
    with pytest.raises(ValueError, match="background"):
        render_object(obj, cams, background=(1.0, 1.0))


def test_front_differs_from_back_only_for_shapes_with_a_front():
    # A light straight above makes the shading symmetric about z, so only geometry and parts differ.
    cams = _cams([0.0, 180.0], [15.0, 15.0], size=64)
    for name, shape in SHAPES.items():
        out = render_object(WorldObject(name, "red"), cams, light_dir=(0.0, 0.0, 1.0))
        differ = ((out.rgb[0] - out.rgb[1]).abs().amax(-1) > 0.1).float().mean()
        if shape.has_front:
            assert differ > 0.004, name
        else:
            assert differ < 0.002, name


def test_contact_sheet_layout():
    sheet = contact_sheet([WorldObject("mug", "red"), WorldObject("cone", "blue")], orbit_cameras(3, width=16, height=16),
                          supersample=1)
    assert sheet.shape == (32, 48, 3)


def test_rendering_restores_the_thread_setting():
    before = torch.get_num_threads()
    render_object(WorldObject("cone", "green"), orbit_cameras(1, width=8, height=8))
    assert torch.get_num_threads() == before
