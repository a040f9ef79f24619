import math

import pytest
import torch

from gen3d import losses
from gen3d.losses import (
    LossWeights,
    binary_entropy,
    entropy_loss,
    opaque_loss,
    orientation_loss,
    sparsity_loss,
)
from gen3d.rendering.types import SampleRecord


def packed(rays: list[int]) -> torch.Tensor:
    """ray_indices [S] for rays holding rays[r] samples each."""
    return torch.repeat_interleave(torch.arange(len(rays)), torch.tensor(rays))


def naive_orientation(weights, normals, directions, ray_indices, n_rays):
    total, hit = 0.0, 0
    for r in range(n_rays):
        sel = ray_indices == r
        if weights[sel].sum() > 0:
            hit += 1
        d = directions[sel] / directions[sel].norm(dim=-1, keepdim=True)
        total += float((weights[sel] * (normals[sel] * d).sum(-1).clamp_min(0) ** 2).sum())
    return total / max(hit, 1)


def naive_entropy(weights, ray_indices, n_rays, min_opacity):
    values = []
    for r in range(n_rays):
        w = weights[ray_indices == r]
        if w.sum() >= min_opacity and w.sum() > 0:
            p = w / w.sum()
            values.append(float(-(p[p > 0] * p[p > 0].log()).sum()))
    return sum(values) / max(len(values), 1)


# ---- orientation ---------------------------------------------------------------------------------

def test_orientation_is_zero_facing_the_camera_and_positive_facing_away():
    directions = torch.nn.functional.normalize(torch.randn(6, 3, generator=torch.Generator().manual_seed(0)), dim=-1)
    weights = torch.tensor([0.2, 0.5, 0.3, 0.9, 0.05, 0.05])
    rays = packed([3, 3])
    assert orientation_loss(weights, -directions, directions, rays, 2).item() == 0.0  # n . d = -1
    away = orientation_loss(weights, directions, directions, rays, 2)  # n . d = 1: sum of weights per ray
    assert away.item() == pytest.approx((1.0 + 1.0) / 2)
    # a normal perpendicular to the ray costs nothing either
    side = torch.linalg.cross(directions, torch.tensor([[0.0, 0.0, 1.0]]).expand(6, 3))
    assert orientation_loss(weights, torch.nn.functional.normalize(side, dim=-1), directions, rays, 2).abs() < 1e-12


def test_orientation_matches_a_naive_loop_and_normalizes_per_ray_with_weight():
    g = torch.Generator().manual_seed(1)
    rays = packed([4, 0, 5, 3])  # ray 1 has no samples
    S = len(rays)
    weights = torch.rand(S, generator=g)
    weights[rays == 3] = 0.0  # ray 3 carries no weight: not counted
    normals = torch.nn.functional.normalize(torch.randn(S, 3, generator=g), dim=-1)
    directions = 2.5 * torch.nn.functional.normalize(torch.randn(S, 3, generator=g), dim=-1)  # not unit
    got = orientation_loss(weights, normals, directions, rays, 4)
    assert got.item() == pytest.approx(naive_orientation(weights, normals, directions, rays, 4), rel=1e-5)
    assert orientation_loss(weights[:0], normals[:0], directions[:0], rays[:0], 4).item() == 0.0


