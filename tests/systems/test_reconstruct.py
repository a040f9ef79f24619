"""Feed-forward reconstruction in use: `gen3d reconstruct` and image-to-3D runs initialized by it (init=tgs),
on the shipped reconstructor (gen3d/shapes-tgs) and view prior."""

import json

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image
from plyfile import PlyData
from safetensors.torch import load_file

from gen3d.cli import load_run_config, main
from gen3d.models.tgs import EMBEDDED_TGS, TGS, TGSConfig, load_tgs, prepare_input, reconstruct
from gen3d.rendering.gaussian import render_gaussians
from gen3d.representations.gaussians import GaussianConfig, GaussianModel
from gen3d.runs import resolve_run

FAST = ["turntable_frames=4", "cameras.eval_size=32", "texture_size=64", "mesh_resolution=32", "progress=false",
        "val_views=2"]
"""Outputs small enough for a test; the reconstruction itself is the shipped model at full size."""
TRAIN = ["max_steps=3", "image_size=32", "cameras.batch_size=2", "render_sizes=[16]", "render_size_milestones=[]",
         "densify.densify_from=1", "densify.densify_every=2", "val_every=0", "checkpoint_every=0",
         "turntable_frames=0", "exports=[]", "progress=false"]
"""A few SDS steps after the reconstruction (the refinement `gen3d resume` runs)."""


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a > 0.5, b > 0.5
    return ((a & b).sum() / (a | b).sum()).item()


def shipped_gaussians() -> int:
    return TGSConfig(**json.loads((EMBEDDED_TGS["gen3d/shapes-tgs"] / "config.json").read_text())).num_gaussians


def test_reconstruct_writes_ply_turntable_and_mesh(tmp_path, mug_png, capsys):
    out = tmp_path / "outputs"
    assert main(["reconstruct", str(mug_png), "elevation=15", f"output_dir={out}", *FAST, "--mesh"]) == 0
    run = resolve_run("@last", out)
    assert run.parent.name == "reconstruct" and run.name.startswith("blue_mug@")
    assert capsys.readouterr().out.strip() == str(run)
    ply = PlyData.read(str(run / "export" / "model.ply"))
    assert ply["vertex"].count == shipped_gaussians()
    assert {"x", "f_dc_0", "opacity", "scale_0", "rot_0"} <= {p.name for p in ply["vertex"].properties}
    mesh = trimesh.load(run / "export" / "mesh.glb", force="mesh")
    assert len(mesh.faces) > 50 and mesh.visual.uv is not None
    assert (run / "video" / "turntable.mp4").stat().st_size > 0 or (run / "video" / "turntable.gif").is_file()
    assert (run / "reference.png").is_file()
    meta = json.loads((run / "checkpoints" / "step-000000" / "meta.json").read_text())
    assert meta["system"] == "zero123" and meta["reconstructed_by"] == "gen3d/shapes-tgs" and meta["seconds"] > 0
    _, cfg = load_run_config(str(run), [])
    assert cfg.init == "tgs" and cfg.exports == ["splat-ply", "glb"]
    # the folder is a run: the viewer and export work on it
    from gen3d.viewer.snapshots import snapshot_of

    snapshot, _, _ = snapshot_of(str(run))
    assert snapshot.step == 0 and len(snapshot.splats.centers) == shipped_gaussians()
    assert main(["export", str(run), "--format", "obj", "texture_size=32", "mesh_resolution=24"]) == 0
    assert (run / "export" / "mesh.obj").is_file()


