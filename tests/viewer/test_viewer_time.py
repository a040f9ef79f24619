"""The viewer's time slider for 4D results: timeline snapshots (of `DynamicGaussians` and of folders of PLY frames),
the real viser server's Time / Play controls, and the page in a headless Chromium."""

import time

import numpy as np
import pytest
import torch

from gen3d.cameras import spherical_cameras
from gen3d.errors import Gen3dError
from gen3d.representations.deformation import DeformationConfig, DeformationField
from gen3d.representations.dynamic import DynamicGaussians, save_ply_sequence
from gen3d.representations.gaussians import GaussianConfig, GaussianModel
from gen3d.viewer.protocol import Timeline
from gen3d.viewer.server import Viewer, free_port
from gen3d.viewer.snapshots import dynamic_snapshot, gaussian_snapshot, snapshot_of
from tests.viewer.waiting import wait_for


def moving_gaussians(seed: int = 0) -> DynamicGaussians:
    """200 Gaussians and a small field that moves them differently at each time: its zero-initialized heads and
    all-ones space-time planes (the identity at every t) are replaced by random values."""
    g = torch.Generator().manual_seed(seed)
    model = GaussianModel.random_ball(GaussianConfig(num_points=200), generator=g)
    field = DeformationField(DeformationConfig(resolutions=[4], time_resolution=4, features=4, hidden=8))
    with torch.no_grad():
        for plane in field.temporal:
            plane.copy_(torch.rand(plane.shape, generator=g) * 4)
        for head in field.heads.values():
            head.weight.copy_(torch.randn(head.weight.shape, generator=g))
    return DynamicGaussians(model, field)


def camera():
    return spherical_cameras(torch.tensor([0.0]), torch.tensor([10.0]), torch.tensor([2.5]), torch.tensor([45.0]), 32, 32)


def start_viewer() -> Viewer:
    return Viewer(port=free_port("127.0.0.1", 8900), log=lambda line: None)


# ---- snapshots ---------------------------------------------------------------------------------------

def test_dynamic_snapshot_has_the_frames_of_the_field():
    dynamic = moving_gaussians()
    snap = dynamic_snapshot(dynamic, step=3, frames=5)
    timeline = snap.timeline
    assert len(timeline) == 5 and timeline.times == pytest.approx([0, 0.25, 0.5, 0.75, 1])
    assert snap.step == 3 and snap.info["frames"] == "5" and snap.info["Gaussians"] == "200"
    assert snap.splats is timeline.splats[0]  # code that ignores time sees frame 0
    with torch.no_grad():
        for t, splats in zip(timeline.times, timeline.splats):
            frame = dynamic.at(t)
            np.testing.assert_allclose(splats.centers, frame.means.numpy(), atol=1e-6)
            eig = np.sort(np.linalg.eigvalsh(splats.covariances.astype(np.float64)), 1)
            np.testing.assert_allclose(eig, np.sort(frame.scales.double().numpy() ** 2, 1), rtol=1e-3, atol=1e-10)
    moved = np.abs(timeline.splats[-1].centers - timeline.splats[0].centers).max(1)  # [N]
    assert (moved > 1e-3).mean() > 0.9, "the field should move (nearly) every Gaussian between t=0 and t=1"

    # the renders are of a frozen copy: training the field afterwards changes neither splats nor renders
    before = timeline.render(camera(), 1.0).rgb
    centers = timeline.splats[2].centers.copy()
    with torch.no_grad():
        dynamic.field.heads["means"].bias.add_(0.5)
    torch.testing.assert_close(timeline.render(camera(), 1.0).rgb, before)
    np.testing.assert_array_equal(timeline.splats[2].centers, centers)
    assert float(before.mean()) < 0.99  # something drawn over the white background
    assert float(snap.render(camera()).alpha.mean()) > 0.02  # the snapshot's own render: frame 0


