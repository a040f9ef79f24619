"""Train the embedded text-to-video prior of the Shapes world: the temporal guidance of 4D generation.

The recipe of text-to-video models built on an image model (ModelScope T2V, Wang et al. 2023; AnimateDiff,
Guo et al. 2024, "AnimateDiff: Animate Your Personalized Text-to-Image Diffusion Models without Specific
Tuning"), shrunk to the Shapes world:

- model: diffusers' `UNet3DConditionModel` with the embedded text-to-image prior's widths; its spatial
  layers are *inflated* from ``gen3d/shapes-t2i`` (the same weights, 1x1 convolutions of the attention
  projections as linear layers) and its temporal layers (a temporal transformer at the input, temporal
  convolutions after every ResNet, temporal attention after every spatial transformer) start as the
  identity (their output projections zeroed), so step 0 is the image prior applied to every frame;
- text: the image prior's `CLIPTextModel`, its token embeddings carried over word by word into a vocabulary
  that adds the motion words ("spinning", "bouncing", "growing", "swinging");
- data: every `training_objects()` object (held-out color/shape pairs never seen) under every motion of
  `gen3d.world.animation`, `clips_per_pair` clips each from a random `TRAIN_ORBIT` camera that stays fixed
  over the clip; `frames` frames at t = 0 .. 1, rendered by the exact sphere tracer at `size` x `supersample`
  and averaged down; captions "a red mug, bouncing" with the clip's view word most of the time;
- objective, EMA, checkpoints, resume: those of `train_prior` (ε-prediction, cosine schedule, Min-SNR-γ,
  10% caption dropout for classifier-free guidance).

With ``rest_frame=true`` the UNet also takes the object at rest from the clip's camera (image-to-video conditioning,
`gen3d.priors.video.with_rest_channels`; dropped for `rest_dropout` of the clips), so that what a caption adds is the
motion alone; ``init_from=gen3d/shapes-t2v`` starts it from the text-to-video prior.

The output is a diffusers pipeline folder (``TextToVideoSDPipeline`` layout without a VAE: the model is in
pixel space) that `VideoDiffusionPrior.from_pretrained("gen3d/shapes-t2v")` loads:

    # the shipped weights, from seed 0, in two stages: all layers at 16x16 (4,000 steps), then the temporal layers,
    # first convolution and text encoder on the frozen spatial layers (2,000 steps)
    gen3d world train-video-prior output=outputs/world/t2v-stage1 work_dir=outputs/world/t2v-stage1
    gen3d world train-video-prior init_from=outputs/world/t2v-stage1 train_spatial=false steps=2000
    gen3d world train-video-prior steps=20 max_objects=2 output=/tmp/t2v work_dir=/tmp/t2v-work
    gen3d world train-video-prior rest_frame=true init_from=gen3d/shapes-t2v output=/tmp/i2v work_dir=/tmp/i2v-work
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gen3d.priors.tokenizer import write_clip_tokenizer
from gen3d.priors.video import EMBEDDED_T2V, REST_CHANNELS, mixed_noise, with_rest_channels, with_time_channel
from gen3d.world.train_prior import (
    TRAIN_ORBIT, VIEW_WORDS, PriorTrainConfig, PriorTrainer, _diffusers_version, _text_encoder,
)

MOTION_WORDS = ["spinning", "bouncing", "growing", "swinging"]


@dataclass
class VideoPriorTrainConfig(PriorTrainConfig):
    """Training of the embedded text-to-video prior."""

    output: str = str(EMBEDDED_T2V)
    work_dir: str = "outputs/world/train-video-prior"
    steps: int = 4000
    """Optimization steps (about 0.9 s each on one core at 16x16, batch 4: about an hour). At 1,500 steps the motion
    words still made no difference (ratio 0.999, `benchmarks/bench_video_prior.py`); at 4,000 they do (0.90)."""
    size: int = 16
    """Clip size. 16x16 steps are 4x faster than 32x32 and learn as much per step, so that the thousands of steps
    the motion words need fit in an hour; video SDS resizes a 4D run's renders to it (appearance comes from the
    32x32 image prior)."""
    batch_size: int = 4
    """Clips per step."""
    lr: float = 5e-4
    """Peak AdamW learning rate of the spatial layers and the text encoder."""
    temporal_lr_scale: float = 4.0
    """The temporal layers' learning rate is lr times this: they start from zero, the rest from a trained model
    (with lr 2e-4 for all, the motion words still made no difference to the loss after 500 steps)."""
    warmup: int = 100
    ema_decay: float = 0.998
    frames: int = 8
    """Frames per clip, at t = 0, 1/(F-1), ..., 1."""
    clips_per_pair: int = 4
    """Clips of each (object, motion), each from its own camera."""
    time_channel: bool = True
    """Give the UNet each frame's time as an extra input channel (`gen3d.priors.video.with_time_channel`): without
    it, after 500 steps the motion words still made no difference to the loss (ratio 0.999)."""
    noise_correlation: float = 1.0
    """α of PYoCo's mixed noise (`gen3d.priors.video.mixed_noise`: frames share part of their noise; 0: independent).
    With independent noise (and a time channel), after 500 steps sampled frames still chose their backgrounds each on
    its own and the motion words made no difference to the loss (ratio 0.999)."""
    high_noise_weight_cap: float = 20.0
    """Where SNR < 1, weight the ε-loss by min(1/SNR, this) instead of 1: the x0 error with weight 1, as truncated-SNR
    weighting does (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models"). ε-prediction
    weights the x0 error by SNR, so the noisy steps where a clip's layout and motion are decided teach little
    (0: off, the ε-loss of `train_prior`)."""
    rest_frame: bool = False
    """Condition on the object at rest from the clip's camera (`gen3d.priors.video.with_rest_channels`: image-to-video
    conditioning), so that a caption's motion word is what is left to learn."""
    rest_dropout: float = 0.2
    """With rest_frame: the fraction of clips trained without the image (the model stays a text-to-video model)."""
    rest_init: float = 0.5
    """With rest_frame and a video prior to start from: the rest image's first-layer weights start as this times the
    clip's color weights (0: at zero, so that step 0 is that prior exactly). Zero-initialized input channels were not
    learned: the rest image's weights stayed near zero (mean |w| 0.005 against 0.1 for the clip's colors, even when
    fitting 16 clips), as the shipped prior's time channel did over 1,500 steps (0.0005)."""
    input_lr_scale: float = 1.0
    """The learning rate of the UNet's first convolution is lr times this. The rest image's weights there start at zero
    and Adam moves a weight by about lr per step, so at lr 2e-4 they need hundreds of steps to matter (at 10, with
    rest_init 0, they still stayed near zero)."""
    train_spatial: bool = True
    """Train the spatial layers too. false: only the temporal layers, the first convolution (the time channel's and
    rest image's weights) and the text encoder learn, and the spatial layers stay those of `init_from`, as VideoLDM
    (Blattmann et al. 2023, "Align your Latents") and AnimateDiff (Guo et al. 2023) train their temporal layers on a
    frozen image model: every step's gradient then goes to what the clips add to single images, their motion."""
    init_from: str = "gen3d/shapes-t2i"
    """Image prior whose UNet and text encoder initialize the spatial layers, or a video prior (e.g. gen3d/shapes-t2v)
    whose weights initialize all layers (new input channels start at zero, the rest image's at `rest_init`); "" trains
    from scratch."""
    sample_every: int = 0
    views_per_object: int = 0
    """Unused (clips_per_pair sets the data)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.frames < 2 or self.clips_per_pair < 1:
            raise ValueError(f"frames must be >= 2 and clips_per_pair >= 1, got {self.frames} and {self.clips_per_pair}")
        for name in ("temporal_lr_scale", "noise_correlation", "high_noise_weight_cap", "input_lr_scale"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.rest_dropout <= 1:
            raise ValueError(f"rest_dropout must be in [0, 1], got {self.rest_dropout}")


class VideoPriorTrainer(PriorTrainer):
    verb = "train-video-prior"

    def __init__(self, cfg: VideoPriorTrainConfig):
        from transformers import CLIPTokenizer

        from gen3d.world.catalog import vocabulary

        if cfg.frames < 2:
            raise ValueError(f"frames must be >= 2 (a clip), got {cfg.frames}")
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.work = Path(cfg.work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        self.tok_dir = self.work / "tokenizer"
        vocab_size = write_clip_tokenizer(self.tok_dir, [*vocabulary(), *MOTION_WORDS, *VIEW_WORDS], cfg.max_length)
        self.tokenizer = CLIPTokenizer.from_pretrained(str(self.tok_dir))
        self.unet = video_unet(cfg)
        self.text_encoder = _text_encoder(cfg, vocab_size)
        if cfg.init_from and _is_video_prior(cfg.init_from):
            init_from_video_prior(self.unet, self.text_encoder, self.tokenizer, cfg.init_from,
                                  rest_init=cfg.rest_init if cfg.rest_frame else 0.0)
        elif cfg.init_from:
            inflate_from_image_prior(self.unet, self.text_encoder, self.tokenizer, cfg.init_from)
        self._setup_optimization()
        named = list(self.unet.named_parameters())
        first = [p for n, p in named if n.startswith("conv_in.")] if cfg.input_lr_scale != 1 else []
        temporal = [p for n, p in named if _is_temporal(n)]
        other = [p for n, p in named if not _is_temporal(n) and not any(p is q for q in first)]
        if not cfg.train_spatial:  # the image layers stay as init_from made them; the first convolution still learns
            first_layer = {id(p) for p in self.unet.conv_in.parameters()}
            for p in other:
                p.requires_grad_(id(p) in first_layer)
            other = [p for p in other if p.requires_grad]
        groups = [{"params": other + list(self.text_encoder.parameters())},
                  {"params": temporal, "lr_scale": cfg.temporal_lr_scale}]
        if first:  # a group of its own only when it is scaled: checkpoints of two groups still resume
            groups.append({"params": first, "lr_scale": cfg.input_lr_scale})
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def build_data(self) -> None:
        """Render `clips_per_pair` clips of every training object under every motion (cached in work_dir)."""
        from gen3d.cameras import sample_orbit
        from gen3d.io import atomic_path
        from gen3d.priors.prompts import view_directions
        from gen3d.world.animation import MOTIONS, AnimatedObject
        from gen3d.world.catalog import training_objects

        cfg = self.cfg
        cache = self.work / (f"clips-{cfg.seed}-{cfg.clips_per_pair}-{cfg.frames}-{cfg.size}x{cfg.supersample}-"
                             f"{cfg.max_objects}.pt")
        if cache.is_file():
            self.data = torch.load(cache, weights_only=False)
            return
        objects = training_objects()[: cfg.max_objects or None]
        pairs = [AnimatedObject(o, m) for o in objects for m in MOTIONS]
        g = torch.Generator().manual_seed(cfg.seed)
        t0 = time.perf_counter()
        premult, alpha, info = [], [], []
        n = cfg.clips_per_pair
        for anim in tqdm(pairs, desc="rendering clips", disable=not cfg.progress, file=sys.stderr):
            cams = sample_orbit(replace(TRAIN_ORBIT, batch_size=n), g, width=cfg.size, height=cfg.size)
            outs = [anim.render(cams, t, background=(0.0, 0.0, 0.0), supersample=cfg.supersample)
                    for t in torch.linspace(0, 1, cfg.frames).tolist()]
            premult.append(torch.stack([o.rgb for o in outs], 1).permute(0, 4, 1, 2, 3).half())  # [n, 3, F, s, s]
            alpha.append(torch.stack([o.alpha for o in outs], 1).permute(0, 4, 1, 2, 3).half())
            words = view_directions(cams.azimuth, cams.elevation)
            info += [(anim.obj.shape, anim.obj.color, anim.motion, w) for w in words]
        self.data = {"premult": torch.cat(premult), "alpha": torch.cat(alpha), "info": info}
        with atomic_path(cache) as tmp:
            torch.save(self.data, tmp)
        print(f"rendered {len(info)} clips of {len(pairs)} animated objects in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr)

    def batch(self) -> tuple[torch.Tensor, list[str]]:
        """Clips ``[B, 3, F, s, s]`` in [-1, 1] on white or black backgrounds with their captions (`batch_with_rest`
        without the rest images)."""
        clips, captions, _ = self.batch_with_rest()
        return clips, captions

    def batch_with_rest(self) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        """Clips ``[B, 3, F, s, s]`` in [-1, 1] on white or black backgrounds, their captions and the objects at rest
        ``[B, 3, s, s]`` (the clip's frame at `AnimatedObject.rest_time`)."""
        from gen3d.world.animation import AnimatedObject
        from gen3d.world.catalog import WorldObject

        cfg, g, d = self.cfg, self.generator, self.data
        idx = torch.randint(0, len(d["premult"]), (cfg.batch_size,), generator=g)
        white = (torch.rand(cfg.batch_size, generator=g) < 0.5).float().view(-1, 1, 1, 1, 1)
        premult, alpha = d["premult"][idx].float(), d["alpha"][idx].float()
        clips = premult + white * (1 - alpha)
        view = torch.rand(cfg.batch_size, generator=g) < cfg.view_dependent_fraction
        drop = torch.rand(cfg.batch_size, generator=g) < cfg.cond_dropout
        captions, at_rest = [], []
        for j, i in enumerate(idx.tolist()):
            shape, color, motion, direction = d["info"][i]
            animated = AnimatedObject(WorldObject(shape, color), motion)
            text = animated.caption(g)
            if view[j]:
                text = f"{text}, {direction} view"
            captions.append("" if drop[j] else text)
            at_rest.append(round(animated.rest_time * (cfg.frames - 1)))  # rest's frame: 0, or the last for a growth
        rest = clips[torch.arange(len(idx)), :, torch.tensor(at_rest)]  # [B, 3, s, s]
        return clips * 2 - 1, captions, rest * 2 - 1

    def train_step(self) -> float:
        x0, captions, rest = self.batch_with_rest()
        g = self.generator
        t = torch.randint(0, 1000, (len(x0),), generator=g)
        eps = mixed_noise(x0.shape, self.cfg.noise_correlation, g)
        ab = self.abar[t].view(-1, 1, 1, 1, 1)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
        if self.cfg.time_channel:
            x_t = with_time_channel(x_t)
        if self.cfg.rest_frame:
            keep = (torch.rand(len(x0), generator=g) >= self.cfg.rest_dropout).float().view(-1, 1, 1, 1)
            x_t = with_rest_channels(x_t, rest)
            x_t[:, -REST_CHANNELS:] *= keep[:, :, None]  # dropped: all four channels zero, "no image"
        pred = self.unet(x_t, t, self.encode(captions)).sample
        return self.optimize(self.diffusion_loss(pred, eps, t))

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor:
        """`PriorTrainer.loss_weights` (Min-SNR-γ), with `high_noise_weight_cap`'s weights where SNR < 1."""
        weight = super().loss_weights(t)
        if self.cfg.high_noise_weight_cap > 0:
            snr = self.snr(t)
            weight = torch.where(snr < 1, (1 / snr).clamp(max=self.cfg.high_noise_weight_cap), weight)
        return weight

    def prior(self):
        from gen3d.priors.video import VideoDiffusionPrior

        m = self.ema_modules()
        prior = VideoDiffusionPrior(m["unet"], self.scheduler, m["text"], self.tokenizer, num_frames=self.cfg.frames,
                                    model_name="shapes-t2v (training)", resolution=self.cfg.size, device="cpu",
                                    dtype=torch.float32)
        prior.noise_correlation = self.cfg.noise_correlation
        return prior

    def write_samples(self) -> Path:
        """A grid of sampled clips: one row per prompt, one column per frame."""
        from gen3d.export.video import image_grid, save_image
        from gen3d.priors.video import sample_videos

        clips = sample_videos(self.prior(), video_sample_prompts(), steps=25, guidance_scale=5.0,
                              generator=torch.Generator().manual_seed(0))
        path = self.work / "samples" / f"step-{self.step:06d}.png"
        save_image(path, image_grid(clips.flatten(0, 1), nrow=clips.shape[1]))
        return path

    def export(self) -> Path:
        """Write the EMA weights as a diffusers pipeline folder (atomically, as a whole)."""
        from gen3d.io import atomic_folder
        from gen3d.world.catalog import HELD_OUT

        out = Path(self.cfg.output)
        with atomic_folder(out) as tmp:
            m = self.ema_modules()
            m["unet"].half().save_pretrained(tmp / "unet")
            m["text"].save_pretrained(tmp / "text_encoder")
            self.tokenizer.save_pretrained(str(tmp / "tokenizer"))
            self.scheduler.save_pretrained(tmp / "scheduler")
            index = {"_class_name": "TextToVideoSDPipeline", "_diffusers_version": _diffusers_version(),
                     "unet": ["diffusers", "UNet3DConditionModel"], "scheduler": ["diffusers", "DDPMScheduler"],
                     "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"]}
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
            card = {"name": "gen3d/shapes-t2v", "trained_by": f"gen3d world {self.verb}", "steps": self.step,
                    "frames": self.cfg.frames, "noise_correlation": self.cfg.noise_correlation, "config": asdict(self.cfg), "held_out": [list(h) for h in HELD_OUT]}
            (tmp / "gen3d_prior.json").write_text(json.dumps(card, indent=2))
        return out


