"""The viewer's pieces without a browser: ports, camera conversion, render modes, snapshots of files."""

import socket

import numpy as np
import pytest
import torch

from gen3d.cameras import spherical_cameras
from gen3d.errors import Gen3dError
from gen3d.rendering.types import RenderOutput
from gen3d.ops._projection import quat_to_rotmat
from gen3d.viewer.server import free_port, matrix_quaternion, mode_image, viser_camera
from gen3d.viewer.snapshots import gaussian_snapshot, snapshot_of


def test_free_port_skips_a_port_in_use():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        assert free_port("127.0.0.1", taken) != taken
    assert free_port("127.0.0.1", taken) == taken  # free again once closed


def test_quaternion_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(20):
        q = rng.normal(size=4)
        q /= np.linalg.norm(q)
        R = quat_to_rotmat(torch.from_numpy(q)[None])[0].numpy()
        np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-12)
        back = matrix_quaternion(R)
        assert np.allclose(back, q, atol=1e-9) or np.allclose(back, -q, atol=1e-9)


def test_viser_camera_matches_gen3d_cameras():
    """A viser camera with the pose of one of our orbit cameras yields the same camera (OpenCV axes both)."""
    ref = spherical_cameras(torch.tensor([30.0]), torch.tensor([20.0]), torch.tensor([2.5]), torch.tensor([45.0]), 48, 32)
    c2w = ref.c2w[0].double().numpy()
    cam = viser_camera(matrix_quaternion(c2w[:3, :3]), c2w[:3, 3], np.deg2rad(45.0), 48 / 32, 32)
    torch.testing.assert_close(cam.c2w, ref.c2w, atol=1e-5, rtol=0)
    torch.testing.assert_close(cam.K, ref.K, atol=1e-4, rtol=0)
    assert (cam.width, cam.height) == (48, 32)
    assert abs(float(cam.azimuth[0]) - 30.0) < 1e-3 and abs(float(cam.elevation[0]) - 20.0) < 1e-3


def test_render_modes():
    alpha = torch.zeros(1, 8, 8, 1)
    alpha[:, 2:6, 2:6] = 1
    depth = torch.linspace(1, 2, 64).view(1, 8, 8, 1) * alpha
    out = RenderOutput(rgb=torch.full((1, 8, 8, 3), 0.5), alpha=alpha, depth=depth,
                       normal=torch.tensor([0.0, 0.0, 1.0]).expand(1, 8, 8, 3))
    assert mode_image(out, "rgb").shape == (8, 8, 3) and (mode_image(out, "rgb") == 127).all()
    assert mode_image(out, "alpha")[3, 3].tolist() == [255] * 3 and mode_image(out, "alpha")[0, 0].tolist() == [0] * 3
    d = mode_image(out, "depth")[..., 0]
    assert d[2, 2] > d[5, 5] and d[0, 0] == 0  # near is bright, background black
    assert mode_image(out, "normal")[3, 3].tolist() == [127, 127, 255]


def test_gaussian_snapshot_and_files(tmp_path):
    from gen3d.export.mesh import save_mesh
    from gen3d.export.ply import save_gaussian_ply
    from gen3d.representations.gaussians import GaussianModel

    model = GaussianModel.random_ball(generator=torch.Generator().manual_seed(0))
    snap = gaussian_snapshot(model, step=7)
    s = snap.splats
    assert len(s) == model.num_gaussians and snap.step == 7
    eig = np.linalg.eigvalsh(s.covariances.astype(np.float64))
    np.testing.assert_allclose(np.sort(eig, 1), np.sort(model.scales.detach().double().numpy() ** 2, 1), rtol=1e-4)
    with torch.no_grad():
        model.means.add_(1.0)  # training goes on; the snapshot does not move
    cams = spherical_cameras(torch.tensor([0.0]), torch.tensor([10.0]), torch.tensor([2.5]), torch.tensor([45.0]), 32, 32)
    assert float(snap.render(cams).alpha.mean()) > 0.05
    save_gaussian_ply(tmp_path / "g.ply", model)
    snap2, title, _ = snapshot_of(str(tmp_path / "g.ply"))
    assert len(snap2.splats) == model.num_gaussians and title == "g.ply"

    import trimesh

    save_mesh(tmp_path / "m.glb", trimesh.creation.icosphere(subdivisions=2))
    snap3, _, description = snapshot_of(str(tmp_path / "m.glb"))
    assert snap3.mesh is not None and len(snap3.mesh.faces) == 320 and description == "mesh"


@pytest.mark.parametrize("name, message", [
    ("missing.ply", "does not exist"),
    ("notes.txt", "not '.txt'"),
    ("folder", "not a run folder"),
    ("broken.glb", "cannot read mesh"),
])
def test_view_targets_that_cannot_work(tmp_path, name, message):
    (tmp_path / "folder").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "broken.glb").write_bytes(b"glTF not really")
    with pytest.raises(Gen3dError, match=message):
        snapshot_of(str(tmp_path / name))


def test_viewer_takes_the_next_port_and_warns_about_open_hosts():
    from gen3d.viewer.server import Viewer

    messages = []
    first = Viewer(port=free_port("127.0.0.1", 8600), log=messages.append)
    try:
        second = Viewer(port=first.port, log=messages.append)
        try:
            assert second.port != first.port and f"port {first.port} is in use; using {second.port}" in messages[-1]
        finally:
            second.close()
    finally:
        first.close()
    exposed = Viewer(host="0.0.0.0", port=free_port("0.0.0.0", 8650), log=messages.append)
    exposed.close()
    assert "anyone who can reach this machine" in messages[-1]


def test_live_run_publishes_frustums_and_keeps_open_until_interrupted(tiny_pixel_prior, tmp_path):
    import threading
    import time

    from gen3d.cli import load_run_config
    from gen3d.runs import new_run_dir
    from gen3d.systems.base import write_config
    from tests.systems.conftest import fast_overrides

    o = fast_overrides(tiny_pixel_prior, tmp_path, steps=6) + [
        "viewer.enabled=true", f"viewer.port={free_port('127.0.0.1', 8700)}", "viewer.refresh_every=2",
        "viewer.refresh_seconds=0", "viewer.keep_open=true", "turntable_frames=0", "exports=[]"]
    cls, cfg = load_run_config("dreamgaussian", ["prompt=a red mug", *o])
    run = new_run_dir(cfg.output_dir, cls.name, cfg.prompt)
    write_config(run, cfg)
    system = cls(cfg, run)
    thread = threading.Thread(target=system.fit, daemon=True)
    thread.start()
    t0 = time.time()
    while system.step < 6 and time.time() - t0 < 60:
        time.sleep(0.05)
    time.sleep(1.0)
    assert thread.is_alive(), "keep_open: the viewer should outlive the run"
    viewer = system.viewer
    assert len(viewer._frustums) == 2 and viewer.plot is not None  # the last batch's cameras, the loss plot
    assert viewer._snapshot.step == 6 and not viewer.training
    system._interrupt = True  # what Ctrl-C does
    thread.join(timeout=30)
    assert not thread.is_alive()
