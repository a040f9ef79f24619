"""Volume renderer of neural fields on analytic fields with known answers: the alpha of a constant-density
ball is 1 - exp(-sigma * chord) at every pixel center, an opaque ball's depth and normals are the
sphere's, two colored balls land where the cameras put them; occupancy-grid rendering matches dense
rendering with far fewer field evaluations; backgrounds, materials, the per-sample record, FieldQuery
and input checks."""

import math

import pytest
import torch
from torch import nn

from gen3d.cameras import Cameras, orbit_cameras, spherical_cameras
from gen3d.ops.volume import camera_rays
from gen3d.rendering.types import RenderOutput
from gen3d.rendering.volume import (
    BackgroundConfig,
    FieldQuery,
    MaterialConfig,
    VolumeRenderer,
    VolumeRendererConfig,
)
from gen3d.representations.fields import Field, FieldOutput

F64 = torch.float64


class Balls(Field):
    """Balls of constant albedo; density sigma inside each (hard edge) or sigma * sigmoid((r - |x - c|) / width)
    (smooth, so analytic normals exist). `scale` is a trainable density multiplier; counts evaluations."""

    def __init__(self, balls, sigma=2.0, width=0.0):
        super().__init__()
        self.centers = torch.tensor([b[0] for b in balls], dtype=F64)  # [B, 3]
        self.radii = torch.tensor([b[1] for b in balls], dtype=F64)  # [B]
        self.colors = torch.tensor([b[2] for b in balls], dtype=F64)  # [B, 3]
        self.sigma, self.width = sigma, width
        self.scale = nn.Parameter(torch.ones((), dtype=F64))
        self.evaluations = 0

    def forward(self, points):
        self.evaluations += points.shape[0]
        dist = (points[:, None, :] - self.centers.to(points)[None]).norm(dim=-1)  # [P, B]
        x = self.radii.to(points) - dist
        occ = torch.sigmoid(x / self.width) if self.width > 0 else (x > 0).to(points.dtype)  # [P, B]
        density = self.scale.to(points.dtype) * self.sigma * occ.sum(-1)
        w = occ / occ.sum(-1, keepdim=True).clamp_min(1e-12)
        albedo = w @ self.colors.to(points) + (1 - w.sum(-1, keepdim=True)) * 0.5
        return FieldOutput(density, albedo)


def ball(radius=0.5, sigma=2.0, color=(1.0, 0.0, 0.0), width=0.0, center=(0.0, 0.0, 0.0)):
    return Balls([(center, radius, color)], sigma=sigma, width=width)


def cameras(n=2, size=24, dtype=F64, distance=2.5, elevation=(20.0, -35.0), fovy=40.0) -> Cameras:
    az = torch.linspace(0, 360, n + 1, dtype=dtype)[:n] + 10
    el = torch.tensor(elevation, dtype=dtype).repeat(n)[:n]
    return spherical_cameras(az, el, torch.full((n,), distance, dtype=dtype), torch.full((n,), fovy, dtype=dtype), size, size)


def renderer(**kw) -> VolumeRenderer:
    kw.setdefault("occupancy_grid", False)
    kw.setdefault("normals", "none")
    return VolumeRenderer(VolumeRendererConfig(**kw))


def _ray_geometry(cams, radius):
    """Per pixel: distance h of the ray's line from the origin, the entry t into the ball, the camera z axis."""
    o, d = camera_rays(cams)
    od = (o * d).sum(-1)
    h2 = (o * o).sum(-1) - od ** 2
    t_in = -od - (radius ** 2 - h2).clamp_min(0).sqrt()
    return o, d, h2.sqrt(), t_in


# --- analytic answers ------------------------------------------------------------------------------

@pytest.mark.parametrize("bounds", ["box", "sphere"])
def test_constant_density_ball_alpha_is_beer_lambert_of_the_chord(bounds):
    r, sigma = 0.5, 2.0
    cams = cameras()
    rend = renderer(samples_per_ray=1024, bounds=bounds)
    out = rend(ball(r, sigma), cams)
    _, _, h, _ = _ray_geometry(cams, r)
    chord = 2 * (r ** 2 - h ** 2).clamp_min(0).sqrt()
    expected = 1 - torch.exp(-sigma * chord)
    err = (out.alpha[..., 0] - expected).abs()
    assert (expected > 0.5).sum() > 50  # the ball covers a good part of the image
    assert err.max() < 2 * sigma * rend.cfg.step_size and err.mean() < 1e-3


