"""Rectified flow and MDT-dist math against the exact flow of Gaussian data, where every quantity is analytic."""

import pytest
import torch

from gen3d.models.flow import (MDTConfig, consistency_loss, diffuse, euler_sample, flow_matching_loss, guided,
                               mdt_losses, mdt_target, time_grid, velocity_target)

MU, S = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.3])
"""Data x0 ~ N(MU, diag(S^2)); with sigma_min = 0, x_t ~ N((1 - t) MU, (1 - t)^2 S^2 + t^2)."""


def sigma(t):
    return ((1 - t) ** 2 * S ** 2 + t ** 2).sqrt()


def exact_velocity(x, t, cond=None):
    """The flow's velocity: x_t = (1 - t) MU + sigma_t z along a trajectory, so v = -MU + sigma_t' z."""
    t = t[:, None]
    s = sigma(t)
    z = (x - (1 - t) * MU) / s
    return -MU + (-(1 - t) * S ** 2 + t) / s * z


def exact_average(x, t, cond=None):
    """The average velocity from t to 0: (x_t - x0(x_t)) / t with x0 = MU + S z (the ODE maps quantiles)."""
    tt = t[:, None]
    z = (x - (1 - tt) * MU) / sigma(tt)
    return (x - (MU + S * z)) / tt


def test_convention_identities():
    g = torch.Generator().manual_seed(0)
    x0, eps, t = torch.randn(5, 2, generator=g), torch.randn(5, 2, generator=g), torch.rand(5, generator=g)
    x_t = diffuse(x0, t, eps, sigma_min=0.0)
    assert torch.allclose(x0, x_t - t[:, None] * velocity_target(x0, eps, 0.0), atol=1e-6)
    h = 1e-3  # the target is d x_t / dt, with sigma_min too
    fd = (diffuse(x0, t + h, eps, 1e-2) - diffuse(x0, t - h, eps, 1e-2)) / (2 * h)
    assert torch.allclose(fd, velocity_target(x0, eps, 1e-2), atol=1e-3)
    assert torch.allclose(diffuse(x0, torch.ones(5), eps, 0.0), eps)
    assert torch.allclose(diffuse(x0, torch.zeros(5), eps), x0 + 1e-5 * eps)


