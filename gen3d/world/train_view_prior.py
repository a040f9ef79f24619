"""Train the embedded view-conditioned prior of the Shapes world (Zero-1-to-3 style).

Zero-1-to-3 (Liu et al., 2023, "Zero-1-to-3: Zero-shot One Image to 3D Object") learns
``p(x_target | x_input, relative camera)`` from pairs of renders of the same object. This is that
recipe shrunk to the Shapes world, with the structure of `gen3d.world.train_prior`:

- data: every object of `training_objects()` (the `HELD_OUT` color/shape pairs are never seen)
  rendered from `views_per_object` random `VIEW_ORBIT` cameras by `render_views`, composited on
  white; a training pair is two views (i, j) of one object, with ``relative_pose`` of their
  (elevation, azimuth, distance). The field of view varies too and is not part of the pose;
- model: `UNet2DConditionModel` on ``[x_t ‖ input view]`` (6 channels, the UNet of `train_prior`
  with cross-attention at 8x8 and in the middle block), a tiny `CLIPVisionModelWithProjection`
  (32x32, 8x8 patches: 16 patch tokens + CLS) and a `CameraProjection`, all trained from scratch;
- objective: ε-prediction under the cosine DDPM schedule of the text prior (`_scheduler`);
- classifier-free guidance: with probability `cond_dropout` (5%, as Zero123) a pair is trained with
  its input-view channels, its tokens (and pose) zeroed, which is the unconditional branch at
  inference (Zero123 drops the CLIP token and the concatenated view partly independently);
- EMA weights are exported; checkpoints make the run resumable and everything is drawn from
  generators seeded by `seed`.

Token layout (``tokens``): "single" is Zero123's one token ``Linear([CLS embedding ‖ pose])``,
"patches" is ``[CLS embedding + MLP(pose), 16 patch tokens]``. In short tests both learned the same
(full-size model, batch 16, lr 1e-3, loss on 64 fixed pairs with fixed t and noise): after 250 steps
on 8 objects x 8 views the denoising loss was 0.0525 (single) vs 0.0522 (patches); after 300 steps on
2 objects with a front (house, chair) x 16 views 0.0448 vs 0.0460. That is noise, so "single" is the
default: it is Zero123's design, a little faster, and with one key the attention output is always
the pose-carrying token (the pose cannot be attended away in favor of patch tokens, which repeat what
the concatenated view already shows).

The same tests show the cost of Zero123's design at this scale: after 300 steps neither layout uses
the pose yet (the loss with the poses of other pairs is equal to 5 digits). ``pose_embedding=true``
also adds the pose to the UNet's timestep embedding (``class_embed_type="projection"``), the way
MVDream feeds its camera, so every ResNet block sees it, not only the four cross-attention layers;
it was the only variant whose loss already depended on the pose at 300 steps (0.04560 right pose vs
0.04575 wrong pose), a faint signal, so the shipped weights use it (``pose_embedding=true`` is the
default; ``pose_embedding=false`` is plain Zero123, and real Zero123 checkpoints load either way).

Making it use the azimuth. With the text prior's cameras (`TRAIN_ORBIT`: distance 2-2.5, field
of view 40-50 degrees) the objects filled a third of the 32x32 frame and the prior used the
elevation a little and nothing else: its denoising error on a novel view with the right pose was
1.000 of that with the pose turned by another 180 degrees (`benchmarks/bench_view_prior.py`,
``pose_loss_ratio``); more steps, FiLM conditioning, the input view through tokens only, and the
pose as extra input channels did not change that. Own cameras (`VIEW_ORBIT`: closer, one field of
view, so the pose's distance decides the object's size) and half of the pairs from the five shapes
with a front (``front_fraction``) made it use the distance (ratio 0.93) and the elevation (0.95),
still not the azimuth (1.000, also with fronted shapes only). Two diagnostics (1,200 steps each,
fronted shapes) located the difficulty: with the input view withheld and the pose absolute, the
prior did use the azimuth (ratios 0.95-0.99 per shape); and with the input view present but always
the object's front, so that the relative azimuth is the absolute one, it did too (0.93-0.98). What
it could not learn at this size is the input's own orientation from its 32x32 pixels. So pairs
take their input from the object's front (``input_view="front"``): the input is the rendered view
nearest azimuth 0 and image-to-3D on this prior treats its input as a front view at azimuth 0
(the convention of Zero123-based image-to-3D, which defines novel views relative to the input).
``input_view="any"`` is Zero-1-to-3's random pairs. The shipped weights (3,500 steps, two threads)
use the whole camera: loss ratios 0.87 (azimuth), 0.86 (elevation) and 0.82 (distance) on the seen
objects, 0.88 / 0.84 / 0.84 on the held-out pairs.

The result is a folder (model_index.json, unet/, scheduler/, image_encoder/, cc_projection/,
gen3d_prior.json) that `ViewConditionedPrior.from_pretrained` loads:

    gen3d world train-view-prior threads=2         # the shipped weights, from seed 0
    gen3d world train-view-prior steps=200 output=/tmp/vp work_dir=/tmp/vp-work   # a quick one
    gen3d world train-view-prior --resume          # continue after an interruption
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gen3d.cameras import OrbitConfig
from gen3d.world.train_prior import DiffusionTrainer, TrainConfig, _diffusers_version, _unet, render_views, sample_prompts

EMBEDDED_ZERO123 = Path(__file__).resolve().parents[1] / "assets" / "shapes-zero123"
VIEW_ORBIT = OrbitConfig(elevation_range=(-10.0, 45.0), distance_range=(1.7, 2.1), fovy_range=(40.0, 40.0))
"""Cameras of the view prior's training renders. Closer than the text prior's `TRAIN_ORBIT` so the
object fills more of the 32x32 frame, and with one field of view (as Zero123's renders) so that the
object's size in the image follows from the pose's distance; image-to-3D on this prior uses them."""
SAMPLE_CAMERA = {"azimuth": 0.0, "elevation": 15.0, "distance": 1.9, "fovy": 40.0}
"""Input camera of the sample grids (inside `VIEW_ORBIT`); novel views turn the azimuth."""
SAMPLE_TURNS = (0.0, 90.0, 180.0, 270.0)
"""Δazimuth of the novel views in the sample grids."""


@dataclass
class ViewPriorTrainConfig(TrainConfig):
    """Training of the embedded view-conditioned (Zero123-style) prior."""

    output: str = str(EMBEDDED_ZERO123)
    work_dir: str = "outputs/world/train-view-prior"
    steps: int = 3500
    """Optimization steps (about 30 minutes on one free core at 0.45-0.6 s a step)."""
    views_per_object: int = 24
    """Rendered views of each training object; pairs are drawn among them."""
    cond_dropout: float = 0.05
    """Probability of training a pair unconditionally (input view and tokens zeroed), for CFG."""
    embed_dim: int = 64
    """Width of the image encoder, its projection, the pose token and the UNet's cross-attention."""
    image_layers: int = 2
    """Image encoder transformer layers."""
    patch_size: int = 8
    """Image encoder patch size (32 / 8 = 4x4 = 16 patch tokens)."""
    tokens: str = "single"
    """Cross-attention tokens: "single" (Zero123's Linear([CLS embedding ‖ pose])) or "patches"
    ([CLS + pose token, patch tokens])."""
    pose_embedding: bool = True
    """Also add the pose to the UNet's timestep embedding (a deviation from Zero123 meant to make the
    small prior use the pose; see the module docstring)."""
    input_view: str = "front"
    """Which view of an object is a pair's input: "front" (its rendered view nearest azimuth 0, the
    object's front: the relative azimuth is then the target's absolute one, as image-to-3D pipelines
    on Zero123 assume an input taken at azimuth 0) or "any" (Zero-1-to-3's random pairs)."""
    front_fraction: float = 0.5
    """Share of training pairs drawn from objects with a distinct front (mug, house, chair, snowman,
    rocket): the pairs whose target depends on the azimuth. 0 draws objects uniformly."""
    sample_every: int = 1000
    """Write a sample grid every this many steps (0: never); a grid takes about a minute."""
    sample_guidance: float = 3.0
    """Classifier-free guidance scale of the sample grids (Zero123's default)."""

    def __post_init__(self) -> None:
        from gen3d.priors.view_conditioning import TOKEN_LAYOUTS

        super().__post_init__()
        for name in ("embed_dim", "image_layers", "patch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.sample_guidance >= 0:
            raise ValueError(f"sample_guidance must be >= 0, got {self.sample_guidance}")

        if self.tokens not in TOKEN_LAYOUTS:
            raise ValueError(f"tokens must be one of {TOKEN_LAYOUTS}, got {self.tokens!r}")
        if self.size % self.patch_size:
            raise ValueError(f"size {self.size} must be a multiple of patch_size {self.patch_size}")
        if self.input_view not in ("front", "any"):
            raise ValueError(f"input_view must be 'front' or 'any', got {self.input_view!r}")
        if not 0.0 <= self.front_fraction <= 1.0:
            raise ValueError(f"front_fraction must be in [0, 1], got {self.front_fraction}")
        if self.views_per_object < 1 or self.max_objects < 0:
            raise ValueError(f"views_per_object must be >= 1 and max_objects >= 0, got "
                             f"{self.views_per_object} and {self.max_objects}")


@dataclass
class PairBatch:
    """Training pairs: input views, target views (both ``[B, 3, h, w]`` in [-1, 1]), poses ``[B, 4]``,
    and ``keep`` ``[B]`` (0 where the condition is dropped)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    pose: torch.Tensor
    keep: torch.Tensor


def _image_encoder(cfg: ViewPriorTrainConfig):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection(CLIPVisionConfig(
        image_size=cfg.size, patch_size=cfg.patch_size, num_channels=3, hidden_size=cfg.embed_dim,
        intermediate_size=2 * cfg.embed_dim, num_hidden_layers=cfg.image_layers, num_attention_heads=4,
        projection_dim=cfg.embed_dim,
    ))


def _projection(cfg: ViewPriorTrainConfig):
    from gen3d.priors.view_conditioning import CameraProjection

    return CameraProjection(image_dim=cfg.embed_dim, patch_dim=cfg.embed_dim, token_dim=cfg.embed_dim,
                            hidden_dim=2 * cfg.embed_dim, tokens=cfg.tokens)


def render_on_white(obj, azimuth, elevation, distance, fovy, size: int, supersample: int) -> torch.Tensor:
    """Views of `obj` from spherical cameras (degrees, tensors [C]) composited on white: ``[C, 3, size, size]``."""
    from gen3d.cameras import spherical_cameras
    from gen3d.world.render import render_object

    cams = spherical_cameras(azimuth, elevation, distance, fovy, size * supersample, size * supersample)
    out = render_object(obj, cams, background=(0.0, 0.0, 0.0), supersample=1)
    premult = F.avg_pool2d(out.rgb.permute(0, 3, 1, 2), supersample)
    alpha = F.avg_pool2d(out.alpha.permute(0, 3, 1, 2), supersample)
    return premult + (1 - alpha)


def sample_objects():
    """Objects of the sample grids: those of the text prior's sample prompts (each shape in a seen
    color, then every held-out pair)."""
    from gen3d.world.catalog import parse_prompt

    return [parse_prompt(prompt) for prompt in sample_prompts()]


class ViewPriorTrainer(DiffusionTrainer):
    """Builds the pair data and models, trains with checkpoints, writes the prior folder."""

    verb = "train-view-prior"

    def __init__(self, cfg: ViewPriorTrainConfig):
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.work = Path(cfg.work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)  # diffusers/transformers initialize from the global generator
        self.unet = _unet(cfg, in_channels=6, cross_attention_dim=cfg.embed_dim)
        if cfg.pose_embedding:  # the same UNet with a Linear-SiLU-Linear of the pose added to its timestep embedding
            from diffusers import UNet2DConditionModel

            self.unet = UNet2DConditionModel.from_config(self.unet.config, class_embed_type="projection",
                                                         projection_class_embeddings_input_dim=4)
        self.image_encoder = _image_encoder(cfg)
        self.projection = _projection(cfg)
        self._setup_optimization()
        self._sample_views = None

    # ---- data --------------------------------------------------------------------------------
    def build_data(self) -> None:
        """Render `views_per_object` random views of each training object (cached in work_dir)."""
        from gen3d.world.catalog import training_objects

        cfg = self.cfg
        objects = training_objects()[: cfg.max_objects or None]
        orbit = VIEW_ORBIT
        cache = self.work / (f"views-{cfg.seed}-{len(objects)}x{cfg.views_per_object}-{cfg.size}x{cfg.supersample}"
                             f"-d{orbit.distance_range[0]}-{orbit.distance_range[1]}-f{orbit.fovy_range[0]}.pt")
        if cache.is_file():
            self.data = torch.load(cache, weights_only=False)
            return
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(cfg.seed)
        premult, alpha, cams = [], [], []
        for o in tqdm(objects, desc="rendering", disable=not cfg.progress, file=sys.stderr):
            p, a, _, c = render_views(o, cfg.views_per_object, cfg.size, cfg.supersample, g, return_cameras=True,
                                      orbit=orbit)
            premult.append(p)
            alpha.append(a)
            cams.append(c)
        self.data = {
            "premult": torch.stack(premult).half(), "alpha": torch.stack(alpha).half(),  # [O, K, C, h, w]
            "azimuth": torch.stack([c.azimuth for c in cams]), "elevation": torch.stack([c.elevation for c in cams]),
            "distance": torch.stack([c.distance for c in cams]),  # [O, K]
            "objects": [str(o) for o in objects],
        }
        from gen3d.io import atomic_path

        with atomic_path(cache) as tmp:
            torch.save(self.data, tmp)
        print(f"rendered {cfg.views_per_object} views of {len(objects)} objects in "
              f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)

    def view(self, o: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        """Views i of objects o (index tensors [B]) on white, ``[B, 3, h, w]`` in [-1, 1]."""
        d = self.data
        premult, alpha = d["premult"][o, i].float(), d["alpha"][o, i].float()
        return (premult + (1 - alpha)) * 2 - 1

    def draw_objects(self, n: int) -> torch.Tensor:
        """n object indices: a `front_fraction` share from the objects with a front, the rest uniform."""
        from gen3d.world.catalog import SHAPES

        cfg, g = self.cfg, self.generator
        names = self.data["objects"]  # "red mug": color, then shape
        all_ = torch.arange(len(names))
        front = all_[torch.tensor([SHAPES[name.rsplit(" ", 1)[-1]].has_front for name in names])]
        uniform = all_[torch.randint(0, len(all_), (n,), generator=g)]
        if not len(front) or not cfg.front_fraction:
            return uniform
        pick = front[torch.randint(0, len(front), (n,), generator=g)]
        return torch.where(torch.rand(n, generator=g) < cfg.front_fraction, pick, uniform)

    def batch(self) -> PairBatch:
        """Random pairs (input view i, target view j) of random objects, with their relative poses."""
        from gen3d.priors.view_conditioning import relative_pose

        cfg, g, d = self.cfg, self.generator, self.data
        K = d["azimuth"].shape[1]
        o = self.draw_objects(cfg.batch_size)
        i = torch.randint(0, K, (cfg.batch_size,), generator=g)
        if cfg.input_view == "front":
            i = d["azimuth"][o].abs().argmin(1)  # [B] each object's view nearest its front
        j = torch.randint(0, K, (cfg.batch_size,), generator=g)
        keep = (torch.rand(cfg.batch_size, generator=g) >= cfg.cond_dropout).float()
        pose = relative_pose(d["elevation"][o, i], d["azimuth"][o, i], d["distance"][o, i],
                             d["elevation"][o, j], d["azimuth"][o, j], d["distance"][o, j])
        return PairBatch(self.view(o, i), self.view(o, j), pose, keep)

    # ---- model ---------------------------------------------------------------------------------
    def _modules(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet, "image": self.image_encoder, "proj": self.projection}


    def loss(self, batch: PairBatch, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """ε-prediction loss (Min-SNR weighted: `diffusion_loss`) on the targets noised to timesteps t
        ``[B]`` with noise eps ``[B, 3, h, w]``."""
        from gen3d.priors.view_conditioning import encode_view, view_unet

        ab = self.abar[t].view(-1, 1, 1, 1)
        x_t = ab.sqrt() * batch.targets + (1 - ab).sqrt() * eps
        _, _, tokens = encode_view(self.image_encoder, self.projection, batch.inputs, batch.pose)  # [B, L, D]
        keep = batch.keep.view(-1, 1, 1, 1)  # a dropped condition: zero view, zero tokens, zero pose
        pred = view_unet(self.unet, x_t, t, batch.inputs * keep, tokens * keep[:, :, :, 0], batch.pose * keep[:, :, 0, 0])
        return self.diffusion_loss(pred, eps, t)

    def train_step(self, batch: PairBatch | None = None) -> float:
        batch = self.batch() if batch is None else batch
        g = self.generator
        t = torch.randint(0, 1000, (len(batch.targets),), generator=g)
        eps = torch.randn(batch.targets.shape, generator=g)
        return self.optimize(self.loss(batch, t, eps))

    # ---- outputs -------------------------------------------------------------------------------------
    def prior(self):
        """The EMA model as a `ViewConditionedPrior` (in memory)."""
        from gen3d.priors.view_conditioning import ViewConditionedPrior

        m = self.ema_modules()
        return ViewConditionedPrior(m["unet"], self.scheduler, m["image"], m["proj"],
                                    model_name="shapes-zero123 (training)", device="cpu", dtype=torch.float32)

    def sample_views(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inputs ``[O, h, w, 3]``, ground-truth novel views ``[O, 4, h, w, 3]`` (on white) and poses ``[O * 4, 4]``
        of the sample grid: each of `sample_objects()` from `SAMPLE_CAMERA`, turned by `SAMPLE_TURNS`."""
        from gen3d.priors.view_conditioning import relative_pose

        if self._sample_views is None:
            cfg, cam = self.cfg, SAMPLE_CAMERA
            n = 1 + len(SAMPLE_TURNS)
            azimuth = torch.tensor([cam["azimuth"] + d for d in (0.0, *SAMPLE_TURNS)])
            full = lambda v: torch.full((n,), float(v))
            views = torch.stack([render_on_white(o, azimuth, full(cam["elevation"]), full(cam["distance"]),
                                                 full(cam["fovy"]), cfg.size, cfg.supersample)
                                 for o in sample_objects()]).permute(0, 1, 3, 4, 2)  # [O, 5, h, w, 3]
            pose = relative_pose(cam["elevation"], cam["azimuth"], cam["distance"],
                                 cam["elevation"], azimuth[1:], cam["distance"])  # [4, 4]
            self._sample_views = (views[:, 0], views[:, 1:], pose.repeat(len(views), 1))
        return self._sample_views

    def write_samples(self) -> Path:
        """Sample grid: one column per sample object; rows: the input view, the novel views at Δazimuth
        0/90/180/270 drawn by the EMA prior, then the ground truth of those four views."""
        from gen3d.export.video import image_grid, save_image
        from gen3d.priors.sampling import sample_novel_views

        inputs, truth, pose = self.sample_views()
        O, n = truth.shape[:2]
        novel = sample_novel_views(self.prior(), inputs.repeat_interleave(n, 0), pose, steps=25,
                                   guidance_scale=self.cfg.sample_guidance, generator=torch.Generator().manual_seed(0))
        rows = torch.cat([inputs[None], novel.view(O, n, *novel.shape[1:]).transpose(0, 1), truth.transpose(0, 1)])
        path = self.work / "samples" / f"step-{self.step:06d}.png"
        save_image(path, image_grid(rows.reshape(-1, *rows.shape[2:]), nrow=O))  # [(1 + 2n) * O, h, w, 3]
        return path

    def export(self) -> Path:
        """Write the EMA weights as a prior folder (atomically, as a whole)."""
        from gen3d.io import atomic_folder
        from gen3d.world.catalog import HELD_OUT

        out = Path(self.cfg.output)
        with atomic_folder(out) as tmp:
            m = self.ema_modules()
            m["unet"].save_pretrained(tmp / "unet")
            m["image"].save_pretrained(tmp / "image_encoder")
            m["proj"].save_pretrained(tmp / "cc_projection")
            self.scheduler.save_pretrained(tmp / "scheduler")
            index = {"_class_name": "ViewConditionedPrior", "_diffusers_version": _diffusers_version(),
                     "unet": ["diffusers", "UNet2DConditionModel"], "scheduler": ["diffusers", "DDPMScheduler"],
                     "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
                     "cc_projection": ["gen3d.priors.view_conditioning", "CameraProjection"]}
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
            card = {"name": "gen3d/shapes-zero123", "trained_by": "gen3d world train-view-prior", "steps": self.step,
                    "paper": "Zero-1-to-3 (Liu et al., 2023), shrunk: pixel space 32x32, encoders from scratch",
                    "pose": "(delta elevation [rad], sin delta azimuth, cos delta azimuth, delta distance)",
                    "cameras": {"elevation_range": list(VIEW_ORBIT.elevation_range),
                                "distance_range": list(VIEW_ORBIT.distance_range), "fovy": VIEW_ORBIT.fovy_range[0]},
                    "guidance_scale": 3.0, "config": asdict(self.cfg), "held_out": [list(h) for h in HELD_OUT]}
            (tmp / "gen3d_prior.json").write_text(json.dumps(card, indent=2))
        return out
