import copy
import io
import math

import pytest
import torch

from gen3d.representations.gaussians import PARAM_NAMES, GaussianConfig, GaussianModel
from gen3d.representations.strategy import DensifyConfig, DensifyStrategy

W = H = 64


def two_gaussians(scales, opacities=0.9) -> GaussianModel:
    means = torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.0, 0.0]])
    return GaussianModel.from_values(means, torch.as_tensor(scales, dtype=torch.float32), opacities,
                                     torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))


def fake_stats(strategy, grads_px, radii=None, step=1):
    """Feed pixel-space gradients [C, N, 2] as if a renderer's means2d had received them."""
    grads_px = torch.as_tensor(grads_px, dtype=torch.float32)
    means2d = torch.zeros_like(grads_px, requires_grad=True)
    means2d.grad = grads_px
    radii = torch.full(grads_px.shape[:2], 3.0) if radii is None else torch.as_tensor(radii, dtype=torch.float32)
    strategy.update_stats(means2d, radii, W, H, step)


def strategy_for(**overrides) -> DensifyStrategy:
    cfg = {"densify_from": 1, "densify_until": 1000, "densify_every": 1, "grad_threshold": 0.01,
           "opacity_reset_every": None, "prune_opacity": 0.005, **overrides}
    return DensifyStrategy(DensifyConfig(**cfg), scene_extent=1.0)


def adam_after_one_step(model):
    opt = torch.optim.Adam(model.param_groups(), lr=0.0, eps=1e-15)
    loss = sum((p.float() - 0.1).square().sum() for p in model.parameters())
    loss.backward()
    for group in opt.param_groups:
        group["lr"] = 1e-3
    opt.step()
    opt.zero_grad(set_to_none=True)
    return opt


def assert_optimizer_matches(model, opt):
    for group in opt.param_groups:
        p = group["params"][0]
        assert p is getattr(model, group["name"]), group["name"]
        state = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                assert state[key].shape == p.shape, (group["name"], key)
    assert len(opt.state) <= len(PARAM_NAMES)


def test_config_validation():
    with pytest.raises(ValueError, match="densify_every"):
        DensifyConfig(densify_every=0)
    with pytest.raises(ValueError, match="split_factor"):
        DensifyConfig(split_factor=1)
    with pytest.raises(ValueError, match="max_screen_size"):
        DensifyConfig(max_screen_size=0)
    with pytest.raises(ValueError, match="max_steps"):
        DensifyStrategy(DensifyConfig(densify_until=0.5), scene_extent=1.0)
    s = DensifyStrategy(DensifyConfig(densify_from=0.1, densify_until=0.5), scene_extent=1.0, max_steps=1000)
    assert (s.densify_from, s.densify_until) == (100, 500)