def test_time_grid_and_its_warp():
    grid = time_grid(4)
    assert torch.allclose(grid, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    warped = time_grid(4, rescale_t=3.0)
    assert warped[0] == 1 and warped[-1] == 0 and (warped[:-1] > warped[1:]).all()
    assert (warped[1:-1] > grid[1:-1]).all()  # more of the steps spent at high noise
    with pytest.raises(ValueError, match="steps"):
        time_grid(0)


def test_euler_sampler_reaches_the_data_and_one_step_collapses_to_the_mean():
    noise = torch.randn(20000, 2, generator=torch.Generator().manual_seed(1))
    x = euler_sample(exact_velocity, noise, steps=200)
    assert torch.allclose(x.mean(0), MU, atol=0.02) and torch.allclose(x.std(0), S, atol=0.02)
    one = euler_sample(exact_velocity, noise, steps=1)
    assert torch.allclose(one.mean(0), MU, atol=0.02) and one.std(0).max() < 1e-4  # why few-step needs distillation
    # the exact average velocity is a one-step sampler
    exact = noise - exact_average(noise, torch.ones(len(noise)))
    assert torch.allclose(exact.std(0), S, atol=0.02)


def test_guidance_contrasts_with_the_null_condition():
    def model(x, t, cond):
        return x * (2.0 if cond is None else 3.0)

    x, t = torch.ones(2, 2), torch.ones(2)
    assert torch.equal(guided(model, x, t, "c", 0.0), 3 * x)
    assert torch.allclose(guided(model, x, t, "c", 4.0), (5 * 3 - 4 * 2) * x)
    # guidance only inside the interval: from t = 1 to 0 in 2 steps, guided at t = 1, not at t = 0.5
    out = euler_sample(model, torch.ones(1, 2), "c", steps=2, guidance=1.0, guidance_interval=(0.9, 1.0))
    assert torch.allclose(out, torch.ones(1, 2) * (1 - 0.5 * 4) * (1 - 0.5 * 3))


def test_flow_matching_loss_is_minimal_at_the_exact_velocity():
    g = torch.Generator().manual_seed(2)
    x0 = MU + S * torch.randn(4096, 2, generator=g)
    exact = flow_matching_loss(exact_velocity, x0, None, torch.Generator().manual_seed(3), sigma_min=0.0)
    off = flow_matching_loss(lambda x, t, c: 1.2 * exact_velocity(x, t), x0, None, torch.Generator().manual_seed(3),
                             sigma_min=0.0)
    assert exact < off


def test_mdt_target_is_a_fixed_point_of_the_exact_average_velocity():
    """u = v - t du/dt: with the exact teacher and the exact average velocity as student, v_tgt = v_pred (to O(dt))."""
    cfg = MDTConfig(delta=1e-3, d_norm=None, sigma_min=0.0)
    g = torch.Generator().manual_seed(4)
    t = cfg.sample_t(512, g)
    x_t = diffuse(MU + S * torch.randn(512, 2, generator=g), t, torch.randn(512, 2, generator=g), 0.0)
    v_pred, v_tgt = mdt_target(exact_average, exact_velocity, x_t, t, None, 40.0, cfg)
    assert (v_pred - v_tgt).abs().max() < 5e-3
    wrong = lambda x, t, c: 1.3 * exact_average(x, t)  # noqa: E731
    v_pred, v_tgt = mdt_target(wrong, exact_velocity, x_t, t, None, 40.0, cfg)
    assert (v_pred - v_tgt).abs().mean() > 0.1
    # the official per-sample normalization of D bounds the correction term
    normed = MDTConfig(delta=1e-3, d_norm=0.1, sigma_min=0.0)
    _, v_tgt_n = mdt_target(wrong, exact_velocity, x_t, t, None, 40.0, normed)
    assert ((v_tgt_n - exact_velocity(x_t, t)).norm(dim=1) <= t + 1e-5).all()


def test_vd_gradient_reaches_the_student_only_through_its_one_step_sample():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    student = lambda x, t, c: net(torch.cat([x, t[:, None]], 1))  # noqa: E731
    cfg = MDTConfig(lambda_vm=0.0, sigma_min=0.0)
    x0 = MU + S * torch.randn(64, 2)
    loss = mdt_losses(student, exact_velocity, x0, None, cfg, torch.Generator().manual_seed(5))["vd"]
    grads = torch.autograd.grad(loss, list(net.parameters()))
    # by hand, with the same draws: d loss / d u_f = 2 (v_pred - v_tgt) / numel
    g = torch.Generator().manual_seed(5)
    t = cfg.sample_t(64, g)
    eps = torch.randn(x0.shape, generator=g)
    eps_fake = torch.randn(x0.shape, generator=g)
    u_fake = student(eps_fake, torch.ones(64), None)
    v_pred, v_tgt = mdt_target(student, exact_velocity, diffuse((eps_fake - u_fake).detach(), t, eps, 0.0), t, None,
                               cfg.guidance_vd, cfg)
    surrogate = (2 * (v_pred - v_tgt).detach() * u_fake).sum() / u_fake.numel()
    expected = torch.autograd.grad(surrogate, list(net.parameters()))
    for a, b in zip(grads, expected):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("method", ["mdt", "consistency"])
def test_distillation_turns_the_student_into_a_one_step_sampler(method):
    """A small MLP student, trained against the exact teacher for 1,200 steps, samples the data in one step: the
    right mean and most of the spread, where the teacher's own one-step sample has none. (Longer training keeps
    closing the gap: at 3,000 steps MDT's spread was 0.39 / 0.29 of 0.5 / 0.3.)"""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.SiLU(), torch.nn.Linear(64, 64), torch.nn.SiLU(),
                              torch.nn.Linear(64, 2))
    student = lambda x, t, c: net(torch.cat([x, t[:, None]], 1))  # noqa: E731
    cfg = MDTConfig(sigma_min=0.0)
    steps = 1200
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(6)
    for _ in range(steps):
        x0 = MU + S * torch.randn(256, 2, generator=g)
        loss = (mdt_losses(student, exact_velocity, x0, None, cfg, g)["loss"] if method == "mdt"
                else consistency_loss(student, exact_velocity, x0, None, cfg, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    noise = torch.randn(8192, 2, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        sample = noise - student(noise, torch.ones(len(noise)), None)
    assert torch.allclose(sample.mean(0), MU, atol=0.2)  # from noise of mean 0
    assert (sample.std(0) > 0.6 * S).all() and (sample.std(0) < 1.4 * S).all()


def test_config_errors():
    with pytest.raises(ValueError, match="delta"):
        MDTConfig(delta=0.0)
    with pytest.raises(ValueError, match="d_norm"):
        MDTConfig(d_norm=-1.0)
    with pytest.raises(ValueError, match="guidance_vd"):
        MDTConfig(guidance_vd=float("nan"))
