"""The 4D deformation field (K-planes over x, y, z, t) and its regularizers."""

import math

import pytest
import torch

from gen3d.representations.deformation import (
    DeformationConfig,
    DeformationField,
    knn_indices,
    rigidity_loss,
    time_smoothness,
)


def points(n=64, seed=0):
    return torch.rand(n, 3, generator=torch.Generator().manual_seed(seed)) * 1.6 - 0.8


def test_a_new_field_is_the_identity_at_every_time():
    field = DeformationField()
    x, q, s = points(), torch.randn(64, 4), torch.randn(64, 3)
    for t in (0.0, 0.3, 1.0):
        m2, q2, s2 = field.deform(x, q, s, t)
        assert torch.equal(m2, x) and torch.equal(q2, q) and torch.equal(s2, s)
    # and its features do not depend on t (space-time planes start at one)
    assert torch.allclose(field.features(x, 0.0), field.features(x, 0.9))


def test_space_time_planes_make_the_motion_depend_on_t_and_everything_learns():
    torch.manual_seed(0)
    field = DeformationField(DeformationConfig(resolutions=[8], time_resolution=4, features=4, hidden=16))
    with torch.no_grad():
        field.temporal[0][0, :, 2:] += 0.5  # the xt plane changes after t = 1/2
    x = points(32)
    assert not torch.allclose(field.features(x, 0.0), field.features(x, 1.0))
    # fit a translation that grows with t: the loss falls and every part gets a gradient
    target = lambda t: torch.tensor([0.2 * t, 0.0, 0.0])  # noqa: E731
    opt = torch.optim.Adam(field.parameters(), lr=1e-2)
    losses = []
    for step in range(150):
        t = (step % 5) / 4
        d, _, _ = field(x, t)
        loss = (d - target(t)).square().mean()
        opt.zero_grad()
        loss.backward()
        if step == 10:  # once the zero-initialized heads have moved, the gradient reaches every plane and layer
            for name, p in field.named_parameters():
                if not name.startswith(("heads.quats", "heads.log_scales")):  # unused by a position-only loss
                    assert p.grad is not None and p.grad.abs().sum() > 0, name
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.05 * sum(losses[:5])
    d0, _, _ = field(x, 0.0)
    d1, _, _ = field(x, 1.0)
    assert (d1 - d0)[:, 0].mean().item() == pytest.approx(0.2, abs=0.03)


def test_time_smoothness_is_zero_for_linear_motion_and_positive_for_jitter():
    field = DeformationField(DeformationConfig(resolutions=[4], time_resolution=6, features=2))
    assert time_smoothness(field).item() == 0  # all ones
    with torch.no_grad():
        field.temporal[0].copy_(torch.linspace(0, 1, 6)[:, None].expand(3, 2, 6, 4))  # linear in t
    assert time_smoothness(field).item() == pytest.approx(0, abs=1e-12)
    with torch.no_grad():
        field.temporal[0][:, :, 3] += 0.3  # a jump at one time
    assert time_smoothness(field).item() > 1e-3


def test_rigidity_is_zero_for_rigid_motion_and_positive_for_a_stretch():
    x = points(50)
    nn = knn_indices(x, k=6)
    assert nn.shape == (50, 6) and not (nn == torch.arange(50)[:, None]).any()  # never itself
    c, s = math.cos(0.7), math.sin(0.7)
    R = torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    moved = x @ R.T + torch.tensor([0.3, -0.1, 0.2])
    assert rigidity_loss(x, moved, nn).item() < 1e-10
    stretched = x * torch.tensor([1.3, 1.0, 1.0])
    assert rigidity_loss(x, stretched, nn).item() > 1e-4


@pytest.mark.parametrize("overrides, match", [
    (dict(resolutions=[]), "resolutions"),
    (dict(resolutions=[1]), "resolutions"),
    (dict(time_resolution=1), "time_resolution"),
    (dict(bound=0.0), "bound"),
])
def test_config_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        DeformationConfig(**overrides)


def test_bad_means_shape():
    with pytest.raises(ValueError, match="means must be"):
        DeformationField()(torch.zeros(4, 2), 0.0)
