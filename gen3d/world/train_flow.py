"""Train the text-conditioned flow teacher of gen3d's few-step 3D generator on the Shapes world.

Data: each training object's surface as `source_points` points with their shaded colors (`build_recon_set`), and
its captions (`gen3d.world.catalog.caption`, a random template and synonyms per example). An example is a random
subset of `points` of them, ``[xyz ‖ 2 rgb - 1]``, and one caption encoded by the embedded text prior's frozen CLIP
text encoder (``gen3d/shapes-t2i``). The model (`gen3d.models.point_flow.PointFlowTransformer`) is trained by
rectified flow matching (`gen3d.models.flow.flow_matching_loss`, TRELLIS's convention, logit-normal times) with the
caption dropped to the learned null sequence `p_uncond` of the time, for classifier-free guidance; an EMA of its
weights is what is exported and sampled.

Everything is drawn from generators seeded by `seed`, and checkpoints hold the model, its EMA, the optimizer, the
step and the generator, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import copy
import json
import math
import signal
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from gen3d.models.flow import euler_sample, flow_matching_loss
from gen3d.models.point_flow import PointFlowConfig, PointFlowTransformer


@dataclass
class FlowTrainConfig:
    """Training of the point-set flow teacher on the Shapes world."""

    objects: int = 0
    """Train on the first N of `training_objects()` (0: all)."""
    points: int = 1024
    """Points per set (the latent's size: points x 6 floats)."""
    source_points: int = 2048
    """Surface points stored per object; each example is a random subset of `points` of them."""
    width: int = 128
    """Token width of the transformer."""
    layers: int = 4
    """Transformer blocks."""
    heads: int = 4
    """Attention heads."""
    steps: int = 4000
    """Optimization steps."""
    batch_size: int = 16
    """Examples per step."""
    lr: float = 3e-4
    """Peak AdamW learning rate (warm-up, then cosine decay to 10%)."""
    warmup: int = 200
    """Warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Gradient-norm clipping (0: none)."""
    p_uncond: float = 0.1
    """Probability of replacing an example's caption by the null condition."""
    ema: float = 0.999
    """EMA decay of the exported weights (0: no EMA)."""
    text_encoder: str = "gen3d/shapes-t2i"
    """Prior whose tokenizer and CLIP text encoder embed the captions: the embedded one or a diffusers folder."""
    checkpoint_every: int = 500
    """Write a resumable checkpoint every this many steps (and at the end)."""
    output: str = "outputs/world/flow-teacher"
    """Folder the EMA model is exported to (model.safetensors + config.json)."""
    work_dir: str = "outputs/world/train-flow"
    """Data cache, checkpoints and the training log."""
    seed: int = 0
    """Seed of the data, the initialization and the batches."""
    progress: bool = True
    """Show a progress bar."""
    threads: int = 2
    """torch CPU threads (0: torch's default)."""

    def __post_init__(self) -> None:
        ints = {"objects": 0, "points": 1, "source_points": 1, "width": 1, "layers": 1, "heads": 1, "steps": 0,
                "batch_size": 1, "warmup": 0, "checkpoint_every": 1, "seed": 0, "threads": 0}
        for name, low in ints.items():
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
                raise ValueError(f"FlowTrainConfig.{name} must be an integer >= {low}, got {value!r}")
        if self.points > self.source_points:
            raise ValueError(f"FlowTrainConfig.points ({self.points}) must be <= source_points ({self.source_points})")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"FlowTrainConfig.lr must be > 0, got {self.lr}")
        for name, high in (("p_uncond", 1.0), ("ema", 1.0)):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 <= value < high):
                raise ValueError(f"FlowTrainConfig.{name} must be in [0, {high}), got {value}")
        if not self.work_dir or not self.output:
            raise ValueError("FlowTrainConfig: work_dir and output must be set")

    def model_config(self, text_dim: int, text_length: int) -> PointFlowConfig:
        return PointFlowConfig(width=self.width, layers=self.layers, heads=self.heads, text_dim=text_dim,
                               text_length=text_length)


