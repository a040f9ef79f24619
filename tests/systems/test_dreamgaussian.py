"""End-to-end runs of the DreamGaussian recipe on tiny random diffusers priors (real components)."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from plyfile import PlyData

from gen3d.cli import main
from gen3d.runs import latest_checkpoint, resolve_run
from tests.systems.conftest import fast_overrides, straight_and_resumed

REPO = Path(__file__).resolve().parents[2]


def run_cli(*argv):
    return main(list(argv))


def test_run_resume_export_end_to_end(tiny_pixel_prior, tmp_path, capsys):
    out = tmp_path / "outputs"
    assert run_cli("run", "dreamgaussian", "prompt=a red mug", *fast_overrides(tiny_pixel_prior, out)) == 0
    run = resolve_run("@last", out)
    assert run.parent.name == "dreamgaussian" and run.name.startswith("a_red_mug@")
    for rel in ["config.yaml", "log.txt", "metrics.jsonl", "val/step-000002.png", "val/step-000004.png",
                "export/model.ply", "export/mesh.glb"]:
        assert (run / rel).is_file(), rel
    assert (run / "video" / "turntable.mp4").is_file() or (run / "video" / "turntable.gif").is_file()
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3, 4] and all(np.isfinite(l["loss"]) for l in lines)
    ply = PlyData.read(str(run / "export" / "model.ply"))
    names = [p.name for p in ply["vertex"].properties]
    assert names[:9] == ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    assert names[-8:] == ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]

    # resume past the end: raise max_steps and continue the same run folder
    assert run_cli("run", "@last", "--resume", f"output_dir={out}", "max_steps=6") == 0
    assert latest_checkpoint(run).step == 6
    assert resolve_run("@last", out) == run

    # export again, to a chosen file
    target = tmp_path / "again.ply"
    assert run_cli("export", str(run), "--format", "splat-ply", "--output", str(target)) == 0
    assert PlyData.read(str(target))["vertex"].count == latest_checkpoint(run).model["means"].shape[0]

    # no --format: the run's own exports, written again; mesh-ply is the old name of the mesh ply
    (run / "export" / "mesh.glb").unlink()
    assert run_cli("export", str(run)) == 0
    assert (run / "export" / "mesh.glb").is_file()
    assert run_cli("export", str(run), "--format", "mesh-ply") == 0
    assert trimesh.load(run / "export" / "mesh.ply", force="mesh").visual.kind == "vertex"
    capsys.readouterr()
    assert run_cli("export", str(run), "--format", "glb", "obj", "--output", str(tmp_path / "x.glb")) == 2
    assert "--output names one file" in capsys.readouterr().err
    assert run_cli("export", str(run), "exports=[]") == 2
    assert "lists no exports" in capsys.readouterr().err
    assert run_cli("export", str(run), "--format", "glb", "mesh_faces=2") == 2
    assert "mesh_faces" in capsys.readouterr().err
    assert run_cli("export", str(run), "--format", "gltf") == 2
    assert "unknown export format 'gltf'" in capsys.readouterr().err
    assert run_cli("export", str(run), "--format", "ply", "mesh_faces=300") == 0  # overrides after --format
    assert len(trimesh.load(run / "export" / "mesh.ply", force="mesh").faces) <= 300


def test_interrupted_and_resumed_run_matches_uninterrupted(tiny_pixel_prior, tmp_path):
    straight, resumed = straight_and_resumed("dreamgaussian", tiny_pixel_prior, tmp_path, steps=6, stop_at=3)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_ctrl_c_saves_and_resume_finishes(tiny_pixel_prior, tmp_path):
    out = tmp_path / "outputs"
    cmd = [sys.executable, "-m", "gen3d", "run", "dreamgaussian", "prompt=a red mug",
           *fast_overrides(tiny_pixel_prior, out, steps=400), "checkpoint_every=0", "val_every=0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.time() + 300  # start-up (imports, the C++ extension) is slow on a loaded machine
    metrics = None
    while time.time() < deadline:
        found = list(out.glob("dreamgaussian/*/metrics.jsonl"))
        if found and len(found[0].read_text().splitlines()) >= 3:
            metrics = found[0]
            break
        time.sleep(0.2)
    assert metrics is not None, proc.communicate(timeout=10)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "checkpoint saved; resume with: gen3d run" in err
    run = metrics.parent
    step = latest_checkpoint(run).step
    assert 3 <= step < 400
    assert run_cli("run", str(run), "--resume", f"max_steps={step + 2}", "turntable_frames=2") == 0
    assert latest_checkpoint(run).step == step + 2
    assert (run / "export" / "model.ply").is_file()


def test_latent_prior_runs(tiny_latent_prior, tmp_path):
    out = tmp_path / "outputs"
    assert run_cli("run", "dreamgaussian", "prompt=a blue cube", *fast_overrides(tiny_latent_prior, out, steps=2),
                   "turntable_frames=0", "exports=[splat-ply]") == 0


@pytest.mark.parametrize("override, message", [
    ("prompt=", "prompt is empty"),
    ("promt=a mug", "did you mean 'prompt'"),
    ("prior=no/such-model", "not available offline"),
    ("background=green", "background must be one of"),
])
def test_bad_input_is_one_line_and_leaves_no_run(tiny_pixel_prior, tmp_path, capsys, override, message):
    out = tmp_path / "outputs"
    base = [o for o in fast_overrides(tiny_pixel_prior, out) if not o.startswith(override.split("=")[0] + "=")]
    assert run_cli("run", "dreamgaussian", "prompt=a mug", *base, override) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert not list(out.glob("dreamgaussian/*"))


def test_resume_with_incompatible_config_is_a_clear_error(tiny_pixel_prior, tmp_path, capsys):
    out = tmp_path / "outputs"
    assert run_cli("run", "dreamgaussian", "prompt=a mug", *fast_overrides(tiny_pixel_prior, out, steps=2),
                   "turntable_frames=0", "exports=[]") == 0
    assert run_cli("run", "@last", "--resume", f"output_dir={out}", "max_steps=4", "gaussians.sh_degree=2") == 2
    assert "does not fit this config" in capsys.readouterr().err
    assert latest_checkpoint(resolve_run("@last", out)).step == 2


def test_help_and_configs(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "run" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "--resume" in capsys.readouterr().out
    assert main(["configs"]) == 0
    assert "dreamgaussian" in capsys.readouterr().out
    assert main(["run", "dreamgaussian", "--show-config"]) == 0
    assert "guidance.guidance_scale = 3.0  # " in capsys.readouterr().out
    assert main(["run", "dreamgaussian-sd", "--show-config"]) == 0
    assert "guidance.guidance_scale = 100.0  # " in capsys.readouterr().out


def test_unwritable_output_dir(tiny_pixel_prior, tmp_path, capsys):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    base = [o for o in fast_overrides(tiny_pixel_prior, tmp_path) if not o.startswith("output_dir=")]
    assert run_cli("run", "dreamgaussian", "prompt=a mug", *base, f"output_dir={blocker}/runs") == 2
    assert "cannot write the run folder" in capsys.readouterr().err
    assert blocker.read_text() == ""


def test_binary_entropy_is_zero_for_binary_alpha_and_peaks_at_half():
    from gen3d.systems.dreamgaussian import binary_entropy

    assert binary_entropy(torch.tensor([0.0, 1.0, 1.0])).item() < 2e-3  # alpha is clamped to [1e-4, 1 - 1e-4]
    half = binary_entropy(torch.tensor([0.5]))
    assert half.item() == pytest.approx(np.log(2), rel=1e-4)
    assert binary_entropy(torch.tensor([0.2])) < half


def test_opaque_regularizer_runs(tiny_pixel_prior, tmp_path):
    out = tmp_path / "outputs"
    assert run_cli("run", "dreamgaussian", "prompt=a mug", *fast_overrides(tiny_pixel_prior, out, steps=2),
                   "turntable_frames=0", "exports=[]", "lambda_opaque=1.0") == 0


def test_cli_resume_of_a_densified_run_keeps_training(tiny_pixel_prior, tmp_path):
    """`gen3d run RUN --resume` builds the optimizer before loading a checkpoint whose number of Gaussians
    grew; the resumed steps must still move the loaded parameters."""
    out = tmp_path / "outputs"
    assert run_cli("run", "dreamgaussian", "prompt=a red mug", *fast_overrides(tiny_pixel_prior, out),
                   "exports=[]", "turntable_frames=0") == 0
    run = resolve_run("@last", out)
    before = latest_checkpoint(run).model
    assert before["means"].shape[0] != 200  # densified
    assert run_cli("run", str(run), "--resume", "max_steps=6", "densify.densify_until=4") == 0
    after = latest_checkpoint(run).model
    assert after["means"].shape == before["means"].shape
    assert not torch.equal(after["means"], before["means"]) and not torch.equal(after["sh0"], before["sh0"])