def test_stats_are_ndc_gradient_norms_of_visible_views():
    s = strategy_for()
    grads = torch.zeros(2, 3, 2)
    grads[0, 0] = torch.tensor([0.001, 0.0])
    grads[1, 0] = torch.tensor([0.0, 0.002])
    grads[1, 2] = torch.tensor([0.5, 0.5])  # not visible in camera 1: ignored
    fake_stats(s, grads, radii=[[2.0, 0.0, 0.0], [5.0, 1.0, 0.0]])
    # x-gradient times W/2, y-gradient times H/2, both times C = 2 (losses average over cameras)
    assert torch.allclose(s.grad_accum, torch.tensor([0.001 * 32 * 2 + 0.002 * 32 * 2, 0.0, 0.0]))
    assert torch.equal(s.count, torch.tensor([2.0, 1.0, 0.0]))
    assert torch.equal(s.max_radii, torch.tensor([5.0, 1.0, 0.0]))
    fake_stats(s, torch.ones(2, 3, 2), step=1000)  # from densify_until on: ignored
    assert torch.equal(s.count, torch.tensor([2.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="statistics track 3"):
        fake_stats(s, torch.zeros(1, 4, 2))


def test_small_gaussian_with_high_gradient_is_cloned():
    model, s = two_gaussians([0.005, 0.005]), strategy_for()
    opt = adam_after_one_step(model)
    before = {name: getattr(model, name).detach().clone() for name in PARAM_NAMES}
    fake_stats(s, [[[0.001, 0.0], [0.0, 0.0]]])  # 0.001 px * 32 = 0.032 >= 0.01
    result = s.maybe_densify(model, opt, step=1)
    assert (result.cloned, result.split, result.pruned, model.num_gaussians) == (1, 0, 0, 3)
    for name in PARAM_NAMES:
        assert torch.equal(getattr(model, name)[:2], before[name]), name
        assert torch.equal(getattr(model, name)[2], before[name][0]), name
    assert_optimizer_matches(model, opt)
    assert (opt.state[model.means]["exp_avg"][2] == 0).all() and (opt.state[model.means]["exp_avg"][:2] != 0).any()
    assert s.grad_accum.shape == (3,) and (s.grad_accum == 0).all()  # statistics restart


def test_large_gaussian_with_high_gradient_is_split():
    model, s = two_gaussians([[0.05, 0.02, 0.03], [0.005, 0.005, 0.005]]), strategy_for()
    opt = adam_after_one_step(model)
    parent_mean, parent_scales = model.means[0].detach().clone(), model.scales[0].detach().clone()
    parent_opacity = model.opacities[0].detach().clone()
    fake_stats(s, [[[0.001, 0.0], [0.0, 0.0]]])
    result = s.maybe_densify(model, opt, step=1, generator=torch.Generator().manual_seed(0))
    assert (result.cloned, result.split, result.pruned, model.num_gaussians) == (0, 1, 0, 3)
    children = slice(1, 3)  # the parent is removed, its 2 children appended after the untouched Gaussian
    assert torch.allclose(model.scales[children], (parent_scales / 1.6).expand(2, 3), rtol=1e-5)
    offsets = model.means[children] - parent_mean
    assert (offsets.norm(dim=-1) > 0).all() and (offsets.abs() < 5 * parent_scales).all()
    assert not torch.equal(model.means[1], model.means[2])
    assert torch.equal(model.opacities[children], parent_opacity.expand(2))
    assert_optimizer_matches(model, opt)
    assert (opt.state[model.means]["exp_avg"][children] == 0).all()


def test_low_opacity_and_oversized_gaussians_are_pruned():
    model, s = two_gaussians([0.005, 0.005], opacities=torch.tensor([0.9, 0.004])), strategy_for()
    opt = adam_after_one_step(model)
    kept_mean = model.means[0].detach().clone()
    kept_avg = opt.state[model.means]["exp_avg"][0].clone()
    result = s.maybe_densify(model, opt, step=1)
    assert (result.pruned, model.num_gaussians) == (1, 1)
    assert torch.equal(model.means[0], kept_mean) and torch.equal(opt.state[model.means]["exp_avg"][0], kept_avg)
    assert_optimizer_matches(model, opt)

    big = two_gaussians([0.5, 0.005])  # largest scale above prune_world_size * extent = 0.1
    s = strategy_for()
    s.maybe_densify(big, None, step=1)
    assert big.num_gaussians == 1 and big.scales.max() < 0.01

    screen = two_gaussians([0.005, 0.005])
    s = strategy_for(max_screen_size=10)
    fake_stats(s, torch.zeros(1, 2, 2), radii=[[20.0, 4.0]])
    s.maybe_densify(screen, None, step=1)
    assert screen.num_gaussians == 1 and screen.means[0, 0] == 0.5


def test_opacity_reset_caps_opacities_and_clears_their_moments():
    model = two_gaussians([0.005, 0.005], opacities=torch.tensor([0.9, 0.004]))
    s = strategy_for(densify_every=100, opacity_reset_every=3)
    opt = adam_after_one_step(model)
    means_avg = opt.state[model.means]["exp_avg"].clone()
    low = model.opacities[1].item()
    assert not s.maybe_densify(model, opt, step=2).changed
    result = s.maybe_densify(model, opt, step=3)
    assert result.opacity_reset and model.num_gaussians == 2
    assert torch.allclose(model.opacities, torch.tensor([0.01, low]), atol=1e-7)
    assert (opt.state[model.opacity_logits]["exp_avg"] == 0).all()
    assert (opt.state[model.opacity_logits]["exp_avg_sq"] == 0).all()
    assert torch.equal(opt.state[model.means]["exp_avg"], means_avg)
    assert not s.maybe_densify(model, opt, step=1002).opacity_reset  # not past densify_until


def test_max_gaussians_caps_densification_by_gradient():
    means = torch.stack([torch.tensor([i * 0.3, 0.0, 0.0]) for i in range(4)])
    model = GaussianModel.from_values(means, 0.005, 0.9)
    s = strategy_for(max_gaussians=6)
    fake_stats(s, [[[0.001, 0.0], [0.004, 0.0], [0.003, 0.0], [0.002, 0.0]]])
    result = s.maybe_densify(model, None, step=1)
    assert (result.cloned, model.num_gaussians) == (2, 6)
    assert torch.equal(model.means[4:], means[[1, 2]])  # the two largest gradients


def loss_of(model):
    """A deterministic stand-in for render + guidance: every parameter and a 'screen position' get gradients."""
    means2d = model.means[None, :, :2] * W + W / 2  # [1, N, 2] pixels
    means2d.retain_grad()
    loss = ((means2d / W - 0.3).square().sum() + (model.sh0 - 0.2).square().sum() + (model.opacities - 0.6).square().sum()
            + (model.log_scales + 2.5).square().sum() + 0.01 * model.quats.sum() + model.shN.square().sum())
    return loss, means2d, torch.full(means2d.shape[:2], 2.0)


def train(model, opt, strategy, start, end, max_steps, generator=None):
    for step in range(start, end + 1):
        model.update_learning_rate(opt, step, max_steps)
        loss, means2d, radii = loss_of(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        strategy.update_stats(means2d, radii, W, H, step)
        opt.step()
        strategy.maybe_densify(model, opt, step, generator=generator)
        assert_optimizer_matches(model, opt)


def fresh(seed=0):
    gcfg = GaussianConfig(num_points=24, sh_degree=1)
    model = GaussianModel.random_ball(gcfg, torch.Generator().manual_seed(seed))
    opt = torch.optim.Adam(model.param_groups(), lr=0.0, eps=1e-15)
    dcfg = DensifyConfig(densify_from=4, densify_until=25, densify_every=4, grad_threshold=0.3, percent_dense=0.05,
                         opacity_reset_every=10, prune_opacity=0.005, max_gaussians=80)
    return gcfg, dcfg, model, opt, DensifyStrategy(dcfg, scene_extent=1.0)


def test_training_with_surgery_runs_and_changes_the_count():
    _, _, model, opt, s = fresh()
    n0 = model.num_gaussians
    train(model, opt, s, 1, 12, 30)
    assert model.num_gaussians != n0
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("explicit_generator", [False, True])
def test_interrupted_and_resumed_run_matches_uninterrupted(explicit_generator):
    total, cut = 30, 11  # the resumed part splits at step 12, clones at 16 and 20, resets at 20
    gen = (lambda: torch.Generator().manual_seed(7)) if explicit_generator else (lambda: None)

    _, _, model, opt, s = fresh()
    g = gen()
    train(model, opt, s, 1, total, total, g)
    straight = {k: v.clone() for k, v in model.state_dict().items()}

    gcfg, dcfg, model, opt, s = fresh()
    g = gen()
    train(model, opt, s, 1, cut, total, g)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "strategy": s.state_dict(),
                "generator": g.get_state() if g is not None else None}, buffer)
    del model, opt, s
    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)
    resumed = GaussianModel(gcfg)
    resumed.load_state_dict(ckpt["model"])
    opt = torch.optim.Adam(resumed.param_groups(), lr=0.0, eps=1e-15)
    opt.load_state_dict(ckpt["opt"])
    s = DensifyStrategy(dcfg, scene_extent=1.0)
    s.load_state_dict(ckpt["strategy"])
    g = gen()
    if g is not None:
        g.set_state(ckpt["generator"])
    train(resumed, opt, s, cut + 1, total, total, g)

    final = resumed.state_dict()
    assert final.keys() == straight.keys()
    for k in final:
        assert torch.equal(final[k], straight[k]), k


