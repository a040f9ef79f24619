"""The math of VSD, CDS and ASD (and Perp-Neg through them) on tiny random diffusers priors."""

import pytest
import torch

from gen3d.cameras import spherical_cameras
from gen3d.guidance import GUIDANCES, GuidanceConfig, build_guidance
from gen3d.guidance.asd import ASDGuidance, shifted_timesteps
from gen3d.guidance.base import timestep_weight
from gen3d.guidance.cds import CDSGuidance, cds_timesteps
from gen3d.guidance.config import ASDConfig, CDSConfig, VSDConfig
from gen3d.guidance.vsd import VSDGuidance
from gen3d.priors.diffusion import DiffusionPrior
from gen3d.priors.prompts import PromptConfig, PromptProcessor
from tests.tiny_prior import make_tiny_prior


@pytest.fixture(scope="module")
def priors(tmp_path_factory):
    root = tmp_path_factory.mktemp("guidances")
    return {
        "pixel": str(make_tiny_prior(root / "pixel", "pixel")),
        "latent": str(make_tiny_prior(root / "latent", "latent")),
        "v": str(make_tiny_prior(root / "v", "pixel", prediction_type="v_prediction")),
    }


@pytest.fixture
def pixel_prior(priors):
    # a fresh prior per test: VSD adds a LoRA adapter to the UNet it is given
    return DiffusionPrior.from_pretrained(priors["pixel"])


def _cameras(B):
    azimuth = torch.linspace(-180, 180, B + 1)[:B]
    full = lambda v: torch.full((B,), float(v))  # noqa: E731
    return spherical_cameras(azimuth, full(10), full(2.5), full(45), 16, 16)


def _prompts(prior, B, **kw):
    return PromptProcessor(prior, PromptConfig(prompt="a red mug", **kw))(_cameras(B))


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _cfg_eps(prior, x, t, prompts, s):
    """eps_u + s (eps_c - eps_u) from two separate UNet calls."""
    with torch.no_grad():
        eps_c = prior.unet(x, t, encoder_hidden_states=prompts.cond).sample
        eps_u = prior.unet(x, t, encoder_hidden_states=prompts.uncond).sample
    return eps_u + s * (eps_c - eps_u), eps_c, eps_u


def _record_unet(prior):
    records = []
    handle = prior.unet.register_forward_pre_hook(
        lambda module, args, kwargs: records.append((args[0].detach().clone(), args[1].clone())), with_kwargs=True)
    return records, handle


# ---------------------------------------------------------------- CDS


def test_cds_is_sds_with_the_noise_replaced_by_the_teacher_at_the_ode_advanced_point(pixel_prior):
    prior, B, s = pixel_prior, 2, 7.0
    cfg = GuidanceConfig(type="cds", guidance_scale=s, weighting="sds")
    cds = CDSGuidance(prior, cfg)
    prompts, z = _prompts(prior, B), torch.randn(B, 3, 16, 16, requires_grad=True)
    records, handle = _record_unet(prior)
    try:
        out = cds.guide(z, prompts, step=50, max_steps=100, generator=_gen())
    finally:
        handle.remove()
    (x_t, t2), (x_less, t_less2) = records  # two CFG calls, each on [x; x]
    x_t, t, x_less, t_less = x_t[:B], t2[:B], x_less[:B], t_less2[:B]
    assert torch.equal(t, out.t) and (t > t_less).all()
    abar, abar_less = prior.alphas_cumprod[t].view(-1, 1, 1, 1), prior.alphas_cumprod[t_less].view(-1, 1, 1, 1)
    # x_t is the forward process with the fixed noise eps*
    torch.testing.assert_close(x_t, abar.sqrt() * z.detach() + (1 - abar).sqrt() * cds.fixed_noise.expand_as(z))
    # x_t' is one deterministic DDIM step (eta = 0) from x_t with the teacher's eps
    eps_t, _, _ = _cfg_eps(prior, x_t, t, prompts, s)
    x0 = (x_t - (1 - abar).sqrt() * eps_t) / abar.sqrt()
    torch.testing.assert_close(x_less, abar_less.sqrt() * x0 + (1 - abar_less).sqrt() * eps_t, atol=1e-5, rtol=1e-4)
    # g = SDS's w(t) (eps_hat(x_t) - eps) with eps := eps_hat(x_t', t')
    eps_less, _, _ = _cfg_eps(prior, x_less, t_less, prompts, s)
    expected = timestep_weight("sds", prior.alphas_cumprod, t) * (eps_t - eps_less)
    torch.testing.assert_close(out.grad, expected, atol=1e-5, rtol=1e-4)
    out.loss.backward()
    torch.testing.assert_close(z.grad, expected / B, atol=1e-5, rtol=1e-4)


