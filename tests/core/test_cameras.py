
import pytest
import torch

from gen3d.cameras import OrbitConfig, intrinsics, look_at, orbit_cameras, sample_orbit


def project(cams, points):  # [C,3,3] K, world points [P,3] -> pixels [C,P,2], depth [C,P]
    w2c = cams.viewmats
    pc = points[None] @ w2c[:, :3, :3].transpose(1, 2) + w2c[:, None, :3, 3]
    uv = pc @ cams.K.transpose(1, 2)
    return uv[..., :2] / uv[..., 2:], pc[..., 2]


def test_c2w_is_a_rotation_with_opencv_axes():
    cams = orbit_cameras(8, elevation=20.0)
    R = cams.c2w[:, :3, :3]
    assert torch.allclose(R.transpose(1, 2) @ R, torch.eye(3).expand(8, 3, 3), atol=1e-5)
    assert torch.allclose(torch.det(R), torch.ones(8), atol=1e-5)
    # forward (column 2) points at the origin; down (column 1) has a negative world-z component
    assert torch.allclose(R[:, :, 2], -torch.nn.functional.normalize(cams.eyes, dim=-1), atol=1e-5)
    assert (R[:, 2, 1] < 0).all()


def test_azimuth_zero_is_on_plus_x_and_sees_the_front():
    cams = orbit_cameras(4, elevation=0.0, distance=3.0)
    assert torch.allclose(cams.eyes[0], torch.tensor([3.0, 0.0, 0.0]), atol=1e-5)
    assert torch.allclose(cams.eyes[1], torch.tensor([0.0, 3.0, 0.0]), atol=1e-5)  # azimuth 90: +y
    assert cams.azimuth.tolist() == [0.0, 90.0, -180.0, -90.0]


def test_projection_center_up_and_right():
    cams = orbit_cameras(1, elevation=0.0, distance=3.0, width=64, height=48)
    uv, z = project(cams, torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.5], [0.0, 0.5, 0.0]]))
    assert torch.allclose(uv[0, 0], torch.tensor([32.0, 24.0]), atol=1e-4)
    assert uv[0, 1, 1] < 24.0  # world up appears higher in the image (smaller row)
    assert uv[0, 2, 0] > 32.0  # seen from +x, +y is on the right
    assert z[0, 0] == pytest.approx(3.0, abs=1e-5)


def test_intrinsics_from_fov():
    K = intrinsics(torch.tensor([90.0]), 100, 50)
    assert K[0, 1, 1].item() == pytest.approx(25.0)
    assert K[0, 0, 2].item() == 50 and K[0, 1, 2].item() == 25


def test_sample_orbit_honors_ranges_and_stratifies_azimuth():
    cfg = OrbitConfig(batch_size=4, elevation_range=(0, 30), distance_range=(2, 3), fovy_range=(40, 60))
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        cams = sample_orbit(cfg, g)
        assert ((cams.elevation >= 0) & (cams.elevation <= 30)).all()
        assert ((cams.distance >= 2) & (cams.distance <= 3)).all()
        bins = ((cams.azimuth + 180) // 90).long().tolist()
        assert sorted(bins) == [0, 1, 2, 3]
        assert torch.allclose(cams.eyes.norm(dim=-1), cams.distance, atol=1e-4)
    a = sample_orbit(cfg, torch.Generator().manual_seed(3))
    b = sample_orbit(cfg, torch.Generator().manual_seed(3))
    assert torch.equal(a.c2w, b.c2w)


def test_bad_orbit_config():
    with pytest.raises(ValueError, match="elevation_range"):
        OrbitConfig(elevation_range=(30, 0))
    with pytest.raises(ValueError, match="fovy_range"):
        OrbitConfig(fovy_range=(0, 200))


def test_look_at_straight_down_is_finite():
    c2w = look_at(torch.tensor([[0.0, 0.0, 3.0]]))
    assert torch.isfinite(c2w).all()


def test_resized_and_indexing():
    cams = orbit_cameras(3, width=64, height=64)
    small = cams.resized(32, 16)
    assert small.K[0, 0, 0] == cams.K[0, 0, 0] / 2 and small.K[0, 1, 2] == 8
    assert len(cams[1]) == 1 and len(cams[0:2]) == 2