def test_stratified_training_render_is_unbiased_on_average():
    r, sigma = 0.5, 2.0
    cams = cameras(1)
    rend, field = renderer(samples_per_ray=64), ball(r, sigma)
    g = torch.Generator().manual_seed(0)
    mean = sum(rend(field, cams, g, train=True).alpha for _ in range(16)) / 16
    _, _, h, _ = _ray_geometry(cams, r)
    expected = 1 - torch.exp(-sigma * 2 * (r ** 2 - h ** 2).clamp_min(0).sqrt())
    assert (mean[..., 0] - expected).abs().mean() < 2e-3


def test_opaque_ball_depth_is_the_sphere():
    r = 0.6
    cams = cameras(2, size=20)
    rend = renderer(samples_per_ray=1024)
    out = rend(ball(r, sigma=1e3), cams)
    _, d, h, t_in = _ray_geometry(cams, r)
    z = t_in * (d * cams.c2w[:, None, None, :3, 2]).sum(-1)  # camera-space depth of the entry point
    solid = (h < 0.9 * r) & (out.alpha[..., 0] > 0.999)
    assert solid.sum() > 40
    assert (out.depth[..., 0][solid] - z[solid]).abs().max() < 1.5 * rend.cfg.step_size  # midpoint of the first interval inside
    empty = h > r + 0.01
    assert (out.depth[..., 0][empty] == 0).all() and (out.alpha[..., 0][empty] == 0).all()