def test_cds_noise_is_fixed_across_views_and_steps_and_checkpointed(pixel_prior):
    prior, B = pixel_prior, 3
    cds = CDSGuidance(prior, GuidanceConfig(type="cds", guidance_scale=3.0))
    z, prompts, gen = torch.randn(B, 3, 16, 16), _prompts(pixel_prior, B), _gen()
    noises = []
    records, handle = _record_unet(prior)
    try:
        for step in (1, 40, 90):
            records.clear()
            cds.guide(z, prompts, step, 100, generator=gen)
            x_t, t = records[0][0][:B], records[0][1][:B]
            abar = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
            noises.append((x_t - abar.sqrt() * z) / (1 - abar).sqrt())
    finally:
        handle.remove()
    for n in noises:
        torch.testing.assert_close(n, noises[0].expand_as(n), atol=1e-4, rtol=1e-4)  # every view, every step
        torch.testing.assert_close(n[1], n[0], atol=1e-4, rtol=1e-4)
    other = CDSGuidance(prior, GuidanceConfig(type="cds"))
    other.load_state_dict(cds.state_dict())
    assert torch.equal(other.fixed_noise, cds.fixed_noise)


def test_cds_timesteps_fall_with_a_gap():
    cfg = GuidanceConfig(type="cds", cds=CDSConfig(t_start=0.7, t_end=0.1, anneal_steps=0.5, min_sigma_percent=0.1,
                                                   max_sigma_percent=0.98, end_gap=0.1, perturb=0.2))
    gen = _gen()
    pairs = [cds_timesteps(cfg, 1000, step, 1000, gen) for step in range(0, 1001, 50)]
    t_less = [p[1] for p in pairs]
    assert t_less[0] == 700 and t_less[-1] == 100 and t_less == sorted(t_less, reverse=True)
    assert t_less[10] == 100  # annealed over half the run, then constant
    for t, tl in pairs:
        assert 100 <= tl <= 880 and 100 <= t <= 980 and (t - tl >= 100 or t == 980) and t - tl < 300
    # the sqrt schedule: a quarter of the anneal is half of the way
    assert cds_timesteps(cfg, 1000, 125, 1000, gen)[1] == 400


# ---------------------------------------------------------------- ASD


def test_asd_with_zero_shift_is_the_cfg_direction_alone(pixel_prior):
    prior, B, s = pixel_prior, 2, 5.0
    cfg = GuidanceConfig(type="asd", guidance_scale=s, asd=ASDConfig(plus_ratio=0.0))
    prompts, z = _prompts(prior, B), torch.randn(B, 3, 16, 16)
    records, handle = _record_unet(prior)
    try:
        out = ASDGuidance(prior, cfg).guide(z, prompts, 0, 100, generator=_gen())
    finally:
        handle.remove()
    x_t, t = records[0][0][:B], out.t
    _, eps_c, eps_u = _cfg_eps(prior, x_t, t, prompts, s)
    w = timestep_weight("sds", prior.alphas_cumprod, t)
    torch.testing.assert_close(out.grad, w * (s - 1) * (eps_c - eps_u), atol=1e-5, rtol=1e-4)
    # and without CFG (s = 1) there is nothing left: ASD = SDS with the noise replaced by eps_c(x_t, t)
    one = GuidanceConfig(type="asd", guidance_scale=1.0, asd=ASDConfig(plus_ratio=0.0))
    assert ASDGuidance(prior, one).guide(z, prompts, 0, 100, generator=_gen()).grad.abs().max() < 1e-5


