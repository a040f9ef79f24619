"""`gen3d convert`: distill a field of known shape into a triplane and into 3D Gaussians, then export and resume.

The source is a small hash-grid dreamfusion run whose field is fitted (no prior involved) to a known
shape, an off-center ball half red and half blue, so that the PSNR of the converted renders against
the source's measures the conversion: a fresh triplane (Magic3D's blob) or Gaussians scattered on the
surface with the wrong extent start far from it, and the distillation must close the gap.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gen3d.cli import load_run_config, main
from gen3d.runs import latest_checkpoint, new_run_dir, save_checkpoint
from gen3d.systems.base import write_config
from gen3d.systems.convert import ConvertConfig, convert_run

SMALL_FIELD = ["hashgrid.num_levels=6", "hashgrid.log2_hashmap_size=13", "hashgrid.finest_resolution=64",
               "triplane.resolution=32", "triplane.num_features=8", "renderer.samples_per_ray=64",
               "mesh_resolution=32", "cameras.eval_size=32", "render_size=16", "cameras.batch_size=1"]
FAST = ConvertConfig(render_size=32, batch_size=2, points=4096, grid_resolution=32, eval_size=32, progress=False)
CENTER, RADIUS = torch.tensor([0.15, 0.0, 0.05]), 0.35


def ball(points):
    """Density [P] (80 inside, a 0.01-wide edge) and albedo [P, 3] (red above z = 0.05, blue below)."""
    sigma = 80 * torch.sigmoid((RADIUS - (points - CENTER).norm(dim=-1)) / 0.01)
    albedo = torch.where(points[:, 2:] > 0.05, torch.tensor([0.9, 0.1, 0.1]), torch.tensor([0.1, 0.2, 0.9]))
    return sigma, albedo


@pytest.fixture(scope="module")
def source_run(tiny_pixel_prior, tmp_path_factory):
    out = tmp_path_factory.mktemp("convert")
    system_cls, cfg = load_run_config("dreamfusion", [
        "prompt=a red mug", f"prior={tiny_pixel_prior}", f"output_dir={out}", "progress=false", "max_steps=8",
        "hashgrid.density_bias=none", "turntable_frames=0", *SMALL_FIELD])
    run = new_run_dir(cfg.output_dir, system_cls.name, cfg.prompt)
    write_config(run, cfg)
    source = system_cls(cfg, run)
    field, delta = source.field, cfg.renderer.step_size
    optimizer = torch.optim.Adam(field.param_groups(0.03, 0.01), betas=(0.9, 0.99), eps=1e-15)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):  # fit the per-step opacity and the opacity-weighted albedo to the ball's
        x = torch.cat([torch.rand(4096, 3, generator=gen) * 2 - 1,
                       CENTER + (torch.rand(4096, 3, generator=gen) * 2 - 1) * (RADIUS + 0.1)])
        sigma, albedo = ball(x)
        out = field(x)
        a_t, a_s = -torch.expm1(-sigma * delta), -torch.expm1(-out.density * delta)
        loss = (a_s - a_t).square().mean() + (a_t[:, None] * (out.features - albedo).square()).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.01
    save_checkpoint(run, 8, source.model_tensors(), {"training": {}, "generator": source.generator.get_state()},
                    {"system": "dreamfusion", "format": "gen3d-checkpoint-1", "max_steps": 8})
    return run


def check_report(run, source_run, to, report):
    assert json.loads((run / "convert.json").read_text()) == report
    assert report["source"] == str(source_run) and report["target"] == to and report["steps"] == 60
    assert (run / "config.yaml").is_file() and (run / "val" / "step-000000.png").is_file()
    ckpt = latest_checkpoint(run)
    assert ckpt.step == 0 and ckpt.state["training"] == {}
    a, b = report["initial"], report["final"]
    assert b["psnr"] > a["psnr"] + 6 and b["psnr"] > 24, (a, b)
    assert b["alpha_mae"] < a["alpha_mae"] / 2 and b["silhouette_iou"] > 0.9, (a, b)


def resume_one_step(run, prefix):
    before = load_file(str(run / "checkpoints" / "step-000000" / "model.safetensors"))
    assert main(["run", str(run), "--resume", "max_steps=1", "turntable_frames=0", "val_every=0", "exports=[]"]) == 0
    after = latest_checkpoint(run)
    assert after.step == 1 and after.state["training"]  # SDS trained from the converted model, with an optimizer
    key = next(k for k in before if k.startswith(prefix))
    assert after.model[key].shape == before[key].shape and not torch.equal(after.model[key], before[key])


def test_field_to_triplane_exports_and_resumes(source_run, capsys):
    run, report = convert_run(source_run, "triplane", steps=60, settings=FAST)
    assert run.parent.name == "dreamfusion" and run.parent.parent == source_run.parent.parent
    _, cfg = load_run_config(str(run), [])
    assert cfg.geometry == "triplane" and cfg.triplane.resolution == 32 and cfg.prompt == "a red mug"
    check_report(run, source_run, "triplane", report)
    assert main(["export", str(run), "--format", "glb"]) == 0
    assert (run / "export" / "mesh.glb").stat().st_size > 1000
    resume_one_step(run, "field.planes")


@pytest.fixture(scope="module")
def gaussian_run(source_run):
    return convert_run(source_run, "gaussians", steps=60, overrides=["gaussians.num_points=300", "render_sizes=[16]",
                                                                      "cameras.batch_size=1"], settings=FAST)


def test_field_to_gaussians_exports_and_resumes(source_run, gaussian_run):
    run, report = gaussian_run
    assert run.parent.name == "dreamgaussian"
    _, cfg = load_run_config(str(run), [])
    assert cfg.cameras.eval_distance == 2.25 and cfg.prompt == "a red mug"  # the source's cameras and prompt
    check_report(run, source_run, "gaussians", report)
    assert latest_checkpoint(run).model["means"].shape == (300, 3)
    assert main(["export", str(run), "--format", "splat-ply"]) == 0
    assert (run / "export" / "model.ply").is_file()
    resume_one_step(run, "sh0")


def test_gaussians_to_field(gaussian_run):
    source, _ = gaussian_run
    small = [o for o in SMALL_FIELD if not o.startswith("cameras.")]
    run, report = convert_run(source, "hashgrid", steps=60, overrides=small, settings=FAST)
    check_report(run, source, "hashgrid", report)


def test_cli_prints_the_new_run_and_its_psnr(source_run, capsys):
    assert main(["convert", str(source_run), "to=hashgrid", "steps=2", "convert.render_size=16", "convert.views=4",
                 "convert.eval_size=16", "convert.eval_views=2", "convert.progress=false"]) == 0
    new, line = capsys.readouterr().out.strip().splitlines()
    assert json.loads((Path(new) / "convert.json").read_text())["steps"] == 2
    assert line.startswith("PSNR vs source: ") and " dB at init -> " in line


@pytest.mark.parametrize("args, message", [
    (["to=mesh"], "choose one of: hashgrid, triplane, gaussians"),
    ([], "say what to convert to"),
    (["to=triplane", "steps=many"], "steps must be a whole number"),
    (["to=triplane", "convert.pionts=3"], "did you mean 'points'"),
    (["to=triplane", "triplane.resolutoin=3"], "did you mean 'triplane.resolution'"),
])
def test_cli_bad_input_is_one_line(source_run, capsys, args, message):
    runs = set(source_run.parent.parent.glob("*/*"))
    assert main(["convert", str(source_run), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert set(source_run.parent.parent.glob("*/*")) == runs  # no run folder left behind


def test_cli_missing_run_and_run_without_checkpoint(tmp_path, source_run, capsys):
    assert main(["convert", str(tmp_path / "nowhere"), "to=triplane"]) == 2
    assert "is not a run folder" in capsys.readouterr().err
    empty = tmp_path / "dreamfusion" / "a_red_mug@20260101-000000"
    empty.mkdir(parents=True)
    (empty / "config.yaml").write_text((source_run / "config.yaml").read_text())
    assert main(["convert", str(empty), "to=gaussians"]) == 2
    assert "has no checkpoint yet, so there is nothing to convert" in capsys.readouterr().err
