"""SDS on tiny random priors: the gradient chain, timesteps, weightings, clipping, the NaN guard."""

import pytest
import torch

from gen3d.cameras import spherical_cameras
from gen3d.errors import PriorNotAvailable
from gen3d.guidance import GUIDANCES, SDSGuidance
from gen3d.guidance import GuidanceConfig
from gen3d.guidance.base import reparameterized_loss, sample_timesteps, step_range, timestep_weight
from gen3d.priors.diffusion import DiffusionPrior
from gen3d.priors.prompts import PromptBatch, PromptConfig, PromptProcessor
from tests.tiny_prior import make_tiny_prior

T = 1000


@pytest.fixture(scope="module")
def pixel_prior(tmp_path_factory):
    return DiffusionPrior.from_pretrained(str(make_tiny_prior(tmp_path_factory.mktemp("sds") / "pixel", "pixel")))


@pytest.fixture(scope="module")
def latent_prior(tmp_path_factory):
    return DiffusionPrior.from_pretrained(str(make_tiny_prior(tmp_path_factory.mktemp("sds") / "latent", "latent")))


def _prompts(prior, B, **kw):
    azimuth = torch.linspace(-180, 180, B + 1)[:B]
    full = lambda v: torch.full((B,), float(v))  # noqa: E731
    cameras = spherical_cameras(azimuth, full(10), full(2.5), full(45), 16, 16)
    return PromptProcessor(prior, PromptConfig(prompt="a red mug", **kw))(cameras)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _capture_unet_input(prior):
    """Record the (x_t, t) of every UNet call; returns (records, hook handle)."""
    records = []
    handle = prior.unet.register_forward_pre_hook(
        lambda module, args, kwargs: records.append((args[0].detach().clone(), args[1].clone())), with_kwargs=True
    )
    return records, handle


def _capture_z(prior, monkeypatch):
    """Keep the z that `encode` returns (with its graph), to check the chain rule at z."""
    captured = []
    encode = prior.encode

    def recording_encode(*args, **kwargs):
        z = encode(*args, **kwargs)
        captured.append(z)
        return z

    monkeypatch.setattr(prior, "encode", recording_encode)
    return captured


def _expected_grad(prior, z, x_t, t, prompts, s, weighting="sds"):
    """g = w(t) (eps_u + s (eps_c - eps_u) - eps), from two separate UNet calls and the eps behind x_t."""
    abar = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    eps = (x_t - abar.sqrt() * z) / (1 - abar).sqrt()
    with torch.no_grad():
        eps_c = prior.unet(x_t, t, encoder_hidden_states=prompts.cond).sample
        eps_u = prior.unet(x_t, t, encoder_hidden_states=prompts.uncond).sample
    return timestep_weight(weighting, prior.alphas_cumprod, t) * (eps_u + s * (eps_c - eps_u) - eps)


# ---------------------------------------------------------------- the gradient chain