def test_asd_second_term_is_the_conditional_prediction_at_the_shifted_step_with_the_same_noise(pixel_prior):
    prior, B, s = pixel_prior, 2, 4.0
    cfg = GuidanceConfig(type="asd", guidance_scale=s, min_step_percent=0.2, max_step_percent=0.6,
                         asd=ASDConfig(plus_ratio=0.5, plus_random=False))
    prompts, z = _prompts(prior, B), torch.randn(B, 3, 16, 16)
    records, handle = _record_unet(prior)
    try:
        out = ASDGuidance(prior, cfg).guide(z, prompts, 0, 100, generator=_gen())
    finally:
        handle.remove()
    (x_t, _), (x_plus, t_plus) = records
    t = out.t
    assert torch.equal(t_plus, t + (0.5 * (t - 200)).floor().long())  # plus_ratio (t - min_step), not random
    abar, abar_p = prior.alphas_cumprod[t].view(-1, 1, 1, 1), prior.alphas_cumprod[t_plus].view(-1, 1, 1, 1)
    eps = (x_t[:B] - abar.sqrt() * z) / (1 - abar).sqrt()
    torch.testing.assert_close(x_plus, abar_p.sqrt() * z + (1 - abar_p).sqrt() * eps, atol=1e-5, rtol=1e-4)
    eps_hat, _, _ = _cfg_eps(prior, x_t[:B], t, prompts, s)
    with torch.no_grad():
        eps_plus = prior.unet(x_plus, t_plus, encoder_hidden_states=prompts.cond).sample
    expected = timestep_weight("sds", prior.alphas_cumprod, t) * (eps_hat - eps_plus)
    torch.testing.assert_close(out.grad, expected, atol=1e-5, rtol=1e-4)


def test_asd_shift_bounds():
    t = torch.tensor([20, 500, 990, 999])
    fixed = shifted_timesteps(t, 20, 1000, 0.1, False)
    assert fixed.tolist() == [20, 548, 999, 999]
    rand = shifted_timesteps(t.repeat(50), 20, 1000, 0.1, True, _gen())
    assert (rand >= t.repeat(50)).all() and (rand <= fixed.repeat(50)).all() and (rand < fixed.repeat(50)).any()


# ---------------------------------------------------------------- VSD


def _vsd(prior, s=1.0, **vsd):
    return VSDGuidance(prior, GuidanceConfig(type="vsd", guidance_scale=s, vsd=VSDConfig(**vsd)))


def test_vsd_gradient_vanishes_while_the_estimator_equals_the_prior(pixel_prior):
    prior, B = pixel_prior, 2
    vsd = _vsd(prior, s=1.0, lora_loss_weight=0.0)
    prompts = _prompts(prior, B, view_dependent=False)
    out = vsd(torch.rand(B, 16, 16, 3), prompts, 0, 100, generator=_gen(), cameras=_cameras(B))
    assert out.grad.abs().max() < 1e-5 and out.grad_norm < 1e-4


