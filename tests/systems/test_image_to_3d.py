"""Image-to-3D recipes end to end on the shipped view prior: zero123 (Gaussians) and magic123 (field + text)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from gen3d.cli import main
from gen3d.runs import resolve_run
from tests.systems.conftest import fast_overrides, straight_and_resumed

SMALL = ["image_size=32", "lambda_rgb=1000", "lambda_mask=100"]


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_zero123_run_end_to_end(tiny_pixel_prior, tmp_path, mug_png):
    out = tmp_path / "outputs"
    assert main(["run", "image-to-3d", f"image={mug_png}", "elevation=15", *fast_overrides(tiny_pixel_prior, out),
                 *SMALL]) == 0
    run = resolve_run("@last", out)
    assert run.parent.name == "zero123" and run.name.startswith("blue_mug@")
    reference = np.asarray(Image.open(run / "reference.png"))
    assert reference.shape == (32, 32, 3) and reference[16, 16, 2] > reference[16, 16, 0] + 60  # the blue mug, centered
    rows = metrics(run)
    assert {"ref_rgb", "ref_mask", "zero123"} <= set(rows[0])
    for rel in ("export/model.ply", "export/mesh.glb"):
        assert (run / rel).is_file(), rel


def test_the_reference_losses_fit_the_input_view(tiny_pixel_prior, tmp_path, mug_png):
    out = tmp_path / "outputs"
    o = fast_overrides(tiny_pixel_prior, out, steps=40) + SMALL + [
        "lambda_zero123=0", "turntable_frames=0", "exports=[]", "val_every=0", "checkpoint_every=0",
        "densify.densify_from=1000"]
    assert main(["run", "image-to-3d", f"image={mug_png}", "elevation=15", *o]) == 0
    rows = metrics(resolve_run("@last", out))
    first, last = rows[0], rows[-1]
    assert last["ref_rgb"] < 0.5 * first["ref_rgb"] and last["ref_mask"] < 0.5 * first["ref_mask"]


def test_resumed_run_matches_uninterrupted(tiny_pixel_prior, tmp_path, mug_png):
    straight, resumed = straight_and_resumed("image-to-3d", tiny_pixel_prior, tmp_path, steps=4, stop_at=2,
                                             overrides=[f"image={mug_png}", *SMALL])
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_magic123_joint_guidance_runs(tiny_pixel_prior, tmp_path, mug_png):
    out = tmp_path / "outputs"
    o = fast_overrides(tiny_pixel_prior, out, steps=2, system="dreamfusion") + SMALL + ["turntable_frames=0",
                                                                                    "exports=[glb]"]
    assert main(["run", "magic123", "prompt=a blue mug", f"image={mug_png}", "elevation=15", *o]) == 0
    run = resolve_run("@last", out)
    rows = metrics(run)
    assert {"ref_rgb", "ref_mask", "zero123", "sds_2d"} <= set(rows[0])
    assert (run / "export" / "mesh.glb").is_file() and (run / "reference.png").is_file()


def test_zero123_with_a_text_prior_too(tiny_pixel_prior, tmp_path, mug_png, capsys):
    out = tmp_path / "outputs"
    o = fast_overrides(tiny_pixel_prior, out, steps=2) + SMALL + ["turntable_frames=0", "exports=[]", "lambda_sds=0.5"]
    assert main(["run", "image-to-3d", f"image={mug_png}", *o]) == 2  # a text prior needs a prompt
    assert "prompt is empty" in capsys.readouterr().err
    assert main(["run", "image-to-3d", f"image={mug_png}", "prompt=a blue mug", *o]) == 0
    assert {"sds_2d", "zero123", "ref_rgb"} <= set(metrics(resolve_run("@last", out))[0])


@pytest.mark.parametrize("args, message", [
    ([], "no input image: pass image="),
    (["image=/nonexistent/x.png"], "does not exist"),
    (["elevation=120"], "elevation must be in"),
    (["zero123.type=vsd"], "zero123.type must be sds"),
    (["view_prior=nobody/zero123-missing"], "not available offline"),
])
def test_bad_image_inputs(tiny_pixel_prior, tmp_path, mug_png, capsys, args, message):
    if args and args[0].startswith(("elevation", "zero123", "view_prior")):
        args = [f"image={mug_png}", *args]
    assert main(["run", "image-to-3d", *args, *fast_overrides(tiny_pixel_prior, tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err
    if "offline" in message:
        assert "nobody/zero123-missing" in err and "gen3d/shapes-zero123" in err