def test_identity_field_gives_equal_frames_and_timelines_check_their_input():
    dynamic = DynamicGaussians(GaussianModel.random_ball(GaussianConfig(num_points=50)), DeformationField())
    timeline = dynamic_snapshot(dynamic, frames=3).timeline
    np.testing.assert_array_equal(timeline.splats[0].centers, timeline.splats[2].centers)
    assert timeline.index_at(0.2) == 0 and timeline.index_at(0.3) == 1 and timeline.index_at(0.99) == 2
    with pytest.raises(ValueError, match="one Splats per time"):
        Timeline([0.0, 1.0], timeline.splats[:1])
    with pytest.raises(ValueError, match="sorted and in"):
        Timeline([1.0, 0.0], timeline.splats[:2])
    with pytest.raises(ValueError, match="frames must be >= 1"):
        dynamic_snapshot(dynamic, frames=0)


def test_ply_sequence_folder_opens_as_a_timeline(tmp_path):
    dynamic = moving_gaussians(seed=1)
    save_ply_sequence(dynamic, tmp_path / "frames", 4)
    snap, title, description = snapshot_of(str(tmp_path / "frames"))
    assert title == "frames" and description == "3DGS PLY sequence" and snap.info["frames"] == "4"
    assert snap.timeline.times == pytest.approx([0, 1 / 3, 2 / 3, 1])
    with torch.no_grad():
        for t, splats in zip(snap.timeline.times, snap.timeline.splats):
            np.testing.assert_allclose(splats.centers, dynamic.at(t).means.numpy(), atol=1e-6)
    a1 = snap.timeline.render(camera(), 1.0).alpha
    assert float(a1.mean()) > 0.02 and not torch.equal(a1, snap.timeline.render(camera(), 0.0).alpha)


@pytest.mark.parametrize("content, message", [
    ({}, "not a run folder"),
    ({"model.ply": "gaussian"}, "no frame_000.ply"),
    ({"frame_000.ply": "gaussian", "frame_001.ply": "mesh"}, "frame_001.ply are not 3D Gaussian Splatting PLYs"),
    ({"frame_000.ply": b"garbage"}, "frame_000.ply are not 3D Gaussian Splatting PLYs"),
])
def test_folders_that_are_not_ply_sequences(tmp_path, content, message):
    import trimesh

    from gen3d.export.ply import save_gaussian_ply

    folder = tmp_path / "folder"
    folder.mkdir()
    for name, kind in content.items():
        if kind == "gaussian":
            save_gaussian_ply(folder / name, GaussianModel.random_ball(GaussianConfig(num_points=10)))
        elif kind == "mesh":
            trimesh.creation.box().export(folder / name)
        else:
            (folder / name).write_bytes(kind)
    with pytest.raises(Gen3dError, match=message):
        snapshot_of(str(folder))


# ---- the real viser server -----------------------------------------------------------------------------

def gui_labels(viewer: Viewer) -> set[str]:
    """Labels of the GUI inputs the server holds (what it sends to every browser)."""
    return {h.label for h in viewer.server.gui._gui_input_handle_from_uuid.values()}


