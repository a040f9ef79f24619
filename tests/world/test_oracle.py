"""The oracle video prior (gen3d.world.oracle): the exact denoiser of true clips, and text-to-4D driven by it."""

import sys
from pathlib import Path

import pytest
import torch

from gen3d.priors.video import VideoDiffusionPrior, mixed_noise
from gen3d.world.oracle import ExactVideoDenoiser, mixed_noise_distance, true_clips
from gen3d.world.train_prior import TRAIN_ORBIT

sys.path.insert(0, str(Path(__file__).parents[1] / "systems"))
from test_4d_recipes import make  # noqa: E402


@pytest.fixture(scope="module")
def t2v():
    return VideoDiffusionPrior.from_pretrained("gen3d/shapes-t2v", dtype="float32")


@pytest.fixture(scope="module")
def oracle(t2v):
    clips = true_clips("a red mug", TRAIN_ORBIT, 6, 4, t2v.resolution, torch.Generator().manual_seed(0))
    return ExactVideoDenoiser(t2v, clips), clips


def test_mixed_noise_distance_is_the_mahalanobis_norm():
    """Against the explicit inverse of the mixed noise's covariance, estimated from samples of `mixed_noise`."""
    alpha, F_ = 1.0, 4
    cov = torch.cov(mixed_noise((20000, 1, F_, 1, 1), alpha, torch.Generator().manual_seed(0)).view(-1, F_).T)
    exact = (torch.eye(F_) + alpha ** 2) / (1 + alpha ** 2)
    assert torch.allclose(cov, exact, atol=0.03)
    r = torch.randn(5, 3, F_, 2, 2, generator=torch.Generator().manual_seed(1))
    per_pixel = r.permute(0, 1, 3, 4, 2).reshape(5, -1, F_)
    want = torch.einsum("kpf,fg,kpg->k", per_pixel, torch.linalg.inv(exact), per_pixel)
    assert torch.allclose(mixed_noise_distance(r, alpha), want, rtol=1e-4)
    assert torch.allclose(mixed_noise_distance(r, 0.0), r.square().flatten(1).sum(1))


def test_denoises_each_prompt_to_its_own_clips(oracle, t2v):
    """At low noise a noised true clip comes back exactly, under its prompt with or without a view suffix and
    unconditioned; at high noise the conditioned estimate is a mix of that motion's clips only."""
    denoiser, clips = oracle
    assert clips["a red mug, bouncing"].shape == (12, 3, 4, t2v.resolution, t2v.resolution)  # 6 views x 2 backgrounds
    assert len(clips[""]) == 48
    x0 = clips["a red mug, bouncing"][[2, 9]]
    g = torch.Generator().manual_seed(0)
    text = denoiser.encode_text(["a red mug, bouncing", "a red mug, bouncing, side view", ""])
    for t, tol in ((50, 1e-4), (300, 1e-3)):
        x_t = t2v.add_noise(x0[:1].expand(3, -1, -1, -1, -1), t2v.noise(x0[:1].expand(3, -1, -1, -1, -1), g),
                            torch.full((3,), t))
        abar = t2v.alphas_cumprod[t]
        x0_hat = (x_t - (1 - abar).sqrt() * denoiser.unet_eps(x_t, torch.full((3,), t), text)) / abar.sqrt()
        assert (x0_hat - x0[:1]).abs().max() < tol
    # at t = 999 the bouncing estimate lies in the span of the bouncing clips: its distance to their mean is small
    # against the distance to another motion's clips
    x_t = torch.randn(1, 3, 4, t2v.resolution, t2v.resolution, generator=g)
    abar = t2v.alphas_cumprod[999]
    x0_hat = (x_t - (1 - abar).sqrt() * denoiser.unet_eps(x_t, torch.tensor([999]), text[:1])) / abar.sqrt()
    own = (x0_hat - clips["a red mug, bouncing"]).flatten(1).norm(dim=1).min()
    other = (x0_hat - clips["a red mug, growing"]).flatten(1).norm(dim=1).min()
    assert own < other


def test_bad_input(oracle, t2v):
    denoiser, clips = oracle
    with pytest.raises(ValueError, match="knows only the prompts"):
        denoiser.unet_eps(clips[""][:1], torch.tensor([10]), denoiser.encode_text(["a blue cube, bouncing"]))
    with pytest.raises(ValueError, match="unconditional set"):
        ExactVideoDenoiser(t2v, {"a red mug, bouncing": clips["a red mug, bouncing"]})
    with pytest.raises(ValueError, match="one F for all"):
        ExactVideoDenoiser(t2v, {"": clips[""], "a red mug, bouncing": clips["a red mug, bouncing"][:, :, :3]})
    with pytest.raises(ValueError, match="names no Shapes-world object"):
        true_clips("a teapot", TRAIN_ORBIT, 2, 4, 32)


