import pytest

from tests.tiny_prior import make_tiny_prior


@pytest.fixture(scope="session")
def tiny_pixel_prior(tmp_path_factory):
    return make_tiny_prior(tmp_path_factory.mktemp("prior") / "tiny-pixel", kind="pixel")


@pytest.fixture(scope="session")
def tiny_latent_prior(tmp_path_factory):
    return make_tiny_prior(tmp_path_factory.mktemp("prior") / "tiny-latent", kind="latent")


def fast_overrides(prior, out, steps=4):
    """A run small enough for a CPU test: few Gaussians, small renders, every output written."""
    return [
        f"prior={prior}", f"output_dir={out}", f"max_steps={steps}", "progress=false",
        "gaussians.num_points=200", "render_sizes=[16]", "render_size_milestones=[]",
        "cameras.batch_size=2", "cameras.eval_size=32", "turntable_frames=4", "val_every=2",
        "checkpoint_every=2", "log_every=1", "densify.densify_from=1", "densify.densify_every=2",
    ]
