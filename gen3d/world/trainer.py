"""What gen3d's model trainers share: optimization, data parallelism, EMA, checkpoints, resume and export.

A trainer subclasses `Trainer` with its config (a `TrainConfig` subclass), builds its model, and implements
`build_data` and `loss_terms` (draw a batch from `self.generator`, return the loss and the numbers to log); `fit`
then trains to `steps` with AdamW (linear warm-up, cosine decay to 10%), gradient clipping and an optional EMA of
the weights, writes `metrics.jsonl` and resumable checkpoints (model, EMA, optimizer, step and every rank's
generator) into `work_dir`, stops at a checkpoint on Ctrl-C, and exports the (EMA) weights.

Data parallelism is torch.distributed's: launched by `run_distributed` (gloo processes on this machine) or by
torchrun, each rank draws its own batches from the generator seeded by (seed, rank), DDP averages the gradients,
rank 0 writes. A resumed run continues bit for bit with as many processes as wrote the checkpoint.
"""

from __future__ import annotations

import copy
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
from tqdm.auto import tqdm


@dataclass
class TrainConfig:
    """Optimization and bookkeeping settings every trainer has (each trainer sets its own defaults)."""

    steps: int = 1000
    """Optimization steps."""
    batch_size: int = 8
    """Examples per step and per process."""
    lr: float = 3e-4
    """Peak AdamW learning rate: linear warm-up over `warmup` steps, then cosine decay to 10% at `steps`."""
    warmup: int = 200
    """Warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Gradient-norm clipping (0: none)."""
    ema: float = 0.0
    """Decay of an exponential moving average of the weights, which is then what is exported (0: no EMA)."""
    checkpoint_every: int = 500
    """Write a resumable checkpoint every this many steps (and always at the end)."""
    output: str = "outputs/world/model"
    """Folder the trained model is exported to."""
    export_dtype: str = "float32"
    """Precision of the exported weights: float16 (half the size) or float32."""
    work_dir: str = "outputs/world/train"
    """Data cache, checkpoints and the training log."""
    seed: int = 0
    """Seed of the data, the initialization and the batches (rank r draws from (seed, r))."""
    progress: bool = True
    """Show a progress bar (rank 0 only)."""
    threads: int = 2
    """torch CPU threads per process (0: torch's default)."""

    def check_int(self, name: str, low: int) -> None:
        value = getattr(self, name)
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
            raise ValueError(f"{type(self).__name__}.{name} must be an integer >= {low}, got {value!r}")

    def check_number(self, name: str, low: float = 0.0, high: float = math.inf, high_open: bool = False) -> None:
        value = getattr(self, name)
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
              and low <= value and (value < high if high_open else value <= high))
        if not ok:
            interval = f"[{low}, {high})" if high_open else (f">= {low}" if high == math.inf else f"[{low}, {high}]")
            raise ValueError(f"{type(self).__name__}.{name} must be a finite number {interval}, got {value!r}")

    def __post_init__(self) -> None:
        for name, low in (("steps", 0), ("batch_size", 1), ("warmup", 0), ("checkpoint_every", 1), ("seed", 0),
                          ("threads", 0)):
            self.check_int(name, low)
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"{type(self).__name__}.lr must be a finite number > 0, got {self.lr!r}")
        self.check_number("weight_decay")
        self.check_number("grad_clip")
        self.check_number("ema", 0.0, 1.0, high_open=True)
        if not self.work_dir or not self.output:
            raise ValueError(f"{type(self).__name__}: work_dir and output must be set")
        if self.export_dtype not in ("float16", "float32"):
            raise ValueError(f"{type(self).__name__}.export_dtype must be float16 or float32, got "
                             f"{self.export_dtype!r}")


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def parameter_checksum(model: torch.nn.Module) -> str:
    """sha256 of the model's state dict (names and exact bytes)."""
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def save_weights(model: torch.nn.Module, folder: Path, dtype: str = "float32", files: dict[str, str] | None = None,
                 config: dict | None = None) -> Path:
    """`model.safetensors` (floating tensors in `dtype`), `config.json` (`config`, default the model's `cfg`) and
    any other text `files` into `folder`, replacing it as a whole."""
    from safetensors.torch import save_file

    from gen3d.io import atomic_folder

    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        cast = getattr(torch, dtype)
        state = {k: v.detach().to("cpu", cast if v.is_floating_point() else v.dtype).contiguous()
                 for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(asdict(model.cfg) if config is None else config, indent=2))
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
    return folder


