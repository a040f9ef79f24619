"""Latent Zero-1-to-3 checkpoints in the diffusers layout of the public conversions, on tiny random models.

The folders built here follow ``bennyguo/zero123-xl-diffusers`` (projection in ``cc_projection/`` as
``projection.weight``/``projection.bias``) and ``ashawkey/zero123-xl-diffusers`` (``clip_camera_projection/``
as ``proj.weight``/``proj.bias``); the projection class their model_index.json names lives in their custom
pipeline file, which gen3d must never import (it is not even on the path here).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gen3d.cameras import spherical_cameras
from gen3d.errors import PriorNotAvailable
from gen3d.guidance import GuidanceConfig
from gen3d.guidance.zero123 import Zero123Guidance
from gen3d.priors.view_conditioning import ViewConditionedPrior, relative_pose
from gen3d.priors.zero123 import LatentZero123Prior, load_view_prior

D = 16  # CLIP projection_dim = the UNet's cross_attention_dim (768 in Zero123)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
VARIANTS = {
    # folder name, weight prefix, model_index entry (as the public conversions list them)
    "cc_projection": ("cc_projection", "projection", ["pipeline_zero1to3", "CCProjection"]),
    "clip_camera_projection": ("clip_camera_projection", "proj", ["pipeline_zero1to3", "CLIPCameraProjection"]),
}


def make_tiny_zero123(folder: Path, variant: str = "cc_projection", seed: int = 0) -> Path:
    """A tiny random latent Zero123 (16x16 images, 8x8x4 latents) in the public conversions' layout."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    sub, prefix, entry = VARIANTS[variant]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        UNet2DConditionModel(
            sample_size=8, in_channels=8, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(8, 16), layers_per_block=1, cross_attention_dim=D,
            attention_head_dim=2, norm_num_groups=4,
        ).save_pretrained(folder / "unet")
        AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, sample_size=16,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
        ).save_pretrained(folder / "vae")
        CLIPVisionModelWithProjection(CLIPVisionConfig(
            image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, projection_dim=D,
        )).save_pretrained(folder / "image_encoder")
        # Zero123's cc_projection: a (D + 4) -> D linear layer; random (not identity) so the pose matters
        (folder / sub).mkdir()
        save_file({f"{prefix}.weight": torch.randn(D, D + 4) * 0.3, f"{prefix}.bias": torch.randn(D) * 0.1},
                  str(folder / sub / "diffusion_pytorch_model.safetensors"))
        (folder / sub / "config.json").write_text(json.dumps({
            "_class_name": entry[1], "_diffusers_version": "0.17.1", "in_channel": D + 4, "out_channel": D}))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                       image_mean=CLIP_MEAN, image_std=CLIP_STD).save_pretrained(folder / "feature_extractor")
    DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  clip_sample=False, set_alpha_to_one=False, steps_offset=1).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "Zero1to3StableDiffusionPipeline",
        "_diffusers_version": "0.17.1",
        sub: entry,
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
        "requires_safety_checker": True,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }, indent=2))
    return folder


@pytest.fixture(scope="module")
def zero123_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-zero123")
    return {variant: make_tiny_zero123(root / variant, variant) for variant in VARIANTS}


@pytest.fixture(scope="module")
def priors(zero123_dirs) -> dict[str, LatentZero123Prior]:
    return {variant: load_view_prior(str(folder)) for variant, folder in zero123_dirs.items()}


@pytest.fixture(scope="module")
def prior(priors) -> LatentZero123Prior:
    return priors["cc_projection"]


def images(n: int, size: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, size, size, 3, generator=torch.Generator().manual_seed(seed))


def poses(n: int = 2) -> torch.Tensor:
    return relative_pose(10.0, 0.0, 1.9, torch.tensor([40.0, -20.0])[:n], torch.tensor([60.0, 250.0])[:n],
                         torch.tensor([2.2, 1.5])[:n])


# ---------------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_load_view_prior_reads_the_public_layouts(priors, zero123_dirs, variant):
    from safetensors.torch import load_file

    prior = priors[variant]
    assert type(prior) is LatentZero123Prior
    assert prior.resolution == 16 and prior.latent_size == 8 and prior.downsample == 2
    assert prior.num_train_timesteps == 1000 and prior.alphas_cumprod.shape == (1000,)
    sub, prefix, _ = VARIANTS[variant]
    saved = load_file(str(zero123_dirs[variant] / sub / "diffusion_pytorch_model.safetensors"))
    assert isinstance(prior.projection, torch.nn.Linear)
    assert torch.equal(prior.projection.weight, saved[f"{prefix}.weight"])
    assert torch.equal(prior.projection.bias, saved[f"{prefix}.bias"])
    assert prior.clip_size == 32
    assert torch.allclose(prior.mean.flatten(), torch.tensor(CLIP_MEAN))
    assert torch.allclose(prior.std.flatten(), torch.tensor(CLIP_STD))
    assert not any(p.requires_grad for m in (prior.unet, prior.vae, prior.image_encoder, prior.projection)
                   for p in m.parameters())
    assert "pipeline_zero1to3" not in sys.modules  # the conversions' custom pipeline code is never imported
    assert "LatentZero123Prior" in repr(prior) and "resolution=16" in repr(prior)