def test_the_reconstruction_is_the_held_out_object(tmp_path, mug_png):
    """The held-out blue mug, reconstructed in one pass from its known camera (recenter=false), is the mug: its
    silhouettes at the input and at four novel views and its Gaussians' centers match the ground truth far better
    than the random ball the optimization starts from. Recentered (`gen3d reconstruct`'s default framing) it still
    covers the prepared input's silhouette."""
    from gen3d.cameras import spherical_cameras
    from gen3d.world.catalog import WorldObject
    from gen3d.world.recon_data import build_recon_set, chamfer_distance
    from gen3d.world.render import render_object

    mug = WorldObject("mug", "blue")
    n = 4
    novel = spherical_cameras(torch.tensor([90.0, 180.0, 270.0, 45.0]), torch.full((n,), 30.0), torch.full((n,), 1.9),
                              torch.full((n,), 40.0), 64, 64)
    truth = render_object(mug, novel).alpha[..., 0]
    surface = build_recon_set([mug], views=1, size=8, points=2048).points

    def build(recenter: str):
        system_cls, cfg = load_run_config("image-to-3d", [f"image={mug_png}", "elevation=15", "init=tgs",
                                                          f"recenter={recenter}", "progress=false"])
        (tmp_path / recenter).mkdir()
        system = system_cls(cfg, tmp_path / recenter)
        return system, system.model, system.reconstruct()

    system, ball, model = build("false")
    white = torch.ones(1, 3)
    at_input = lambda m: mask_iou(render_gaussians(m, system.ref_camera, white).alpha[0, ..., 0],  # noqa: E731
                                  system.ref_mask[0, ..., 0])
    at_novel = lambda m: sum(mask_iou(a, t) for a, t in zip(  # noqa: E731
        render_gaussians(m, novel, torch.ones(n, 3)).alpha[..., 0], truth)) / n
    chamfer = lambda m: chamfer_distance(m.means[m.opacities > 0.05][None].detach(), surface).item()  # noqa: E731
    assert at_input(model) > 0.85 and at_input(model) > at_input(ball) + 0.1
    assert at_novel(model) > 0.85 and at_novel(model) > at_novel(ball) + 0.1
    assert chamfer(model) < 0.5 * chamfer(ball)
    assert system.recon_seconds > 0

    system, ball, model = build("true")
    assert at_input(model) > 0.65 and at_input(model) > at_input(ball)


