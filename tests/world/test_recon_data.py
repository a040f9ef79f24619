"""The reconstruction training set (renders, cameras, surface points) and the Chamfer distance."""

import pytest
import torch

from gen3d.world.catalog import WorldObject
from gen3d.world.recon_data import build_recon_set, chamfer_distance, nearest_indices
from gen3d.world.render import render_object

OBJECTS = [WorldObject("mug", "red"), WorldObject("torus", "teal")]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_recon_set(OBJECTS, views=3, size=24, points=500, seed=1,
                           cache=tmp_path_factory.mktemp("recon") / "set.pt")


def test_shapes_and_points_on_the_surface(data):
    assert data.objects == ["red mug", "teal torus"] and len(data) == 2
    assert data.rgb.shape == (2, 3, 24, 24, 3) and data.alpha.shape == (2, 3, 24, 24, 1)
    assert data.c2w.shape == (2, 3, 4, 4) and data.K.shape == (2, 3, 3, 3) and data.points.shape == (2, 500, 3)
    for obj, points in zip(OBJECTS, data.points):
        assert obj.sdf(points).abs().max() < 0.02  # on the exact surface (marching cubes at 128^3)
    assert torch.allclose(data.colors[1], torch.tensor(OBJECTS[1].rgb).expand(500, 3))


def test_views_are_renders_from_their_cameras(data):
    from gen3d.cameras import Cameras

    cams = Cameras(data.c2w[0], data.K[0], 24, 24, data.azimuth[0], data.elevation[0], data.distance[0])
    direct = render_object(OBJECTS[0], cams)  # no supersampling: the set's antialiasing differs only at edges
    inside = (direct.alpha[..., 0] > 0.99) & (data.alpha[0, ..., 0] > 0.99)
    assert inside.float().mean() > 0.1
    diff = (direct.rgb[inside] - data.rgb[0][inside]).abs().amax(-1)  # shading varies within a pixel at creases
    assert diff.median() < 0.01 and diff.mean() < 0.03
    assert ((data.alpha[0, ..., 0] > 0.5) == (direct.alpha[..., 0] > 0.5)).float().mean() > 0.97


def test_deterministic_and_cached(data, tmp_path):
    again = build_recon_set(OBJECTS, views=3, size=24, points=500, seed=1)
    assert torch.equal(again.points, data.points) and torch.equal(again.rgb, data.rgb)
    other = build_recon_set(OBJECTS[:1], views=3, size=24, points=500, seed=2)
    assert not torch.equal(other.c2w[0], data.c2w[0])
    path = tmp_path / "c.pt"
    first = build_recon_set(OBJECTS[:1], views=2, size=16, points=50, cache=path)
    assert torch.equal(build_recon_set(OBJECTS[:1], views=2, size=16, points=50, cache=path).rgb, first.rgb)
    assert build_recon_set(OBJECTS[:1], views=2, size=16, points=60, cache=path).points.shape[1] == 60  # new key


def test_chamfer_distance():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 300, 3, generator=g)
    assert torch.allclose(chamfer_distance(a, a), torch.zeros(2), atol=1e-6)
    shift = torch.tensor([0.5, 0.0, 0.0])
    far = a + 10 * shift  # far apart: every nearest neighbour is across the gap
    d = (a[:, :, None] - far[:, None]).square().sum(-1)  # [B, N, N] brute force
    expected = d.min(2).values.mean(1) + d.min(1).values.mean(1)
    assert torch.allclose(chamfer_distance(a, far), expected, rtol=1e-4)
    assert torch.allclose(chamfer_distance(a, far, chunk=7), chamfer_distance(a, far))
    b = torch.rand(2, 100, 3, generator=g, requires_grad=True)
    chamfer_distance(b, a, chunk=33).sum().backward()
    assert torch.isfinite(b.grad).all() and b.grad.abs().sum() > 0
    # the same gradient as differentiating the brute-force minima (matched pairs only)
    b2 = b.detach().clone().requires_grad_(True)
    d = (b2[:, :, None] - a[:, None]).square().sum(-1)  # [B, 100, 300]
    (d.min(2).values.mean(1) + d.min(1).values.mean(1)).sum().backward()
    assert torch.allclose(b.grad, b2.grad, atol=1e-6)
    with pytest.raises(ValueError, match="expected"):
        chamfer_distance(a, a[0])


def test_nearest_indices_match_brute_force():
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(2, 50, 3, generator=g), torch.rand(2, 70, 3, generator=g)
    a_to_b, b_to_a = nearest_indices(a, b, chunk=16)
    d = torch.cdist(a, b)  # [2, 50, 70]
    assert torch.allclose(d.gather(2, a_to_b[..., None])[..., 0], d.min(2).values, atol=1e-6)
    assert torch.allclose(d.gather(1, b_to_a[:, None])[:, 0], d.min(1).values, atol=1e-6)
    assert a_to_b.shape == (2, 50) and b_to_a.shape == (2, 70)