def test_pixel_gradient_reaches_render(pixel_prior):
    B, s = 2, 20.0
    prompts = _prompts(pixel_prior, B)
    rgb = torch.rand(B, 16, 16, 3, requires_grad=True)
    records, handle = _capture_unet_input(pixel_prior)
    try:
        out = SDSGuidance(pixel_prior, GuidanceConfig(guidance_scale=s))(rgb, prompts, 0, 100, generator=_gen())
    finally:
        handle.remove()
    (x_in, t_in), = records  # one batched call on [x_t; x_t]
    torch.testing.assert_close(x_in[:B], x_in[B:])
    torch.testing.assert_close(t_in, torch.cat([out.t, out.t]))
    z = 2 * rgb.detach().permute(0, 3, 1, 2) - 1
    g = _expected_grad(pixel_prior, z, x_in[:B], out.t, prompts, s)
    torch.testing.assert_close(out.grad, g, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(out.loss, 0.5 * out.grad.pow(2).sum() / B)
    assert out.grad_norm == pytest.approx(float(out.grad.norm()))
    assert out.nonfinite == 0 and out.t.shape == (B,)
    out.loss.backward()
    # z = 2 rgb - 1, so dL/drgb = 2 g / B, laid out [B, H, W, 3].
    torch.testing.assert_close(rgb.grad, 2 * out.grad.permute(0, 2, 3, 1) / B)


def test_pixel_gradient_through_resize(pixel_prior, monkeypatch):
    B = 2
    captured = _capture_z(pixel_prior, monkeypatch)
    rgb = torch.rand(B, 24, 20, 3, requires_grad=True)
    out = SDSGuidance(pixel_prior)(rgb, _prompts(pixel_prior, B), 0, 100, generator=_gen())
    (z,) = captured
    dz, drgb = torch.autograd.grad(out.loss, [z, rgb], retain_graph=True)
    torch.testing.assert_close(dz, out.grad / B)
    (expected,) = torch.autograd.grad(z, rgb, grad_outputs=out.grad / B)
    torch.testing.assert_close(drgb, expected)


def test_latent_gradient_at_z_and_render(latent_prior, monkeypatch):
    B, s = 2, 7.5
    captured = _capture_z(latent_prior, monkeypatch)
    records, handle = _capture_unet_input(latent_prior)
    prompts = _prompts(latent_prior, B)
    rgb = torch.rand(B, 32, 32, 3, requires_grad=True)
    try:
        out = SDSGuidance(latent_prior, GuidanceConfig(guidance_scale=s))(rgb, prompts, 0, 100, generator=_gen())
    finally:
        handle.remove()
    (z,) = captured
    assert out.grad.shape == z.shape == (B, 4, 16, 16)
    g = _expected_grad(latent_prior, z.detach(), records[0][0][:B], out.t, prompts, s)
    torch.testing.assert_close(out.grad, g, atol=1e-4, rtol=1e-3)
    dz, drgb = torch.autograd.grad(out.loss, [z, rgb], retain_graph=True)
    torch.testing.assert_close(dz, out.grad / B)
    (expected,) = torch.autograd.grad(z, rgb, grad_outputs=out.grad / B)
    torch.testing.assert_close(drgb, expected)
    assert drgb.abs().sum() > 0


def test_reparameterized_loss_gradient_is_g_over_b():
    z = torch.randn(3, 4, 5, 5, requires_grad=True)
    g = torch.randn(3, 4, 5, 5)
    loss = reparameterized_loss(z, g)
    loss.backward()
    torch.testing.assert_close(z.grad, g / 3)
    torch.testing.assert_close(loss, 0.5 * g.pow(2).sum() / 3)


def test_same_generator_same_result(pixel_prior):
    prompts, rgb = _prompts(pixel_prior, 2), torch.rand(2, 16, 16, 3)
    sds = SDSGuidance(pixel_prior)
    a, b, c = (sds(rgb, prompts, 0, 100, generator=_gen(seed)) for seed in (1, 1, 2))
    torch.testing.assert_close(a.grad, b.grad)
    assert not torch.equal(a.grad, c.grad)


# ---------------------------------------------------------------- timesteps


@pytest.mark.parametrize(
    "min_pct, max_pct, step, bounds",
    [
        (0.02, 0.98, 0, (20, 980)),
        (0.02, [0, 0.98, 0.5, 100], 0, (20, 980)),
        (0.02, [0, 0.98, 0.5, 100], 50, (20, 740)),
        (0.02, [0, 0.98, 0.5, 100], 100, (20, 500)),
        (0.02, [0, 0.98, 0.5, 100], 500, (20, 500)),
        ([0, 0.5, 0.02, 1000], [0, 0.98, 0.5, 1000], 500, (260, 740)),
        (0.3, 0.3, 7, (300, 300)),
    ],
)
def test_timesteps_honor_annealed_range(min_pct, max_pct, step, bounds):
    t = sample_timesteps(4096, T, min_pct, max_pct, step, 1000, generator=_gen())
    assert t.dtype == torch.long
    assert (int(t.min()), int(t.max())) == bounds  # inclusive at both ends, and both ends reached


def test_sds_timesteps_in_range(pixel_prior):
    cfg = GuidanceConfig(min_step_percent=[0, 0.5, 0.02, 100], max_step_percent=[0, 0.98, 0.5, 100])
    sds, prompts, rgb = SDSGuidance(pixel_prior, cfg), _prompts(pixel_prior, 4), torch.rand(4, 16, 16, 3)
    for step, (lo, hi) in ((0, (500, 980)), (100, (20, 500))):
        t = sds(rgb, prompts, step, 100, generator=_gen(step)).t
        assert ((t >= lo) & (t <= hi)).all(), (step, t)


def test_step_range():
    assert step_range(1000, 0.02, 0.98) == (20, 980)
    assert step_range(100, 0.29, 0.57) == (29, 57)  # float error must not floor 28.999... to 28
    assert step_range(1000, 0.0, 1.0) == (0, 999)
    with pytest.raises(ValueError, match="min_step_percent"):
        step_range(1000, 0.6, 0.5)


def test_sqrt_anneal_is_deterministic():
    def t_at(step):
        t = sample_timesteps(3, T, 0.02, 0.98, step, 400, sqrt_anneal=True, generator=_gen(step))
        assert len(set(t.tolist())) == 1
        return int(t[0])

    assert t_at(0) == 980
    assert t_at(100) == int(1000 * ((0.98 - 0.02) * 0.5 + 0.02))  # sqrt(100 / 400) = 0.5
    assert t_at(400) == 20
    assert t_at(0) > t_at(50) > t_at(200) > t_at(400)


# ---------------------------------------------------------------- weighting, clipping, NaN guard


def test_weightings(pixel_prior):
    prompts, rgb = _prompts(pixel_prior, 3), torch.rand(3, 16, 16, 3)
    outs = {w: SDSGuidance(pixel_prior, GuidanceConfig(weighting=w))(rgb, prompts, 0, 100, generator=_gen())
            for w in ("uniform", "sds", "fantasia3d")}
    t = outs["uniform"].t
    assert torch.equal(t, outs["sds"].t) and torch.equal(t, outs["fantasia3d"].t)
    abar = pixel_prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(outs["sds"].grad, (1 - abar) * outs["uniform"].grad)
    torch.testing.assert_close(outs["fantasia3d"].grad, abar.sqrt() * (1 - abar) * outs["uniform"].grad)


def test_timestep_weight_values():
    abar = torch.linspace(0.99, 0.01, 10)
    t = torch.tensor([0, 4, 9])
    torch.testing.assert_close(timestep_weight("sds", abar, t).flatten(), 1 - abar[t])
    torch.testing.assert_close(timestep_weight("uniform", abar, t).flatten(), torch.ones(3))
    torch.testing.assert_close(timestep_weight("fantasia3d", abar, t).flatten(), abar[t].sqrt() * (1 - abar[t]))
    with pytest.raises(ValueError, match="weighting"):
        timestep_weight("snr", abar, t)


def test_grad_clip_bounds_g(pixel_prior):
    prompts, rgb = _prompts(pixel_prior, 2), torch.rand(2, 16, 16, 3)
    free = SDSGuidance(pixel_prior)(rgb, prompts, 0, 100, generator=_gen())
    assert free.grad.abs().max() > 0.05
    clipped = SDSGuidance(pixel_prior, GuidanceConfig(grad_clip=0.01))(rgb, prompts, 0, 100, generator=_gen())
    assert clipped.grad.abs().max() <= 0.01
    torch.testing.assert_close(clipped.grad, free.grad.clamp(-0.01, 0.01))
    scheduled = SDSGuidance(pixel_prior, GuidanceConfig(grad_clip=[0, 0.01, 0.05, 100]))
    for step, c in ((0, 0.01), (50, 0.03), (100, 0.05)):
        out = scheduled(rgb, prompts, step, 100, generator=_gen())
        assert out.grad.abs().max() <= c + 1e-7


def test_nonfinite_predictions_are_zeroed_and_counted(pixel_prior):
    def poison(module, args, output):
        output.sample[0, 0, 0, 0] = float("nan")  # cond half, sample 0
        output.sample[1, 1, 2, 3] = float("inf")  # cond half, sample 1
        return output

    handle = pixel_prior.unet.register_forward_hook(poison)
    rgb = torch.rand(2, 16, 16, 3, requires_grad=True)
    try:
        out = SDSGuidance(pixel_prior)(rgb, _prompts(pixel_prior, 2), 0, 100, generator=_gen())
    finally:
        handle.remove()
    assert out.nonfinite == 2
    assert torch.isfinite(out.loss) and torch.isfinite(out.grad).all()
    assert out.grad[0, 0, 0, 0] == 0 and out.grad[1, 1, 2, 3] == 0
    out.loss.backward()
    assert torch.isfinite(rgb.grad).all()


def test_perp_neg_through_sds(pixel_prior):
    rgb = torch.rand(2, 16, 16, 3)
    prompts = _prompts(pixel_prior, 2, use_perp_neg=True)
    out = SDSGuidance(pixel_prior)(rgb, prompts, 0, 100, generator=_gen())
    assert torch.isfinite(out.loss) and out.grad.shape == (2, 3, 16, 16)
    # With zero negative weights Perp-Neg SDS equals plain SDS on the same (interpolated) positive.
    plain = PromptBatch(prompts.cond, prompts.uncond, prompts.directions)
    zero = PromptBatch(prompts.cond, prompts.uncond, prompts.directions, prompts.neg, torch.zeros(2, 2))
    a = SDSGuidance(pixel_prior)(rgb, plain, 0, 100, generator=_gen())
    b = SDSGuidance(pixel_prior)(rgb, zero, 0, 100, generator=_gen())
    torch.testing.assert_close(a.grad, b.grad, atol=5e-4, rtol=1e-3)  # batch 4B vs 2B, times s = 100


# ---------------------------------------------------------------- config and registry


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"weighting": "snr"}, "weighting"),
        ({"min_step_percent": 1.5}, "min_step_percent"),
        ({"max_step_percent": [0, 0.98, 1.2, 100]}, "max_step_percent"),
        ({"min_step_percent": 0.6, "max_step_percent": 0.5}, "min_step_percent"),
        ({"grad_clip": -1.0}, "grad_clip"),
        ({"grad_clip": [1, 2]}, "grad_clip"),
        ({"guidance_scale": -3.0}, "guidance_scale"),
    ],
)
def test_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        GuidanceConfig(**kwargs)