def test_reconstruct_then_resume_equals_a_run_with_init_tgs(tmp_path, mug_png):
    """`gen3d reconstruct` + `gen3d resume` (SDS refinement) = `gen3d run image-to-3d init=tgs`, bit for bit."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["run", "image-to-3d", f"image={mug_png}", "init=tgs", f"output_dir={a}", *TRAIN]) == 0
    assert main(["reconstruct", str(mug_png), f"output_dir={b}", *TRAIN, "turntable_frames=0"]) == 0
    reconstructed = resolve_run("@last", b)
    assert main(["resume", str(reconstructed)]) == 0
    straight = load_file(str(resolve_run("@last", a) / "checkpoints" / "step-000003" / "model.safetensors"))
    resumed = load_file(str(reconstructed / "checkpoints" / "step-000003" / "model.safetensors"))
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    initial = load_file(str(reconstructed / "checkpoints" / "step-000000" / "model.safetensors"))
    assert not torch.equal(initial["means"], resumed["means"])  # SDS moved it


@pytest.mark.parametrize("args, message", [
    (["reconstruct", "missing.png"], "does not exist"),
    (["reconstruct", "{folder}"], "is a folder"),
    (["reconstruct", "{image}", "recon_model=/no/such/model"], "TGS model '/no/such/model' not found"),
    (["reconstruct", "{image}", "--config", "dreamgaussian"], "needs an image-to-3d"),
    (["reconstruct", "{image}", "init=tgz"], "init must be one of"),
    (["run", "image-to-3d", "image={image}", "init=tgs", "recon_model=/no/such/model"], "gen3d/shapes-tgs"),
])
def test_bad_input_is_one_line_and_leaves_no_run(tmp_path, mug_png, capsys, args, message):
    out = tmp_path / "outputs"
    args = [a.format(image=mug_png, folder=tmp_path) for a in args]
    assert main([*args, f"output_dir={out}", "progress=false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and message in err[-1]  # one line, after any progress lines
    assert sum(line.startswith("error:") for line in err) == 1
    assert not any(p.is_dir() for p in out.glob("*/*"))  # no run folder left behind


# ---- the loader and the one-view helper ----------------------------------------------------------------------


def test_load_tgs_errors_name_the_problem(tmp_path):
    from gen3d.errors import Gen3dError, PriorNotAvailable

    with pytest.raises(PriorNotAvailable, match="model.safetensors"):
        load_tgs(tmp_path)
    torch.manual_seed(0)
    net = TGS(TGSConfig.tiny())
    from safetensors.torch import save_file

    save_file(net.state_dict(), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"num_points": 64, "bogus": 1}))
    with pytest.raises(Gen3dError, match="config.json is not a TGSConfig"):
        load_tgs(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"num_points": 64}))
    with pytest.raises(Gen3dError, match="does not fit its config.json"):
        load_tgs(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({}))
    loaded = load_tgs(tmp_path)
    assert not loaded.training and all(torch.equal(a, b) for a, b in zip(loaded.parameters(), net.parameters()))


def test_reconstruct_pads_or_drops_sh_bands_and_prepares_the_input():
    torch.manual_seed(0)
    net = TGS(TGSConfig.tiny(sh_degree=1)).eval()
    rgb, mask = torch.ones(64, 64, 3), torch.zeros(64, 64)
    rgb[16:48, 16:48], mask[16:48, 16:48] = torch.tensor([0.9, 0.1, 0.1]), 1.0
    from gen3d.cameras import spherical_cameras

    one = lambda v: torch.tensor([float(v)])  # noqa: E731
    camera = spherical_cameras(one(0), one(15), one(1.9), one(40), 64, 64)
    image, cams = prepare_input(rgb, mask, camera, net.cfg.image_size)
    assert image.shape == (1, 32, 32, 4) and cams.width == 32 and torch.allclose(cams.K[0, 0, 0], camera.K[0, 0, 0] / 2)
    assert torch.allclose(image[0, 16, 16], torch.tensor([0.9, 0.1, 0.1, 1.0])) and image[0, 0, 0, 3] == 0
    with torch.no_grad():
        direct = net(image, cams)
    for degree, K in [(0, 1), (1, 4), (3, 16)]:
        model, seconds = reconstruct(net, rgb, mask, camera, GaussianConfig(sh_degree=degree, position_lr_init=0.123))
        assert isinstance(model, GaussianModel) and model.sh_degree == degree and seconds >= 0
        assert model.cfg.position_lr_init == 0.123
        assert model.sh.shape == (net.cfg.num_gaussians, K, 3)
        kept = min(K, 4)
        assert torch.allclose(model.sh[:, :kept], direct.sh[0, :, :kept])
        assert torch.count_nonzero(model.sh[:, kept:]) == 0
        assert torch.allclose(model.means, direct.means[0]) and model.means.requires_grad


def test_reference_png_and_gaussians_are_in_the_input_frame(tmp_path, mug_png):
    """Rendered from the input camera, the reconstruction has the prepared input's colors (the mug's blue)."""
    system_cls, cfg = load_run_config("image-to-3d", [f"image={mug_png}", "elevation=15", "init=tgs", "progress=false"])
    (tmp_path / "run").mkdir()
    system = system_cls(cfg, tmp_path / "run")
    model = system.reconstruct()
    out = render_gaussians(model, system.ref_camera, torch.ones(1, 3))
    both = (system.ref_mask[0, ..., 0] > 0.5) & (out.alpha[0, ..., 0].detach() > 0.5)
    assert both.sum() > 100
    rendered, reference = out.rgb[0].detach()[both].mean(0), system.ref_rgb[0][both].mean(0)
    assert (rendered - reference).abs().max() < 0.12, (rendered, reference)
    assert rendered[2] > rendered[0] + 0.2  # blue, not gray
    assert np.asarray(Image.open(tmp_path / "run" / "reference.png")).shape[:2] == (cfg.image_size, cfg.image_size)
