"""Train gen3d's few-step text-to-3D generator on the Shapes world: the flow teacher, then its distilled student.

Data: each training object's surface as `source_points` points with their shaded colors (`build_recon_set`), and
its captions (`gen3d.world.catalog.caption`, a random template and synonyms per example). An example is a random
subset of `points` of them, ``[xyz ‖ 2 rgb - 1]`` (`gen3d.models.point_flow.to_latent`), and one caption encoded by
the embedded text prior's frozen CLIP text encoder (``gen3d/shapes-t2i``).

- `FlowTrainer` (``gen3d world train-flow``): the teacher, a `PointFlowTransformer` trained by rectified flow
  matching (`gen3d.models.flow.flow_matching_loss`, TRELLIS's convention, logit-normal times) with the caption
  dropped to the learned null sequence `p_uncond` of the time, for classifier-free guidance. The EMA of its weights
  is exported (the embedded ``gen3d/shapes-flow-teacher``).
- `DistillTrainer` (``gen3d world distill-flow``): a student initialized from the teacher and trained by MDT-dist
  (`gen3d.models.flow.mdt_losses`: velocity matching on the data, velocity distillation on the student's own
  one-step samples, Zhou et al. 2025) or, as the baseline, by consistency distillation
  (`gen3d.models.flow.consistency_loss`); it samples in 1-2 steps without guidance (the embedded
  ``gen3d/shapes-flow``).

Both are `gen3d.world.trainer.Trainer`s: seeded, resumable bit for bit, data-parallel over processes.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from gen3d.models.flow import MDTConfig, consistency_loss, flow_matching_loss, logit_normal_t, mdt_losses
from gen3d.models.point_flow import (
    EMBEDDED_FLOW,
    GeneratorInfo,
    PointFlowConfig,
    PointFlowGenerator,
    PointFlowTransformer,
    TextEncoder,
    from_latent,  # noqa: F401  (re-exported: the latent's two halves)
    to_latent,
)
from gen3d.world.trainer import Trainer, TrainConfig, save_weights

DISTILL_METHODS = ("mdt", "consistency")


# ---- data shared by both trainers -------------------------------------------------------------------------
class PointSetData:
    """The training objects' colored surface points and captions; `batch` draws random subsets with captions."""

    def __init__(self, objects: int, source_points: int, seed: int, work: Path):
        from gen3d.world.catalog import training_objects
        from gen3d.world.recon_data import build_recon_set

        self.objects = training_objects()[: objects or None]
        self.source_points = source_points
        cache = work / f"points-{seed}-{len(self.objects)}-{source_points}.pt"
        data = build_recon_set(self.objects, views=1, size=8, points=source_points, seed=seed, cache=cache)
        self.latents = to_latent(data.points, data.lit)  # [O, P, 6]

    def batch(self, size: int, points: int, g: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        """`size` random objects: a random subset of `points` of each one's points, and a random caption."""
        from gen3d.world.catalog import caption

        pick = torch.randint(0, len(self.objects), (size,), generator=g)
        subsets = torch.stack([torch.randperm(self.source_points, generator=g)[:points] for _ in range(size)])
        x0 = torch.gather(self.latents[pick], 1, subsets[..., None].expand(-1, -1, 6))
        captions = [caption(self.objects[i].shape, self.objects[i].color, g) for i in pick.tolist()]
        return x0, captions


def _latent_json(info: GeneratorInfo) -> dict[str, str]:
    return {"latent.json": json.dumps(asdict(info), indent=2)}


# ---- the teacher ---------------------------------------------------------------------------------------------
@dataclass
class FlowTrainConfig(TrainConfig):
    """Training of the point-set flow teacher on the Shapes world (defaults: the embedded gen3d/shapes-flow-teacher)."""

    objects: int = 0
    """Train on the first N of `training_objects()` (0: all)."""
    points: int = 512
    """Points per set (the latent's size: points x 6 floats)."""
    source_points: int = 2048
    """Surface points stored per object; each example is a random subset of `points` of them."""
    width: int = 128
    """Token width of the transformer."""
    layers: int = 4
    """Transformer blocks."""
    heads: int = 4
    """Attention heads."""
    steps: int = 5000
    """Optimization steps."""
    batch_size: int = 16
    """Examples per step and per process."""
    lr: float = 4e-4
    """Peak AdamW learning rate: linear warm-up over `warmup` steps, then cosine decay to 10% at `steps`."""
    t_mean: float = 0.0
    """Mean of the logit-normal training times, t = sigmoid(N(t_mean, 1)): 0 as in SD3 (Esser et al. 2024), which
    trains the low-noise times that place points on the surface; TRELLIS's 1 draws t < 0.2 under 1% of the time."""
    p_uncond: float = 0.1
    """Probability of replacing an example's caption by the null condition."""
    ema: float = 0.999
    """Decay of the EMA of the weights, which is what is exported and sampled (0: no EMA)."""
    text_encoder: str = "gen3d/shapes-t2i"
    """Prior whose tokenizer and CLIP text encoder embed the captions: the embedded one or a diffusers folder."""
    sample_guidance: float = 3.0
    """Classifier-free guidance scale the export samples with by default (latent.json)."""
    output: str = str(EMBEDDED_FLOW["gen3d/shapes-flow-teacher"])
    """Folder the EMA model is exported to (model.safetensors, config.json, latent.json); default: the embedded
    model's."""
    export_dtype: str = "float16"
    """Precision of the exported weights: float16 (half the size; loading computes in float32) or float32."""
    work_dir: str = "outputs/world/train-flow"
    """Data cache, checkpoints and the training log."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, low in (("objects", 0), ("points", 1), ("source_points", 1), ("width", 1), ("layers", 1),
                          ("heads", 1)):
            self.check_int(name, low)
        if self.points > self.source_points:
            raise ValueError(f"FlowTrainConfig.points ({self.points}) must be <= source_points ({self.source_points})")
        if not math.isfinite(self.t_mean):
            raise ValueError(f"FlowTrainConfig.t_mean must be a finite number, got {self.t_mean}")
        self.check_number("p_uncond", 0.0, 1.0, high_open=True)
        self.check_number("sample_guidance")

    def model_config(self, text_dim: int, text_length: int) -> PointFlowConfig:
        return PointFlowConfig(width=self.width, layers=self.layers, heads=self.heads, text_dim=text_dim,
                               text_length=text_length)


class FlowTrainer(Trainer):
    """The flow teacher: data, text encoder and model; `fit` trains (resumable) and exports the EMA."""

    verb = "train-flow"
    cfg: FlowTrainConfig

    def __init__(self, cfg: FlowTrainConfig):
        super().__init__(cfg)
        self.text = TextEncoder(cfg.text_encoder)
        torch.manual_seed(cfg.seed)  # the model initializes from the global generator
        self.setup(PointFlowTransformer(cfg.model_config(self.text.dim, self.text.length)))
        self.data: PointSetData | None = None

    def build_data(self) -> None:
        cfg = self.cfg
        self.data = PointSetData(cfg.objects, cfg.source_points, cfg.seed, self.work)

    @property
    def objects(self):
        return self.data.objects

    @property
    def latents(self) -> torch.Tensor:
        return self.data.latents

    def batch(self) -> tuple[torch.Tensor, list[str]]:
        self.ensure_data()
        return self.data.batch(self.cfg.batch_size, self.cfg.points, self.generator)

    def loss(self, x0: torch.Tensor, captions: list[str]) -> torch.Tensor:
        text = self.model.with_dropout(self.text(captions), self.cfg.p_uncond, self.generator)
        t = logit_normal_t(x0.shape[0], self.generator, mean=self.cfg.t_mean)
        return flow_matching_loss(self.net, x0, text, self.generator, t=t)

    def loss_terms(self) -> tuple[torch.Tensor, dict[str, float]]:
        return self.loss(*self.batch()), {}

    def sample(self, captions: list[str], steps: int = 25, guidance: float = 3.0, seed: int = 0) -> torch.Tensor:
        """Latents [len(captions), points, 6] from the (EMA) model by the Euler sampler with guidance."""
        return PointFlowGenerator(self.exported_model(), self.info(), self.text)(captions, steps, guidance, seed)

    def info(self) -> GeneratorInfo:
        return GeneratorInfo(points=self.cfg.points, text_encoder=self.cfg.text_encoder, steps=25,
                             guidance=self.cfg.sample_guidance, kind="teacher")

    def export(self) -> Path:
        """The EMA (or plain) model's weights, `PointFlowConfig` and latent.json into `output`, as a whole."""
        return save_weights(self.exported_model(), Path(self.cfg.output), self.cfg.export_dtype,
                            _latent_json(self.info()))


# ---- the distilled student -----------------------------------------------------------------------------------
@dataclass
class DistillConfig(TrainConfig):
    """Few-step distillation of a point-set flow teacher (defaults: the embedded gen3d/shapes-flow, by MDT-dist)."""

    method: str = "mdt"
    """mdt (MDT-dist's velocity matching + velocity distillation) or consistency (the consistency-distillation
    baseline)."""
    teacher: str = "gen3d/shapes-flow-teacher"
    """The teacher: the embedded one or a folder from `gen3d world train-flow`; the student starts as a copy."""
    objects: int = 0
    """Data for velocity matching: the first N of `training_objects()` (0: all)."""
    source_points: int = 2048
    """Surface points stored per object; each example is a random subset of the teacher's `points` of them."""
    delta: float = 0.01
    """dt of the teacher Euler step the student's time derivative is taken over (MDT-dist's distill_interval)."""
    d_norm: float | None = 0.1
    """D <- D / (|D| + d_norm) per sample (MDT-dist's normalization)."""
    guidance_vm: float = 3.0
    """Teacher CFG scale in the velocity-matching target (MDT-dist's code: 40, for TRELLIS; this teacher's own
    sampling scale suits it, see the README)."""
    guidance_vd: float = 3.0
    """Teacher CFG scale in the velocity-distillation target (MDT-dist's code: 100)."""
    lambda_vm: float = 1.0
    """Weight of velocity matching (mdt)."""
    lambda_vd: float = 1.0
    """Weight of velocity distillation (mdt)."""
    sample_steps: int = 1
    """Steps the export samples with by default (latent.json)."""
    steps: int = 1000
    """Optimization steps."""
    batch_size: int = 8
    """Examples per step and per process."""
    lr: float = 2e-4
    """Peak AdamW learning rate: linear warm-up over `warmup` steps, then cosine decay to 10% at `steps`."""
    warmup: int = 50
    """Warm-up steps."""
    ema: float = 0.995
    """Decay of the EMA of the student's weights, which is what is exported (0: no EMA)."""
    output: str = str(EMBEDDED_FLOW["gen3d/shapes-flow"])
    """Folder the student is exported to (model.safetensors, config.json, latent.json); default: the embedded
    model's."""
    export_dtype: str = "float16"
    """Precision of the exported weights: float16 or float32."""
    work_dir: str = "outputs/world/distill-flow"
    """Data cache, checkpoints and the training log."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in DISTILL_METHODS:
            raise ValueError(f"DistillConfig.method must be one of {list(DISTILL_METHODS)}, got {self.method!r}")
        self.check_int("objects", 0)
        self.check_int("source_points", 1)
        self.check_int("sample_steps", 1)
        for name in ("guidance_vm", "guidance_vd", "lambda_vm", "lambda_vd"):
            self.check_number(name)
        if self.method == "mdt" and not (self.lambda_vm or self.lambda_vd):
            raise ValueError("DistillConfig: lambda_vm or lambda_vd must be > 0")
        self.mdt_config()  # checks delta and d_norm

    def mdt_config(self) -> MDTConfig:
        try:
            return MDTConfig(delta=self.delta, d_norm=self.d_norm, guidance_vm=self.guidance_vm,
                             guidance_vd=self.guidance_vd, lambda_vm=self.lambda_vm, lambda_vd=self.lambda_vd)
        except ValueError as exc:
            raise ValueError(str(exc).replace("MDTConfig", "DistillConfig")) from None


class DistillTrainer(Trainer):
    """A student distilled from a frozen teacher by MDT-dist or consistency distillation; exports its EMA."""

    verb = "distill-flow"
    cfg: DistillConfig

    def __init__(self, cfg: DistillConfig):
        import copy

        from gen3d.models.point_flow import load_point_flow

        super().__init__(cfg)
        teacher = load_point_flow(cfg.teacher)
        if teacher.info.kind != "teacher":
            raise ValueError(f"DistillConfig.teacher: '{cfg.teacher}' is a distilled {teacher.info.kind}, not a "
                             "flow teacher (train one with `gen3d world train-flow`)")
        self.teacher_info, self.text = teacher.info, teacher.text
        self.teacher = teacher.model.requires_grad_(False).eval()
        self.points = teacher.info.points
        if self.points > cfg.source_points:
            raise ValueError(f"DistillConfig.source_points ({cfg.source_points}) must be >= the teacher's points "
                             f"({self.points})")
        self.mdt = cfg.mdt_config()
        student = copy.deepcopy(self.teacher).requires_grad_(True).train()
        student.null_text.requires_grad_(False)  # never asked for the null condition (no DDP gradient to wait for)
        self.setup(student)
        self.data: PointSetData | None = None

    def build_data(self) -> None:
        cfg = self.cfg
        self.data = PointSetData(cfg.objects, cfg.source_points, cfg.seed, self.work)

    def loss_terms(self) -> tuple[torch.Tensor, dict[str, float]]:
        self.ensure_data()
        x0, captions = self.data.batch(self.cfg.batch_size, self.points, self.generator)
        text = self.text(captions)  # the teacher's guidance contrasts it with its learned null sequence (cond=None)
        if self.cfg.method == "consistency":
            loss = consistency_loss(self.net, self.teacher, x0, text, self.mdt, self.generator, target_model=self.model)
            return loss, {}
        out = mdt_losses(self.net, self.teacher, x0, text, self.mdt, self.generator)
        return out["loss"], {k: v.item() for k, v in out.items() if k != "loss"}

    def sample(self, captions: list[str], steps: int = 1, seed: int = 0) -> torch.Tensor:
        """Latents [len(captions), points, 6] from the (EMA) student in `steps` Euler steps, no guidance."""
        return PointFlowGenerator(self.exported_model(), self.info(), self.text)(captions, steps, 0.0, seed)

    def info(self) -> GeneratorInfo:
        return GeneratorInfo(points=self.points, text_encoder=self.teacher_info.text_encoder,
                             steps=self.cfg.sample_steps, guidance=0.0, kind=f"student ({self.cfg.method})")

    def export(self) -> Path:
        return save_weights(self.exported_model(), Path(self.cfg.output), self.cfg.export_dtype,
                            _latent_json(self.info()))