def test_load_view_prior_keeps_the_embedded_pixel_prior():
    prior = load_view_prior("gen3d/shapes-zero123")
    assert type(prior) is ViewConditionedPrior


def test_preprocessing_is_read_from_the_feature_extractor(zero123_dirs, tmp_path):
    folder = shutil.copytree(zero123_dirs["cc_projection"], tmp_path / "other-clip")
    config_file = folder / "feature_extractor" / "preprocessor_config.json"
    config = json.loads(config_file.read_text())
    config.update(image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3], crop_size=24, size=24)  # older int form
    config_file.write_text(json.dumps(config))
    prior = LatentZero123Prior.from_pretrained(str(folder))
    assert prior.clip_size == 24
    assert torch.allclose(prior.mean.flatten(), torch.tensor([0.5, 0.4, 0.3]))
    assert torch.allclose(prior.std.flatten(), torch.tensor([0.2, 0.25, 0.3]))


# ---------------------------------------------------------------------------------------------- the model
def test_encode_and_condition_latents(prior):
    rgb = images(2, size=16)
    x = 2.0 * rgb.permute(0, 3, 1, 2) - 1.0
    posterior = prior.vae.encode(x).latent_dist
    assert prior.scaling == prior.vae.config.scaling_factor and prior.scaling != 1.0
    assert torch.allclose(prior.encode(rgb), posterior.mean * prior.scaling, atol=1e-6)
    condition = prior.encode_condition(rgb, poses(2))
    assert torch.allclose(condition.image, posterior.mode(), atol=1e-6)  # unscaled
    assert condition.image.shape == (2, 4, 8, 8) and condition.tokens.shape == (2, 1, D)


def test_clip_preprocessing_uses_the_feature_extractor(prior):
    rgb = images(2, size=20, seed=3)
    x = F.interpolate(rgb.permute(0, 3, 1, 2), (16, 16), mode="bilinear", align_corners=False)  # model resolution
    clip = F.interpolate(x, (32, 32), mode="bicubic", align_corners=False)  # feature extractor's crop size
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    expected = prior.image_encoder(pixel_values=(clip - mean) / std).image_embeds
    condition = prior.encode_condition(rgb, poses(2))
    assert torch.allclose(condition.image_embeds, expected, atol=1e-5)
    # and the normalization matters: unnormalized pixels give another embedding
    assert not torch.allclose(prior.image_encoder(pixel_values=clip).image_embeds, expected, atol=1e-3)


def test_pose_token_uses_zero123_polar_convention(prior):
    rgb = images(2, seed=4)
    pose = poses(2)
    condition = prior.encode_condition(rgb, pose)
    assert torch.equal(condition.pose, pose)
    zero123 = torch.stack([-torch.deg2rad(torch.tensor([30.0, -30.0])),  # polar grows downward: -Δelevation
                           torch.sin(torch.deg2rad(torch.tensor([60.0, 250.0]))),
                           torch.cos(torch.deg2rad(torch.tensor([60.0, 250.0]))), torch.tensor([0.3, -0.4])], -1)
    assert torch.allclose(LatentZero123Prior.zero123_pose(pose), zero123, atol=1e-6)
    expected = prior.projection(torch.cat([condition.image_embeds, zero123], -1))[:, None]
    assert torch.allclose(condition.tokens, expected, atol=1e-6)
    unflipped = prior.projection(torch.cat([condition.image_embeds, pose], -1))[:, None]
    assert not torch.allclose(condition.tokens, unflipped, atol=1e-4)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_predict_noise_is_zero123_cfg(priors, variant):
    prior = priors[variant]
    rgb = images(2, seed=5)
    condition = prior.encode_condition(rgb, poses(2))
    gen = torch.Generator().manual_seed(1)
    x_t = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([100, 700])
    pred = prior.predict_noise(x_t, t, condition, guidance_scale=4.0)

    latent = prior.vae.encode(2.0 * F.interpolate(rgb.permute(0, 3, 1, 2), (16, 16), mode="bilinear",
                                                  align_corners=False) - 1.0).latent_dist.mode()
    token = prior.projection(torch.cat([condition.image_embeds, prior.zero123_pose(poses(2))], -1))[:, None]
    eps_c = prior.unet(torch.cat([x_t, latent], 1), t, encoder_hidden_states=token).sample
    eps_u = prior.unet(torch.cat([x_t, torch.zeros_like(latent)], 1), t,
                       encoder_hidden_states=torch.zeros_like(token)).sample
    assert torch.allclose(pred.eps_cond, eps_c, atol=1e-5)
    assert torch.allclose(pred.eps_uncond, eps_u, atol=1e-5)
    assert torch.allclose(pred.eps_guided, eps_u + 4.0 * (eps_c - eps_u), atol=1e-5)
    assert (eps_c - eps_u).abs().max() > 1e-4  # the condition reaches the UNet at all

    # a condition of one view broadcasts over the batch
    one = prior.encode_condition(rgb[:1], poses(1))
    assert torch.allclose(prior.predict_noise(x_t, t, one, 4.0).eps_cond,
                          prior.predict_noise(x_t, t, one.expand(2), 4.0).eps_cond, atol=1e-6)