def test_vsd_estimator_learns_the_renders_and_the_camera_and_leaves_the_prior_alone(pixel_prior):
    prior, B = pixel_prior, 2
    x_t, t = torch.randn(B, 3, 16, 16), torch.tensor([300, 600])
    text = prior.encode_text(["a red mug"]).expand(B, -1, -1)
    with torch.no_grad():
        before = prior.unet_eps(x_t, t, text)
    vsd = _vsd(prior, s=1.0, lr=1e-2, camera_dropout=0.0)
    prompts, cams = _prompts(prior, B, view_dependent=False), _cameras(B)
    rgb, gen = torch.rand(B, 16, 16, 3), _gen()
    z = prior.encode(rgb)
    t_eval, eps_eval = torch.arange(50, 1000, 100).repeat_interleave(B), torch.randn(10 * B, 3, 16, 16, generator=_gen(5))
    zs, cam_eval = z.repeat(10, 1, 1, 1), vsd.camera_vector(cams, B, z.device).repeat(10, 1)

    def denoising_error():  # the LoRA's loss at fixed timesteps and noise
        with torch.no_grad():
            eps = vsd.estimate(prior.add_noise(zs, eps_eval, t_eval), t_eval, text.repeat(10, 1, 1), cam_eval)
        return float((eps - eps_eval).pow(2).mean())

    error = denoising_error()
    for step in range(40):
        vsd(rgb, prompts, step, 100, generator=gen, cameras=cams)
    after = denoising_error()
    assert after < 0.9 * error  # the LoRA fits the (fixed) renders (measured: 1.07 -> 0.86)
    out = vsd(rgb, prompts, 40, 100, generator=_gen(), cameras=cams)
    assert out.grad_norm > 1e-3  # the estimator no longer equals the prior
    with torch.no_grad():
        torch.testing.assert_close(prior.unet_eps(x_t, t, text), before)  # the prior's own calls are untouched
        a = vsd.estimate(x_t, t, text, vsd.camera_vector(cams, B, z.device))
        b = vsd.estimate(x_t, t, text, vsd.camera_vector(cams.__getitem__([1, 0]), B, z.device))
    assert (a - b).abs().max() > 1e-6  # the camera embedding learned something


def test_vsd_state_round_trip(priors):
    B = 2
    first = _vsd(DiffusionPrior.from_pretrained(priors["pixel"]), lr=1e-3)
    prompts, cams = _prompts(first.prior, B), _cameras(B)
    for step in range(3):
        first(torch.rand(B, 16, 16, 3), prompts, step, 100, generator=_gen(step), cameras=cams)
    second = _vsd(DiffusionPrior.from_pretrained(priors["pixel"]), lr=1e-3)
    second.load_state_dict(first.state_dict())
    rgb = torch.rand(B, 16, 16, 3)
    a = first(rgb, prompts, 3, 100, generator=_gen(9), cameras=cams)
    b = second(rgb, prompts, 3, 100, generator=_gen(9), cameras=cams)
    torch.testing.assert_close(a.grad, b.grad)
    assert a.logs["lora_loss"] == b.logs["lora_loss"]
    with pytest.raises(ValueError, match="does not match"):
        _vsd(DiffusionPrior.from_pretrained(priors["pixel"]), lora_rank=2).load_state_dict(first.state_dict())


def test_vsd_lora_target_follows_the_prediction_type(priors):
    """With a v-prediction prior the LoRA regresses v, and the guidance converts it to epsilon."""
    prior = DiffusionPrior.from_pretrained(priors["v"])
    vsd = _vsd(prior, s=1.0, lora_loss_weight=0.0)
    out = vsd(torch.rand(2, 16, 16, 3), _prompts(prior, 2, view_dependent=False), 0, 100, generator=_gen(),
              cameras=_cameras(2))
    assert out.grad.abs().max() < 1e-5  # estimator == prior in epsilon space, whatever the UNet predicts
    with pytest.raises(ValueError, match="cameras="):
        vsd(torch.rand(2, 16, 16, 3), _prompts(prior, 2), 0, 100, generator=_gen())


# ---------------------------------------------------------------- shared plumbing


@pytest.mark.parametrize("kind", ["pixel", "latent"])
@pytest.mark.parametrize("name", ["sds", "vsd", "cds", "asd"])
def test_every_guidance_reaches_the_render_on_pixel_and_latent_priors(priors, kind, name):
    prior = DiffusionPrior.from_pretrained(priors[kind])
    B = 2
    guidance = build_guidance(prior, GuidanceConfig(type=name, guidance_scale=7.5))
    assert isinstance(guidance, GUIDANCES[name])
    rgb = torch.rand(B, 16, 16, 3, requires_grad=True) if kind == "pixel" else torch.rand(B, 32, 32, 3, requires_grad=True)
    out = guidance(rgb, _prompts(prior, B), 10, 100, generator=_gen(), cameras=_cameras(B))
    C = 4 if kind == "latent" else 3
    assert out.grad.shape == (B, C, 16, 16) and torch.isfinite(out.grad).all() and out.grad_norm > 0
    out.loss.backward()
    assert rgb.grad is not None and rgb.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["sds", "vsd", "cds", "asd"])
