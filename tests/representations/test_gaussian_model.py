import math

import pytest
import torch

from gen3d.errors import CheckpointError
from gen3d.ops.sh import C0
from gen3d.representations.gaussians import PARAM_NAMES, GaussianConfig, GaussianModel, knn_scales


def random_model(n: int, sh_degree: int = 0, seed: int = 0) -> GaussianModel:
    g = torch.Generator().manual_seed(seed)
    K = (sh_degree + 1) ** 2
    return GaussianModel.from_tensors(
        torch.rand(n, 3, generator=g) - 0.5, torch.rand(n, 3, generator=g) * 2 - 4, torch.randn(n, 4, generator=g),
        torch.randn(n, generator=g), torch.randn(n, K, 3, generator=g), GaussianConfig(sh_degree=sh_degree),
    )


@pytest.mark.parametrize("field,value", [("sh_degree", 4), ("init", "cube"), ("num_points", 0), ("init_opacity", 1.0),
                                         ("init_scale", -0.1), ("position_lr_final", 0.0), ("opacity_lr", -1.0),
                                         ("position_lr_max_steps", 0)])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        GaussianConfig(**{field: value})


def test_param_groups_are_named_with_dreamgaussian_rates():
    model = random_model(5, sh_degree=1)
    groups = {g["name"]: g for g in model.param_groups()}
    assert list(groups) == list(PARAM_NAMES)
    assert all(g["params"][0] is getattr(model, name) for name, g in groups.items())
    assert groups["means"]["lr"] == pytest.approx(10 * 0.001)  # spatial_lr_scale 10, as DreamGaussian
    assert groups["sh0"]["lr"] == 0.01 and groups["shN"]["lr"] == pytest.approx(0.01 / 20)
    assert groups["opacity_logits"]["lr"] == 0.05
    assert groups["log_scales"]["lr"] == 0.005 and groups["quats"]["lr"] == 0.005
    n_params = sum(p.numel() for g in groups.values() for p in g["params"])
    assert n_params == sum(p.numel() for p in model.parameters())


def test_position_lr_decays_log_linearly():
    cfg = GaussianConfig(spatial_lr_scale=1.0)
    assert cfg.position_lr(0, 100) == pytest.approx(1e-3)
    assert cfg.position_lr(50, 100) == pytest.approx(math.sqrt(1e-3 * 2e-5))  # geometric mean halfway
    assert cfg.position_lr(100, 100) == pytest.approx(2e-5)
    assert cfg.position_lr(500, 100) == pytest.approx(2e-5)
    fixed = GaussianConfig(spatial_lr_scale=1.0, position_lr_max_steps=10)
    assert fixed.position_lr(10) == pytest.approx(2e-5) and fixed.position_lr(5, 1000) == pytest.approx(math.sqrt(1e-3 * 2e-5))
    with pytest.raises(ValueError, match="max_steps"):
        cfg.position_lr(3)

    model = GaussianModel.random_ball(GaussianConfig(num_points=16))
    opt = torch.optim.Adam(model.param_groups(), lr=0.0, eps=1e-15)
    lr = model.update_learning_rate(opt, 25, max_steps=100)
    assert lr == pytest.approx(10 * 1e-3 * (2e-5 / 1e-3) ** 0.25)
    assert {g["name"]: g["lr"] for g in opt.param_groups}["means"] == lr
    assert {g["name"]: g["lr"] for g in opt.param_groups}["sh0"] == 0.01