# ---------------------------------------------------------------------------------------------- guidance
def test_zero123_guidance_with_a_latent_prior(prior):
    reference = images(1, size=20, seed=6)[0]
    cfg = GuidanceConfig(guidance_scale=3.0, min_step_percent=0.2, max_step_percent=0.8)
    guidance = Zero123Guidance(prior, reference, elevation=10.0, azimuth=0.0, distance=1.9, cfg=cfg)
    cams = spherical_cameras(torch.tensor([60.0, 250.0]), torch.tensor([40.0, -20.0]), torch.tensor([2.2, 1.5]),
                             torch.full((2,), 40.0), 20, 20)
    rgb = images(2, size=20, seed=7).requires_grad_(True)
    out = guidance(rgb, cams, step=1, max_steps=10, generator=torch.Generator().manual_seed(0))
    assert out.grad.shape == (2, 4, 8, 8) and torch.isfinite(out.grad).all()
    out.loss.backward()
    assert rgb.grad is not None and torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0

    new_poses = guidance.poses(cams)
    assert torch.allclose(new_poses, poses(2), atol=1e-5)
    reposed = prior.repose(guidance.condition.expand(2), new_poses)
    fresh = prior.encode_condition(reference[None], new_poses)
    assert torch.allclose(reposed.tokens, fresh.tokens, atol=1e-5)
    assert torch.allclose(reposed.image, fresh.image, atol=1e-6)


# ---------------------------------------------------------------------------------------------- errors
def edited_copy(source: Path, target: Path, drop: tuple[str, ...] = ()) -> Path:
    folder = shutil.copytree(source, target)
    index = json.loads((folder / "model_index.json").read_text())
    for name in drop:
        index.pop(name, None)
        shutil.rmtree(folder / name, ignore_errors=True)
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_missing_vae_is_named(zero123_dirs, tmp_path, variant):
    folder = edited_copy(zero123_dirs[variant], tmp_path / "incomplete", drop=("vae",))
    with pytest.raises(PriorNotAvailable, match=r"4-channel latents.*no 'vae' component") as info:
        load_view_prior(str(folder))
    assert "\n" not in str(info.value)
    with pytest.raises(PriorNotAvailable, match="no 'vae' component.*a latent Zero123 needs"):
        LatentZero123Prior.from_pretrained(str(folder))


def test_missing_projection_is_named(zero123_dirs, tmp_path):
    folder = edited_copy(zero123_dirs["cc_projection"], tmp_path / "no-projection", drop=("cc_projection",))
    with pytest.raises(PriorNotAvailable, match="no camera projection.*cc_projection or clip_camera_projection"):
        load_view_prior(str(folder))


def test_projection_without_weight_is_named(zero123_dirs, tmp_path):
    from safetensors.torch import save_file

    folder = edited_copy(zero123_dirs["clip_camera_projection"], tmp_path / "no-weight")
    save_file({"proj.bias": torch.zeros(D)}, str(folder / "clip_camera_projection" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(PriorNotAvailable, match="holds no linear projection weight"):
        load_view_prior(str(folder))


def test_missing_hub_id_names_the_embedded_view_prior():
    with pytest.raises(PriorNotAvailable, match="not available offline") as info:
        load_view_prior("nobody/zero123-missing")
    assert "gen3d/shapes-zero123" in str(info.value)
    with pytest.raises(PriorNotAvailable, match="gen3d/shapes-zero123"):
        LatentZero123Prior.from_pretrained("nobody/zero123-missing")