@pytest.mark.parametrize("method", ["analytic", "finite_difference"])
def test_normals_of_a_ball_are_radial(method):
    r = 0.6
    cams = cameras(2, size=16)
    rend = renderer(samples_per_ray=512, normals=method, normals_eps=1e-4)
    out = rend(ball(r, sigma=300.0, width=0.01), cams)
    o, d, h, t_in = _ray_geometry(cams, r)
    expected = (o + t_in[..., None] * d) / r  # outward normal at the entry point
    solid = (h < 0.8 * r) & (out.alpha[..., 0] > 0.99)
    assert solid.sum() > 20
    n = out.normal / out.alpha  # the normal map is alpha-weighted
    cos = (n[solid] * expected[solid]).sum(-1)
    assert cos.min() > 0.995
    assert (out.normal.norm(dim=-1) <= out.alpha[..., 0] + 1e-12).all()  # alpha-weighted unit normals
    assert (out.normal[h > r + 0.2].abs() < 1e-5).all()  # background: 0
    rec = out.samples
    p = cams.eyes[rec.ray_indices // 256] + 0 * rec.directions  # eye of each sample's camera
    assert rec.normals.shape == rec.directions.shape
    heavy = rec.weights > 0.05
    t_mid = 0.5 * (rec.t_starts + rec.t_ends)
    x = p + t_mid[:, None] * rec.directions
    torch.testing.assert_close(rec.normals[heavy], nn.functional.normalize(x[heavy], dim=-1), atol=0.02, rtol=0)


def test_two_colored_balls_land_where_the_camera_sees_them():
    field = Balls([((0.0, 0.5, 0.0), 0.35, (1.0, 0.0, 0.0)), ((0.0, -0.5, 0.0), 0.35, (0.0, 0.0, 1.0))], sigma=50.0)
    cams = orbit_cameras(2, elevation=0.0, width=32, height=32).to(F64)  # azimuth 0 (at +x) and 180 (at -x)
    for grid in (False, True):
        rend = renderer(occupancy_grid=grid)
        if grid:
            for k in range(3):
                rend.grid.update(field.density, 16 * k, torch.Generator().manual_seed(k))
        rgb = rend(field, cams).rgb
        # seen from +x, +y is on the right (OpenCV x axis = forward x up); from -x it is on the left
        right, left = rgb[:, 16, 22], rgb[:, 16, 9]
        torch.testing.assert_close(right[0], torch.tensor([1.0, 0, 0], dtype=F64), atol=1e-3, rtol=0)
        torch.testing.assert_close(left[0], torch.tensor([0.0, 0, 1], dtype=F64), atol=1e-3, rtol=0)
        torch.testing.assert_close(right[1], torch.tensor([0.0, 0, 1], dtype=F64), atol=1e-3, rtol=0)
        torch.testing.assert_close(left[1], torch.tensor([1.0, 0, 0], dtype=F64), atol=1e-3, rtol=0)
        torch.testing.assert_close(rgb[:, 2, 16], torch.ones(2, 3, dtype=F64))  # white background above


# --- occupancy grid --------------------------------------------------------------------------------

@pytest.mark.parametrize("dilation", [0, 1])
def test_occupancy_grid_render_matches_dense_with_far_fewer_field_evaluations(dilation):
    field = Balls([((0.2, 0.1, 0.0), 0.45, (0.9, 0.6, 0.1))], sigma=50.0, width=0.02)
    cams = cameras(2, size=32, dtype=torch.float32)
    dense = renderer(normals="none")
    culled = renderer(occupancy_grid=True, grid_resolution=32, grid_dilation=dilation, early_stop_eps=0.0)
    g = torch.Generator().manual_seed(0)
    for step in range(0, 6 * 16, 16):  # training-time updates through forward
        culled(field, cams[:1].resized(4, 4), g, step=step, train=True)
    assert culled.grid.updates.item() == 6 and culled.grid.occupied_fraction() < 0.1 + 0.06 * dilation
    field.evaluations = 0
    ref = dense(field, cams)
    n_dense, field.evaluations = field.evaluations, 0
    out = culled(field, cams)
    n_culled = field.evaluations
    assert n_culled < n_dense / 4
    assert len(out.samples.weights) == n_culled
    diff = (out.alpha - ref.alpha).abs()
    if dilation:
        assert diff.max() < 0.005 and (out.rgb - ref.rgb).abs().max() < 0.005
    else:
        # one probe per cell misses cells the ball's sharp edge only clips: the silhouette erodes a little
        assert diff.mean() < 5e-3 and diff.flatten().quantile(0.9) < 0.01 and diff.max() < 0.2


def test_early_stop_keeps_the_render_and_drops_hidden_samples():
    field, cams = ball(0.5, 200.0, width=0.01), cameras(2, size=16)
    full = renderer(occupancy_grid=True, early_stop_eps=0.0)
    early = renderer(occupancy_grid=True, early_stop_eps=1e-4)
    a, b = full(field, cams), early(field, cams)  # fresh grids: every cell occupied
    assert len(b.samples.weights) < 0.85 * len(a.samples.weights)  # the ball's back half and the space behind it
    hidden = a.samples.weights < 1e-12  # (some empty space in front also has zero weight)
    assert len(a.samples.weights) - len(b.samples.weights) <= int(hidden.sum())
    assert (a.alpha - b.alpha).abs().max() < 2e-4 and (a.rgb - b.rgb).abs().max() < 2e-4


def test_forward_updates_the_grid_only_in_training_on_its_interval():
    rend, field = renderer(occupancy_grid=True, grid_resolution=8, grid_update_interval=4), ball()
    cams = cameras(1, size=4)
    rend(field, cams, step=0)  # evaluation: no update
    assert rend.grid.updates.item() == 0
    rend(field, cams, torch.Generator().manual_seed(0), step=0, train=True)
    rend(field, cams, torch.Generator().manual_seed(0), step=3, train=True)
    assert rend.grid.updates.item() == 1
    state = rend.state_dict()
    assert {"grid.density", "grid.occupied", "grid.updates"} <= set(state)


def test_chunking_does_not_change_the_render():
    field, cams = ball(0.5, 3.0, width=0.05), cameras(2, size=12)
    a = renderer(normals="analytic")(field, cams)
    b = renderer(normals="analytic", chunk_rays=37)(field, cams)
    for x, y in ((a.rgb, b.rgb), (a.alpha, b.alpha), (a.depth, b.depth), (a.normal, b.normal),
                 (a.samples.weights, b.samples.weights), (a.samples.ray_indices, b.samples.ray_indices)):
        torch.testing.assert_close(x, y)


# --- backgrounds -----------------------------------------------------------------------------------

def _empty():
    return ball(sigma=0.0)


def test_solid_background_and_override():
    cams = cameras(2, size=6)
    rend = renderer(background=BackgroundConfig(kind="solid", color=(0.2, 0.4, 0.6)))
    out = rend(_empty(), cams)
    torch.testing.assert_close(out.rgb, torch.tensor([0.2, 0.4, 0.6], dtype=F64).expand(2, 6, 6, 3))
    assert (out.alpha == 0).all() and (out.depth == 0).all()
    over = rend(_empty(), cams, background=torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]], dtype=F64)).rgb
    torch.testing.assert_close(over[1, 3, 3], torch.tensor([1.0, 0.0, 1.0], dtype=F64))


def test_random_background_per_camera_from_the_generator():
    cams = cameras(3, size=5)
    rend = renderer(background=BackgroundConfig(kind="random", color=(0.0, 0.0, 0.0)))
    a = rend(_empty(), cams, torch.Generator().manual_seed(1), train=True).rgb
    b = rend(_empty(), cams, torch.Generator().manual_seed(1), train=True).rgb
    c = rend(_empty(), cams, torch.Generator().manual_seed(2), train=True).rgb
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    assert (a == a[:, :1, :1]).all()  # one color per camera
    assert (a[0, 0, 0] - a[1, 0, 0]).abs().max() > 1e-3
    assert (rend(_empty(), cams).rgb == 0).all()  # evaluation: the configured color