def test_random_ball_is_inside_the_radius_and_seeded():
    cfg = GaussianConfig(num_points=500, init_radius=0.3, sh_degree=2)
    a = GaussianModel.random_ball(cfg, torch.Generator().manual_seed(1))
    b = GaussianModel.random_ball(cfg, torch.Generator().manual_seed(1))
    c = GaussianModel.random_ball(cfg, torch.Generator().manual_seed(2))
    assert a.num_gaussians == 500 and a.sh_degree == 2
    assert a.means.norm(dim=-1).max() <= 0.3 + 1e-6
    assert a.means.norm(dim=-1).max() > 0.25  # fills the ball, not just its center
    assert torch.equal(a.means, b.means) and not torch.equal(a.means, c.means)
    assert torch.allclose(a.opacities, torch.full((500,), 0.1))
    assert ((a.base_colors - 0.5).abs() <= 0.021).all()  # near-gray start
    assert a.shN.shape == (500, 8, 3) and (a.shN == 0).all()
    assert torch.allclose(a.quats, torch.tensor([1.0, 0, 0, 0]).expand(500, 4))
    # scales: RMS distance to the 3 nearest neighbours, isotropic
    assert torch.allclose(a.scales, knn_scales(a.means)[:, None].expand(500, 3))
    assert 0.005 < a.scales.mean() < 0.1
    const = GaussianModel.random_ball(GaussianConfig(num_points=10, init_scale=0.02))
    assert torch.allclose(const.scales, torch.full((10, 3), 0.02))


def test_properties_and_shapes():
    model = random_model(7, sh_degree=3)
    assert model.sh.shape == (7, 16, 3) and model.shN.shape == (7, 15, 3) and model.sh0.shape == (7, 1, 3)
    assert torch.allclose(model.scales, model.log_scales.exp())
    assert torch.allclose(model.opacities, torch.sigmoid(model.opacity_logits))
    R = model.rotations
    assert torch.allclose(R @ R.transpose(1, 2), torch.eye(3).expand(7, 3, 3), atol=1e-5)
    assert torch.allclose(torch.linalg.det(R), torch.ones(7), atol=1e-5)
    deg0 = GaussianModel(GaussianConfig(), num_gaussians=3)
    assert deg0.shN.shape == (3, 0, 3) and deg0.sh.shape == (3, 1, 3)
    with pytest.raises(ValueError, match="sh must be"):
        GaussianModel.from_tensors(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2), torch.zeros(2, 5, 3))
    with pytest.raises(ValueError, match="quats"):
        GaussianModel.from_tensors(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), torch.zeros(2, 1, 3))


def test_rotations_use_wxyz_quaternions():
    angle = 0.7
    q = torch.tensor([[math.cos(angle / 2), 0.0, 0.0, math.sin(angle / 2)]]) * 3.0  # unnormalized, about z
    R = GaussianModel.from_values(torch.zeros(1, 3), 0.1, 0.5, quats=q).rotations[0].detach()
    expected = torch.tensor([[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1]])
    assert torch.allclose(R, expected, atol=1e-6)


def test_load_state_dict_with_a_different_number_of_gaussians():
    big, small = random_model(12, sh_degree=1, seed=1), random_model(5, sh_degree=1, seed=2)
    small.load_state_dict(big.state_dict())
    assert small.num_gaussians == 12
    for name in PARAM_NAMES:
        assert torch.equal(getattr(small, name), getattr(big, name))
        assert isinstance(getattr(small, name), torch.nn.Parameter)
    empty = GaussianModel(GaussianConfig(sh_degree=1))
    empty.load_state_dict(big.state_dict())
    assert torch.equal(empty.sh, big.sh)
    # an optimizer built after loading trains the resized parameters
    opt = torch.optim.Adam(empty.param_groups(), lr=0.0, eps=1e-15)
    empty.means.sum().backward()
    opt.step()
    with pytest.raises(CheckpointError, match="SH degree 1"):
        GaussianModel(GaussianConfig(sh_degree=0)).load_state_dict(big.state_dict())


