"""The text-to-video prior (issue 12): its trainer, the inflation from the image prior, loading, video SDS."""

import pytest
import torch

from gen3d.errors import PriorNotAvailable
from gen3d.priors.diffusion import DiffusionPrior
from gen3d.priors.video import VideoDiffusionPrior, sample_videos, with_time_channel


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    from gen3d.world.train_video_prior import VideoPriorTrainConfig, VideoPriorTrainer

    work = tmp_path_factory.mktemp("t2v")
    cfg = VideoPriorTrainConfig(output=str(work / "out"), work_dir=str(work / "work"), steps=2, max_objects=1,
                                clips_per_pair=1, frames=3, size=32, supersample=1, progress=False)
    return VideoPriorTrainer(cfg)


@pytest.fixture(scope="module")
def exported(trainer):
    trainer.fit()
    return trainer.cfg.output


def test_inflated_model_is_the_image_prior_on_every_frame(trainer):
    """Before training, the video UNet is the image UNet applied frame by frame (temporal layers are the identity),
    and the text encoder embeds the image prior's words as it did (words the image prior's tokenizer splits into pieces,
    such as "front" in the shipped one, are one token in the video prior's and start afresh)."""
    image = DiffusionPrior.from_pretrained("gen3d/shapes-t2i", dtype="float32")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 3, 32, 32, generator=g)
    t = torch.tensor([100, 700])
    prompts = ["a red mug", "a blue cube, side view"]
    text = trainer.encode(prompts)
    assert torch.allclose(text, image.encode_text(prompts), atol=1e-5)
    split = ["a blue cube, front view"]  # "f ro n t" in the image prior's tokenizer, one token in the video prior's
    assert not torch.allclose(trainer.encode(split), image.encode_text(split), atol=1e-5)
    with torch.no_grad():
        video = trainer.unet(with_time_channel(x), t, text).sample
        frames = [image.unet(x[:, :, f], t, text).sample for f in range(3)]
    assert torch.allclose(video, torch.stack(frames, 2), atol=1e-4)


def test_clips_hold_the_motion(trainer):
    trainer.build_data()
    d = trainer.data
    assert d["premult"].shape == (4, 3, 3, 32, 32)  # 1 object x 4 motions x 1 clip, 3 frames
    motions = [info[2] for info in d["info"]]
    assert sorted(motions) == ["bounce", "grow", "spin", "swing"]
    bounce = d["alpha"][motions.index("bounce")].float()[0]  # [F, s, s]
    rows = torch.arange(32.0)[:, None]
    center = [(a * rows).sum() / a.sum() for a in bounce]  # image rows grow downwards: the middle frame is higher
    assert center[1] < center[0] - 0.5 and center[1] < center[2] - 0.5
    clips, captions = trainer.batch()
    assert clips.shape == (4, 3, 3, 32, 32) and clips.min() >= -1 and clips.max() <= 1
    assert any(c.split(",")[1].strip() in ("spinning", "bouncing", "growing", "swinging") for c in captions if c)


def test_exported_prior_loads_as_a_video_prior(exported):
    prior = VideoDiffusionPrior.from_pretrained(exported)
    assert prior.num_frames == 3 and prior.resolution == 32 and not prior.is_latent
    assert prior.time_channel and prior.unet.config.in_channels == 4  # the frames' times go in as a 4th channel
    x = with_time_channel(torch.zeros(2, 3, 3, 4, 4))
    assert x.shape == (2, 4, 3, 4, 4) and x[:, 3, :, 0, 0].tolist() == [[-1.0, 0.0, 1.0]] * 2
    rgb = torch.rand(2, 3, 40, 40, 3)
    z = prior.encode(rgb)
    assert z.shape == (2, 3, 3, 32, 32)
    assert prior.decode(z).shape == (2, 3, 32, 32, 3)
    clips = sample_videos(prior, ["a red mug, bouncing"], steps=2, generator=torch.Generator().manual_seed(0))
    assert clips.shape == (1, 3, 32, 32, 3) and 0 <= clips.min() and clips.max() <= 1
    with pytest.raises(ValueError, match=r"\[B, F, H, W, 3\]"):
        prior.encode(torch.rand(2, 40, 40, 3))


def test_an_image_prior_is_not_a_video_prior():
    with pytest.raises(PriorNotAvailable, match="is an image model.*UNet3DConditionModel"):
        VideoDiffusionPrior.from_pretrained("gen3d/shapes-t2i")