class Trainer:
    """The shared training loop (see the module docstring). Subclasses set `verb`, build `self.model` before
    calling `setup()`, and implement `build_data`, `loss_terms` and `export`."""

    verb = "train"
    find_unused_parameters = False
    """Passed to DDP: set when some parameters take no gradient in a step."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.rank, self.world_size = rank(), world_size()
        self.work = Path(cfg.work_dir)
        if self.rank == 0:
            self.work.mkdir(parents=True, exist_ok=True)
        self.step = 0
        self.last_terms: dict[str, float] = {}
        self._stop = False
        self._data_ready = False

    def setup(self, model: torch.nn.Module) -> None:
        """Wrap `model` (DDP with several processes), and make its EMA, the optimizer and the batch generator."""
        cfg = self.cfg
        self.model = model
        self.net: torch.nn.Module = model
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            # DDP broadcasts rank 0's initial parameters
            self.net = DistributedDataParallel(model, find_unused_parameters=self.find_unused_parameters)
        self.ema = copy.deepcopy(model).requires_grad_(False) if cfg.ema else None
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.generator = torch.Generator().manual_seed(cfg.seed * 100_003 + 1 + self.rank)

    # ---- to implement --------------------------------------------------------------------------------
    def build_data(self) -> None:
        raise NotImplementedError

    def loss_terms(self) -> tuple[torch.Tensor, dict[str, float]]:
        """Draw a batch (from `self.generator`) and return the loss to minimize and the numbers to log."""
        raise NotImplementedError

    def export(self) -> Path:
        raise NotImplementedError

    # ---- data ----------------------------------------------------------------------------------------
    def ensure_data(self) -> None:
        """`build_data` once; with several processes rank 0 first (it writes the cache the others read)."""
        if self._data_ready:
            return
        if self.world_size > 1 and self.rank != 0:
            dist.barrier()
        self.build_data()
        if self.world_size > 1 and self.rank == 0:
            dist.barrier()
        self._data_ready = True

    # ---- one step ------------------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        from gen3d.schedules import warmup_cosine

        return warmup_cosine(step, self.cfg.lr, self.cfg.warmup, self.cfg.steps)

    def update_ema(self) -> None:
        if self.ema is not None:
            with torch.no_grad():
                for e, p in zip(self.ema.parameters(), self.model.parameters()):
                    e.lerp_(p, 1 - self.cfg.ema)

    def train_step(self) -> float:
        """One AdamW step on a fresh batch (scheduled lr, gradient clipping, EMA); returns the loss."""
        self.ensure_data()
        self.model.train()
        loss, self.last_terms = self.loss_terms()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages the gradients over the ranks here
        if skip_nonfinite(self, loss, list(self.model.parameters())):  # the same on every rank: the same gradients
            self.step += 1
            return loss.item()
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.update_ema()
        self.step += 1
        return loss.item()

    # ---- checkpoints ---------------------------------------------------------------------------------
    def _generator_states(self) -> list[torch.Tensor]:
        """Every rank's generator state (a collective: all ranks call it)."""
        state = self.generator.get_state()
        if self.world_size == 1:
            return [state]
        states = [torch.empty_like(state) for _ in range(self.world_size)]
        dist.all_gather(states, state)
        return states

    def save_checkpoint(self) -> None:
        """Model, EMA, optimizer, step and all ranks' generators (all ranks call it; rank 0 writes, atomically)."""
        from gen3d.runs import save_checkpoint

        states = self._generator_states()
        if self.rank != 0:
            return
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        if self.ema is not None:
            tensors |= {f"ema.{k}": v for k, v in self.ema.state_dict().items()}
        state = {"optimizer": self.optimizer.state_dict(), "generators": states, "world_size": self.world_size}
        save_checkpoint(self.work, self.step, tensors, state, {"system": self.verb, "config": asdict(self.cfg)})

    def resume(self) -> bool:
        """Load the newest checkpoint in work_dir (False if there is none)."""
        from gen3d.runs import latest_checkpoint

        ckpt = latest_checkpoint(self.work)
        if ckpt is None:
            return False
        if ckpt.meta.get("system") not in (None, self.verb):
            raise ValueError(f"checkpoint {ckpt.path} was written by `gen3d world {ckpt.meta['system']}`, not "
                             f"{self.verb}; use another work_dir")
        if ckpt.state["world_size"] != self.world_size:
            raise ValueError(f"checkpoint {ckpt.path} was written by {ckpt.state['world_size']} processes; resume "
                             f"it with as many (not {self.world_size})")
        self.model.load_state_dict({k[6:]: v for k, v in ckpt.model.items() if k.startswith("model.")})
        if self.ema is not None:
            self.ema.load_state_dict({k[4:]: v for k, v in ckpt.model.items() if k.startswith("ema.")})
        self.optimizer.load_state_dict(ckpt.state["optimizer"])
        self.generator.set_state(ckpt.state["generators"][self.rank])
        self.step = ckpt.step
        return True

    # ---- training loop -------------------------------------------------------------------------------
    def on_step(self) -> None:
        """Called on every rank after each step (validation pictures and the like)."""

    def on_end(self) -> None:
        """Called on every rank after the last checkpoint, before the export."""

    def fit(self) -> Path:
        """Train to cfg.steps (Ctrl-C checkpoints and stops), then export (rank 0)."""
        cfg = self.cfg
        self.ensure_data()
        main = self.rank == 0
        # Ctrl-C and SIGTERM (kill, systemd, docker stop, job schedulers) alike: checkpoint at the step's end and stop
        stop = lambda *a: setattr(self, "_stop", True)  # noqa: E731
        previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
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
                self.on_step()
                if self.world_size > 1:  # everyone stops at the same step if any rank was interrupted
                    flag = torch.tensor([float(self._stop)])
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    self._stop = bool(flag.item())
                if self._stop or self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                if self._stop:
                    if main:
                        print(f"\ninterrupted at step {self.step}; checkpoint saved; resume with: gen3d world "
                              f"{self.verb} --resume work_dir={cfg.work_dir}", file=sys.stderr)
                    raise KeyboardInterrupt
        finally:
            bar.close()
            if log is not None:
                log.close()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        self.save_checkpoint()
        self.on_end()
        out = self.export() if main else Path(cfg.output)
        if self.world_size > 1:
            dist.barrier()  # the export is complete when any rank returns
        return out

    def exported_model(self) -> torch.nn.Module:
        """The EMA if there is one, else the model."""
        return self.ema if self.ema is not None else self.model


