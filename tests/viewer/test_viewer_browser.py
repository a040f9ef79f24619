"""The viewer in a real headless Chromium: live runs (Gaussians and a field), pause, export, two clients, gen3d view."""

import io
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from gen3d.cli import load_run_config
from gen3d.runs import new_run_dir
from gen3d.systems.base import Interrupted, write_config
from gen3d.viewer.server import free_port
from tests.systems.conftest import fast_overrides
from tests.viewer.waiting import wait_for

pytestmark = pytest.mark.slow


def screenshot(page) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(page.screenshot())).convert("RGB")).astype(int)  # [H, W, 3]


def central_view(img: np.ndarray) -> np.ndarray:
    """The 3D view's central pixels, left of the GUI panel, where the object sits."""
    H, W = img.shape[:2]
    return img[H // 4: 3 * H // 4, W // 6: W // 2 + W // 10]


def foreground_fraction(page) -> float:
    """Fraction of the 3D view's central pixels that differ from its background."""
    img = screenshot(page)
    background = img[img.shape[0] - 150, img.shape[1] // 2]  # below the object, above the axes widget
    return float((np.abs(central_view(img) - background).sum(-1) > 40).mean())


def dark_fraction(page) -> float:
    """Fraction of the central view that is near black (the background of the alpha and depth modes)."""
    return float((central_view(screenshot(page)).sum(-1) < 60).mean())


class LiveRun:
    """A System training in a background thread with the viewer on, for the duration of a `with` block."""

    def __init__(self, prior, tmp_path, system="dreamgaussian", extra=()):
        o = fast_overrides(prior, tmp_path, steps=100000, system=system) + [
            "viewer.enabled=true", f"viewer.port={free_port('127.0.0.1', 8300)}", "viewer.refresh_every=2",
            "val_every=0", "checkpoint_every=0", "cameras.batch_size=1", *extra]
        cls, cfg = load_run_config(system, ["prompt=a red mug", *o])
        run = new_run_dir(cfg.output_dir, cls.name, cfg.prompt)
        write_config(run, cfg)
        self.system = cls(cfg, run)
        self.error = None

    def _fit(self):
        try:
            self.system.fit()
        except Interrupted:
            pass
        except Exception as exc:  # surfaced by __exit__
            self.error = exc

    def __enter__(self):
        self.thread = threading.Thread(target=self._fit, daemon=True)
        self.thread.start()
        wait_for(lambda: getattr(self.system, "viewer", None) is not None and self.system.step > 2, what="training")
        return self

    def __exit__(self, *exc):
        self.system._interrupt = True
        self.system.viewer._paused.clear()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "training did not stop"
        if self.error is not None:
            raise self.error


def open_page(browser, url, button="Pause"):
    """A new page on `url`, once the viewer's GUI shows `button` (Resume for a paused run)."""
    page = browser.new_page(viewport={"width": 1000, "height": 700})
    page.goto(url)
    page.get_by_role("button", name=button).wait_for(timeout=30000)
    return page


def test_live_gaussians_pause_export_and_two_clients(browser, tiny_pixel_prior, tmp_path):
    with LiveRun(tiny_pixel_prior, tmp_path, extra=["exports=[splat-ply]"]) as live:
        system, viewer = live.system, live.system.viewer
        assert viewer.url.startswith("http://localhost:")
        page = open_page(browser, viewer.url)
        wait_for(lambda: foreground_fraction(page) > 0.005, what="the Gaussians in the screenshot")
        assert page.get_by_text("a red mug").count() >= 1

        # pause: the step counter stops; resume: it moves again
        page.get_by_role("button", name="Pause").click()
        page.get_by_role("button", name="Resume").wait_for()
        wait_for(lambda: viewer.paused, what="the pause to reach the server")
        time.sleep(0.5)
        paused_at = system.step
        time.sleep(1.5)
        assert system.step == paused_at

        # "Export now" works while paused, into the run folder
        page.get_by_role("button", name="Export now").click()
        wait_for(lambda: (system.run_dir / "export" / "model.ply").is_file(), what="the export")

        # a second client at once (while paused: software WebGL draws the splats slowly beside a training thread)
        second = open_page(browser, viewer.url, button="Resume")  # it is shown the run's state
        wait_for(lambda: len(viewer.server.get_clients()) == 2, what="two clients")
        wait_for(lambda: foreground_fraction(second) > 0.005, what="the Gaussians in the second client")

        page.get_by_role("button", name="Resume").click()
        wait_for(lambda: not viewer.paused, what="the resume to reach the server")
        wait_for(lambda: system.step > paused_at + 2, what="training to resume")

        # the first client leaves and training goes on
        page.close()
        wait_for(lambda: len(viewer.server.get_clients()) == 1, what="the first client to leave")
        step = system.step
        wait_for(lambda: system.step > step + 2, what="training after a client left")
        second.close()


def test_live_field_is_rendered_by_the_server(browser, tiny_pixel_prior, tmp_path):
    with LiveRun(tiny_pixel_prior, tmp_path, system="dreamfusion", extra=["viewer.resolution=64"]) as live:
        viewer = live.system.viewer
        page = open_page(browser, viewer.url)
        wait_for(lambda: foreground_fraction(page) > 0.005, what="the field's render in the screenshot")
        assert dark_fraction(page) < 0.5
        viewer.mode.value = "alpha"  # the dropdown's value, as the GUI sets it: alpha over black
        wait_for(lambda: dark_fraction(page) > 0.5, what="the alpha mode's black background")
        page.close()


@pytest.fixture(scope="module")
def finished_run(tiny_pixel_prior, tmp_path_factory):
    from gen3d.cli import main
    from gen3d.runs import resolve_run

    out = tmp_path_factory.mktemp("view") / "outputs"
    assert main(["run", "dreamgaussian", "prompt=a red mug", *fast_overrides(tiny_pixel_prior, out)]) == 0
    return resolve_run("@last", out)


@pytest.mark.parametrize("kind", ["ply", "run"])
def test_gen3d_view(browser, finished_run, kind):
    target = finished_run / "export" / "model.ply" if kind == "ply" else finished_run
    port = free_port("127.0.0.1", 8400)
    proc = subprocess.Popen([sys.executable, "-m", "gen3d", "view", str(target), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = None
        for line in proc.stdout:  # viser's banner, then ours
            if m := re.search(r"viewer: (http://\S+)", line):
                url = m.group(1)
                break
        assert url, "gen3d view printed no URL"
        page = browser.new_page(viewport={"width": 1000, "height": 700})
        page.goto(url)
        wait_for(lambda: foreground_fraction(page) > 0.005, what="the result's Gaussians")
        if kind == "run":
            assert page.get_by_text("a red mug").count() >= 1 and page.get_by_text("Turntable").count() >= 1
        page.close()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
