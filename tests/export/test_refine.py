"""Mesh renders through the differentiable rasterizer, and texture refinement against renders and with SDS."""

import numpy as np
import pytest
import torch
import trimesh

from gen3d.cameras import OrbitConfig, orbit_cameras, sample_orbit
from gen3d.export.mesh import save_mesh
from gen3d.export.refine import TextureRefineConfig, refine_texture, render_loss
from gen3d.export.texture import bake, textured_mesh
from gen3d.rendering.mesh import MeshQuery, render_mesh, sample_texture


def color_of(points):
    return (points * 0.8 + 0.5).clamp(0, 1)


@pytest.fixture(scope="module")
def baked_sphere():
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.6)
    return bake(sphere.vertices, sphere.faces, color_of, size=128)


def test_texture_lookup_hits_texel_centers():
    texture = torch.rand(4, 4, 3)
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    uv = torch.stack([(cols + 0.5) / 4, 1 - (rows + 0.5) / 4], -1)  # row 0 is v = 1
    assert torch.allclose(sample_texture(texture, uv), texture, atol=1e-6)


def test_textured_render_matches_the_colors_it_was_baked_from(baked_sphere):
    v, f, uv, tex = (torch.as_tensor(x) for x in baked_sphere)
    cams = orbit_cameras(4, 15.0, 2.75, 45.0, 96, 96)
    textured = render_mesh(v, f.long(), cams, uv=uv, texture=tex.float() / 255)
    colored = render_mesh(v, f.long(), cams, colors=color_of(v))
    mask = textured.alpha[..., 0] > 0
    assert 0.1 < mask.float().mean() < 0.5
    assert (textured.rgb - colored.rgb).abs()[mask].mean() < 0.01
    assert (textured.rgb[~mask] == 1).all()  # white background


def test_an_exported_glb_renders_as_before_saving(baked_sphere, tmp_path):
    mesh = textured_mesh(*baked_sphere)
    path = save_mesh(tmp_path / "m.glb", mesh, y_up=False)
    loaded = trimesh.load(path, force="mesh")
    cams = orbit_cameras(2, 15.0, 2.75, 45.0, 64, 64)
    a, b = MeshQuery(mesh).render(cams), MeshQuery(loaded).render(cams)
    assert torch.equal(a.alpha, b.alpha) and (a.rgb - b.rgb).abs().max() < 0.02


def test_refinement_against_renders_recovers_a_washed_out_texture(baked_sphere):
    v, f, uv, good = baked_sphere
    cams = orbit_cameras(4, 15.0, 2.75, 45.0, 64, 64)
    vt, ft = torch.as_tensor(v), torch.as_tensor(f).long()

    def target(c):
        return render_mesh(vt, ft, c, colors=color_of(vt))

    washed = (good.astype(np.float32) * 0.3 + 0.7 * 128).astype(np.uint8)  # faded toward gray
    gen = torch.Generator().manual_seed(0)
    orbit = OrbitConfig(batch_size=4)
    cfg = TextureRefineConfig(steps=40, resolution=96, lr=0.2)
    refined, losses = refine_texture(v, f, uv, washed, render_loss(target),
                                     lambda step: sample_orbit(orbit, gen, width=96, height=96), cfg, progress=False)
    assert losses[-1] < 0.2 * losses[0]

    def error(texture):
        out = render_mesh(vt, ft, cams, uv=torch.as_tensor(uv), texture=torch.as_tensor(texture).float() / 255)
        mask = out.alpha[..., 0] > 0
        return float((out.rgb - target(cams).rgb).abs()[mask].mean())

    assert error(refined) < 0.3 * error(washed)
    assert refined.shape == good.shape and refined.dtype == np.uint8


def test_bad_refine_settings():
    for kwargs, match in [({"steps": -1}, "steps"), ({"mode": "sdedit"}, "mode"), ({"lr": 0}, "lr"),
                          ({"resolution": 8}, "resolution")]:
        with pytest.raises(ValueError, match=match):
            TextureRefineConfig(**kwargs)


@pytest.mark.parametrize("system", ["dreamgaussian", "dreamfusion"])
def test_runs_refine_their_textures_in_both_modes(tiny_pixel_prior, tmp_path, system):
    from PIL import Image

    from gen3d.cli import main
    from gen3d.runs import resolve_run
    from tests.systems.conftest import fast_overrides

    out = tmp_path / "outputs"
    o = fast_overrides(tiny_pixel_prior, out, steps=2, system=system) + [
        "exports=[glb]", "turntable_frames=0", "texture_refine.steps=3", "texture_refine.resolution=32"]
    assert main(["run", system, "prompt=a red mug", *o]) == 0
    run = resolve_run("@last", out)
    assert "texture refined (render, 3 steps" in (run / "log.txt").read_text()
    textures = {}
    for mode, steps in (("plain", 0), ("render", 3), ("sds", 3)):
        target = tmp_path / f"{mode}.obj"
        assert main(["export", str(run), "--format", "obj", "--output", str(target), f"texture_refine.steps={steps}",
                     f"texture_refine.mode={'render' if mode == 'plain' else mode}", "texture_refine.resolution=32"]) == 0
        textures[mode] = np.asarray(Image.open(tmp_path / f"{mode}.png"))  # the MTL's texture, named by the OBJ
    assert not np.array_equal(textures["plain"], textures["render"])
    assert not np.array_equal(textures["plain"], textures["sds"])
