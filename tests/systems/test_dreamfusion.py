"""The neural-field recipe (DreamFusion / Magic3D coarse) end to end on a tiny real prior."""

import json

import numpy as np
import pytest
import torch
import trimesh

from gen3d.cli import load_run_config, main
from gen3d.runs import latest_checkpoint, new_run_dir, resolve_run
from gen3d.systems.base import write_config
from tests.systems.conftest import fast_overrides, straight_and_resumed


def run_cli(*argv):
    return main(list(argv))


@pytest.mark.parametrize("preset, extra", [
    ("dreamfusion-if", ["renderer.grid_resolution=16"]),  # hash grid, diffuse shading, normals, orientation loss
    ("dreamfusion-triplane", []),  # triplane, albedo
])
def test_run_resume_export(preset, extra, tiny_pixel_prior, tmp_path):
    out = tmp_path / "outputs"
    o = fast_overrides(tiny_pixel_prior, out, system="dreamfusion")
    assert run_cli("run", preset, "prompt=a red mug", *o, *extra) == 0
    run = resolve_run("@last", out)
    assert run.parent.name == "dreamfusion"
    for rel in ["config.yaml", "metrics.jsonl", "val/step-000004.png", "export/mesh.glb"]:
        assert (run / rel).is_file(), rel
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    assert all(np.isfinite(line["loss"]) and line["samples_per_ray"] > 0 for line in lines)
    if preset == "dreamfusion-if":
        assert all(line["orient"] >= 0 for line in lines)
    mesh = trimesh.load(run / "export" / "mesh.glb", force="mesh")
    assert len(mesh.faces) > 0 and mesh.visual.kind == "texture"  # the baked albedo (texture_size)
    # the untrained blob has radius ~0.5: the mesh is a closed ball of about that size
    extent = mesh.bounding_box.extents.max()
    assert 0.6 < extent < 1.4, extent
    assert run_cli("run", "@last", "--resume", f"output_dir={out}", "max_steps=6") == 0
    assert latest_checkpoint(run).step == 6
    assert run_cli("export", str(run), "--format", "obj", "--output", str(tmp_path / "m.obj")) == 0
    assert len(trimesh.load(tmp_path / "m.obj", force="mesh").faces) > 0


def test_interrupted_and_resumed_run_matches_uninterrupted(tiny_pixel_prior, tmp_path):
    straight, resumed = straight_and_resumed("dreamfusion", tiny_pixel_prior, tmp_path, steps=5, stop_at=3,
                                             overrides=["renderer.grid_update_interval=2"], system="dreamfusion")
    a, b = straight.model_tensors(), resumed.model_tensors()
    assert a.keys() == b.keys() and any(k.startswith("renderer.grid") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_training_moves_the_field_and_uses_the_occupancy_grid(tiny_pixel_prior, tmp_path):
    o = fast_overrides(tiny_pixel_prior, tmp_path, steps=6, system="dreamfusion")
    system_cls, cfg = load_run_config("magic3d-coarse", ["prompt=a red mug", *o, "turntable_frames=0", "exports=[]"])
    run = new_run_dir(cfg.output_dir, system_cls.name, cfg.prompt)
    write_config(run, cfg)
    system = system_cls(cfg, run)
    before = {k: v.clone() for k, v in system.model_tensors().items()}
    system.fit()
    after = system.model_tensors()
    assert not torch.equal(before["field.tables"], after["field.tables"])
    assert any(k.startswith("renderer.background_mlp") and not torch.equal(before[k], after[k]) for k in after)
    assert system.renderer.grid.occupied_fraction() < 0.5  # the blob fills a small part of the box
    q = system.query()
    inside, outside = q.occupancy(torch.tensor([[0.0, 0.0, 0.0], [0.95, 0.95, 0.95]]))
    assert inside > 0.5 > outside


@pytest.mark.parametrize("override, message", [
    ("geometry=voxels", "geometry must be one of"),
    ("mesh_threshold=dense", "mesh_threshold must be 'auto' or a positive number"),
    ("renderer.normals=sideways", "renderer.normals must be"),
    ("hashgrid.log2_hashmap_size=40", "log2_hashmap_size"),
])
def test_bad_config_is_one_line(override, message, tiny_pixel_prior, tmp_path, capsys):
    o = fast_overrides(tiny_pixel_prior, tmp_path / "out", system="dreamfusion")
    assert run_cli("run", "dreamfusion", "prompt=a red mug", *o, override) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("checkpoints"))


def test_ply_export_of_a_field_says_to_convert(tiny_pixel_prior, tmp_path, capsys):
    out = tmp_path / "outputs"
    o = fast_overrides(tiny_pixel_prior, out, steps=2, system="dreamfusion")
    assert run_cli("run", "dreamfusion", "prompt=a red mug", *o, "exports=[]", "turntable_frames=0") == 0
    assert run_cli("export", str(resolve_run("@last", out)), "--format", "splat-ply") == 2
    assert "gen3d convert" in capsys.readouterr().err
