"""Zero123 SDS on the shipped view-conditioned prior: the poses it conditions on and the gradient it returns."""

import pytest
import torch

from gen3d.cameras import spherical_cameras
from gen3d.guidance import GuidanceConfig
from gen3d.guidance.base import timestep_weight
from gen3d.guidance.zero123 import Zero123Guidance
from gen3d.priors.view_conditioning import ViewConditionedPrior, relative_pose
from gen3d.world.catalog import WorldObject
from gen3d.world.render import render_object


@pytest.fixture(scope="module")
def prior():
    return ViewConditionedPrior.from_pretrained("gen3d/shapes-zero123")


@pytest.fixture(scope="module")
def reference():
    cams = spherical_cameras(torch.zeros(1), torch.tensor([15.0]), torch.tensor([1.9]), torch.tensor([40.0]), 32, 32)
    return render_object(WorldObject("mug", "blue"), cams).rgb[0]  # [32, 32, 3] on white


def cameras(azimuths, elevation=15.0, distance=1.9):
    n = len(azimuths)
    return spherical_cameras(torch.tensor(azimuths, dtype=torch.float32), torch.full((n,), elevation),
                             torch.full((n,), distance), torch.full((n,), 40.0), 32, 32)


def test_poses_are_relative_to_the_input_camera(prior, reference):
    g = Zero123Guidance(prior, reference, elevation=15.0, azimuth=0.0, distance=1.9)
    poses = g.poses(cameras([0.0, 90.0, 180.0], elevation=45.0, distance=2.1))
    expected = relative_pose(15.0, 0.0, 1.9, torch.full((3,), 45.0), torch.tensor([0.0, 90.0, 180.0]), torch.full((3,), 2.1))
    assert torch.allclose(poses, expected)
    assert torch.allclose(poses[1], torch.tensor([0.5236, 1.0, 0.0, 0.2]), atol=1e-3)


def test_gradient_is_cfg_sds_with_the_view_condition(prior, reference):
    cfg = GuidanceConfig(guidance_scale=3.0, min_step_percent=0.3, max_step_percent=0.3)
    g = Zero123Guidance(prior, reference, 15.0, 0.0, 1.9, cfg)
    cams = cameras([30.0, 200.0])
    rgb = torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    out = g(rgb, cams, step=1, max_steps=10, generator=torch.Generator().manual_seed(7))
    # the same gradient computed directly: a fresh condition with the two poses, the same noise and t
    z = prior.encode(rgb.detach())
    t = out.t
    gen = torch.Generator().manual_seed(7)
    torch.randint(int(t[0]), int(t[0]) + 1, (2,), generator=gen)  # the guidance draws t first, then the noise
    eps = torch.randn(z.shape, generator=gen)
    condition = prior.encode_condition(reference[None], g.poses(cams))
    pred = prior.predict_noise(prior.add_noise(z, eps, t), t, condition, 3.0)
    expected = timestep_weight("sds", prior.alphas_cumprod, t) * (pred.eps_guided - eps)
    assert torch.allclose(out.grad, expected, atol=1e-5)
    out.loss.backward()
    assert rgb.grad is not None and rgb.grad.abs().sum() > 0


def test_the_camera_changes_the_gradient(prior, reference):
    cfg = GuidanceConfig(guidance_scale=3.0, min_step_percent=0.5, max_step_percent=0.5)
    g = Zero123Guidance(prior, reference, 15.0, 0.0, 1.9, cfg)
    rgb = reference[None].expand(1, -1, -1, -1)
    a = g(rgb, cameras([0.0]), 1, 10, generator=torch.Generator().manual_seed(3)).grad
    b = g(rgb, cameras([180.0]), 1, 10, generator=torch.Generator().manual_seed(3)).grad
    assert (a - b).abs().mean() > 1e-3 * a.abs().mean()


def test_bad_calls(prior, reference):
    g = Zero123Guidance(prior, reference, 15.0, 0.0, 1.9)
    with pytest.raises(ValueError, match="2 renders but 1 cameras"):
        g(torch.rand(2, 32, 32, 3), cameras([0.0]), 1, 10)
    with pytest.raises(ValueError, match="guidance type 'vsd'"):
        Zero123Guidance(prior, reference, 15.0, 0.0, 1.9, GuidanceConfig(type="vsd"))
