"""Train the embedded text-to-image prior of the Shapes world.

The prior is a small pixel-space text-conditioned diffusion model in the style of DeepFloyd IF
stage I (Saharia et al., 2022 "Imagen"; DeepFloyd IF): a `UNet2DConditionModel` on 32x32 RGB,
cross-attending to a small `CLIPTextModel` trained from scratch with it, ε-prediction under a
cosine noise schedule (Nichol & Dhariwal, 2021), captions dropped 10% of the time so classifier-
free guidance works (Ho & Salimans, 2022), EMA weights saved. Why pixel space and not a latent
model with a small VAE: at 32x32 the UNet already sees the whole object, a VAE would add a second
model to train and its decoder to every SDS step, and renders of flat-shaded shapes gain nothing
from a learned compression. The UNet has cross-attention only at 8x8 (and in the middle block):
measured on 2 cores, that trains at about 0.5 s per batch of 32, about 6x faster than with
attention at 16x16 as well.

The result is a diffusers pipeline folder (model_index.json, unet/, text_encoder/, tokenizer/,
scheduler/) that `DiffusionPrior.from_pretrained` loads like any hub model. Everything is drawn
from generators seeded by `seed`, and checkpoints make the run resumable:

    gen3d world train-prior                       # the shipped weights, from seed 0
    gen3d world train-prior steps=200 output=/tmp/prior work_dir=/tmp/prior-work   # a quick one
    gen3d world train-prior --resume              # continue after an interruption
"""

from __future__ import annotations

import copy
import json
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gen3d.cameras import OrbitConfig
from gen3d.priors.tokenizer import write_clip_tokenizer
from gen3d.world.trainer import skip_nonfinite

VIEW_WORDS = ["front", "side", "back", "overhead", "view", ","]
TRAIN_ORBIT = OrbitConfig(elevation_range=(-10.0, 45.0), distance_range=(2.0, 2.5), fovy_range=(40.0, 50.0))
"""Cameras of the prior's training renders; text-to-3D on this prior samples the same ranges."""
EMBEDDED_T2I = Path(__file__).resolve().parents[1] / "assets" / "shapes-t2i"


