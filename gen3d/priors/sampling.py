"""Drawing images from a `DiffusionPrior`: deterministic DDIM with classifier-free guidance.

Used for the sample grids written while the embedded priors train and for the 2D sample metrics.
DDIM (Song et al., 2021, "Denoising Diffusion Implicit Models") with eta = 0:

    x0_hat = (x_t - sqrt(1 - abar_t) * eps_hat) / sqrt(abar_t)
    x_s    = sqrt(abar_s) * x0_hat + sqrt(1 - abar_s) * eps_hat

over an evenly spaced decreasing grid of timesteps t > s, with eps_hat the CFG-combined
prediction of `DiffusionPrior.predict_noise` (diffusers convention).
"""

from __future__ import annotations

import torch
from torch import Tensor


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
        T = prior.num_train_timesteps
        grid = torch.linspace(T - 1, 0, steps + 1).round().long()  # t_0 > t_1 > ... > t_steps = 0
        abar = prior.alphas_cumprod
        for k in range(steps):
            t, s = int(grid[k]), int(grid[k + 1])
            tt = torch.full((len(chunk),), t, device=prior.device, dtype=torch.long)
            eps = prior.predict_noise(x.to(prior.dtype), tt, cond, uncond, guidance_scale).eps_guided.float()
            x0 = ((x - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()).clamp(-1.0, 1.0)
            x = abar[s].sqrt() * x0 + (1 - abar[s]).sqrt() * eps if k < steps - 1 else x0
        out.append(prior.decode(x))
    return torch.cat(out)