def _is_temporal(name: str) -> bool:
    """A parameter of the UNet's temporal layers (what an image UNet does not have)."""
    return name.startswith("transformer_in.") or ".temp_attentions." in name or ".temp_convs." in name


def video_unet(cfg: VideoPriorTrainConfig):
    """The video prior's `UNet3DConditionModel`: `train_prior._unet`'s layout with temporal layers."""
    from diffusers import UNet3DConditionModel

    n = len(cfg.block_out_channels)
    return UNet3DConditionModel(
        sample_size=cfg.size, in_channels=3 + int(cfg.time_channel) + REST_CHANNELS * int(cfg.rest_frame),
        out_channels=3, layers_per_block=1,
        block_out_channels=tuple(cfg.block_out_channels),
        down_block_types=tuple("DownBlock3D" if i < n - 1 else "CrossAttnDownBlock3D" for i in range(n)),
        up_block_types=tuple("CrossAttnUpBlock3D" if i == 0 else "UpBlock3D" for i in range(n)),
        cross_attention_dim=cfg.text_dim, attention_head_dim=8, norm_num_groups=8,
    )


@torch.no_grad()
def inflate_from_image_prior(unet, text_encoder, tokenizer, image_prior: str) -> None:
    """Copy an image prior's UNet and text encoder into the video model (spatial layers, shared words) and
    zero the temporal layers' output projections so the video model starts as the image model per frame."""
    from gen3d.priors.diffusion import DiffusionPrior

    source = DiffusionPrior.from_pretrained(image_prior, dtype="float32")
    own = unet.state_dict()
    spatial = source.unet.state_dict()
    extra = own["conv_in.weight"].shape[1] - spatial["conv_in.weight"].shape[1]  # the time channel: zero weights
    if extra > 0:  # conv weight [out, in, kh, kw]: pad the input dimension
        spatial["conv_in.weight"] = F.pad(spatial["conv_in.weight"], (0, 0, 0, 0, 0, extra))
    if set(spatial) - set(own) or any(own[k].numel() != v.numel() for k, v in spatial.items()):
        raise ValueError(f"{image_prior}: its UNet does not have the video UNet's spatial layout "
                         f"(block_out_channels / text_dim must match the image prior's)")
    unet.load_state_dict({k: v.reshape(own[k].shape) for k, v in spatial.items()}, strict=False)
    for name, module in unet.named_modules():
        if name == "transformer_in" or ".temp_attentions." in f".{name}.":
            if hasattr(module, "proj_out"):
                module.proj_out.weight.zero_()
                module.proj_out.bias.zero_()

    _copy_text_encoder(source, text_encoder, tokenizer)


