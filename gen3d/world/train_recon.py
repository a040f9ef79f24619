"""Train the TGS single-image reconstructor (`gen3d.models.tgs`) on the Shapes world.

Data: `build_recon_set` renders of the training objects (RGB on white, alpha, cameras) and points on
their exact surfaces, cached in `work_dir`. A training example is one object, one input view and
`target_views` other views of it. The loss follows TGS (Zou et al. 2024): the Chamfer distance of the
point decoder's coarse points and of the upsampled points to the surface points, plus the MSE of
renders of the decoded Gaussians (on white) against the target views' RGB and of their alpha against
the target masks. Each example's world is scaled at random (`scale_range`; images unchanged, cameras and
points scaled), so that size is read from the image and the camera. One term is added to TGS's: the MSE of each Gaussian's color against the shaded color
of the surface point nearest to its point (`lambda_color`; without it, a tiny model trained for 2,000
CPU steps kept grayish Gaussians: color error 0.023 against 0.006 with it).

Everything is drawn from generators seeded by `seed` (model initialization) and (seed, rank) (the
batches), and checkpoints hold the model, the optimizer, the step and every rank's generator, so a
resumed run continues bit for bit (with the same number of processes and threads).

Distributed: when `torch.distributed` is initialized (``torchrun``, or `gen3d.world.trainer.run_distributed`, which spawns
CPU processes with the gloo backend), the model is wrapped in `DistributedDataParallel`, every rank
draws its own batches (`batch_size` is per process) and only rank 0 writes files. Under ``torchrun``,
end each process with `gen3d.world.trainer.shutdown_distributed()` rather than a bare `destroy_process_group()`.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from gen3d.cameras import Cameras
from gen3d.models.tgs import EMBEDDED_TGS, TGS, TGSConfig
from gen3d.ops.sh import sh_to_rgb
from gen3d.world.trainer import Trainer, TrainConfig, save_weights

MODEL_SIZES = ("tiny", "small")


@dataclass
class ReconTrainConfig(TrainConfig):
    """Training of the TGS reconstructor on the Shapes world (defaults: the embedded gen3d/shapes-tgs)."""

    model: str = "small"
    """Model size: a `TGSConfig` constructor name, tiny or small (the embedded model)."""
    objects: int = 0
    """Train on the first N of `training_objects()` (0: all)."""
    views: int = 12
    """Rendered views per object (input and target views are drawn among them)."""
    size: int = 64
    """Image size of the renders (inputs and targets)."""
    points: int = 2048
    """Surface points per object (the Chamfer target)."""
    steps: int = 12000
    """Optimization steps."""
    batch_size: int = 4
    """Examples per step and per process."""
    target_views: int = 2
    """Views each example's Gaussians are rendered from and compared with."""
    scale_range: tuple[float, float] = (0.75, 1.5)
    """Each example's world is scaled by a log-uniform factor in this range: camera positions and surface points
    scaled, images unchanged. The model must then read an object's size from its image and camera rather than from
    its shape, as recentered inputs need (`gen3d reconstruct` scales the object to fill 75% of the view: 0.77-1.5
    times the Shapes world's own sizes). (1, 1): off."""
    lr: float = 6e-4
    """Peak AdamW learning rate: linear warm-up over `warmup` steps, then cosine decay to 10% at `steps`."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    lambda_chamfer_coarse: float = 1.0
    """Weight of the Chamfer distance of the coarse points to the surface points."""
    lambda_chamfer: float = 1.0
    """Weight of the Chamfer distance of the upsampled (Gaussian) points to the surface points."""
    lambda_rgb: float = 1.0
    """Weight of the MSE of the rendered RGB (on white) against the target views."""
    lambda_mask: float = 1.0
    """Weight of the MSE of the rendered alpha against the target masks."""
    lambda_color: float = 1.0
    """Weight of the MSE of each Gaussian's color against the shaded color of the surface point nearest
    to its point (not in TGS: a dense color signal that renders at low resolution give only weakly)."""
    backend: str = "auto"
    """Gaussian rasterizer backend (`render_gaussians`); "torch" needs no compilation."""
    checkpoint_every: int = 250
    """Write a resumable checkpoint every this many steps (and always at the end)."""
    sample_every: int = 1000
    """Write a validation grid every this many steps (0: never)."""
    output: str = str(EMBEDDED_TGS["gen3d/shapes-tgs"])
    """Folder the trained model is exported to (model.safetensors + config.json); default: the embedded model's."""
    export_dtype: str = "float16"
    """Precision of the exported weights: float16 (half the size; `load_tgs` computes in float32) or float32."""
    work_dir: str = "outputs/world/train-recon"
    """Data cache, checkpoints, validation grids and the training log."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.model not in MODEL_SIZES:
            raise ValueError(f"ReconTrainConfig.model must be one of {MODEL_SIZES}, got {self.model!r}")
        for name, low in (("objects", 0), ("views", 1), ("size", 8), ("points", 1), ("target_views", 1),
                          ("sample_every", 0)):
            self.check_int(name, low)
        if self.target_views > self.views:
            raise ValueError(f"ReconTrainConfig.target_views ({self.target_views}) must be <= views ({self.views})")
        self.scale_range = tuple(self.scale_range)
        if len(self.scale_range) != 2 or not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(f"ReconTrainConfig.scale_range must be (low, high) with 0 < low <= high, got "
                             f"{list(self.scale_range)}")
        for name in ("lambda_chamfer_coarse", "lambda_chamfer", "lambda_rgb", "lambda_mask", "lambda_color"):
            self.check_number(name)
        if not (self.lambda_chamfer_coarse or self.lambda_chamfer or self.lambda_rgb or self.lambda_mask
                or self.lambda_color):
            raise ValueError("ReconTrainConfig: at least one loss weight must be > 0")

    def tgs_config(self) -> TGSConfig:
        return getattr(TGSConfig, self.model)()


class ReconTrainer(Trainer):
    """Builds the data and the model, trains with checkpoints (resumable), writes grids and the export."""

    verb = "train-recon"
    find_unused_parameters = True  # the ViT's mask token is never used
    cfg: ReconTrainConfig

    def __init__(self, cfg: ReconTrainConfig):
        super().__init__(cfg)
        torch.manual_seed(cfg.seed)  # the model initializes from the global generator
        self.setup(TGS(cfg.tgs_config()))
        self.data = None

    # ---- data --------------------------------------------------------------------------------
    def build_data(self):
        """The `ReconSet` of the first `objects` training objects (cached in work_dir)."""
        from gen3d.world.catalog import training_objects
        from gen3d.world.recon_data import build_recon_set

        cfg = self.cfg
        objects = training_objects()[: cfg.objects or None]
        cache = self.work / f"recon-{cfg.seed}-{len(objects)}x{cfg.views}-{cfg.size}-{cfg.points}.pt"
        t0 = time.perf_counter()
        self.data = build_recon_set(objects, views=cfg.views, size=cfg.size, points=cfg.points, seed=cfg.seed,
                                    cache=cache)
        if self.rank == 0 and cfg.progress:
            print(f"recon set: {len(objects)} objects x {cfg.views} views in {time.perf_counter() - t0:.1f} s",
                  file=sys.stderr)
        return self.data

    def _cameras(self, o: torch.Tensor, v: torch.Tensor, scale: torch.Tensor) -> Cameras:
        """Cameras of objects o and views v (same shape) in a world scaled by `scale` (broadcast to them)."""
        d, s = self.data, self.cfg.size
        c2w = d.c2w[o, v].clone()
        c2w[:, :3, 3] *= scale[..., None]
        return Cameras(c2w, d.K[o, v], s, s, d.azimuth[o, v], d.elevation[o, v], d.distance[o, v] * scale)

    def make_batch(self, objects: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor,
                   scales: torch.Tensor | None = None) -> dict:
        """The batch of objects [B], input views [B] and target views [B, T] (indices into the data), each example's
        world scaled by `scales` [B] (default 1): camera positions and surface points scaled, images unchanged
        (an object s times larger seen from s times farther looks the same)."""
        d = self.data
        scales = torch.ones(len(objects)) if scales is None else scales
        T = targets.shape[1]
        return {
            "image": torch.cat([d.rgb[objects, inputs], d.alpha[objects, inputs]], -1),  # [B, S, S, 4]
            "cameras": self._cameras(objects, inputs, scales),
            "points": d.points[objects] * scales[:, None, None],  # [B, P, 3]
            "point_colors": d.lit[objects],  # [B, P, 3]
            "target_rgb": d.rgb[objects[:, None], targets],  # [B, T, S, S, 3]
            "target_alpha": d.alpha[objects[:, None], targets],  # [B, T, S, S, 1]
            "target_cameras": [self._cameras(objects[b].expand(T), targets[b], scales[b].expand(T))
                                for b in range(len(objects))],
        }

    def batch(self) -> dict:
        """`batch_size` random (object, input view, target views, world scale) from this rank's generator."""
        cfg, g = self.cfg, self.generator
        self.ensure_data()
        objects = torch.randint(0, len(self.data), (cfg.batch_size,), generator=g)
        inputs = torch.randint(0, cfg.views, (cfg.batch_size,), generator=g)
        targets = torch.stack([torch.randperm(cfg.views, generator=g)[: cfg.target_views]
                               for _ in range(cfg.batch_size)])
        low, high = (math.log(v) for v in cfg.scale_range)
        scales = torch.exp(low + (high - low) * torch.rand(cfg.batch_size, generator=g))
        return self.make_batch(objects, inputs, targets, scales)

    # ---- loss and optimization ---------------------------------------------------------------------
    def render(self, out, b: int, cameras: Cameras):
        from gen3d.rendering.gaussian import render_gaussians

        white = torch.ones(len(cameras), 3)
        return render_gaussians(out.gaussians(b), cameras, white, backend=self.cfg.backend)

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """The weighted loss and its terms (see the module docstring)."""
        from gen3d.world.recon_data import chamfer_distance, nearest_indices

        cfg = self.cfg
        out = self.net(batch["image"], batch["cameras"])
        nearest, nearest_back = nearest_indices(out.points, batch["points"])  # [B, N], [B, P]
        terms = {
            "chamfer_coarse": chamfer_distance(out.coarse_points, batch["points"]).mean(),
            "chamfer": chamfer_distance(out.points, batch["points"], indices=(nearest, nearest_back)).mean(),
        }
        rgb, alpha = [], []
        for b, cams in enumerate(batch["target_cameras"]):
            r = self.render(out, b, cams)
            rgb.append(F.mse_loss(r.rgb, batch["target_rgb"][b]))
            alpha.append(F.mse_loss(r.alpha, batch["target_alpha"][b]))
        terms["rgb"] = torch.stack(rgb).mean()
        terms["mask"] = torch.stack(alpha).mean()
        target = torch.gather(batch["point_colors"], 1, nearest[..., None].expand(-1, -1, 3))  # [B, N, 3]
        terms["color"] = F.mse_loss(sh_to_rgb(out.sh[:, :, 0]), target)
        total = (cfg.lambda_chamfer_coarse * terms["chamfer_coarse"] + cfg.lambda_chamfer * terms["chamfer"]
                 + cfg.lambda_rgb * terms["rgb"] + cfg.lambda_mask * terms["mask"] + cfg.lambda_color * terms["color"])
        return total, {k: v.item() for k, v in terms.items()}

    def loss_terms(self) -> tuple[torch.Tensor, dict[str, float]]:
        return self.loss(self.batch())

    def on_step(self) -> None:
        if self.rank == 0 and self.cfg.sample_every and self.step % self.cfg.sample_every == 0:
            self.write_samples()

    def on_end(self) -> None:
        if self.rank == 0 and self.cfg.sample_every:
            self.write_samples()

    # ---- outputs -------------------------------------------------------------------------------------
    @torch.no_grad()
    def write_samples(self, rows: int = 4) -> Path:
        """Validation grid: per object (`rows` spread over the set), input view 0 | target view 1 | its prediction."""
        from gen3d.export.video import image_grid, save_image

        n = min(rows, len(self.data))
        objects = torch.linspace(0, len(self.data) - 1, n).round().long()  # spread over the catalog
        inputs = torch.zeros(n, dtype=torch.long)
        targets = torch.full((n, 1), 1 % self.cfg.views, dtype=torch.long)
        batch = self.make_batch(objects, inputs, targets)
        was_training = self.model.training
        self.model.eval()
        out = self.model(batch["image"], batch["cameras"])
        self.model.train(was_training)
        tiles = []
        for b in range(n):
            pred = self.render(out, b, batch["target_cameras"][b]).rgb[0].clamp(0, 1)
            tiles += [batch["image"][b, ..., :3], batch["target_rgb"][b, 0], pred]
        path = self.work / "samples" / f"step-{self.step:06d}.png"
        save_image(path, image_grid(torch.stack(tiles), nrow=3))
        return path

    def export(self) -> Path:
        """Write `model.safetensors` and `config.json` (the `TGSConfig`) into `output`, as a whole; `load_tgs` reads
        it."""
        return save_weights(self.model, Path(self.cfg.output), self.cfg.export_dtype)
