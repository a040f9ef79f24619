import numpy as np
import pytest
import torch
from PIL import Image

from gen3d.cameras import spherical_cameras
from gen3d.world.catalog import WorldObject
from gen3d.world.render import render_object


@pytest.fixture(scope="module")
def mug_png(tmp_path_factory):
    """A held-out object (the blue mug) seen from elevation 15, as an RGBA PNG."""
    cams = spherical_cameras(torch.zeros(1), torch.tensor([15.0]), torch.tensor([1.9]), torch.tensor([40.0]), 64, 64)
    out = render_object(WorldObject("mug", "blue"), cams, supersample=2)
    rgba = torch.cat([out.rgb[0], out.alpha[0]], -1).numpy()
    path = tmp_path_factory.mktemp("input") / "blue_mug.png"
    Image.fromarray((rgba * 255).round().astype(np.uint8), "RGBA").save(path)
    return path



def fast_overrides(prior, out, steps=4, system="dreamgaussian"):
    """A run of `system` small enough for a CPU test: a small representation, small renders, every output written."""
    common = [
        f"prior={prior}", f"output_dir={out}", f"max_steps={steps}", "progress=false",
        "cameras.batch_size=2", "cameras.eval_size=32", "turntable_frames=4", "val_every=2",
        "checkpoint_every=2", "log_every=1", "texture_size=64", "mesh_resolution=32",
    ]
    if system == "dreamfusion":
        return common + ["render_size=16", "hashgrid.num_levels=4", "hashgrid.log2_hashmap_size=10",
                         "hashgrid.finest_resolution=64", "triplane.resolution=16", "triplane.num_features=8",
                         "renderer.samples_per_ray=32"]
    return common + ["gaussians.num_points=200", "render_sizes=[16]", "render_size_milestones=[]",
                     "densify.densify_from=1", "densify.densify_every=2"]


def straight_and_resumed(preset, prior, tmp_path, steps, stop_at, overrides=(), system="dreamgaussian"):
    """Two seeded runs of `preset`: one straight through `steps`, one stopped at `stop_at`, checkpointed, and
    resumed in a new System to the end. Returns (straight, resumed) Systems, for comparing their tensors."""
    from gen3d.cli import load_run_config
    from gen3d.runs import new_run_dir
    from gen3d.systems.base import write_config

    def make(sub):
        o = fast_overrides(prior, tmp_path / sub, steps=steps, system=system)
        system_cls, cfg = load_run_config(preset, ["prompt=a red mug", *o, "turntable_frames=0", "exports=[]",
                                                   "checkpoint_every=0", "val_every=0", *overrides])
        run = new_run_dir(cfg.output_dir, system_cls.name, cfg.prompt)
        write_config(run, cfg)
        return system_cls(cfg, run)

    straight = make("a")
    straight.fit()
    first = make("b")
    first.fit(stop_at=stop_at)
    first.save()
    resumed = type(first)(first.cfg, first.run_dir)
    assert resumed.resume() == stop_at
    resumed.fit()
    return straight, resumed