def test_density_at_the_center_is_the_opacity_and_exp_half_at_one_sigma():
    angle = 0.9
    q = torch.tensor([[math.cos(angle / 2), math.sin(angle / 2), 0.0, 0.0]])  # rotation about x
    scales = torch.tensor([[0.1, 0.2, 0.05]])
    model = GaussianModel.from_values(torch.tensor([[0.1, -0.2, 0.3]]), scales, 0.7, 0.5, quats=q)
    R = model.rotations[0].detach()
    center = model.means.detach()
    with torch.no_grad():
        assert model.density(center).item() == pytest.approx(0.7, rel=1e-6)
        # one standard deviation along each (rotated) principal axis
        for axis in range(3):
            p = center + scales[0, axis] * R[:, axis]
            assert model.density(p).item() == pytest.approx(0.7 * math.exp(-0.5), rel=1e-5)
        # 2 sigma along a diagonal of the local frame: d = S R^T (x - mu) has |d|^2 = 4
        local = torch.tensor([1.0, 1.0, 1.0]) / math.sqrt(3) * 2
        p = center + (R @ (scales[0] * local))[None]
        assert model.density(p).item() == pytest.approx(0.7 * math.exp(-2.0), rel=1e-5)
        # beyond the 3-sigma cutoff the Gaussian contributes nothing
        assert model.density(center + 3.2 * scales[0, 0] * R[:, 0]).item() == 0.0


def test_morton_order_walks_the_grid_in_cubic_blocks():
    from gen3d.representations.gaussians import _morton_code

    n = 8
    cells = torch.stack(torch.meshgrid(*[torch.arange(n)] * 3, indexing="ij"), -1).reshape(-1, 3)
    codes = _morton_code(cells, bits=3)
    assert sorted(codes.tolist()) == list(range(n ** 3))  # one code per cell
    ordered = cells[torch.argsort(codes)]
    for size in (2, 4):  # every run of size^3 consecutive cells is a size x size x size cube
        for block in ordered.split(size ** 3):
            assert ((block.amax(0) - block.amin(0)) == size - 1).all() and (block.amin(0) % size == 0).all()


def test_density_matches_brute_force_and_ignores_chunking():
    model = random_model(40, seed=3)
    pts = torch.rand(300, 3) - 0.5
    with torch.no_grad():
        cov = model.rotations @ torch.diag_embed(model.scales.square()) @ model.rotations.transpose(1, 2)
        d = pts[:, None, :] - model.means[None]  # [P, N, 3]
        m2 = torch.einsum("pni,nij,pnj->pn", d, torch.linalg.inv(cov), d)
        expected = (model.opacities * torch.exp(-0.5 * m2) * (m2 <= 9.0)).sum(1)
        got = model.density(pts)
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)
        assert torch.allclose(model.density(pts, chunk=7), got, atol=1e-6)
        no_cut = (model.opacities * torch.exp(-0.5 * m2)).sum(1)
        assert torch.allclose(model.density(pts, cutoff=50.0), no_cut, atol=1e-5, rtol=1e-4)
    # differentiable (useful for regularizers)
    model.density(pts[:10]).sum().backward()
    assert model.means.grad is not None and model.opacity_logits.grad is not None


def test_color_at_is_density_weighted_dc_color():
    means = torch.tensor([[-0.5, 0.0, 0.0], [0.5, 0.0, 0.0]])
    colors = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    model = GaussianModel.from_values(means, 0.3, 0.9, colors)  # 3 sigma = 0.9 < the 1.0 gap
    assert torch.allclose(model.sh0[:, 0] * C0 + 0.5, colors, atol=1e-6)
    with torch.no_grad():
        c = model.color_at(torch.tensor([[-0.5, 0.0, 0.05], [0.45, 0.0, 0.0], [0.0, 0.0, 0.0], [-3.0, 0.0, 0.0]]))
    assert torch.allclose(c[0], colors[0], atol=1e-5) and torch.allclose(c[1], colors[1], atol=1e-5)
    assert torch.allclose(c[2], torch.tensor([0.5, 0.0, 0.5]), atol=1e-5)  # halfway: equal weights
    assert torch.allclose(c[3], colors[0])  # no Gaussian reaches: nearest one's color
