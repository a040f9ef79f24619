"""Drawing images from a prior: deterministic DDIM with classifier-free guidance.

Used for the sample grids written while the embedded priors train and for the 2D sample metrics.
DDIM (Song et al., 2021, "Denoising Diffusion Implicit Models") with eta = 0:

    x0_hat = (x_t - sqrt(1 - abar_t) * eps_hat) / sqrt(abar_t)
    x_s    = sqrt(abar_s) * x0_hat + sqrt(1 - abar_s) * eps_hat

over an evenly spaced decreasing grid of timesteps t > s, with eps_hat the CFG-combined
prediction of the prior's `predict_noise` (diffusers convention). `sample_images` draws from a
text-conditioned `DiffusionPrior`, `sample_novel_views` from a Zero-1-to-3-style
`ViewConditionedPrior` (Liu et al., 2023); both run the one loop in `ddim`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


@torch.no_grad()
def ddim(eps_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, alphas_cumprod: Tensor,
         num_train_timesteps: int, steps: int) -> Tensor:
    """Run DDIM (eta = 0) from noise x ``[N, C, h, w]`` float32 to the clamped x0_hat ``[N, C, h, w]``.

    eps_fn(x_t ``[N, C, h, w]`` float32, t ``[N]`` int64) returns the guided epsilon ``[N, C, h, w]``.
    """
    if steps < 1:
        raise ValueError(f"ddim: steps must be >= 1, got {steps}")
    grid = torch.linspace(num_train_timesteps - 1, 0, steps + 1).round().long()  # t_0 > t_1 > ... > t_steps = 0
    abar = alphas_cumprod
    for k in range(steps):
        t, s = int(grid[k]), int(grid[k + 1])
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        eps = eps_fn(x, tt).float()
        x0 = ((x - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()).clamp(-1.0, 1.0)
        eps = (x - abar[t].sqrt() * x0) / (1 - abar[t]).sqrt()  # the noise consistent with the clipped x0 (as diffusers)
        x = abar[s].sqrt() * x0 + (1 - abar[s]).sqrt() * eps if k < steps - 1 else x0
    return x


@torch.no_grad()
def sample_images(prior, prompts: list[str], steps: int = 25, guidance_scale: float = 5.0,
                  negative_prompt: str = "", generator: torch.Generator | None = None,
                  batch_size: int = 16) -> Tensor:
    """Images ``[N, H, W, 3]`` in [0, 1] for `prompts` (one each), at the prior's resolution."""
    if steps < 1:
        raise ValueError(f"sample_images: steps must be >= 1, got {steps}")
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        cond = prior.encode_text(chunk)
        uncond = prior.encode_text([negative_prompt]).expand_as(cond)
        channels = prior.unet.config.in_channels
        size = prior.latent_size
        x = torch.randn((len(chunk), channels, size, size), generator=generator).to(prior.device, torch.float32)

        def eps_fn(x_t: Tensor, t: Tensor, cond=cond, uncond=uncond) -> Tensor:
            return prior.predict_noise(x_t.to(prior.dtype), t, cond, uncond, guidance_scale).eps_guided

        out.append(prior.decode(ddim(eps_fn, x, prior.alphas_cumprod, prior.num_train_timesteps, steps)))
    return torch.cat(out)


@torch.no_grad()
def sample_novel_views(prior, images: Tensor, poses: Tensor, steps: int = 25, guidance_scale: float = 3.0,
                       generator: torch.Generator | None = None, batch_size: int = 16) -> Tensor:
    """Novel views ``[N, h, w, 3]`` in [0, 1] of input views `images` ``[N, H, W, 3]`` (in [0, 1]) seen from
    relative cameras `poses` ``[N, 4]`` (`gen3d.priors.view_conditioning.relative_pose`), with a
    `ViewConditionedPrior` and Zero123's CFG (default s = 3)."""
    if steps < 1:
        raise ValueError(f"sample_novel_views: steps must be >= 1, got {steps}")
    if images.ndim != 4 or poses.shape != (images.shape[0], 4):
        raise ValueError(f"sample_novel_views: images must be [N, H, W, 3] and poses [N, 4], got "
                         f"{tuple(images.shape)} and {tuple(poses.shape)}")
    out = []
    for i in range(0, len(images), batch_size):
        condition = prior.encode_condition(images[i:i + batch_size], poses[i:i + batch_size])
        channels = prior.unet.config.out_channels
        size = prior.latent_size
        x = torch.randn((len(condition), channels, size, size), generator=generator).to(prior.device, torch.float32)

        def eps_fn(x_t: Tensor, t: Tensor, condition=condition) -> Tensor:
            return prior.predict_noise(x_t.to(prior.dtype), t, condition, guidance_scale).eps_guided

        out.append(prior.decode(ddim(eps_fn, x, prior.alphas_cumprod, prior.num_train_timesteps, steps)))
    return torch.cat(out)
