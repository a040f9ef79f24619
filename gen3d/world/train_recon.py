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

Distributed: when `torch.distributed` is initialized (``torchrun``, or `run_distributed`, which spawns
CPU processes with the gloo backend), the model is wrapped in `DistributedDataParallel`, every rank
draws its own batches (`batch_size` is per process) and only rank 0 writes files. Under ``torchrun``,
end each process with `shutdown_distributed()` rather than a bare `destroy_process_group()`.
"""

from __future__ import annotations

import hashlib
import json
import math
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from gen3d.cameras import Cameras
from gen3d.models.tgs import EMBEDDED_TGS, TGS, TGSConfig
from gen3d.ops.sh import sh_to_rgb

MODEL_SIZES = ("tiny", "small")


@dataclass
class ReconTrainConfig:
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
    warmup: int = 200
    """Warm-up steps."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Gradient-norm clipping (0: none)."""
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
    seed: int = 0
    """Seed of the data, the initialization and the batches (rank r draws from (seed, r))."""
    progress: bool = True
    """Show a progress bar (rank 0 only)."""
    threads: int = 2
    """torch CPU threads per process (0: torch's default)."""

    def __post_init__(self) -> None:
        if self.model not in MODEL_SIZES:
            raise ValueError(f"ReconTrainConfig.model must be one of {MODEL_SIZES}, got {self.model!r}")
        ints = {"objects": 0, "views": 1, "size": 8, "points": 1, "steps": 0, "batch_size": 1, "target_views": 1,
                "warmup": 0, "checkpoint_every": 1, "sample_every": 0, "seed": 0, "threads": 0}
        for name, low in ints.items():
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
                raise ValueError(f"ReconTrainConfig.{name} must be an integer >= {low}, got {value!r}")
        if self.target_views > self.views:
            raise ValueError(f"ReconTrainConfig.target_views ({self.target_views}) must be <= views ({self.views})")
        self.scale_range = tuple(self.scale_range)
        if len(self.scale_range) != 2 or not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(f"ReconTrainConfig.scale_range must be (low, high) with 0 < low <= high, got "
                             f"{list(self.scale_range)}")
        if not self.lr > 0:
            raise ValueError(f"ReconTrainConfig.lr must be > 0, got {self.lr}")
        for name in ("weight_decay", "grad_clip", "lambda_chamfer_coarse", "lambda_chamfer", "lambda_rgb",
                     "lambda_mask", "lambda_color"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"ReconTrainConfig.{name} must be a finite number >= 0, got {value!r}")
        if not (self.lambda_chamfer_coarse or self.lambda_chamfer or self.lambda_rgb or self.lambda_mask
                or self.lambda_color):
            raise ValueError("ReconTrainConfig: at least one loss weight must be > 0")
        if not self.work_dir:
            raise ValueError("ReconTrainConfig.work_dir must be set")
        if not self.output:
            raise ValueError("ReconTrainConfig.output must be set")
        if self.export_dtype not in ("float16", "float32"):
            raise ValueError(f"ReconTrainConfig.export_dtype must be float16 or float32, got {self.export_dtype!r}")

    def tgs_config(self) -> TGSConfig:
        return getattr(TGSConfig, self.model)()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def parameter_checksum(model: torch.nn.Module) -> str:
    """sha256 of the model's state dict (names and exact bytes)."""
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