def test_mlp_background_is_trainable_and_random_prob_replaces_it():
    cams = cameras(2, size=6)
    rend = renderer(background=BackgroundConfig(kind="mlp"))
    rgb = rend(_empty(), cams, torch.Generator().manual_seed(0), train=True).rgb
    assert (rgb > 0).all() and (rgb < 1).all()
    assert rgb.view(2, -1, 3).std(1).max() > 1e-4  # depends on the view direction
    rgb.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in rend.background_mlp.parameters())
    assert any(k.startswith("background_mlp.") for k in rend.state_dict())
    rand = renderer(background=BackgroundConfig(kind="mlp", random_prob=1.0))
    rgb = rand(_empty(), cams, torch.Generator().manual_seed(0), train=True).rgb
    assert (rgb == rgb[:, :1, :1]).all()  # solid per camera
    assert rand(_empty(), cams).rgb.view(2, -1, 3).std(1).max() > 1e-4  # evaluation: the MLP


# --- materials -------------------------------------------------------------------------------------

def _shaded(**material):
    return renderer(normals="analytic", samples_per_ray=256, material=MaterialConfig(kind="diffuse", **material))


def test_albedo_material_renders_the_albedo():
    out = renderer()(ball(0.6, 200.0, color=(0.9, 0.2, 0.1)), cameras(1, size=16))
    torch.testing.assert_close(out.rgb[0, 8, 8], torch.tensor([0.9, 0.2, 0.1], dtype=F64), atol=1e-4, rtol=0)


def test_textureless_shading_is_gray():
    cams = cameras(1, size=16)
    out = _shaded()(ball(0.6, 200.0, color=(0.9, 0.2, 0.1), width=0.01), cams, shading="textureless")
    core = out.rgb[0, 6:10, 6:10]
    torch.testing.assert_close(core[..., 0], core[..., 1])
    torch.testing.assert_close(core[..., 0], core[..., 2])
    assert core.mean() > 0.5  # lit from the camera by default in evaluation


def test_light_behind_the_object_darkens_the_diffuse_render():
    cams = cameras(1, size=16)
    field = ball(0.6, 200.0, color=(0.9, 0.9, 0.9), width=0.01)
    rend = _shaded(ambient=0.1, diffuse=0.9)
    front = rend(field, cams, light_positions=cams.eyes * 1.2)
    behind = rend(field, cams, light_positions=-cams.eyes * 1.2)
    core = (slice(None), slice(5, 11), slice(5, 11))
    assert front.rgb[core].mean() > 0.7
    torch.testing.assert_close(behind.rgb[core], torch.full_like(behind.rgb[core], 0.9 * 0.1), atol=0.02, rtol=0)
    albedo = rend(field, cams, shading="albedo")
    torch.testing.assert_close(albedo.rgb[core], torch.full_like(albedo.rgb[core], 0.9), atol=1e-3, rtol=0)


def test_training_draws_shading_modes_per_camera():
    field = ball(0.6, 200.0, color=(0.9, 0.2, 0.1), width=0.01)
    cams = cameras(12, size=8, elevation=(15.0,))
    rend = _shaded(albedo_only_prob=0.3, textureless_prob=0.5)
    rgb = rend(field, cams, torch.Generator().manual_seed(0), train=True).rgb[:, 4, 4]  # [C, 3]
    gray = (rgb.amax(-1) - rgb.amin(-1)) < 1e-6
    albedo = (rgb - torch.tensor([0.9, 0.2, 0.1], dtype=F64)).abs().amax(-1) < 1e-3
    assert gray.any() and albedo.any() and (~gray & ~albedo).any()  # all three modes occur
    only = _shaded(albedo_only_prob=0.0, textureless_prob=1.0)
    rgb = only(field, cams, torch.Generator().manual_seed(0), train=True).rgb[:, 4, 4]
    assert ((rgb.amax(-1) - rgb.amin(-1)) < 1e-6).all()


# --- per-sample record and gradients ---------------------------------------------------------------