def test_time_controls_only_for_timelines_and_the_slider_picks_the_frame():
    static = gaussian_snapshot(GaussianModel.random_ball(GaussianConfig(num_points=30)))
    snap = dynamic_snapshot(moving_gaussians(), frames=5)
    viewer = start_viewer()
    try:
        viewer.publish(static)
        assert viewer.time_slider is None and "Time" not in gui_labels(viewer) and viewer.shown_time is None
        np.testing.assert_allclose(viewer.splats.centers, static.splats.centers)

        viewer.publish(snap)
        assert {"Time", "Play"} <= gui_labels(viewer)
        slider = viewer.time_slider
        assert (slider.min, slider.max, slider.step, slider.value) == (0.0, 1.0, 0.25, 0.0)
        np.testing.assert_allclose(viewer.splats.centers, snap.timeline.splats[0].centers)
        for value, frame in ((0.75, 3), (0.3, 1), (1.0, 4)):  # as the GUI sets it; 0.3 shows the nearest frame
            slider.value = value
            np.testing.assert_allclose(viewer.splats.centers, snap.timeline.splats[frame].centers)
            assert viewer.shown_time == snap.timeline.times[frame]
        viewer.mode.value = "depth"  # the server-side modes hide the splats; a new frame keeps them hidden
        slider.value = 0.5
        assert not viewer.splats.visible
        viewer.mode.value = "rgb"

        viewer.publish(dynamic_snapshot(moving_gaussians(seed=2), frames=5))  # a live run's next snapshot
        assert viewer.time_slider is slider and viewer.shown_time == 0.5  # same controls, same time
        viewer.publish(static)
        assert viewer.time_slider is None and not {"Time", "Play"} & gui_labels(viewer)
        np.testing.assert_allclose(viewer.splats.centers, static.splats.centers)
    finally:
        viewer.close()


def test_play_advances_and_loops_pause_stops_and_close_ends_the_thread():
    snap = dynamic_snapshot(moving_gaussians(), frames=4)
    snap.timeline.fps = 40.0
    viewer = start_viewer()
    try:
        viewer.publish(snap)
        seen = []
        viewer.time_slider.on_update(lambda _: seen.append(viewer.time_slider.value))
        viewer.play_button.value = True  # a click, as the GUI sends it
        assert viewer.playing and viewer.play_button.label == "Pause"
        wait_for(lambda: len(seen) >= 6, what="playback")
        assert seen[:5] == pytest.approx([1 / 3, 2 / 3, 1, 0, 1 / 3])  # one frame at a time, looping

        viewer.toggle_play()
        assert not viewer.playing and viewer.play_button.label == "Play"
        time.sleep(0.15)
        paused_at = viewer.time_slider.value
        time.sleep(0.3)
        assert viewer.time_slider.value == paused_at
        np.testing.assert_allclose(viewer.splats.centers,
                                   snap.timeline.splats[snap.timeline.index_at(paused_at)].centers)
        viewer.toggle_play()
        wait_for(lambda: viewer.time_slider.value != paused_at, what="playback to resume")
    finally:
        viewer.close()
    assert not viewer._play_thread.is_alive()


# ---- a headless Chromium ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_page_shows_the_time_controls_and_server_renders_follow_the_time(browser):
    from tests.viewer.test_viewer_browser import foreground_fraction

    snap = dynamic_snapshot(moving_gaussians(), frames=5)
    times_rendered = []
    render = snap.timeline.render
    snap.timeline.render = lambda cameras, t: times_rendered.append(t) or render(cameras, t)
    viewer = start_viewer()
    try:
        viewer.publish(snap)
        page = browser.new_page(viewport={"width": 1000, "height": 700})
        page.goto(viewer.url)
        page.get_by_role("button", name="Play").wait_for(timeout=30000)
        assert page.get_by_text("Time", exact=True).count() >= 1
        wait_for(lambda: foreground_fraction(page) > 0.005, timeout=30, what="the splats in the screenshot")

        page.get_by_role("button", name="Play").click()
        wait_for(lambda: viewer.playing, what="the click to reach the server")
        wait_for(lambda: viewer.shown_time not in (None, 0.0), what="the time to advance")
        viewer.toggle_play()

        viewer.mode.value = "alpha"  # a server-side mode: rendered at the slider's time
        viewer.time_slider.value = 0.75
        wait_for(lambda: 0.75 in times_rendered, timeout=30, what="a server render at t=0.75")

        viewer.publish(gaussian_snapshot(GaussianModel.random_ball(GaussianConfig(num_points=30))))
        page.get_by_role("button", name="Play").wait_for(state="detached", timeout=10000)
        page.get_by_text("Time", exact=True).wait_for(state="detached", timeout=10000)
        page.close()
    finally:
        viewer.close()
