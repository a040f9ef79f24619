import pytest

from tests.tiny_prior import make_tiny_prior


@pytest.fixture(scope="session")
def tiny_pixel_prior(tmp_path_factory):
    return make_tiny_prior(tmp_path_factory.mktemp("prior") / "tiny-pixel", kind="pixel")


@pytest.fixture(scope="session")
def tiny_latent_prior(tmp_path_factory):
    return make_tiny_prior(tmp_path_factory.mktemp("prior") / "tiny-latent", kind="latent")


def fast_overrides(prior, out, steps=4, system="dreamgaussian"):
    """A run of `system` small enough for a CPU test: a small representation, small renders, every output written."""
    common = [
        f"prior={prior}", f"output_dir={out}", f"max_steps={steps}", "progress=false",
        "cameras.batch_size=2", "cameras.eval_size=32", "turntable_frames=4", "val_every=2",
        "checkpoint_every=2", "log_every=1",
    ]
    if system == "dreamfusion":
        return common + ["render_size=16", "mesh_resolution=32", "hashgrid.num_levels=4", "hashgrid.log2_hashmap_size=10",
                         "hashgrid.finest_resolution=64", "triplane.resolution=16", "triplane.num_features=8",
                         "renderer.samples_per_ray=32"]
    return common + ["gaussians.num_points=200", "render_sizes=[16]", "render_size_milestones=[]",
                     "densify.densify_from=1", "densify.densify_every=2"]