class ReconTrainer:
    """Builds the data and the model, trains with checkpoints (resumable), writes grids and the export."""

    verb = "train-recon"

    def __init__(self, cfg: ReconTrainConfig):
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.rank, self.world_size = _rank(), _world_size()
        self.work = Path(cfg.work_dir)
        if self.rank == 0:
            self.work.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)  # the model initializes from the global generator
        self.model = TGS(cfg.tgs_config())
        self.net: torch.nn.Module = self.model
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            # the ViT's mask token is never used; DDP broadcasts rank 0's initial parameters
            self.net = DistributedDataParallel(self.model, find_unused_parameters=True)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.generator = torch.Generator().manual_seed(cfg.seed * 100_003 + 1 + self.rank)
        self.step = 0
        self.data = None
        self._stop = False

    # ---- data --------------------------------------------------------------------------------
    def build_data(self):
        """The `ReconSet` of the first `objects` training objects (cached in work_dir)."""
        from gen3d.world.catalog import training_objects
        from gen3d.world.recon_data import build_recon_set

        cfg = self.cfg
        objects = training_objects()[: cfg.objects or None]
        cache = self.work / f"recon-{cfg.seed}-{len(objects)}x{cfg.views}-{cfg.size}-{cfg.points}.pt"
        if self.world_size > 1 and self.rank != 0:
            dist.barrier()  # rank 0 builds (or finds) the cache first
        t0 = time.perf_counter()
        self.data = build_recon_set(objects, views=cfg.views, size=cfg.size, points=cfg.points, seed=cfg.seed,
                                    cache=cache)
        if self.world_size > 1 and self.rank == 0:
            dist.barrier()
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
        if self.data is None:
            self.build_data()
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

    def lr_at(self, step: int) -> float:
        from gen3d.schedules import warmup_cosine

        return warmup_cosine(step, self.cfg.lr, self.cfg.warmup, self.cfg.steps)

    def train_step(self) -> float:
        """One AdamW step on a fresh batch (scheduled lr, gradient clipping); returns the loss."""
        self.model.train()
        loss, self.last_terms = self.loss(self.batch())
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages the gradients over the ranks here
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.step += 1
        return loss.item()

    # ---- checkpoints -----------------------------------------------------------------------------
    def _generator_states(self) -> list[torch.Tensor]:
        """Every rank's generator state (a collective: all ranks call it)."""
        state = self.generator.get_state()
        if self.world_size == 1:
            return [state]
        states = [torch.empty_like(state) for _ in range(self.world_size)]
        dist.all_gather(states, state)
        return states

    def save_checkpoint(self) -> None:
        """Model, optimizer, step and all ranks' generators (all ranks call it; rank 0 writes, atomically)."""
        from gen3d.runs import save_checkpoint

        states = self._generator_states()
        if self.rank != 0:
            return
        state = {"optimizer": self.optimizer.state_dict(), "generators": states, "world_size": self.world_size}
        save_checkpoint(self.work, self.step, {f"model.{k}": v for k, v in self.model.state_dict().items()}, state,
                        {"system": self.verb, "config": asdict(self.cfg)})

    def resume(self) -> bool:
        """Load the newest checkpoint in work_dir (False if there is none)."""
        from gen3d.runs import latest_checkpoint

        ckpt = latest_checkpoint(self.work)
        if ckpt is None:
            return False
        if ckpt.state["world_size"] != self.world_size:
            raise ValueError(f"checkpoint {ckpt.path} was written by {ckpt.state['world_size']} processes; resume "
                             f"it with as many (not {self.world_size})")
        self.model.load_state_dict({k[6:]: v for k, v in ckpt.model.items() if k.startswith("model.")})
        self.optimizer.load_state_dict(ckpt.state["optimizer"])
        self.generator.set_state(ckpt.state["generators"][self.rank])
        self.step = ckpt.step
        return True

    # ---- training loop -----------------------------------------------------------------------------
    def fit(self) -> Path:
        """Train to cfg.steps (Ctrl-C checkpoints and stops), write the last grid and export (rank 0)."""
        cfg = self.cfg
        if self.data is None:
            self.build_data()
        main = self.rank == 0
        previous = signal.signal(signal.SIGINT, lambda *a: setattr(self, "_stop", True))
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (cfg.progress and main), desc=self.verb,
                   file=sys.stderr)
        log = (self.work / "metrics.jsonl").open("a") if main else None
        avg = None
        try:
            while self.step < cfg.steps:
                loss = self.train_step()
                avg = loss if avg is None else 0.98 * avg + 0.02 * loss
                bar.update(1)
                bar.set_postfix(loss=f"{avg:.4f}", refresh=False)
                if log is not None and (self.step % 50 == 0 or self.step == cfg.steps):
                    log.write(json.dumps({"step": self.step, "loss": loss, "loss_avg": avg, **self.last_terms,
                                          "lr": self.lr_at(self.step - 1)}) + "\n")
                    log.flush()
                if main and cfg.sample_every and self.step % cfg.sample_every == 0:
                    self.write_samples()
                if self.world_size > 1:  # everyone stops at the same step if any rank was interrupted
                    flag = torch.tensor([float(self._stop)])
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    self._stop = bool(flag.item())
                if self._stop or self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                if self._stop:
                    if main:
                        print(f"\ninterrupted at step {self.step}; resume with: gen3d world {self.verb} --resume "
                              f"work_dir={cfg.work_dir}", file=sys.stderr)
                    raise KeyboardInterrupt
        finally:
            bar.close()
            if log is not None:
                log.close()
            signal.signal(signal.SIGINT, previous)
        self.save_checkpoint()
        if main and cfg.sample_every:
            self.write_samples()
        out = self.export()
        if self.world_size > 1:
            dist.barrier()  # the export is complete when any rank returns
        return out

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
        """Write `model.safetensors` and `config.json` (the `TGSConfig`) into `output`, as a whole (rank 0); `load_tgs`
        reads it."""
        out = Path(self.cfg.output)
        if self.rank != 0:
            return out
        from safetensors.torch import save_file

        from gen3d.io import atomic_folder

        with atomic_folder(out) as tmp:
            dtype = getattr(torch, self.cfg.export_dtype)
            state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
                     for k, v in self.model.state_dict().items()}
            save_file(state, str(tmp / "model.safetensors"))
            (tmp / "config.json").write_text(json.dumps(asdict(self.model.cfg), indent=2))
        return out