def test_registry_and_input_checks(pixel_prior):
    assert GUIDANCES["sds"] is SDSGuidance
    sds = SDSGuidance(pixel_prior)
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        sds(torch.rand(2, 3, 16, 16), _prompts(pixel_prior, 2), 0, 10)
    with pytest.raises(ValueError, match="3 renders but 2 text conditions"):
        sds(torch.rand(3, 16, 16, 3), _prompts(pixel_prior, 2), 0, 10)


# ---------------------------------------------------------------- real weights


@pytest.mark.weights
@pytest.mark.slow
def test_sd21_base_one_step_from_cache():
    try:
        prior = DiffusionPrior.from_pretrained("stabilityai/stable-diffusion-2-1-base")
    except PriorNotAvailable as exc:
        pytest.skip(str(exc))
    assert prior.is_latent and prior.resolution == 512 and prior.num_train_timesteps == 1000
    prompts = PromptProcessor(prior, PromptConfig(prompt="a red mug"))(
        spherical_cameras(torch.zeros(1), torch.zeros(1), torch.full((1,), 2.5), torch.full((1,), 45.0), 64, 64)
    )
    rgb = torch.rand(1, 64, 64, 3, requires_grad=True)
    out = SDSGuidance(prior)(rgb, prompts, 0, 10000, generator=_gen())
    out.loss.backward()
    assert out.grad.shape == (1, 4, 64, 64) and out.nonfinite == 0
    assert torch.isfinite(out.loss) and torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0