def test_azimuth_window_denoises_over_the_clips_near_the_camera(t2v):
    """Seen from a camera (`seen_from`), the camera-aware oracle answers as the plain oracle of only the clips whose
    camera is within the window of that camera's azimuth; video SDS passes its cameras on; outside, all clips."""
    from gen3d.cameras import orbit_cameras
    from gen3d.guidance import GuidanceConfig
    from gen3d.guidance.video import VideoSDSGuidance
    from gen3d.priors.prompts import PromptConfig, PromptProcessor

    clips, azimuths = true_clips("a red mug", TRAIN_ORBIT, 12, 4, t2v.resolution, torch.Generator().manual_seed(0),
                                 return_azimuths=True)
    assert all(azimuths[p].shape == (len(x),) for p, x in clips.items())
    assert torch.equal(azimuths[""][:12], azimuths["a red mug, bouncing"][:12])  # on black, then on white
    window = ExactVideoDenoiser(t2v, clips, azimuths, azimuth_window=40.0)
    cams = orbit_cameras(2, width=16, height=16, start_azimuth=10.0)  # azimuths 10 and -170
    near = [((azimuths[p] - cams.azimuth[:, None] + 180) % 360 - 180).abs() <= 40 for p in clips]  # [prompt][2, K]
    assert all(0 < int(m.sum()) < m.numel() // 2 for m in near)
    text = window.encode_text(["a red mug, bouncing", ""])
    x_t = torch.randn(2, 3, 4, t2v.resolution, t2v.resolution, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([700, 700])
    for c in range(2):  # clip c seen from camera c, under the prompt and unconditioned
        with window.seen_from(cams[c:c + 1]):
            got = window.unet_eps(x_t, t, text)
        for j, prompt in enumerate(["a red mug, bouncing", ""]):
            sub = {q: clips[q][near[list(clips).index(q)][c]] for q in ("", prompt)}
            want = ExactVideoDenoiser(t2v, sub).unet_eps(x_t[j:j + 1], t[j:j + 1], text[j:j + 1])
            assert torch.allclose(got[j:j + 1], want, atol=1e-5)
    assert window.cameras is None
    plain = ExactVideoDenoiser(t2v, clips).unet_eps(x_t, t, text)
    assert torch.allclose(window.unet_eps(x_t, t, text), plain)  # no camera: every clip
    # video SDS hands its cameras to the prior: the camera-aware oracle's gradient is the window's
    guidance = VideoSDSGuidance(window, GuidanceConfig(guidance_scale=1.0))
    prompts = PromptProcessor(window, PromptConfig(prompt="a red mug, bouncing", view_dependent=False))
    rgb = torch.rand(1, 4, 16, 16, 3)
    outs = [guidance(rgb, prompts(cams[c:c + 1]), 0, 10, generator=torch.Generator().manual_seed(2),
                     cameras=cams[c:c + 1]).grad for c in range(2)]
    blind = guidance(rgb, prompts(cams[:1]), 0, 10, generator=torch.Generator().manual_seed(2)).grad
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[0], blind)
    with pytest.raises(ValueError, match="azimuth_window must be in"):
        ExactVideoDenoiser(t2v, clips, azimuths, azimuth_window=0.0)
    with pytest.raises(ValueError, match="needs azimuths"):
        ExactVideoDenoiser(t2v, clips, azimuth_window=30.0)
    with pytest.raises(ValueError, match="no clip of"):
        narrow = ExactVideoDenoiser(t2v, clips, azimuths, azimuth_window=0.01)
        with narrow.seen_from(cams[:1]):
            narrow.unet_eps(x_t[:1], t[:1], text[:1])


@pytest.mark.parametrize("motion, rises", [("bouncing", True), ("spinning", False)])
def test_text_to_4d_draws_the_motion_from_a_prior_that_knows_it(tmp_path, motion, rises):
    """The dynamic stage turns a video prior's knowledge into motion: with the exact denoiser of the mug's true clips
    as the video prior, the mug rises in the middle frames when bouncing, and does not when spinning."""
    system = make("text-to-4d", tmp_path, ["prompt=a red mug", f"motion={motion}", "max_steps=60", "static_steps=20",
                                           "turntable_frames=0", "exports=[]", "lambda_frame=0",
                                           "deformation_lr=0.005", "grid_lr=0.05", "lambda_rigidity=0"])
    system.ensure_training()
    truth = true_clips("a red mug", system.cfg.cameras, 32, system.cfg.frames, system.video_prior.resolution,
                       torch.Generator().manual_seed(0))
    system.setup_video_prior(f"a red mug, {motion}", ExactVideoDenoiser(system.video_prior, truth))
    system.fit()
    heights = [system.dynamic.at(t).means[:, 2].mean().item() for t in system.times()]
    rise = min(heights[1:3]) - max(heights[0], heights[-1])
    assert (rise > 0.04) if rises else (rise < 0.02)
