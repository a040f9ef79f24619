"""Run folders, ``@last``, and atomic checkpoints.

A run lives in ``<output_dir>/<system>/<prompt-slug>@<YYYYmmdd-HHMMSS>/``::

    config.yaml          the resolved config (what `--resume` reloads)
    log.txt              everything the run printed
    metrics.jsonl        one JSON object per logged step
    val/step-000100.png  validation renders (rgb | alpha over a fixed orbit)
    checkpoints/step-000500/   model.safetensors + state.pt + meta.json, written atomically
    video/turntable.mp4  turntable at the end (.gif where no mp4 encoder exists)
    export/              model.ply (3DGS layout), mesh.glb, ...

A checkpoint is a folder written under a temporary name and renamed into place, so a crash
while saving leaves the previous checkpoint intact. ``meta.json`` makes it self-describing.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gen3d.errors import CheckpointError, Gen3dError
from gen3d.io import atomic_folder

TIMESTAMP = "%Y%m%d-%H%M%S"
CHECKPOINT_RE = re.compile(r"^step-(\d{6,})$")


def slugify(text: str, max_len: int = 48) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return slug[:max_len].rstrip("_") or "run"


def new_run_dir(output_dir: str | Path, system: str, name: str, now: _dt.datetime | None = None) -> Path:
    """Create a fresh run folder; fails with a clear error when `output_dir` is not writable."""
    stamp = (now or _dt.datetime.now()).strftime(TIMESTAMP)
    base = Path(output_dir) / system
    run = base / f"{slugify(name)}@{stamp}"
    i = 1
    while run.exists():  # two runs in the same second
        run = base / f"{slugify(name)}@{stamp}-{i}"
        i += 1
    try:
        run.mkdir(parents=True)
        probe = run / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise Gen3dError(
            f"cannot write the run folder under '{output_dir}' ({exc.strerror or exc}); "
            f"pass output_dir=<a writable folder>"
        ) from None
    return run


def _stamp_of(run: Path) -> str:
    return run.name.rsplit("@", 1)[-1]


def list_runs(output_dir: str | Path) -> list[Path]:
    """All run folders under `output_dir`, oldest first."""
    root = Path(output_dir)
    runs = [p.parent for p in root.glob("*/*@*/config.yaml")]
    return sorted(runs, key=lambda p: (_stamp_of(p), p.stat().st_mtime))


def resolve_run(ref: str, output_dir: str | Path = "outputs") -> Path:
    """``@last`` (newest run), ``@last:<system>``, or a run folder path -> run folder."""
    if ref.startswith("@last"):
        system = ref.partition(":")[2]
        runs = [r for r in list_runs(output_dir) if not system or r.parent.name == system]
        if not runs:
            where = f" of system '{system}'" if system else ""
            raise Gen3dError(f"no runs{where} under '{output_dir}' for {ref}; start one with: gen3d run dreamgaussian prompt=\"...\"")
        return runs[-1]
    path = Path(ref)
    if not (path / "config.yaml").is_file():
        raise Gen3dError(f"'{ref}' is not a run folder (it has no config.yaml); name a folder under outputs/ or use @last")
    return path


@dataclass
class Checkpoint:
    step: int
    model: dict[str, torch.Tensor]  # parameters, saved as safetensors
    state: dict[str, Any]  # optimizer, strategy, RNG states, ...
    meta: dict[str, Any]
    path: Path


def checkpoint_dirs(run: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = run / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and CHECKPOINT_RE.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))


def save_checkpoint(run: Path, step: int, model: dict[str, torch.Tensor], state: dict[str, Any],
                    meta: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint `step` atomically (temporary folder, then rename) and keep the newest `keep`."""
    root = run / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    with atomic_folder(final) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.items()}, str(tmp / "model.safetensors"))
        torch.save(state, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=2))
    for old in checkpoint_dirs(run)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> Checkpoint:
    """Load one checkpoint folder; a damaged one raises `CheckpointError` naming what is wrong."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        model = load_file(str(path / "model.safetensors"))
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError, SafetensorError, json.JSONDecodeError, EOFError) as exc:
        raise CheckpointError(f"checkpoint '{path}' is damaged ({type(exc).__name__}: {str(exc)[:200]})") from None
    return Checkpoint(step=int(meta["step"]), model=model, state=state, meta=meta, path=path)


def latest_checkpoint(run: Path, warn=print) -> Checkpoint | None:
    """The newest checkpoint that loads; damaged ones are reported and skipped, never deleted."""
    errors = []
    for path in reversed(checkpoint_dirs(run)):
        try:
            return load_checkpoint(path)
        except CheckpointError as exc:
            errors.append(str(exc))
            warn(f"warning: {exc}; trying an older checkpoint")
    if errors:
        raise CheckpointError(
            f"no usable checkpoint in '{run}': {'; '.join(errors)}; start a new run instead of --resume"
        )
    return None