def test_orientation_gradients_reach_normals_but_not_weights():
    g = torch.Generator().manual_seed(2)
    rays = packed([3, 4])
    weights = torch.rand(7, generator=g, dtype=torch.float64).requires_grad_(True)
    normals = torch.randn(7, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    directions = torch.nn.functional.normalize(torch.randn(7, 3, generator=g, dtype=torch.float64), dim=-1)
    loss = orientation_loss(weights, normals, directions, rays, 2)
    assert loss.requires_grad
    loss.backward()
    assert weights.grad is None
    assert normals.grad is not None and normals.grad.abs().sum() > 0
    assert torch.autograd.gradcheck(lambda n: orientation_loss(weights.detach(), n, directions, rays, 2), (normals,))


@pytest.mark.parametrize("bad", [
    {"weights": torch.ones(4, 1)},
    {"normals": torch.ones(4, 2)},
    {"directions": torch.ones(3, 3)},
    {"ray_indices": torch.zeros(4)},  # float indices
    {"ray_indices": torch.tensor([0, 0, 1, 2])},  # 2 >= n_rays
    {"ray_indices": torch.tensor([0, -1, 1, 1])},
    {"n_rays": 0},
])
def test_orientation_rejects_bad_inputs(bad):
    args = {"weights": torch.ones(4), "normals": torch.ones(4, 3), "directions": torch.ones(4, 3),
            "ray_indices": torch.tensor([0, 0, 1, 1]), "n_rays": 2}
    args.update(bad)
    with pytest.raises(ValueError, match="orientation_loss"):
        orientation_loss(**args)


# ---- sparsity / opaque ---------------------------------------------------------------------------

def test_sparsity_values():
    assert sparsity_loss(torch.zeros(2, 4, 4, 1)).item() == pytest.approx(0.1)  # sqrt(0 + 0.01)
    assert sparsity_loss(torch.ones(2, 4, 4, 1)).item() == pytest.approx(math.sqrt(1.01))
    alpha = torch.tensor([0.0, 0.5, 1.0, 0.25])
    assert sparsity_loss(alpha, eps=0.0).item() == pytest.approx(0.4375)  # plain L1
    assert sparsity_loss(alpha).item() == pytest.approx(sum(math.sqrt(a * a + 0.01) for a in alpha.tolist()) / 4)
    a = torch.tensor([0.0, 0.3], requires_grad=True)
    sparsity_loss(a).backward()
    assert a.grad[0] == 0 and a.grad[1] > 0  # smooth at 0, pushes opacity down
    with pytest.raises(ValueError, match="eps"):
        sparsity_loss(alpha, eps=-1.0)


def test_opaque_is_binary_entropy_zero_at_0_and_1_and_log2_at_half():
    assert opaque_loss(torch.tensor([0.0, 1.0, 1.0, 0.0])).item() < 2e-3
    assert opaque_loss(torch.full((1, 2, 2, 1), 0.5)).item() == pytest.approx(math.log(2), rel=1e-6)
    alpha = torch.tensor([0.2, 0.7])
    expected = -sum(a * math.log(a) + (1 - a) * math.log(1 - a) for a in alpha.tolist()) / 2
    assert opaque_loss(alpha).item() == pytest.approx(expected, rel=1e-6)
    assert opaque_loss(alpha).item() == binary_entropy(alpha).item()
    a = torch.tensor([0.0, 1.0, 0.3, 0.8], requires_grad=True)
    opaque_loss(a).backward()
    assert torch.isfinite(a.grad).all()
    assert a.grad[2] > 0 and a.grad[3] < 0  # descent pushes alpha towards 0 below one half, towards 1 above


@pytest.mark.parametrize("fn", [sparsity_loss, opaque_loss])
@pytest.mark.parametrize("bad", [torch.zeros(3, dtype=torch.long), torch.zeros(0), [0.5, 0.5]])
def test_alpha_losses_reject_bad_inputs(fn, bad):
    with pytest.raises(ValueError, match="alpha"):
        fn(bad)


# ---- entropy -------------------------------------------------------------------------------------

def test_entropy_is_zero_for_one_surface_and_log_k_for_even_fog():
    rays = packed([4, 4])
    one_surface = torch.tensor([0.0, 0.9, 0.0, 0.0, 0.0, 0.0, 0.0, 0.95])
    assert entropy_loss(one_surface, rays, 2).item() == pytest.approx(0.0, abs=1e-6)
    fog = torch.full((8,), 0.2)  # each ray: 4 equal weights, total 0.8
    assert entropy_loss(fog, rays, 2).item() == pytest.approx(math.log(4), rel=1e-5)


def test_entropy_ignores_empty_rays_and_matches_a_naive_loop():
    g = torch.Generator().manual_seed(3)
    rays = packed([5, 3, 0, 6])
    weights = torch.rand(len(rays), generator=g) * 0.3
    weights[rays == 1] = 0.01  # total 0.03 < min_opacity: masked out
    got = entropy_loss(weights, rays, 4, min_opacity=0.1)
    assert got.item() == pytest.approx(naive_entropy(weights, rays, 4, 0.1), rel=1e-5)
    assert entropy_loss(weights, rays, 4, min_opacity=0.0).item() == pytest.approx(
        naive_entropy(weights, rays, 4, 0.0), rel=1e-5)
    assert entropy_loss(torch.zeros(14), rays, 4).item() == 0.0


def test_entropy_gradcheck():
    g = torch.Generator().manual_seed(4)
    rays = packed([3, 4])
    weights = (torch.rand(7, generator=g, dtype=torch.float64) * 0.5 + 0.05).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda w: entropy_loss(w, rays, 2), (weights,))


