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
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from gen3d.errors import CheckpointError, Gen3dError
from gen3d.io import atomic_folder

TIMESTAMP = "%Y%m%d-%H%M%S"
CHECKPOINT_RE = re.compile(r"^step-(\d{6,})$")
FORMAT_VERSION = 1  # raise it (and read the old layouts) when the checkpoint layout changes
CHECKPOINT_FORMAT = f"gen3d-checkpoint-{FORMAT_VERSION}"


class NewerCheckpoint(CheckpointError):
    """A checkpoint in a format newer than this gen3d reads."""


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
        check_run_config(runs[-1])
        return runs[-1]
    path = Path(ref)
    if not (path / "config.yaml").is_file():
        raise Gen3dError(f"'{ref}' is not a run folder (it has no config.yaml); name a folder under outputs/ or use @last")
    check_run_config(path)
    return path


def check_run_config(run: Path) -> None:
    """Fail with one clear line when the run's config.yaml (what resume and export rebuild the run from) is not
    a readable YAML mapping naming its system: a damaged file, not a config for the loader to puzzle over."""
    import yaml

    path = run / "config.yaml"
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        mark = getattr(exc, "problem_mark", None)
        reason = (f"{type(exc).__name__}" + (f" at line {mark.line + 1}" if mark else "")
                  + f": {getattr(exc, 'problem', None) or getattr(exc, 'strerror', None) or _first_line(exc)}")
        raise Gen3dError(f"the run's config file '{path}' is damaged ({reason}); restore it (it is the run's resolved "
                         "config) or start a new run") from None
    if not isinstance(data, dict) or not data.get("system"):
        raise Gen3dError(f"the run's config file '{path}' is damaged (it does not name its system); restore it (it "
                         "is the run's resolved config) or start a new run")


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
    """Write checkpoint `step` atomically (temporary folder, then rename) and keep the newest `keep`.

    A full disk or an unwritable folder is an OSError that `atomic_folder` turns into one clear `Gen3dError`
    (torch.save and safetensors would report it as an opaque RuntimeError: the weights are serialized in memory
    and written with a plain file write, state.pt through a file that keeps the OSError); the older checkpoints
    are then left as they were.
    """
    from gen3d import __version__

    final = run / "checkpoints" / f"step-{step:06d}"
    weights = save({k: v.detach().contiguous().cpu() for k, v in model.items()})
    meta = {"format": CHECKPOINT_FORMAT, **meta, "step": step, "gen3d_version": __version__}
    with atomic_folder(final) as tmp:
        (tmp / "model.safetensors").write_bytes(weights)
        with open(tmp / "state.pt", "wb") as f:
            out = _KeepsWriteErrors(f)
            try:
                torch.save(state, out)
            except RuntimeError:
                if out.error is not None:
                    raise out.error from None
                raise
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    for old in checkpoint_dirs(run)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


class _KeepsWriteErrors:
    """A binary file whose failed write is kept in `error`, for writers that replace it by their own exception."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.f.flush()


def load_checkpoint(path: Path) -> Checkpoint:
    """Load one checkpoint folder; a damaged one raises `CheckpointError` naming what is wrong, one written by a
    newer gen3d `NewerCheckpoint`."""
    meta = read_meta(path)
    try:
        model = load_file(str(path / "model.safetensors"))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint '{path}' is damaged: it has no model.safetensors") from None
    except (OSError, SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint '{path}' is damaged: model.safetensors cannot be read "
                              f"({type(exc).__name__}: {_first_line(exc)})") from None
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint '{path}' is damaged: it has no state.pt") from None
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"checkpoint '{path}' is damaged: state.pt cannot be read "
                              f"({type(exc).__name__}: {_first_line(exc)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint '{path}' is damaged: state.pt holds a {type(state).__name__}, not a dict")
    return Checkpoint(step=meta["step"], model=model, state=state, meta=meta, path=path)


def read_meta(path: Path) -> dict[str, Any]:
    """The meta.json of checkpoint folder `path`, checked: a dict with an integer step, in a format this gen3d
    reads (`CHECKPOINT_FORMAT`; none: an early gen3d-checkpoint-1)."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint '{path}' is damaged: it has no meta.json") from None
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"checkpoint '{path}' is damaged: meta.json is not valid JSON "
                              f"({type(exc).__name__}: {_first_line(exc)})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int) or isinstance(meta["step"], bool):
        raise CheckpointError(f"checkpoint '{path}' is damaged: meta.json has no integer 'step'")
    fmt = meta.get("format", CHECKPOINT_FORMAT)
    match = re.fullmatch(r"gen3d-checkpoint-(\d+)", str(fmt))
    if match is None:
        raise CheckpointError(f"checkpoint '{path}' is not a gen3d checkpoint (its meta.json says format "
                              f"{fmt!r}); name a run folder written by gen3d")
    if int(match.group(1)) > FORMAT_VERSION:
        from gen3d import __version__

        raise NewerCheckpoint(
            f"checkpoint '{path}' was written by gen3d {meta.get('gen3d_version', '(a newer version)')} in format {fmt}, "
            f"but this gen3d {__version__} reads only {CHECKPOINT_FORMAT}; upgrade gen3d (pip install -U gen3d)")
    return meta


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0][:200]


def latest_checkpoint(run: Path, warn=print) -> Checkpoint | None:
    """The newest checkpoint that loads; damaged ones are reported and skipped, never deleted. A checkpoint written
    by a newer gen3d stops the search (`NewerCheckpoint`): resuming from an older one would overwrite its progress."""
    errors = []
    for path in reversed(checkpoint_dirs(run)):
        try:
            return load_checkpoint(path)
        except NewerCheckpoint:
            raise
        except CheckpointError as exc:
            errors.append(str(exc))
            warn(f"warning: {exc}; trying an older checkpoint")
    if errors:
        raise CheckpointError(
            f"no usable checkpoint in '{run}': {'; '.join(errors)}; start a new run instead of --resume"
        )
    return None