# ---- several processes ---------------------------------------------------------------------------------
MAX_NONFINITE_STEPS = 10
"""Skipped steps in a row after which a world trainer stops (`skip_nonfinite`)."""


def skip_nonfinite(trainer, loss: torch.Tensor, params: list[torch.Tensor]) -> bool:
    """Whether this step must be skipped because its loss or a gradient is NaN/Inf (after backward): the world
    trainers' counterpart of `gen3d.systems.base.System.optimize`. Skipped steps make no update (nor EMA), are counted
    (``trainer.nonfinite_steps``) and reported; more than `MAX_NONFINITE_STEPS` in a row stop the training with advice,
    the last checkpoint intact."""
    from gen3d.losses import grads_finite

    loss_finite = bool(torch.isfinite(loss.detach()).all())
    if loss_finite and grads_finite(params):
        trainer._nonfinite_run = 0
        return False
    trainer._nonfinite_run = getattr(trainer, "_nonfinite_run", 0) + 1
    trainer.nonfinite_steps = getattr(trainer, "nonfinite_steps", 0) + 1
    for p in params:
        p.grad = None
    what = "a gradient" if loss_finite else "the loss"
    if trainer._nonfinite_run > MAX_NONFINITE_STEPS:
        from gen3d.errors import Gen3dError

        raise Gen3dError(f"{what} was NaN/Inf for {trainer._nonfinite_run} steps in a row (step {trainer.step + 1}); "
                         f"the last checkpoint in {trainer.cfg.work_dir} is intact: lower lr and resume with "
                         f"gen3d world {trainer.verb} --resume work_dir={trainer.cfg.work_dir} lr=...")
    tqdm.write(f"warning: step {trainer.step + 1} skipped: {what} is not finite "
               f"({trainer.nonfinite_steps} skipped so far)", file=sys.stderr)
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, trainer_cls: type, cfg: TrainConfig, world_size: int, port: int, resume: bool,
            results) -> None:
    import os

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        trainer = trainer_cls(cfg)
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


def run_distributed(trainer_cls: type, cfg: TrainConfig, world_size: int, resume: bool = False,
                    timeout: float | None = None) -> dict[int, str]:
    """Train `trainer_cls(cfg)` in `world_size` CPU processes (gloo, on 127.0.0.1 and a free port), each running
    `fit` (after `resume()` if `resume`).

    Returns each rank's `parameter_checksum` of its final model (equal on all ranks after DDP training).
    A rank's error is raised here (`torch.multiprocessing.ProcessRaisedException`); with `timeout`
    (seconds), processes still running then are terminated and `TimeoutError` is raised.
    """
    import torch.multiprocessing as mp

    if world_size < 1:
        raise ValueError(f"run_distributed: world_size must be >= 1, got {world_size}")
    results = mp.get_context("spawn").SimpleQueue()
    ctx = mp.start_processes(_worker, args=(trainer_cls, cfg, world_size, _free_port(), resume, results),
                             nprocs=world_size, join=False, start_method="spawn")
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
        rank_, checksum = results.get()
        out[rank_] = checksum
    return out