def test_video_sds_gradient(exported):
    from gen3d.guidance import GuidanceConfig
    from gen3d.guidance.video import VideoSDSGuidance
    from gen3d.priors.prompts import PromptConfig, PromptProcessor
    from gen3d.cameras import orbit_cameras

    prior = VideoDiffusionPrior.from_pretrained(exported)
    guidance = VideoSDSGuidance(prior, GuidanceConfig(guidance_scale=5.0))
    prompts = PromptProcessor(prior, PromptConfig(prompt="a red mug, bouncing"))
    cams = orbit_cameras(2, width=32, height=32)
    rgb = torch.rand(2, 3, 32, 32, 3, requires_grad=True)
    out = guidance(rgb, prompts(cams), 0, 10, generator=torch.Generator().manual_seed(0))
    assert out.grad.shape == (2, 3, 3, 32, 32) and out.t.shape == (2,)
    out.loss.backward()
    # dL/drgb = g / B mapped back through x -> 2x - 1 (pixel prior, no resize at 32x32)
    expected = 2 * out.grad.permute(0, 2, 3, 4, 1) / 2
    assert torch.allclose(rgb.grad, expected, atol=1e-5)
    with pytest.raises(ValueError, match="clips"):
        guidance(torch.rand(2, 32, 32, 3), prompts(cams), 0, 10)


def test_shipped_video_prior():
    prior = VideoDiffusionPrior.from_pretrained("gen3d/shapes-t2v")
    assert prior.num_frames == 8 and prior.resolution == 16
    assert "VideoDiffusionPrior(8 frames" in repr(prior)


def test_mixed_noise_statistics():
    """Unit variance per entry; frames correlated by alpha^2 / (1 + alpha^2); alpha = 0 is independent noise."""
    from gen3d.priors.video import mixed_noise

    g = torch.Generator().manual_seed(0)
    for alpha, corr in ((0.0, 0.0), (1.0, 0.5), (2.0, 0.8)):
        e = mixed_noise((64, 3, 4, 16, 16), alpha, g)
        assert abs(e.var().item() - 1) < 0.02
        a, b = e[:, :, 0].flatten(), e[:, :, 3].flatten()
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item() - corr) < 0.02


def test_high_noise_weighting(trainer):
    """high_noise_weight_cap: where SNR < 1 the ε error is weighted by min(1 / SNR, cap) (the x0 error, capped);
    elsewhere Min-SNR-γ as for the image prior; 0 leaves the image prior's loss."""
    from dataclasses import replace

    g = torch.Generator().manual_seed(0)
    pred, eps = torch.randn(3, 3, 2, 4, 4, generator=g), torch.randn(3, 3, 2, 4, 4, generator=g)
    t = torch.tensor([10, 800, 990])  # SNR far above gamma, ~0.1 (1/SNR below the cap), ~2e-4 (above it)
    per = (pred - eps).pow(2).flatten(1).mean(1)
    snr = trainer.abar[t] / (1 - trainer.abar[t])
    gamma = trainer.cfg.min_snr_gamma
    saved = trainer.cfg
    try:
        trainer.cfg = replace(saved, high_noise_weight_cap=0.0)
        assert torch.allclose(trainer.diffusion_loss(pred, eps, t),
                              (per * torch.stack([gamma / snr[0], torch.tensor(1.0), torch.tensor(1.0)])).mean())
        trainer.cfg = replace(saved, high_noise_weight_cap=20.0)
        assert 1 < 1 / snr[1] < 20 < 1 / snr[2]
        expected = (per * torch.stack([gamma / snr[0], 1 / snr[1], torch.tensor(20.0)])).mean()
        assert torch.allclose(trainer.diffusion_loss(pred, eps, t), expected)
    finally:
        trainer.cfg = saved


@pytest.fixture(scope="module")
def rest_trainer(tmp_path_factory):
    """A video prior that also takes the object at rest, initialized from the shipped text-to-video prior."""
    from gen3d.world.train_video_prior import VideoPriorTrainConfig, VideoPriorTrainer

    work = tmp_path_factory.mktemp("i2v")
    cfg = VideoPriorTrainConfig(output=str(work / "out"), work_dir=str(work / "work"), steps=2, max_objects=1,
                                clips_per_pair=1, frames=3, size=32, supersample=1, progress=False, rest_frame=True,
                                init_from="gen3d/shapes-t2v", input_lr_scale=10.0)
    return VideoPriorTrainer(cfg)