def test_perp_neg_reaches_every_guidance(pixel_prior, name):
    """With Perp-Neg the prior is called on [pos, uncond, neg1, neg2]: 4B inputs."""
    B = 2
    guidance = build_guidance(pixel_prior, GuidanceConfig(type=name, guidance_scale=7.5))
    prompts = _prompts(pixel_prior, B, use_perp_neg=True)
    sizes = []
    handle = pixel_prior.unet.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    try:
        guidance(torch.rand(B, 16, 16, 3), prompts, 10, 100, generator=_gen(), cameras=_cameras(B))
    finally:
        handle.remove()
    assert 4 * B in sizes


def test_perp_neg_removes_the_component_along_the_positive_direction(pixel_prior):
    """A negative prompt equal to the positive one is entirely along it: Perp-Neg removes nothing, plain CFG remains;
    a negative orthogonal to it is subtracted in full."""
    prior, B, s = pixel_prior, 2, 6.0
    x_t, t = torch.randn(B, 3, 16, 16), torch.tensor([200, 700])
    pos = prior.encode_text(["a red mug, front view"]).expand(B, -1, -1)
    uncond = prior.encode_text([""]).expand(B, -1, -1)
    with torch.no_grad():
        same = prior.predict_noise_perp_neg(x_t, t, pos, uncond, pos.unsqueeze(1), torch.full((B, 1), -3.0), s)
        plain = prior.predict_noise(x_t, t, pos, uncond, s)
        torch.testing.assert_close(same.eps_guided, plain.eps_guided, atol=1e-4, rtol=1e-4)
        neg = prior.encode_text(["a blue cube, back view"]).expand(B, -1, -1)
        pred = prior.predict_noise_perp_neg(x_t, t, pos, uncond, neg.unsqueeze(1), torch.full((B, 1), -1.0), s)
    removed = (plain.eps_guided - pred.eps_guided).flatten(1)  # = s * perp(e_neg, e_pos)
    e_pos = (plain.eps_cond - plain.eps_uncond).flatten(1)
    cosine = (removed * e_pos).sum(1) / (removed.norm(dim=1) * e_pos.norm(dim=1))
    assert cosine.abs().max() < 1e-3 and removed.norm(dim=1).min() > 0


@pytest.mark.parametrize("kwargs, field", [
    ({"type": "dds"}, "guidance.type"),
    ({"guidance_scale": [0, -1.0, 5.0, 100]}, "guidance.guidance_scale"),
    ({"perp_neg_scale": -1}, "guidance.perp_neg_scale"),
])
def test_guidance_config_errors(kwargs, field):
    with pytest.raises(ValueError, match=field):
        GuidanceConfig(**kwargs)


@pytest.mark.parametrize("cls, kwargs, field", [
    (VSDConfig, {"lora_rank": 0}, "lora_rank"),
    (VSDConfig, {"camera_condition": "mvp"}, "camera_condition"),
    (VSDConfig, {"camera_dropout": 1.5}, "camera_dropout"),
    (CDSConfig, {"t_start": 2.0}, "t_start"),
    (CDSConfig, {"min_sigma_percent": 0.95}, "min_sigma_percent"),
    (CDSConfig, {"anneal_steps": 0}, "anneal_steps"),
    (ASDConfig, {"plus_ratio": -0.1}, "plus_ratio"),
])
def test_method_config_errors(cls, kwargs, field):
    with pytest.raises(ValueError, match=field):
        cls(**kwargs)


def test_guidance_scale_schedule(pixel_prior):
    cds = CDSGuidance(pixel_prior, GuidanceConfig(type="cds", guidance_scale=[0, 100.0, 50.0, 1.0]))
    assert cds.scale(0, 1000) == 100.0 and cds.scale(500, 1000) == 75.0 and cds.scale(1000, 1000) == 50.0
