"""Tiny random priors for the prior tests, built once per session (well under a second each)."""

from pathlib import Path

import pytest

from gen3d.priors.diffusion import DiffusionPrior
from tests.tiny_prior import make_tiny_prior


@pytest.fixture(scope="session")
def tiny_prior_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny prior folders: "pixel", "latent", "pixel_v" (v-prediction), "pixel_lv" (learned variance)."""
    root = tmp_path_factory.mktemp("tiny-priors")
    return {
        "pixel": make_tiny_prior(root / "pixel", "pixel"),
        "latent": make_tiny_prior(root / "latent", "latent"),
        "pixel_v": make_tiny_prior(root / "pixel-v", "pixel", prediction_type="v_prediction"),
        "pixel_lv": make_tiny_prior(root / "pixel-lv", "pixel", learned_variance=True),
    }


@pytest.fixture(scope="session")
def pixel_prior(tiny_prior_dirs) -> DiffusionPrior:
    return DiffusionPrior.from_pretrained(str(tiny_prior_dirs["pixel"]))


@pytest.fixture(scope="session")
def latent_prior(tiny_prior_dirs) -> DiffusionPrior:
    return DiffusionPrior.from_pretrained(str(tiny_prior_dirs["latent"]))