def test_entropy_rejects_bad_inputs():
    with pytest.raises(ValueError, match="min_opacity"):
        entropy_loss(torch.ones(2), packed([2]), 1, min_opacity=2.0)
    with pytest.raises(ValueError, match="ray_indices"):
        entropy_loss(torch.ones(3), packed([2]), 1)


# ---- weights -------------------------------------------------------------------------------------

def record(S=6, normals=True):
    g = torch.Generator().manual_seed(5)
    d = torch.nn.functional.normalize(torch.randn(S, 3, generator=g), dim=-1)
    return SampleRecord(weights=torch.rand(S, generator=g), normals=d.clone() if normals else None,
                           directions=d, ray_indices=packed([S // 2, S - S // 2]), n_rays=2)


def test_weights_are_schedules_evaluated_at_a_step():
    w = LossWeights(lambda_orient=[0, 10, 1000, 5000], lambda_sparsity=2.0, lambda_entropy=[0.5, 0.0, 1.0, 1.0])
    assert w.at(0) == {"orient": 10.0, "sparsity": 2.0, "opaque": 0.0, "entropy": 0.0}
    assert w.at(2500)["orient"] == pytest.approx(505.0)
    assert w.at(9000)["orient"] == 1000.0
    assert w.at(300, max_steps=1000)["entropy"] == 0.0  # float positions are fractions of the run
    assert w.at(750, max_steps=1000)["entropy"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="lambda_opaque"):
        LossWeights(lambda_opaque=[1, 2])
    with pytest.raises(ValueError, match="lambda_sparsity must be >= 0"):
        LossWeights(lambda_sparsity=-1.0).at(0)


def test_terms_are_weighted_and_zero_weights_cost_nothing(monkeypatch):
    alpha, samples = torch.rand(1, 4, 4, 1), record()
    w = LossWeights(lambda_orient=3.0, lambda_sparsity=0.5, lambda_opaque=0.0, lambda_entropy=[100, 0.0, 2.0, 200])
    terms = w.terms(50, alpha=alpha, samples=samples)
    assert set(terms) == {"orient", "sparsity"}  # opaque is 0, entropy is 0 until step 100
    assert terms["sparsity"].item() == pytest.approx(0.5 * sparsity_loss(alpha).item())
    s = samples
    assert terms["orient"].item() == pytest.approx(
        3.0 * orientation_loss(s.weights, s.normals, s.directions, s.ray_indices, s.n_rays).item())
    assert w.terms(150, alpha=alpha, samples=samples)["entropy"].item() == pytest.approx(
        1.0 * entropy_loss(s.weights, s.ray_indices, s.n_rays).item())

    def boom(*args, **kwargs):
        raise AssertionError("a term with weight 0 was computed")

    for name in ("orientation_loss", "entropy_loss", "opaque_loss"):
        monkeypatch.setattr(losses, name, boom)
    assert set(LossWeights(lambda_sparsity=1.0).terms(0, alpha=alpha, samples=record(normals=False))) == {"sparsity"}
    assert LossWeights().terms(0) == {}  # nothing needed, nothing computed


def test_terms_name_the_missing_input():
    with pytest.raises(ValueError, match="alpha"):
        LossWeights(lambda_opaque=1.0).terms(0)
    with pytest.raises(ValueError, match="samples"):
        LossWeights(lambda_entropy=1.0).terms(0, alpha=torch.rand(4))
    with pytest.raises(ValueError, match="normals"):
        LossWeights(lambda_orient=1.0).terms(0, samples=record(normals=False))
