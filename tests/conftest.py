import os

# Tests never touch the network: hub lookups answer from the local cache only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


# The tests' tensors are tiny: one thread is as fast, and it does not spin-wait against other
# processes on a shared 2-core machine (measured: a tiny UNet call took 0.8 s on 2 busy threads
# against 18 ms on 1).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


# Tiny random diffusers priors (real components, built offline) for runs of every system.
@pytest.fixture(scope="session")
def tiny_pixel_prior(tmp_path_factory):
    from tests.tiny_prior import make_tiny_prior

    return make_tiny_prior(tmp_path_factory.mktemp("prior") / "tiny-pixel", kind="pixel")


@pytest.fixture(scope="session")
def tiny_latent_prior(tmp_path_factory):
    from tests.tiny_prior import make_tiny_prior

    return make_tiny_prior(tmp_path_factory.mktemp("prior") / "tiny-latent", kind="latent")