def test_sample_record_is_consistent_with_the_images():
    cams = cameras(2, size=10)
    out = renderer(normals="analytic")(ball(0.5, 5.0, width=0.03), cams)
    rec = out.samples
    assert rec.n_rays == 200 and rec.ray_indices.min() >= 0 and rec.ray_indices.max() < 200
    assert (rec.ray_indices[1:] >= rec.ray_indices[:-1]).all()
    alpha = torch.zeros(200, dtype=F64).index_add(0, rec.ray_indices, rec.weights)
    torch.testing.assert_close(alpha, out.alpha.reshape(-1))
    _, d = camera_rays(cams)
    torch.testing.assert_close(rec.directions, d.reshape(-1, 3)[rec.ray_indices])
    assert rec.normals.shape == (len(rec.weights), 3)
    assert renderer()(ball(), cams).samples.normals is None and renderer()(ball(), cams).normal is None


def test_gradients_reach_the_field_through_colors_and_normals():
    field, cams = ball(0.5, 5.0, width=0.05), cameras(1, size=8)
    rend = renderer(normals="analytic")
    out = rend(field, cams, torch.Generator().manual_seed(0), train=True)
    (g_alpha,) = torch.autograd.grad(out.alpha.sum(), field.scale, retain_graph=True)
    assert g_alpha > 0  # denser -> more opaque
    rec = out.samples
    # an orientation-style loss on the normals needs second derivatives in training
    assert rec.normals.requires_grad
    (g_normals,) = torch.autograd.grad((rec.weights.detach()[:, None] * rec.normals).sum(), field.scale,
                                       allow_unused=True)
    assert g_normals is None or torch.isfinite(g_normals)
    with torch.no_grad():
        ev = rend(field, cams)
    assert not ev.rgb.requires_grad and not ev.samples.normals.requires_grad


# --- FieldQuery ------------------------------------------------------------------------------------

def test_field_query_occupancy_and_white_render():
    field = ball(0.5, 100.0)
    q = FieldQuery(field, renderer(background=BackgroundConfig(kind="solid", color=(0.0, 0.0, 0.0))))
    occ = q.occupancy(torch.tensor([[0.0, 0.0, 0.0], [0.9, 0.0, 0.0]], dtype=F64))
    torch.testing.assert_close(occ, torch.tensor([1 - math.exp(-100.0 / 32), 0.0], dtype=F64))
    out = q.render(cameras(1, size=12))
    assert isinstance(out, RenderOutput)
    torch.testing.assert_close(out.rgb[0, 0, 0], torch.ones(3, dtype=F64))  # white, not the renderer's black
    assert out.alpha[0, 6, 6, 0] > 0.99
    default = FieldQuery(field).render(cameras(1, size=6))
    assert default.rgb.shape == (1, 6, 6, 3)


# --- input checks ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    ({"bounds": "cube"}, "bounds"),
    ({"samples_per_ray": 0}, "samples_per_ray"),
    ({"normals": "sobel"}, "normals"),
    ({"grid_backend": "cuda"}, "grid_backend"),
    ({"chunk_rays": 0}, "chunk_rays"),
    ({"material": MaterialConfig(kind="diffuse"), "normals": "none"}, "needs normals"),
])
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VolumeRendererConfig(**kwargs)


def test_bad_material_and_background_configs_raise():
    with pytest.raises(ValueError, match="material.kind"):
        MaterialConfig(kind="pbr")
    with pytest.raises(ValueError, match="textureless_prob"):
        MaterialConfig(textureless_prob=1.5)
    with pytest.raises(ValueError, match="light_distance_range"):
        MaterialConfig(light_distance_range=(1.0, 0.5))
    with pytest.raises(ValueError, match="background.kind"):
        BackgroundConfig(kind="sky")
    with pytest.raises(ValueError, match="background.color"):
        BackgroundConfig(color=(2.0, 0.0, 0.0))


def test_bad_forward_inputs_raise():
    rend, cams = renderer(), cameras(2, size=4)

    class Features4(Field):
        feature_dim = 4

    with pytest.raises(ValueError, match="gen3d Field"):
        rend(lambda p: p, cams)
    with pytest.raises(ValueError, match="F = 4"):
        rend(Features4(), cams)
    with pytest.raises(ValueError, match="Cameras"):
        rend(ball(), cams.c2w)
    with pytest.raises(ValueError, match="background"):
        rend(ball(), cams, background=torch.ones(2))
    with pytest.raises(ValueError, match="light_positions"):
        rend(ball(), cams, light_positions=torch.ones(3))
    with pytest.raises(ValueError, match="shading"):
        rend(ball(), cams, shading="toon")
    with pytest.raises(ValueError, match="needs normals"):
        rend(ball(), cams, shading="diffuse")
    with pytest.raises(ValueError, match="step"):
        rend(ball(), cams, step=-1, train=True)