class TextEncoder:
    """A prior's frozen tokenizer + CLIP text encoder: captions -> hidden states [B, L, D], cached per caption."""

    def __init__(self, model: str = "gen3d/shapes-t2i"):
        from transformers import AutoTokenizer, CLIPTextModel

        from gen3d.priors.diffusion import _locate

        folder = _locate(model, download=False, cache_dir=None)  # embedded id, folder or cached hub id
        self.tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
        self.encoder = CLIPTextModel.from_pretrained(folder / "text_encoder").eval().requires_grad_(False)
        self.length = min(int(self.tokenizer.model_max_length), 77)
        self.dim = self.encoder.config.hidden_size
        self.cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if missing:
            ids = self.tokenizer(missing, padding="max_length", max_length=self.length, truncation=True,
                                 return_tensors="pt").input_ids
            for caption, hidden in zip(missing, self.encoder(ids)[0]):
                self.cache[caption] = hidden
        return torch.stack([self.cache[c] for c in captions])


def to_latent(points: torch.Tensor, colors: torch.Tensor) -> torch.Tensor:
    """[.., N, 3] positions and [.., N, 3] colors in [0, 1] -> the latent [.., N, 6]: xyz ‖ 2 rgb - 1."""
    return torch.cat([points, 2 * colors - 1], -1)


