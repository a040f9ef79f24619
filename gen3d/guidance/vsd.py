"""Variational Score Distillation (VSD) from ProlificDreamer.

ProlificDreamer (Wang et al. 2023, "ProlificDreamer: High-Fidelity and Diverse Text-to-3D Generation
with Variational Score Distillation") treats the 3D parameters as a distribution and replaces SDS's
"eps_hat - eps" by the difference of two scores: the pretrained prior's and that of the *renders'*
distribution, estimated online by a LoRA of the prior's UNet conditioned on the camera
(ALGORITHMS.md §2):

    x_t     = sqrt(abar_t) z + sqrt(1 - abar_t) eps
    eps_pre = eps_u + s (eps_c - eps_u)                  frozen prior, view-dependent text, CFG
    eps_est = LoRA-UNet(x_t, t, y, camera)                 the estimator, view-independent text y
    g       = w(t) (eps_pre - eps_est)

and, on the detached render, the estimator's own denoising loss
``|| LoRA-UNet(add_noise(z, eps', t'), t', y, c) - target ||^2`` with t' ~ U{0..T-1}, the target
eps' (or v or z, by the prior's prediction type), and the camera c zeroed with probability
`camera_dropout`. The estimator starts equal to the prior: peft initialises LoRA's B to zero and the
camera embedding's last layer is zero-initialised here, so at the first step (with s = 1) g = 0.

Implementation choices:

- The estimator is the prior's own UNet with a peft LoRA adapter (rank `lora_rank` on the attention
  projections), switched on only inside `estimator()`; the prior's calls run with it off
  (threestudio does the same when both model paths agree). No second UNet is loaded.
- The camera enters through the UNet's class embedding: a diffusers ``TimestepEmbedding``
  (Linear 16 -> D, SiLU, Linear D -> D) of the flattened camera-to-world matrix, added to the time
  embedding, installed on the UNet only while the estimator runs.
- The LoRA and camera embedding take their AdamW step inside `guide` (after g is computed with the
  pre-step estimator), which equals one joint optimizer step of the 3D parameters and the LoRA
  because the two losses share no parameters. Their state is checkpointed with the run.

CFG convention: `guidance_scale` is the prior's CFG in diffusers' convention (ProlificDreamer: 7.5);
`lora_guidance_scale` mixes the camera-free and camera-conditioned estimates (1: the conditioned one).
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from gen3d.errors import Gen3dError
from gen3d.guidance.base import Guidance, GuidanceOutput, finish, guided_noise, noise_like, timestep_weight
from gen3d.guidance.config import GuidanceConfig

if TYPE_CHECKING:
    from gen3d.cameras import Cameras
    from gen3d.priors.diffusion import DiffusionPrior
    from gen3d.priors.prompts import PromptBatch

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
CAMERA_DIM = 16  # flattened 4x4 camera-to-world
_names = itertools.count()


class VSDGuidance(Guidance):
    """VSD over a `DiffusionPrior`, with a camera-conditioned LoRA estimator (see the module docstring)."""

    def __init__(self, prior: "DiffusionPrior", cfg: GuidanceConfig | None = None, seed: int = 0) -> None:
        """Add the LoRA adapter to `prior`'s UNet; `seed` draws its initial weights (LoRA's A) reproducibly."""
        try:
            from peft import LoraConfig
        except ImportError:
            raise Gen3dError("guidance.type=vsd needs peft for its LoRA estimator: pip install peft") from None
        from diffusers.models.embeddings import TimestepEmbedding

        self.prior = prior
        self.cfg = cfg or GuidanceConfig(type="vsd", guidance_scale=7.5)
        v = self.cfg.vsd
        unet = prior.unet
        if v.camera_condition != "none" and getattr(unet, "class_embedding", None) is not None:
            raise Gen3dError(
                f"prior {prior.model_name!r} already uses its UNet's class embedding, so VSD cannot condition its "
                f"estimator on the camera there; set guidance.vsd.camera_condition=none"
            )
        self.adapter = f"gen3d_vsd_{next(_names)}"
        with torch.random.fork_rng(devices=[]):  # peft and torch.nn init from the global generator: seed it
            torch.manual_seed(seed)
            unet.add_adapter(LoraConfig(r=v.lora_rank, lora_alpha=v.lora_alpha or v.lora_rank,
                                        init_lora_weights=True, target_modules=LORA_TARGETS), adapter_name=self.adapter)
            self.camera_embedding = None
            if v.camera_condition != "none":
                dim = unet.time_embedding.linear_2.out_features
                self.camera_embedding = TimestepEmbedding(CAMERA_DIM, dim).to(prior.device)
                torch.nn.init.zeros_(self.camera_embedding.linear_2.weight)
                torch.nn.init.zeros_(self.camera_embedding.linear_2.bias)
        unet.disable_adapters()  # the prior runs without it; `estimator()` switches it on
        self.lora = {name: p for name, p in unet.named_parameters() if f".{self.adapter}." in name}
        if not self.lora:
            raise Gen3dError(f"prior {prior.model_name!r}: its UNet has no attention projections {LORA_TARGETS} for VSD's LoRA")
        for p in self.lora.values():
            p.data = p.data.float()
            p.requires_grad_(True)
        params = list(self.lora.values()) + (list(self.camera_embedding.parameters()) if self.camera_embedding else [])
        self.optimizer = torch.optim.AdamW(params, lr=v.lr, betas=(0.9, 0.99), eps=1e-15)

    @contextmanager
    def estimator(self) -> Iterator[None]:
        """Within: the prior's UNet is the estimator (LoRA on, camera class embedding installed)."""
        unet = self.prior.unet
        unet.set_adapter(self.adapter)
        unet.enable_adapters()
        if self.camera_embedding is not None:
            unet.class_embedding = self.camera_embedding
        try:
            yield
        finally:
            unet.disable_adapters()
            if self.camera_embedding is not None:
                unet.class_embedding = None

    def camera_vector(self, cameras: "Cameras | None", batch: int, device: torch.device) -> Tensor | None:
        """The class label ``[B, 16]`` of each camera (flattened c2w), None without camera conditioning."""
        if self.camera_embedding is None:
            return None
        if cameras is None or len(cameras) != batch:
            raise ValueError(f"VSD conditions its estimator on the cameras: pass the {batch} render cameras as cameras=")
        return cameras.c2w.reshape(batch, CAMERA_DIM).to(device, torch.float32)

    def unet_output(self, x: Tensor, t: Tensor, text: Tensor, camera: Tensor | None) -> Tensor:
        """The estimator's raw output ``[B, C, h, w]`` (call inside `estimator()`)."""
        prior = self.prior
        kwargs = {} if camera is None else {"class_labels": camera.to(prior.dtype)}
        out = prior.unet(x.to(prior.dtype), t, encoder_hidden_states=text.to(prior.dtype), **kwargs).sample
        return out[:, : x.shape[1]]

    def estimate(self, x_t: Tensor, t: Tensor, text: Tensor, camera: Tensor | None) -> Tensor:
        """The estimator's epsilon ``[B, C, h, w]`` float32, with `lora_guidance_scale` over the camera."""
        prior, s = self.prior, self.cfg.vsd.lora_guidance_scale
        with self.estimator():
            eps = prior.output_to_eps(self.unet_output(x_t, t, text, camera), x_t, t)
            if camera is not None and s != 1.0:
                eps0 = prior.output_to_eps(self.unet_output(x_t, t, text, torch.zeros_like(camera)), x_t, t)
                eps = eps0 + s * (eps - eps0)
        return eps

    def train_estimator(self, z: Tensor, text: Tensor, camera: Tensor | None, generator: torch.Generator | None) -> float:
        """One AdamW step of the LoRA (and camera embedding) on its denoising loss at the detached z; returns the loss."""
        prior, v = self.prior, self.cfg.vsd
        B = z.shape[0]
        device = generator.device if generator is not None else "cpu"
        t = torch.randint(0, max(int(prior.num_train_timesteps * v.lora_t_max), 1), (B,), generator=generator,
                          device=device).to(z.device)
        eps = noise_like(z, generator)
        if camera is not None:
            keep = torch.rand(B, generator=generator, device=device).to(z.device) >= v.camera_dropout
            camera = camera * keep.view(-1, 1).float()
        x_t = prior.add_noise(z, eps, t)
        abar = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
        if prior.prediction_type == "epsilon":
            target = eps
        elif prior.prediction_type == "v_prediction":
            target = abar.sqrt() * eps - (1.0 - abar).sqrt() * z
        else:
            target = z
        with torch.enable_grad(), self.estimator():
            loss = F.mse_loss(self.unet_output(x_t, t, text, camera).float(), target)
            (v.lora_loss_weight * loss).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def guide(
        self,
        z: Tensor,
        prompts: "PromptBatch",
        step: int,
        max_steps: int,
        generator: torch.Generator | None = None,
        cameras: "Cameras | None" = None,
    ) -> GuidanceOutput:
        """VSD on z ``[B, C, h, w]``; also steps the estimator once on the detached z."""
        cfg, prior = self.cfg, self.prior
        B = z.shape[0]
        z = z.float()
        camera = self.camera_vector(cameras, B, z.device)
        text = prompts.plain if prompts.plain is not None else prompts.cond  # the estimator's view-independent y
        t = self.timesteps(B, step, max_steps, generator).to(z.device)
        eps = noise_like(z, generator)
        with torch.no_grad():
            x_t = prior.add_noise(z.detach(), eps, t)
            eps_pre = guided_noise(prior, x_t, t, prompts, self.scale(step, max_steps), cfg.perp_neg_scale).eps_guided
            eps_est = self.estimate(x_t, t, text, camera)
            grad = timestep_weight(cfg.weighting, prior.alphas_cumprod, t) * (eps_pre - eps_est)
        out = finish(z, grad, t, self.clip(step, max_steps))
        if cfg.vsd.lora_loss_weight > 0:
            out.logs["lora_loss"] = self.train_estimator(z.detach(), text, camera, generator)
        return out

    def parameters(self) -> list[Tensor]:
        """The estimator's trainable tensors: LoRA weights, then the camera embedding's."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def state_dict(self) -> dict:
        # by position, not name: the adapter's name differs between processes
        return {"params": [p.detach().cpu() for p in self.parameters()], "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        params = self.parameters()
        saved = state["params"]
        if len(saved) != len(params) or any(a.shape != b.shape for a, b in zip(saved, params)):
            raise ValueError("the checkpoint's VSD estimator does not match this config (guidance.vsd.lora_rank or "
                             "camera_condition changed?)")
        with torch.no_grad():
            for p, value in zip(params, saved):
                p.copy_(value.to(p.device, p.dtype))
        self.optimizer.load_state_dict(state["optimizer"])
