"""The shipped embedded prior: present, self-describing, loaded by id through the hub code path."""

import json

import torch

from gen3d.priors.diffusion import EMBEDDED_PRIORS, DiffusionPrior
from gen3d.priors.sampling import sample_images
from gen3d.world.catalog import HELD_OUT, parse_prompt, vocabulary
from gen3d.world.metrics import sample_agreement


def test_shipped_prior_is_small_and_describes_itself():
    folder = EMBEDDED_PRIORS["gen3d/shapes-t2i"]
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 8 * 2**20, size
    card = json.loads((folder / "gen3d_prior.json").read_text())
    assert [tuple(h) for h in card["held_out"]] == [tuple(h) for h in HELD_OUT]
    assert card["steps"] == card["config"]["steps"]
    assert not list(folder.rglob("*.bin")), "weights are safetensors"


def test_shipped_prior_loads_by_id_and_knows_every_word():
    prior = DiffusionPrior.from_pretrained("gen3d/shapes-t2i")
    assert not prior.is_latent and prior.resolution == 32
    for word in vocabulary():  # every caption word round-trips (no unknown token)
        ids = prior.tokenizer(word)["input_ids"]
        assert 3 <= len(ids) <= len(word) + 2 and prior.tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == word


def test_prompt_steers_the_samples_color():
    """Samples of a prompt are closer in color to its object than unconditional samples of the same seeds."""
    prior = DiffusionPrior.from_pretrained("gen3d/shapes-t2i")
    prompts = ["a red sphere", "a yellow cylinder", "a blue tree", "a green cone"]
    guided = sample_images(prior, prompts, steps=10, guidance_scale=5.0, generator=torch.Generator().manual_seed(0))
    plain = sample_images(prior, [""] * 4, steps=10, guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
    de = lambda images: sum(r.color_delta_e for r in sample_agreement(images, prompts)) / 4  # noqa: E731
    assert all(parse_prompt(p) for p in prompts)
    assert de(guided) < de(plain) - 5, (de(guided), de(plain))
