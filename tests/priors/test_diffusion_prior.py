"""DiffusionPrior on tiny random diffusers components: loading, encode/decode, noising, CFG, errors."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from gen3d.errors import PriorNotAvailable
from gen3d.priors.diffusion import EMBEDDED_HINT, DiffusionPrior, resolve_dtype


def _text(prior, prompt, B):
    return prior.encode_text([prompt]).expand(B, -1, -1)


def _raw_unet(prior, x, t, text):
    with torch.no_grad():
        return prior.unet(x, t, encoder_hidden_states=text).sample


# ---------------------------------------------------------------- loading


def test_loads_pixel_and_latent_priors(pixel_prior, latent_prior, tiny_prior_dirs):
    assert not pixel_prior.is_latent and latent_prior.is_latent
    assert pixel_prior.resolution == 16 and pixel_prior.latent_size == 16
    assert latent_prior.resolution == 32 and latent_prior.latent_size == 16  # sample_size 16 x VAE factor 2
    for prior in (pixel_prior, latent_prior):
        assert prior.num_train_timesteps == 1000
        assert prior.device == torch.device("cpu") and prior.dtype == torch.float32
        assert prior.alphas_cumprod.shape == (1000,)
        assert bool((prior.alphas_cumprod[1:] < prior.alphas_cumprod[:-1]).all())
        for module in (prior.unet, prior.text_encoder, prior.vae):
            if module is not None:
                assert not module.training
                assert not any(p.requires_grad for p in module.parameters())
    assert pixel_prior.model_name == str(tiny_prior_dirs["pixel"])


def test_dtype_resolution():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("float8", torch.device("cpu"))


def test_resolution_override(tiny_prior_dirs):
    prior = DiffusionPrior.from_pretrained(str(tiny_prior_dirs["latent"]), resolution=16)
    z = prior.encode(torch.rand(1, 24, 24, 3))
    assert z.shape == (1, 4, 8, 8)


# ---------------------------------------------------------------- encode / decode


def test_pixel_encode_is_affine_and_differentiable(pixel_prior):
    rgb = torch.rand(2, 16, 16, 3, requires_grad=True)
    z = pixel_prior.encode(rgb)
    torch.testing.assert_close(z, 2 * rgb.detach().permute(0, 3, 1, 2) - 1)
    z.sum().backward()
    torch.testing.assert_close(rgb.grad, torch.full_like(rgb, 2.0))
    torch.testing.assert_close(pixel_prior.decode(z.detach()), rgb.detach())


def test_pixel_encode_resizes(pixel_prior):
    rgb = torch.rand(2, 20, 24, 3)
    z = pixel_prior.encode(rgb)
    expected = F.interpolate(rgb.permute(0, 3, 1, 2), (16, 16), mode="bilinear", align_corners=False) * 2 - 1
    torch.testing.assert_close(z, expected)


def test_latent_encode_matches_vae_and_is_differentiable(latent_prior):
    rgb = torch.rand(2, 32, 32, 3, requires_grad=True)
    z = latent_prior.encode(rgb, generator=torch.Generator().manual_seed(3))
    assert z.shape == (2, 4, 16, 16)
    with torch.no_grad():
        dist = latent_prior.vae.encode(2 * rgb.permute(0, 3, 1, 2) - 1).latent_dist
        expected = dist.sample(generator=torch.Generator().manual_seed(3)) * latent_prior.vae.config.scaling_factor
    torch.testing.assert_close(z.detach(), expected)
    z.square().sum().backward()
    assert rgb.grad is not None and rgb.grad.abs().sum() > 0 and torch.isfinite(rgb.grad).all()
    image = latent_prior.decode(z.detach())
    assert image.shape == (2, 32, 32, 3) and image.min() >= 0 and image.max() <= 1


def test_encode_rejects_wrong_shape(pixel_prior):
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        pixel_prior.encode(torch.rand(2, 3, 16, 16))


# ---------------------------------------------------------------- noising and noise prediction


def test_add_noise_matches_formula_and_diffusers(pixel_prior):
    z, eps = torch.randn(3, 3, 16, 16), torch.randn(3, 3, 16, 16)
    t = torch.tensor([0, 500, 999])
    abar = pixel_prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = pixel_prior.add_noise(z, eps, t)
    torch.testing.assert_close(x_t, abar.sqrt() * z + (1 - abar).sqrt() * eps)
    torch.testing.assert_close(x_t, pixel_prior.scheduler.add_noise(z, eps, t))


def test_cfg_matches_two_separate_unet_calls(pixel_prior):
    B, s = 2, 7.5
    x_t, t = torch.randn(B, 3, 16, 16), torch.tensor([100, 700])
    cond, uncond = _text(pixel_prior, "a red mug", B), _text(pixel_prior, "", B)
    with torch.no_grad():
        pred = pixel_prior.predict_noise(x_t, t, cond, uncond, s)
    eps_c, eps_u = _raw_unet(pixel_prior, x_t, t, cond), _raw_unet(pixel_prior, x_t, t, uncond)
    assert (eps_c - eps_u).abs().max() > 1e-4  # the text matters, so the test is not vacuous
    torch.testing.assert_close(pred.eps_cond, eps_c, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(pred.eps_uncond, eps_u, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(pred.eps_guided, eps_u + s * (eps_c - eps_u), atol=1e-4, rtol=1e-4)


def test_v_prediction_conversion_recovers_eps(tiny_prior_dirs):
    prior = DiffusionPrior.from_pretrained(str(tiny_prior_dirs["pixel_v"]))
    assert prior.prediction_type == "v_prediction"
    # Against diffusers' own definition of v.
    z, eps, t = torch.randn(3, 3, 16, 16), torch.randn(3, 3, 16, 16), torch.tensor([5, 400, 990])
    x_t = prior.add_noise(z, eps, t)
    v = prior.scheduler.get_velocity(z, eps, t)
    torch.testing.assert_close(prior.output_to_eps(v, x_t, t), eps, atol=1e-5, rtol=1e-4)
    # And through the UNet: eps = sqrt(abar) v + sqrt(1 - abar) x_t.
    cond, uncond = _text(prior, "a red mug", 3), _text(prior, "", 3)
    with torch.no_grad():
        pred = prior.predict_noise(x_t, t, cond, uncond, 3.0)
    v_c = _raw_unet(prior, x_t, t, cond)
    abar = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(pred.eps_cond, abar.sqrt() * v_c + (1 - abar).sqrt() * x_t, atol=1e-5, rtol=1e-4)


def test_learned_variance_keeps_first_half(tiny_prior_dirs):
    prior = DiffusionPrior.from_pretrained(str(tiny_prior_dirs["pixel_lv"]))
    assert prior.unet.config.out_channels == 6
    x_t, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 900])
    cond, uncond = _text(prior, "a cube", 2), _text(prior, "", 2)
    with torch.no_grad():
        pred = prior.predict_noise(x_t, t, cond, uncond, 5.0)
    assert pred.eps_guided.shape == (2, 3, 16, 16)
    torch.testing.assert_close(pred.eps_cond, _raw_unet(prior, x_t, t, cond)[:, :3], atol=1e-5, rtol=1e-4)


def test_perp_neg_combination(pixel_prior):
    B, s = 2, 10.0
    x_t, t = torch.randn(B, 3, 16, 16), torch.tensor([300, 600])
    pos, uncond = _text(pixel_prior, "a red mug, front view", B), _text(pixel_prior, "", B)
    neg = torch.stack([_text(pixel_prior, "a red mug, side view", B), _text(pixel_prior, "a red mug, back view", B)], 1)
    weights = torch.tensor([[-1.0, -0.5], [-0.2, 0.0]])
    with torch.no_grad():
        pred = pixel_prior.predict_noise_perp_neg(x_t, t, pos, uncond, neg, weights, s)
    eps_u = _raw_unet(pixel_prior, x_t, t, uncond)
    e_pos = _raw_unet(pixel_prior, x_t, t, pos) - eps_u
    direction = e_pos.clone()
    for k in range(2):
        e_k = _raw_unet(pixel_prior, x_t, t, neg[:, k]) - eps_u
        for b in range(B):
            perp = e_k[b] - (e_k[b] * e_pos[b]).sum() / e_pos[b].pow(2).sum() * e_pos[b]
            direction[b] += weights[b, k] * perp
    torch.testing.assert_close(pred.eps_guided, eps_u + s * direction, atol=1e-4, rtol=1e-4)
    # With zero weights Perp-Neg is plain CFG.
    with torch.no_grad():
        zero = pixel_prior.predict_noise_perp_neg(x_t, t, pos, uncond, neg, torch.zeros(B, 2), s)
        plain = pixel_prior.predict_noise(x_t, t, pos, uncond, s)
    torch.testing.assert_close(zero.eps_guided, plain.eps_guided, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- text


def test_text_embeddings_are_cached(tiny_prior_dirs):
    prior = DiffusionPrior.from_pretrained(str(tiny_prior_dirs["pixel"]))
    calls = []
    prior.text_encoder.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    a = prior.encode_text(["a red mug"])
    b = prior.encode_text(["a red mug"])
    assert calls == [1]
    assert a.shape == (1, 77, 16) and not a.requires_grad
    torch.testing.assert_close(a, b)
    both = prior.encode_text(["a blue cube", "a red mug", "a blue cube"])
    assert calls == [1, 1]  # only the new prompt was encoded
    assert both.shape == (3, 77, 16)
    torch.testing.assert_close(both[0], both[2])
    torch.testing.assert_close(both[1], a[0])
    assert (both[0] - both[1]).abs().max() > 0


@pytest.mark.parametrize("words, vocabulary", [(3, ["a", "red\t", "mug,"]), (75, ["a", "red\t"]), (76, ["a", "red\t"]),
                                               (5000, ["a", "red\t", "mug,", "spinningly"])])
def test_long_prompts_read_the_same_tokens_and_warn_once_over_the_limit(tiny_prior_dirs, words, vocabulary, caplog):
    prior = DiffusionPrior.from_pretrained(str(tiny_prior_dirs["pixel"]))
    prompt = " ".join(vocabulary[i % len(vocabulary)] for i in range(words))
    full = prior.tokenizer(prompt).input_ids  # every token, without truncation ("a" and "red" are one token each)
    with caplog.at_level("WARNING", logger="gen3d"):
        emb = prior.encode_text([prompt])
    ids = prior.tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    torch.testing.assert_close(emb[0], prior.text_encoder(ids)[0][0])  # as if the whole prompt had been tokenized
    warned = [r for r in caplog.records if "the rest is ignored" in r.getMessage()]
    assert len(warned) == (len(full) > 77) == (words > 75)


# ---------------------------------------------------------------- errors


def _assert_one_line(exc_info):
    message = str(exc_info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    """Point every Hugging Face cache variable at an empty folder, so nothing is cached for certain."""
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    return home


def test_hub_id_not_in_cache(empty_hf_cache):
    model = "stabilityai/stable-diffusion-2-1-base"
    with pytest.raises(PriorNotAvailable) as info:
        DiffusionPrior.from_pretrained(model)
    message = _assert_one_line(info)
    for part in (model, "not available offline", "not in the local Hugging Face cache", f"hf download {model}",
                 f"huggingface-cli download {model}", "download=true", EMBEDDED_HINT):
        assert part in message, part


def test_download_failure_is_one_line(empty_hf_cache):
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        pytest.skip("needs HF_HUB_OFFLINE=1 so no download is attempted")
    with pytest.raises(PriorNotAvailable) as info:
        DiffusionPrior.from_pretrained("stabilityai/stable-diffusion-2-1-base", download=True)
    message = _assert_one_line(info)
    assert "could not download" in message and EMBEDDED_HINT in message


@pytest.mark.parametrize("model", ["not a model id", "a/b/c", "/no/such/folder/anywhere"])
def test_invalid_id(model):
    with pytest.raises(PriorNotAvailable) as info:
        DiffusionPrior.from_pretrained(model)
    message = _assert_one_line(info)
    assert repr(model) in message and "neither an existing folder nor a valid Hugging Face repo id" in message


def test_folder_without_model_index(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(PriorNotAvailable, match="is a file, not a folder"):
        DiffusionPrior.from_pretrained(str(tmp_path / "weights.safetensors"))
    with pytest.raises(PriorNotAvailable) as info:
        DiffusionPrior.from_pretrained(str(tmp_path))
    message = _assert_one_line(info)
    assert "has no model_index.json" in message and str(tmp_path) in message


def test_folder_missing_component(tiny_prior_dirs, tmp_path):
    folder = shutil.copytree(tiny_prior_dirs["pixel"], tmp_path / "broken")
    shutil.rmtree(folder / "tokenizer")
    with pytest.raises(PriorNotAvailable) as info:
        DiffusionPrior.from_pretrained(str(folder))
    assert "'tokenizer'" in _assert_one_line(info)

    index = json.loads((folder / "model_index.json").read_text())
    del index["unet"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(PriorNotAvailable) as info:
        DiffusionPrior.from_pretrained(str(folder))
    assert "no 'unet' component" in _assert_one_line(info)


def test_folder_with_broken_weights(tiny_prior_dirs, tmp_path):
    folder = shutil.copytree(tiny_prior_dirs["pixel"], tmp_path / "broken")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(PriorNotAvailable) as info:
        DiffusionPrior.from_pretrained(str(folder))
    assert "could not load component 'unet'" in _assert_one_line(info)


def test_hub_id_found_in_local_cache(tiny_prior_dirs, empty_hf_cache):
    """A hub id resolves through the local cache (the layout `hf download` leaves), with no network."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = empty_hf_cache / "hub" / "models--gen3d-test--tiny-pixel"
    shutil.copytree(tiny_prior_dirs["pixel"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    prior = DiffusionPrior.from_pretrained("gen3d-test/tiny-pixel")
    assert prior.model_name == "gen3d-test/tiny-pixel" and not prior.is_latent