# ---- several processes -------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, cfg: ReconTrainConfig, world_size: int, port: int, resume: bool, results) -> None:
    import os

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        trainer = ReconTrainer(cfg)
        if resume:
            trainer.resume()
        trainer.fit()
        results.put((rank, parameter_checksum(trainer.model)))
        shutdown_distributed()
    finally:
        if dist.is_initialized():  # after an error: no barrier, the other ranks may be gone
            dist.destroy_process_group()


def shutdown_distributed() -> None:
    """`destroy_process_group` after a barrier and a short pause (call it on every rank at the end).

    Gloo drops a finished collective's tensors on its own threads, which needs the GIL; destroying the
    group joins those threads while holding it, so a drop still pending deadlocks (seen with torch 2.13
    after `all_gather`). The barrier (waited on without the GIL) and the pause let them finish first.
    """
    dist.barrier()
    time.sleep(0.2)
    dist.destroy_process_group()


def run_distributed(cfg: ReconTrainConfig, world_size: int, resume: bool = False,
                    timeout: float | None = None) -> dict[int, str]:
    """Train with `world_size` CPU processes (gloo, on 127.0.0.1 and a free port), each running `fit`
    (after `resume()` if `resume`).

    Returns each rank's `parameter_checksum` of its final model (equal on all ranks after DDP training).
    A rank's error is raised here (`torch.multiprocessing.ProcessRaisedException`); with `timeout`
    (seconds), processes still running then are terminated and `TimeoutError` is raised.
    """
    import torch.multiprocessing as mp

    if world_size < 1:
        raise ValueError(f"run_distributed: world_size must be >= 1, got {world_size}")
    results = mp.get_context("spawn").SimpleQueue()
    ctx = mp.start_processes(_worker, args=(cfg, world_size, _free_port(), resume, results), nprocs=world_size,
                             join=False, start_method="spawn")
    deadline = None if timeout is None else time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if deadline is not None and time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            for p in ctx.processes:
                p.join(5)
            raise TimeoutError(f"run_distributed: {world_size} processes still running after {timeout} s")
    out = {}
    while not results.empty():
        rank, checksum = results.get()
        out[rank] = checksum
    return out