def from_latent(latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The latent [.., N, 6] -> (positions, colors clamped to [0, 1])."""
    return latent[..., :3], ((latent[..., 3:] + 1) / 2).clamp(0, 1)


class FlowTrainer:
    """Builds the data, the text encoder and the model; trains with checkpoints (resumable); exports the EMA."""

    verb = "train-flow"

    def __init__(self, cfg: FlowTrainConfig):
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.work = Path(cfg.work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.text = TextEncoder(cfg.text_encoder)
        torch.manual_seed(cfg.seed)
        self.model = PointFlowTransformer(cfg.model_config(self.text.dim, self.text.length))
        self.ema = copy.deepcopy(self.model).requires_grad_(False) if cfg.ema else None
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.generator = torch.Generator().manual_seed(cfg.seed * 100_003 + 1)
        self.step = 0
        self.latents = self.objects = None
        self._stop = False

    def build_data(self) -> None:
        """Every training object's `source_points` surface points and shaded colors (cached in work_dir)."""
        from gen3d.world.catalog import training_objects
        from gen3d.world.recon_data import build_recon_set

        objects = training_objects()[: self.cfg.objects or None]
        cache = self.work / f"points-{self.cfg.seed}-{len(objects)}-{self.cfg.source_points}.pt"
        data = build_recon_set(objects, views=1, size=8, points=self.cfg.source_points, seed=self.cfg.seed,
                               cache=cache)
        self.objects = objects
        self.latents = to_latent(data.points, data.lit)  # [O, P, 6]

    def batch(self) -> tuple[torch.Tensor, list[str]]:
        """`batch_size` random objects: a random subset of `points` of each one's points, and a random caption."""
        from gen3d.world.catalog import caption

        cfg, g = self.cfg, self.generator
        if self.latents is None:
            self.build_data()
        pick = torch.randint(0, len(self.objects), (cfg.batch_size,), generator=g)
        subsets = torch.stack([torch.randperm(cfg.source_points, generator=g)[: cfg.points]
                               for _ in range(cfg.batch_size)])
        x0 = torch.gather(self.latents[pick], 1, subsets[..., None].expand(-1, -1, 6))
        captions = [caption(self.objects[i].shape, self.objects[i].color, g) for i in pick.tolist()]
        return x0, captions

    def lr_at(self, step: int) -> float:
        from gen3d.schedules import warmup_cosine

        return warmup_cosine(step, self.cfg.lr, self.cfg.warmup, self.cfg.steps)

    def loss(self, x0: torch.Tensor, captions: list[str]) -> torch.Tensor:
        text = self.model.with_dropout(self.text(captions), self.cfg.p_uncond, self.generator)
        return flow_matching_loss(self.model, x0, text, self.generator)

    def train_step(self) -> float:
        self.model.train()
        loss = self.loss(*self.batch())
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        if self.ema is not None:
            with torch.no_grad():
                for e, p in zip(self.ema.parameters(), self.model.parameters()):
                    e.lerp_(p, 1 - self.cfg.ema)
        self.step += 1
        return loss.item()

    def save_checkpoint(self) -> None:
        from gen3d.runs import save_checkpoint

        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        if self.ema is not None:
            tensors |= {f"ema.{k}": v for k, v in self.ema.state_dict().items()}
        state = {"optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state()}
        save_checkpoint(self.work, self.step, tensors, state, {"system": self.verb, "config": asdict(self.cfg)})

    def resume(self) -> bool:
        from gen3d.runs import latest_checkpoint

        ckpt = latest_checkpoint(self.work)
        if ckpt is None:
            return False
        self.model.load_state_dict({k[6:]: v for k, v in ckpt.model.items() if k.startswith("model.")})
        if self.ema is not None:
            self.ema.load_state_dict({k[4:]: v for k, v in ckpt.model.items() if k.startswith("ema.")})
        self.optimizer.load_state_dict(ckpt.state["optimizer"])
        self.generator.set_state(ckpt.state["generator"])
        self.step = ckpt.step
        return True

    def fit(self) -> Path:
        """Train to cfg.steps (Ctrl-C checkpoints and stops), then export."""
        cfg = self.cfg
        if self.latents is None:
            self.build_data()
        previous = signal.signal(signal.SIGINT, lambda *a: setattr(self, "_stop", True))
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not cfg.progress, desc=self.verb, file=sys.stderr)
        avg = None
        try:
            with (self.work / "metrics.jsonl").open("a") as log:
                while self.step < cfg.steps:
                    loss = self.train_step()
                    avg = loss if avg is None else 0.98 * avg + 0.02 * loss
                    bar.update(1)
                    bar.set_postfix(loss=f"{avg:.4f}", refresh=False)
                    if self.step % 50 == 0 or self.step == cfg.steps:
                        log.write(json.dumps({"step": self.step, "loss": loss, "loss_avg": avg}) + "\n")
                        log.flush()
                    if self._stop or self.step % cfg.checkpoint_every == 0:
                        self.save_checkpoint()
                    if self._stop:
                        print(f"\ninterrupted at step {self.step}; resume with --resume work_dir={cfg.work_dir}",
                              file=sys.stderr)
                        raise KeyboardInterrupt
        finally:
            bar.close()
            signal.signal(signal.SIGINT, previous)
        self.save_checkpoint()
        return self.export()

    def sampler_model(self) -> PointFlowTransformer:
        return (self.ema if self.ema is not None else self.model).eval()

    def sample(self, captions: list[str], steps: int = 25, guidance: float = 3.0, seed: int = 0) -> torch.Tensor:
        """Latents [len(captions), points, 6] from the (EMA) model by the Euler sampler with guidance."""
        noise = torch.randn(len(captions), self.cfg.points, 6, generator=torch.Generator().manual_seed(seed))
        return euler_sample(self.sampler_model(), noise, self.text(captions), steps=steps, guidance=guidance)

    def export(self) -> Path:
        """The EMA (or plain) model's weights and `PointFlowConfig` into `output`, as a whole."""
        from safetensors.torch import save_file

        from gen3d.io import atomic_folder

        out = Path(self.cfg.output)
        model = self.sampler_model()
        with atomic_folder(out) as tmp:
            save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
                      str(tmp / "model.safetensors"))
            (tmp / "config.json").write_text(json.dumps(asdict(model.cfg), indent=2))
            (tmp / "latent.json").write_text(json.dumps({"points": self.cfg.points, "layout": "xyz, 2 rgb - 1",
                                                         "text_encoder": self.cfg.text_encoder}, indent=2))
        return out