def test_split_sampling_depends_only_on_the_generator():
    def run(seed):
        model = two_gaussians([0.05, 0.05])
        s = strategy_for()
        fake_stats(s, [[[0.001, 0.0], [0.001, 0.0]]])
        torch.manual_seed(123 + seed)  # the global RNG must not matter
        s.maybe_densify(model, None, step=1, generator=torch.Generator().manual_seed(seed))
        return model.means.detach().clone()

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_state_dict_round_trip():
    s = strategy_for()
    empty = s.state_dict()
    assert all(isinstance(v, torch.Tensor) and v.numel() == 0 for v in empty.values())
    fake_stats(s, torch.rand(2, 5, 2) * 0.01, radii=torch.rand(2, 5) * 4)
    state = copy.deepcopy(s.state_dict())
    other = strategy_for()
    other.load_state_dict(state)
    for key in ("grad_accum", "count", "max_radii"):
        assert torch.equal(getattr(other, key), getattr(s, key))
    other.load_state_dict(empty)
    assert other.grad_accum is None
    # identical statistics densify identically
    a, b = GaussianModel.from_values(torch.rand(5, 3), 0.005, 0.9), None
    b = copy.deepcopy(a)
    ra, rb = s.maybe_densify(a, None, step=1), strategy_for().maybe_densify(b, None, step=1)
    other.load_state_dict(state)
    rb = other.maybe_densify(b, None, step=1)
    assert ra == rb and torch.equal(a.means, b.means)
    assert math.isfinite(float(a.means.detach().sum()))


def test_split_factor_sets_children_and_default_shrink():
    model, s = two_gaussians([0.05, 0.005]), strategy_for(split_factor=3)
    fake_stats(s, [[[0.001, 0.0], [0.0, 0.0]]])
    s.maybe_densify(model, None, step=1)
    assert model.num_gaussians == 1 + 3
    assert torch.allclose(model.scales[1:], torch.full((3, 3), 0.05 / (0.8 * 3)))
    empty = GaussianModel(GaussianConfig())
    assert strategy_for().maybe_densify(empty, None, step=2).num_gaussians == 0
