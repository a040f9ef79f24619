"""Tiny random diffusion priors in diffusers pipeline layout, built offline for tests.

`make_tiny_prior(folder)` writes a folder that `DiffusionPrior.from_pretrained(str(folder))` loads
through exactly the code path used for hub models:

    folder/
      model_index.json
      unet/          config.json + diffusion_pytorch_model.safetensors  (UNet2DConditionModel)
      scheduler/     scheduler_config.json                              (DDPMScheduler)
      text_encoder/  config.json + model.safetensors                    (CLIPTextModel)
      tokenizer/     vocab.json + merges.txt + tokenizer_config.json    (CLIPTokenizer)
      vae/           config.json + diffusion_pytorch_model.safetensors  (AutoencoderKL, "latent" only)

The weights are random (seeded, so two builds are identical) and the global RNG is left untouched.
The CLIP tokenizer is a real byte-level BPE whose vocab covers every byte, so any prompt tokenizes;
a few words used in tests get whole-word merges.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch

from gen3d.priors.tokenizer import write_clip_tokenizer

TEXT_DIM = 16  # hidden size of the tiny text encoder = cross_attention_dim of the UNet
MAX_TEXT_LENGTH = 77  # CLIP's context length
WORDS = (
    "a an the of on in with and red green blue yellow white black gray mug cube sphere cone torus "
    "chair teapot dog cat car front side back overhead view photo blurry ugly low quality shape"
).split()


def make_tiny_prior(
    folder: Path,
    kind: Literal["latent", "pixel"] = "pixel",
    sample_size: int = 16,
    prediction_type: str = "epsilon",
    learned_variance: bool = False,
    num_train_timesteps: int = 1000,
    seed: int = 0,
) -> Path:
    """Build a tiny random text-conditioned prior in diffusers pipeline layout under `folder`.

    kind: "pixel" (UNet on 3-channel images of `sample_size`², no VAE, like DeepFloyd IF stage I and
        the embedded priors) or "latent" (UNet on 4-channel latents of `sample_size`² plus an
        AutoencoderKL with a downsampling factor of 2, like Stable Diffusion).
    prediction_type: "epsilon", "v_prediction" or "sample" (written to the scheduler config).
    learned_variance: UNet outputs 2x the input channels (DeepFloyd IF style); the prior keeps the first half.
    Returns `folder`.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if kind not in ("latent", "pixel"):
        raise ValueError(f"make_tiny_prior: kind must be 'latent' or 'pixel', got {kind!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = write_clip_tokenizer(folder / "tokenizer", WORDS, MAX_TEXT_LENGTH)
    channels = 4 if kind == "latent" else 3
    index = {
        "_class_name": "StableDiffusionPipeline" if kind == "latent" else "IFPipeline",
        "_diffusers_version": "0.42.0",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "vae": ["diffusers", "AutoencoderKL"] if kind == "latent" else [None, None],
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=channels,
            out_channels=2 * channels if learned_variance else channels,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(8, 16),
            layers_per_block=1,
            cross_attention_dim=TEXT_DIM,
            attention_head_dim=2,
            norm_num_groups=4,
        )
        unet.save_pretrained(folder / "unet")
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=MAX_TEXT_LENGTH,
            bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
        ))
        text_encoder.save_pretrained(folder / "text_encoder")
        if kind == "latent":
            vae = AutoencoderKL(
                in_channels=3, out_channels=3, latent_channels=4, sample_size=2 * sample_size,
                down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
            )
            vae.save_pretrained(folder / "vae")
    DDPMScheduler(
        num_train_timesteps=num_train_timesteps, beta_schedule="scaled_linear", beta_start=0.00085,
        beta_end=0.012, prediction_type=prediction_type, clip_sample=False,
        variance_type="learned_range" if learned_variance else "fixed_small",
    ).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder
