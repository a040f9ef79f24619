"""The point-set velocity model: shapes, zero init, permutation equivariance, the text condition and its null, and a
flow-matching fit of a small set."""

import pytest
import torch

from gen3d.models.flow import euler_sample, flow_matching_loss, guided
from gen3d.models.point_flow import PointFlowConfig, PointFlowTransformer

CFG = PointFlowConfig(width=32, layers=2, heads=4, text_dim=16, text_length=4)


def perturbed(model: PointFlowTransformer) -> PointFlowTransformer:
    """The model with every parameter nudged, so the zero-initialized layers no longer hide the rest."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def test_zero_velocity_at_initialization_and_shapes():
    torch.manual_seed(0)
    model = PointFlowTransformer(CFG)
    x, t, text = torch.randn(3, 50, 6), torch.rand(3), torch.randn(3, 4, 16)
    v = model(x, t, text)
    assert v.shape == (3, 50, 6) and torch.count_nonzero(v) == 0
    with pytest.raises(ValueError, match="x must be"):
        model(torch.randn(3, 50, 5), t, text)
    with pytest.raises(ValueError, match="text must be"):
        model(x, t, torch.randn(2, 4, 16))


def test_permutation_equivariant_and_conditioned():
    torch.manual_seed(0)
    model = perturbed(PointFlowTransformer(CFG)).eval()
    x, t, text = torch.randn(2, 40, 6), torch.rand(2), torch.randn(2, 4, 16)
    perm = torch.randperm(40)
    with torch.no_grad():
        v = model(x, t, text)
        assert torch.allclose(model(x[:, perm], t, text), v[:, perm], atol=1e-5)
        assert not torch.allclose(model(x, t, torch.randn(2, 4, 16)), v, atol=1e-3)  # the text matters
        assert not torch.allclose(model(x, t.flip(0) * 0.5, text), v, atol=1e-3)  # and the time
        assert torch.equal(model(x, t, None), model(x, t, model.null(2)))  # None is the learned null sequence
        # guidance contrasts the text with the null sequence
        w = 2.0
        assert torch.allclose(guided(model, x, t, text, w), 3 * v - 2 * model(x, t, None), atol=1e-5)


def test_condition_dropout_uses_the_null_sequence():
    model = PointFlowTransformer(CFG)
    text = torch.randn(1000, 4, 16)
    dropped = model.with_dropout(text, 0.3, torch.Generator().manual_seed(0))
    is_null = (dropped == model.null(1000)).all(-1).all(-1)
    kept = (dropped == text).all(-1).all(-1)
    assert (is_null | kept).all() and 0.25 < is_null.float().mean() < 0.35


def test_flow_matching_fits_two_prompted_shapes():
    """Two 'objects' (a ring and a line of points, different colors) under two text conditions: 600
    flow-matching steps and the 25-step Euler sampler give each prompt its own object."""
    torch.manual_seed(0)
    n = 64
    angle = torch.linspace(0, 2 * torch.pi, n + 1)[:-1]
    ring = torch.cat([torch.stack([angle.cos(), angle.sin(), torch.zeros(n)], 1) * 0.5, torch.tensor([[1.0, -1, -1]]).expand(n, 3)], 1)
    line = torch.cat([torch.stack([torch.zeros(n), torch.zeros(n), torch.linspace(-0.5, 0.5, n)], 1),
                      torch.tensor([[-1.0, -1, 1]]).expand(n, 3)], 1)
    data = torch.stack([ring, line])  # [2, n, 6]
    texts = torch.randn(2, 4, 16)
    model = PointFlowTransformer(CFG)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(600):
        pick = torch.randint(0, 2, (16,), generator=g)
        loss = flow_matching_loss(model, data[pick], model.with_dropout(texts[pick], 0.1, g), g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    noise = torch.randn(2, n, 6, generator=torch.Generator().manual_seed(1))
    sample = euler_sample(model, noise, texts, steps=25, guidance=1.0, null=None)
    # colors: the ring is red (+1, -1, -1), the line blue (-1, -1, +1)
    assert sample[0, :, 3].mean() > 0.5 and sample[0, :, 5].mean() < -0.5
    assert sample[1, :, 3].mean() < -0.5 and sample[1, :, 5].mean() > 0.5
    # geometry: the ring is flat in z, the line is along z
    assert sample[0, :, 2].std() < 0.05 and sample[1, :, 2].std() > 0.15  # the line's own spread: 0.29