def _is_video_prior(model: str) -> bool:
    from gen3d.priors.diffusion import _locate

    index = _locate(model, False, None) / "model_index.json"
    return index.is_file() and "UNet3DConditionModel" in index.read_text()


@torch.no_grad()
def init_from_video_prior(unet, text_encoder, tokenizer, video_prior: str, rest_init: float = 0.0) -> None:
    """Copy a video prior's UNet and text encoder into this one. Input channels it lacks (the rest frame's) start at
    zero, so step 0 is that prior, or, for the rest image, at `rest_init` times the clip's color weights."""
    from gen3d.priors.video import VideoDiffusionPrior

    source = VideoDiffusionPrior.from_pretrained(video_prior, dtype="float32")
    own, theirs = unet.state_dict(), source.unet.state_dict()
    extra = own["conv_in.weight"].shape[1] - theirs["conv_in.weight"].shape[1]
    if extra < 0 or set(theirs) != set(own) or any(own[k].shape != v.shape for k, v in theirs.items()
                                                   if k != "conv_in.weight"):
        raise ValueError(f"{video_prior}: its UNet does not have this video UNet's layout (block_out_channels, "
                         f"text_dim and time_channel must match)")
    first = F.pad(theirs["conv_in.weight"], (0, 0, 0, 0, 0, extra))
    if extra >= REST_CHANNELS and rest_init:  # [clip 3, time 1, rest image 3, flag 1]: the image's start as the clip's
        start = first.shape[1] - REST_CHANNELS
        first[:, start:start + 3] = rest_init * first[:, :3]
    theirs["conv_in.weight"] = first
    unet.load_state_dict(theirs)
    _copy_text_encoder(source, text_encoder, tokenizer)


def _copy_text_encoder(source, text_encoder, tokenizer) -> None:
    """A prior's text encoder into `text_encoder`, its token embeddings word by word into `tokenizer`'s vocabulary."""
    old_emb = source.text_encoder.get_input_embeddings().weight
    own_text = text_encoder.state_dict()
    text_encoder.load_state_dict({k: v for k, v in source.text_encoder.state_dict().items()
                                  if k in own_text and v.shape == own_text[k].shape}, strict=False)
    old_vocab, new_vocab = source.tokenizer.get_vocab(), tokenizer.get_vocab()
    emb = text_encoder.get_input_embeddings().weight
    for token, i in new_vocab.items():
        if token in old_vocab:
            emb[i] = old_emb[old_vocab[token]]


def video_sample_prompts() -> list[str]:
    """One prompt per motion (seen objects) for the sample grids."""
    return ["a red mug, spinning", "a blue cube, bouncing", "a green cone, growing", "a yellow lamp, swinging"]