@dataclass
class TrainConfig:
    """Settings shared by the trainers of the embedded priors (text-to-image and view-conditioned)."""

    output: str = ""
    """Folder the finished prior is written to (the shipped one by default)."""
    work_dir: str = ""
    """Checkpoints, sample grids, the render cache and the training log."""
    seed: int = 0
    """Seed of everything: renders, initialization, batches, noise, condition dropout."""
    steps: int = 2500
    """Optimization steps."""
    batch_size: int = 32
    """Examples per step."""
    lr: float = 5e-4
    """Peak AdamW learning rate (linear warm-up, cosine decay to 10%)."""
    warmup: int = 200
    """Warm-up steps."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    ema_decay: float = 0.999
    """Decay of the exponential moving average whose weights are saved (with the usual warm-up)."""
    min_snr_gamma: float = 5.0
    """Min-SNR loss weighting (Hang et al., 2023, "Efficient Diffusion Training via Min-SNR Weighting
    Strategy"): the ε-MSE of timestep t is weighted by min(SNR(t), γ) / SNR(t), which stops the many
    nearly-clean timesteps from dominating the gradient; 0 turns it off (plain ε-MSE)."""
    size: int = 32
    """Image size the prior models."""
    supersample: int = 2
    """Renders are made at size * supersample and averaged down (antialiasing)."""
    views_per_object: int = 40
    """Rendered views of each training object."""
    max_objects: int = 0
    """Train on only the first N training objects (0: all; small values are for quick tests)."""
    cond_dropout: float = 0.1
    """Probability of training an example unconditionally (for classifier-free guidance)."""
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    """UNet widths per resolution (32, 16, 8)."""
    sample_every: int = 500
    """Write a sample grid every this many steps (0: never)."""
    checkpoint_every: int = 250
    """Write a resumable checkpoint every this many steps."""
    progress: bool = True
    """Show a progress bar."""
    threads: int = 1
    """torch CPU threads (0: torch's default). The shipped weights used 1, the two priors training at once
    on the 2 cores: results differ in the last bits across thread counts, and one thread does not
    spin-wait against other work (two multi-threaded torch processes on 2 cores slow each other
    several-fold)."""

    def __post_init__(self) -> None:
        for name, low in (("seed", 0), ("steps", 1), ("batch_size", 1), ("warmup", 0), ("size", 8),
                          ("supersample", 1), ("max_objects", 0), ("sample_every", 0), ("checkpoint_every", 1),
                          ("threads", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not (self.weight_decay >= 0 and self.min_snr_gamma >= 0):
            raise ValueError(f"weight_decay and min_snr_gamma must be >= 0, got {self.weight_decay} and "
                             f"{self.min_snr_gamma}")
        if not 0 <= self.ema_decay < 1 or not 0 <= self.cond_dropout <= 1:
            raise ValueError(f"ema_decay must be in [0, 1) and cond_dropout in [0, 1], got {self.ema_decay} and "
                             f"{self.cond_dropout}")
        if not self.block_out_channels or min(self.block_out_channels) < 8:
            raise ValueError(f"block_out_channels must be widths >= 8, got {self.block_out_channels}")


@dataclass
class PriorTrainConfig(TrainConfig):
    """Training of the embedded text-to-image prior."""

    output: str = str(EMBEDDED_T2I)
    work_dir: str = "outputs/world/train-prior"
    steps: int = 6000
    """Optimization steps (about 50 minutes on one core at 0.5 s a step)."""
    view_dependent_fraction: float = 0.8
    """Fraction of captions that carry the view suffix (', front view', ...)."""
    text_dim: int = 64
    """Text encoder width = the UNet's cross-attention width."""
    text_layers: int = 2
    """Text encoder transformer layers."""
    max_length: int = 16
    """Tokens per caption (captions are at most ~8 words)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("text_dim", "text_layers", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.view_dependent_fraction <= 1:
            raise ValueError(f"view_dependent_fraction must be in [0, 1], got {self.view_dependent_fraction}")


def _unet(cfg: PriorTrainConfig, in_channels: int = 3, cross_attention_dim: int | None = None):
    """The embedded priors' UNet; `in_channels` and `cross_attention_dim` (default: cfg.text_dim) let the
    view-conditioned prior (`train_view_prior`) share it."""
    from diffusers import UNet2DConditionModel

    n = len(cfg.block_out_channels)
    return UNet2DConditionModel(
        sample_size=cfg.size, in_channels=in_channels, out_channels=3, layers_per_block=1,
        block_out_channels=tuple(cfg.block_out_channels),
        down_block_types=tuple("DownBlock2D" if i < n - 1 else "CrossAttnDownBlock2D" for i in range(n)),
        up_block_types=tuple("CrossAttnUpBlock2D" if i == 0 else "UpBlock2D" for i in range(n)),
        cross_attention_dim=cross_attention_dim or cfg.text_dim, attention_head_dim=8, norm_num_groups=8,
    )


def _text_encoder(cfg: PriorTrainConfig, vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=cfg.text_dim, intermediate_size=2 * cfg.text_dim,
        num_hidden_layers=cfg.text_layers, num_attention_heads=4, max_position_embeddings=cfg.max_length,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    ))


def _scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                         prediction_type="epsilon", clip_sample=False)


class DiffusionTrainer:
    """What the embedded priors' trainers share: the optimizer step with EMA, the learning-rate
    schedule, checkpoints and resume, EMA copies of the modules, and the training loop.

    A subclass builds its modules, calls `_setup_optimization()`, and provides `_modules()`,
    `build_data()`, `train_step()`, `write_samples()` and `export()`.
    """

    verb = ""  # the `gen3d world` verb that runs this trainer (progress bar, resume hint, checkpoint meta)

    def _modules(self) -> dict[str, torch.nn.Module]:
        """The trained modules by checkpoint prefix, in optimizer order."""
        raise NotImplementedError

    def _params(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{k}": v for name, m in self._modules().items() for k, v in m.state_dict().items()}

    def _setup_optimization(self) -> None:
        cfg = self.cfg
        self.ema = {k: v.detach().clone() for k, v in self._params().items()}
        self.scheduler = _scheduler()
        self.abar = self.scheduler.alphas_cumprod.float()
        params = [p for m in self._modules().values() for p in m.parameters()]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.generator = torch.Generator().manual_seed(cfg.seed + 1)
        self.step = 0
        self.data = None
        self._stop = False

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio abar / (1 - abar) of timesteps t."""
        ab = self.abar[t]
        return ab / (1 - ab)

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor:
        """Per-example weights of the ε-MSE: Min-SNR-γ (`TrainConfig.min_snr_gamma`; 0: all 1)."""
        gamma = self.cfg.min_snr_gamma
        if gamma > 0:
            snr = self.snr(t)
            return snr.clamp(max=gamma) / snr
        return torch.ones(len(t))

    def diffusion_loss(self, pred: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ε-prediction MSE per example, weighted by `loss_weights`, averaged."""
        return ((pred - eps).pow(2).flatten(1).mean(1) * self.loss_weights(t)).mean()

    def lr_at(self, step: int) -> float:
        from gen3d.schedules import warmup_cosine

        return warmup_cosine(step, self.cfg.lr, self.cfg.warmup, self.cfg.steps)

    def optimize(self, loss: torch.Tensor) -> float:
        """One AdamW step on `loss` (scheduled lr, gradient clipping at 1), then the EMA update."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step) * group.get("lr_scale", 1.0)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for grp in self.optimizer.param_groups for p in grp["params"]]
        if skip_nonfinite(self, loss, params):  # no update, no EMA
            self.step += 1
            return loss.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        self.optimizer.step()
        # EMA with the usual warm-up, so early averages are not dominated by the random initialization
        decay = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for k, v in self._params().items():
                if v.dtype.is_floating_point:
                    self.ema[k].lerp_(v, 1 - decay)
                else:
                    self.ema[k].copy_(v)
        self.step += 1
        return loss.item()

    # ---- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        from gen3d.runs import save_checkpoint

        tensors = {**self._params(), **{f"ema.{k}": v for k, v in self.ema.items()}}
        state = {"optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state()}
        save_checkpoint(self.work, self.step, tensors, state, {"system": self.verb, "config": asdict(self.cfg)})

    def resume(self) -> bool:
        from gen3d.runs import latest_checkpoint

        ckpt = latest_checkpoint(self.work)
        if ckpt is None:
            return False
        for name, module in self._modules().items():
            module.load_state_dict({k[len(name) + 1:]: v for k, v in ckpt.model.items() if k.startswith(f"{name}.")})
        self.ema = {k[4:]: v.clone() for k, v in ckpt.model.items() if k.startswith("ema.")}
        self.optimizer.load_state_dict(ckpt.state["optimizer"])
        self.generator.set_state(ckpt.state["generator"])
        self.step = ckpt.step
        return True

    def ema_modules(self) -> dict[str, torch.nn.Module]:
        """Copies of the modules holding the EMA weights, in eval mode."""
        out = {}
        for name, module in self._modules().items():
            clone = copy.deepcopy(module)
            clone.load_state_dict({k[len(name) + 1:]: v for k, v in self.ema.items() if k.startswith(f"{name}.")})
            out[name] = clone.eval()
        return out

    def fit(self) -> Path:
        """Train to cfg.steps (Ctrl-C checkpoints and stops), write the samples and export the prior."""
        cfg = self.cfg
        if self.data is None:
            self.build_data()
        # Ctrl-C and SIGTERM (kill, systemd, docker stop, job schedulers) alike: checkpoint at the step's end and stop
        stop = lambda *a: setattr(self, "_stop", True)  # noqa: E731
        previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not cfg.progress, desc=self.verb, file=sys.stderr)
        log = (self.work / "metrics.jsonl").open("a")
        avg = None
        try:
            while self.step < cfg.steps:
                loss = self.train_step()
                avg = loss if avg is None else 0.98 * avg + 0.02 * loss
                bar.update(1)
                bar.set_postfix(loss=f"{avg:.4f}", refresh=False)
                if self.step % 50 == 0:
                    log.write(json.dumps({"step": self.step, "loss": loss, "loss_avg": avg, "lr": self.lr_at(self.step)}) + "\n")
                    log.flush()
                if cfg.sample_every and self.step % cfg.sample_every == 0:
                    self.write_samples()
                if self._stop or self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                if self._stop:
                    print(f"\ninterrupted at step {self.step}; checkpoint saved; resume with: gen3d world "
                          f"{self.verb} --resume work_dir={cfg.work_dir}", file=sys.stderr)
                    raise KeyboardInterrupt
        finally:
            bar.close()
            log.close()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        self.save_checkpoint()
        if cfg.sample_every:
            self.write_samples()
        return self.export()


class PriorTrainer(DiffusionTrainer):
    """Builds the data and models, trains with checkpoints, writes the pipeline folder."""

    verb = "train-prior"

    def __init__(self, cfg: PriorTrainConfig):
        from transformers import CLIPTokenizer

        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.work = Path(cfg.work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)  # diffusers/transformers initialize from the global generator
        from gen3d.world.catalog import vocabulary

        self.tok_dir = self.work / "tokenizer"
        vocab_size = write_clip_tokenizer(self.tok_dir, [*vocabulary(), *VIEW_WORDS], cfg.max_length)
        self.tokenizer = CLIPTokenizer.from_pretrained(str(self.tok_dir))
        self.unet = _unet(cfg)
        self.text_encoder = _text_encoder(cfg, vocab_size)
        self._setup_optimization()

    # ---- data --------------------------------------------------------------------------------
    def build_data(self) -> None:
        """Render every training object from `views_per_object` random cameras (cached in work_dir)."""
        from gen3d.world.catalog import training_objects

        cfg = self.cfg
        cache = self.work / f"renders-{cfg.seed}-{cfg.views_per_object}-{cfg.size}x{cfg.supersample}-{cfg.max_objects}.pt"
        if cache.is_file():
            self.data = torch.load(cache, weights_only=False)
            return
        objects = training_objects()[: cfg.max_objects or None]
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(cfg.seed)
        chunks = [render_views(o, cfg.views_per_object, cfg.size, cfg.supersample, g)
                  for o in tqdm(objects, desc="rendering", disable=not cfg.progress, file=sys.stderr)]
        self.data = {
            "premult": torch.cat([c[0] for c in chunks]).half(), "alpha": torch.cat([c[1] for c in chunks]).half(),
            "shape": [o.shape for o in objects for _ in range(cfg.views_per_object)],
            "color": [o.color for o in objects for _ in range(cfg.views_per_object)],
            "direction": [d for c in chunks for d in c[2]],
        }
        from gen3d.io import atomic_path

        with atomic_path(cache) as tmp:
            torch.save(self.data, tmp)
        print(f"rendered {len(self.data['premult'])} views of {len(objects)} objects in "
              f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)

    def batch(self) -> tuple[torch.Tensor, list[str]]:
        """A batch of images in [-1, 1] on white or black backgrounds with their captions."""
        from gen3d.world.catalog import caption

        cfg, g, d = self.cfg, self.generator, self.data
        idx = torch.randint(0, len(d["premult"]), (cfg.batch_size,), generator=g)
        white = (torch.rand(cfg.batch_size, generator=g) < 0.5).float().view(-1, 1, 1, 1)
        premult, alpha = d["premult"][idx].float(), d["alpha"][idx].float()
        images = premult + white * (1 - alpha)
        captions = []
        view = torch.rand(cfg.batch_size, generator=g) < cfg.view_dependent_fraction
        drop = torch.rand(cfg.batch_size, generator=g) < cfg.cond_dropout
        for j, i in enumerate(idx.tolist()):
            text = caption(d["shape"][i], d["color"][i], g)
            if view[j]:
                text = f"{text}, {d['direction'][i]} view"
            captions.append("" if drop[j] else text)
        return images * 2 - 1, captions

    # ---- model ---------------------------------------------------------------------------------
    def _modules(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet, "text": self.text_encoder}

    def encode(self, captions: list[str]) -> torch.Tensor:
        ids = self.tokenizer(captions, padding="max_length", max_length=self.cfg.max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids)[0]  # [B, L, D]

    def train_step(self) -> float:
        x0, captions = self.batch()
        g = self.generator
        t = torch.randint(0, 1000, (len(x0),), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        ab = self.abar[t].view(-1, 1, 1, 1)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
        pred = self.unet(x_t, t, self.encode(captions)).sample
        return self.optimize(self.diffusion_loss(pred, eps, t))

    # ---- outputs -------------------------------------------------------------------------------------
    def prior(self):
        """The EMA model as a `DiffusionPrior` (in memory)."""
        from gen3d.priors.diffusion import DiffusionPrior

        m = self.ema_modules()
        return DiffusionPrior(m["unet"], self.scheduler, m["text"], self.tokenizer, model_name="shapes-t2i (training)",
                              resolution=self.cfg.size, device="cpu", dtype=torch.float32)

    def write_samples(self) -> Path:
        from gen3d.export.video import image_grid, save_image
        from gen3d.priors.sampling import sample_images

        prompts = sample_prompts()
        images = sample_images(self.prior(), prompts, steps=25, guidance_scale=5.0,
                               generator=torch.Generator().manual_seed(0))
        path = self.work / "samples" / f"step-{self.step:06d}.png"
        save_image(path, image_grid(images, nrow=8))
        return path

    def export(self) -> Path:
        """Write the EMA weights as a diffusers pipeline folder (atomically, as a whole)."""
        from gen3d.io import atomic_folder
        from gen3d.world.catalog import HELD_OUT

        out = Path(self.cfg.output)
        with atomic_folder(out) as tmp:
            m = self.ema_modules()
            m["unet"].save_pretrained(tmp / "unet")
            m["text"].save_pretrained(tmp / "text_encoder")
            self.tokenizer.save_pretrained(str(tmp / "tokenizer"))
            self.scheduler.save_pretrained(tmp / "scheduler")
            index = {"_class_name": "IFPipeline", "_diffusers_version": _diffusers_version(),
                     "unet": ["diffusers", "UNet2DConditionModel"], "scheduler": ["diffusers", "DDPMScheduler"],
                     "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"]}
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
            card = {"name": "gen3d/shapes-t2i", "trained_by": "gen3d world train-prior", "steps": self.step,
                    "config": asdict(self.cfg), "held_out": [list(h) for h in HELD_OUT]}
            (tmp / "gen3d_prior.json").write_text(json.dumps(card, indent=2))
        return out


def render_views(obj, n: int, size: int, supersample: int, generator: torch.Generator,
                 return_cameras: bool = False, orbit: OrbitConfig = TRAIN_ORBIT):
    """n random views of `obj`: premultiplied color [n, 3, size, size], alpha [n, 1, size, size], view words.

    Cameras follow `orbit` (by default `TRAIN_ORBIT`, the range text-to-3D presets on this prior sample from).
    With `return_cameras`, a fourth element: the `Cameras` drawn (azimuth, elevation, distance per
    view; the random draws are the same either way).
    """
    from gen3d.cameras import sample_orbit
    from gen3d.priors.prompts import view_directions
    from gen3d.world.render import render_object

    cams = sample_orbit(replace(orbit, batch_size=n), generator, width=size * supersample, height=size * supersample)
    out = render_object(obj, cams, background=(0.0, 0.0, 0.0), supersample=1)
    premult = F.avg_pool2d(out.rgb.permute(0, 3, 1, 2), supersample)
    alpha = F.avg_pool2d(out.alpha.permute(0, 3, 1, 2), supersample)
    directions = view_directions(cams.azimuth, cams.elevation)
    if return_cameras:
        return premult, alpha, directions, cams
    return premult, alpha, directions


def sample_prompts() -> list[str]:
    """Fixed prompts of the sample grids: one per shape (seen colors) and every held-out pair."""
    from gen3d.world.catalog import COLORS, HELD_OUT, SHAPES, caption

    colors = list(COLORS)
    held = set(HELD_OUT)
    prompts = []
    for i, shape in enumerate(SHAPES):  # each shape in a seen color, cycling through the palette
        color = next(c for k in range(len(colors)) if (c := colors[(i + k) % len(colors)], shape) not in held)
        prompts.append(caption(shape, color))
    return prompts + [caption(shape, color) for color, shape in HELD_OUT]


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__
