"""Every preset in configs/ runs 2 steps end to end on a tiny real diffusers prior."""

import pytest

from gen3d.cli import list_presets, main
from gen3d.runs import resolve_run
from tests.systems.conftest import fast_overrides


IMAGE_SYSTEMS = {"zero123": "dreamgaussian", "magic123": "dreamfusion", "dreamgaussian4d": "dreamgaussian"}
"""image (and video) recipe -> its text-to-3D base"""
FOUR_D = ("dream4d", "dreamgaussian4d")


@pytest.mark.parametrize("preset", sorted(list_presets()))
def test_preset_smoke(preset, tiny_pixel_prior, tmp_path):
    from PIL import Image

    from gen3d.config import read_yaml

    out = tmp_path / "outputs"
    system = read_yaml(list_presets()[preset])["system"]
    extra = []
    if system in IMAGE_SYSTEMS:  # real view priors (zero123-xl) are replaced by the shipped one, as text priors are
        disc = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
        disc.paste((200, 40, 40, 255), (10, 10, 30, 30))
        disc.save(tmp_path / "in.png")
        extra = [f"image={tmp_path / 'in.png'}", "view_prior=gen3d/shapes-zero123", "image_size=32"]
    if system == "dreamgaussian4d":  # a video: the disc moving right
        for i in range(2):
            frame = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
            frame.paste((200, 40, 40, 255), (8 + 4 * i, 10, 28 + 4 * i, 30))
            frame.save((tmp_path / "clip").mkdir(exist_ok=True) or tmp_path / "clip" / f"{i}.png")
        extra = [f"video={tmp_path / 'clip'}", *extra[1:]]
    if system in FOUR_D:
        extra += ["static_steps=1", "frames=2", "frame_views=1", "rigidity_points=16"]
    base = IMAGE_SYSTEMS.get(system, system)
    assert main(["run", preset, *fast_overrides(tiny_pixel_prior, out, steps=2, system=base), "turntable_frames=2",
                 *extra]) == 0
    run = resolve_run("@last", out)
    assert (run / "checkpoints" / "step-000002").is_dir()
    assert any((run / "export").iterdir())


def test_default_preset_runs_on_the_shipped_prior(tmp_path):
    """The README's main command, shortened: the embedded prior, nothing overridden but the length."""
    out = tmp_path / "outputs"
    assert main(["run", "dreamgaussian", "prompt=a teal torus", f"output_dir={out}", "max_steps=3",
                 "turntable_frames=3", "progress=false", "cameras.eval_size=32"]) == 0
    run = resolve_run("@last", out)
    assert (run / "export" / "model.ply").is_file() and (run / "export" / "mesh.glb").is_file()
