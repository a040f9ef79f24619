import datetime as dt
import json

import pytest
import torch

from gen3d.errors import CheckpointError, Gen3dError
from gen3d.io import atomic_path
from gen3d.runs import checkpoint_dirs, latest_checkpoint, list_runs, new_run_dir, resolve_run, save_checkpoint, slugify


def test_slug_and_layout(tmp_path):
    run = new_run_dir(tmp_path, "dreamgaussian", "A Red Mug!", now=dt.datetime(2026, 1, 2, 3, 4, 5))
    assert run == tmp_path / "dreamgaussian" / "a_red_mug@20260102-030405"
    again = new_run_dir(tmp_path, "dreamgaussian", "A Red Mug!", now=dt.datetime(2026, 1, 2, 3, 4, 5))
    assert again.name == "a_red_mug@20260102-030405-1"
    assert slugify("   ") == "run"


def test_last_is_the_newest_run(tmp_path):
    with pytest.raises(Gen3dError, match="no runs"):
        resolve_run("@last", tmp_path)
    for i, system in enumerate(["a", "b", "a"]):
        run = new_run_dir(tmp_path, system, f"p{i}", now=dt.datetime(2026, 1, 1, 0, 0, i))
        (run / "config.yaml").write_text("system: x\n")
    assert resolve_run("@last", tmp_path).name == "p2@20260101-000002"
    assert resolve_run("@last:b", tmp_path).name == "p1@20260101-000001"
    assert len(list_runs(tmp_path)) == 3
    with pytest.raises(Gen3dError, match="not a run folder"):
        resolve_run(str(tmp_path), tmp_path)


def test_unwritable_output_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(Gen3dError, match="cannot write the run folder .* pass output_dir="):
        new_run_dir(blocker / "sub", "dreamgaussian", "x")


def _save(run, step, value=1.0):
    return save_checkpoint(run, step, {"w": torch.full((3,), value)}, {"opt": {"lr": 0.1}}, {"system": "s"}, keep=2)


def test_checkpoints_keep_the_newest_and_load(tmp_path):
    for s in (10, 20, 30):
        _save(tmp_path, s, float(s))
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-000020", "step-000030"]
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.step == 30 and ckpt.model["w"][0] == 30.0 and ckpt.state["opt"]["lr"] == 0.1
    assert json.loads((ckpt.path / "meta.json").read_text())["system"] == "s"


def test_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    _save(tmp_path, 10)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        _save(tmp_path, 20)
    monkeypatch.undo()
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-000010"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    assert latest_checkpoint(tmp_path).step == 10


def test_damaged_checkpoint_falls_back_then_fails_clearly(tmp_path):
    _save(tmp_path, 10)
    newest = _save(tmp_path, 20)
    (newest / "model.safetensors").write_bytes(b"garbage")
    warnings = []
    assert latest_checkpoint(tmp_path, warn=warnings.append).step == 10
    assert "damaged" in warnings[0]
    (checkpoint_dirs(tmp_path)[0] / "state.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        latest_checkpoint(tmp_path, warn=warnings.append)


def test_atomic_path_keeps_old_file_on_error(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("fail midway")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