def test_rest_frame_model_starts_as_the_video_prior_it_grew_from(rest_trainer):
    """Before training, shown no image, it is gen3d/shapes-t2v; its rest image's first-layer weights start as
    rest_init times the clip's color weights."""
    from gen3d.priors.video import with_rest_channels

    source = VideoDiffusionPrior.from_pretrained("gen3d/shapes-t2v", dtype="float32")
    assert rest_trainer.unet.config.in_channels == 8  # clip 3 + time 1 + rest image 3 + "there is an image" 1
    g = torch.Generator().manual_seed(0)
    x, rest = torch.randn(2, 3, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    t = torch.tensor([100, 700])
    text = rest_trainer.encode(["a red mug, bouncing", ""])
    assert torch.allclose(text, source.encode_text(["a red mug, bouncing", ""]), atol=1e-5)
    rest_trainer.unet.eval()  # no dropout (the temporal convolutions have it)
    try:
        with torch.no_grad():
            ours = rest_trainer.unet(with_rest_channels(with_time_channel(x), None), t, text).sample
            theirs = source.unet(with_time_channel(x), t, text).sample
            shown = rest_trainer.unet(with_rest_channels(with_time_channel(x), rest), t, text).sample
    finally:
        rest_trainer.unet.train()
    assert torch.allclose(ours, theirs, atol=1e-4)
    assert not torch.allclose(shown, theirs, atol=1e-2)
    w = rest_trainer.unet.conv_in.weight
    assert torch.equal(w[:, 4:7], 0.5 * w[:, :3]) and w[:, 7].abs().max() == 0


def test_rest_frame_is_the_object_at_rest(rest_trainer):
    """The rest image of a batch is the clip's first frame, or its last (full-size) frame for a growth."""
    rest_trainer.build_data()
    clips, captions, rest = rest_trainer.batch_with_rest()
    assert rest.shape == (4, 3, 32, 32)
    for clip, caption, r in zip(clips, captions, rest):
        frame = clip[:, -1] if "growing" in caption else clip[:, 0]
        if caption:  # a dropped caption does not say which
            assert torch.equal(r, frame)
    from gen3d.world.animation import AnimatedObject
    from gen3d.world.catalog import WorldObject

    assert [AnimatedObject(WorldObject("mug", "red"), m).rest_time for m in ("spin", "bounce", "grow", "swing")] \
        == [0.0, 0.0, 1.0, 0.0]


def test_at_rest_feeds_the_rest_image(rest_trainer):
    """`VideoDiffusionPrior.at_rest` gives the UNet the encoded image on every frame, repeated over the CFG batch;
    None gives four zero channels; a prior without the input (the shipped text-to-video one) is unchanged by it."""
    from gen3d.priors.video import with_rest_channels

    rest_trainer.fit()
    first, *_ = rest_trainer.unet.conv_in.parameters()
    groups = rest_trainer.optimizer.param_groups
    assert any(p is first for p in groups[2]["params"]) and groups[2]["lr"] == pytest.approx(10 * groups[0]["lr"])
    prior = VideoDiffusionPrior.from_pretrained(rest_trainer.cfg.output, dtype="float32")
    assert prior.rest_frame and prior.time_channel and prior.extra_channels == 5
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 3, 32, 32, generator=g)
    t = torch.tensor([300, 300, 800, 800])
    text = prior.encode_text(["a red mug, bouncing", "a red mug, bouncing", "", ""])
    rest = torch.rand(2, 32, 32, 3, generator=g)
    with torch.no_grad():
        with prior.at_rest(rest):
            got = prior.unet_eps(x, t, text)
        image = (rest * 2 - 1).permute(0, 3, 1, 2).repeat(2, 1, 1, 1)
        want = prior.unet(with_rest_channels(with_time_channel(x), image), t, text).sample
        assert torch.allclose(got, want, atol=1e-5)
        assert prior.rest is None  # restored on leaving
        want_none = prior.unet(with_rest_channels(with_time_channel(x), None), t, text).sample
        assert torch.allclose(prior.unet_eps(x, t, text), want_none, atol=1e-5)
    assert with_rest_channels(with_time_channel(x), None)[:, 4:].abs().sum() == 0
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        with prior.at_rest(torch.rand(2, 3, 32, 32)):
            pass
    with pytest.raises(ValueError, match="4 clips for 3 rest images"):
        with torch.no_grad(), prior.at_rest(torch.rand(3, 32, 32, 3)):
            prior.unet_eps(x, t, text)
    shipped = VideoDiffusionPrior.from_pretrained("gen3d/shapes-t2v", dtype="float32")
    if not shipped.rest_frame:
        with torch.no_grad():
            plain = shipped.unet_eps(x, t, text)
            with shipped.at_rest(rest):
                assert torch.equal(shipped.unet_eps(x, t, text), plain)


def test_frozen_spatial_layers_train_only_the_temporal_layers_first_convolution_and_text(tmp_path):
    """train_spatial=false: two steps change the temporal layers, the first convolution and the text encoder, and
    leave every other UNet weight exactly as init_from made it."""
    from gen3d.world.train_video_prior import VideoPriorTrainConfig, VideoPriorTrainer, _is_temporal

    cfg = VideoPriorTrainConfig(output=str(tmp_path / "out"), work_dir=str(tmp_path / "work"), steps=2, max_objects=1,
                                clips_per_pair=1, frames=3, size=16, supersample=1, progress=False,
                                train_spatial=False, warmup=1)
    trainer = VideoPriorTrainer(cfg)
    before = {n: p.detach().clone() for n, p in trainer.unet.named_parameters()}
    text_before = {n: p.detach().clone() for n, p in trainer.text_encoder.named_parameters()}
    trainer.build_data()
    for _ in range(2):
        trainer.train_step()
    changed = {n for n, p in trainer.unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "nothing trained"
    assert all(_is_temporal(n) or n.startswith("conv_in.") for n in changed), sorted(changed)[:5]
    assert any(_is_temporal(n) for n in changed) and "conv_in.weight" in changed
    assert any(not torch.equal(p, text_before[n]) for n, p in trainer.text_encoder.named_parameters())
