"""Captioned render sets: determinism, captions and view words, backgrounds, cache, batches."""

import pytest
import torch

from gen3d.priors.prompts import view_directions
from gen3d.world import WorldObject, build_renders, iterate_batches, parse_prompt
from gen3d.world import dataset as dataset_module

OBJECTS = [WorldObject("mug", "red"), WorldObject("house", "blue"), WorldObject("sphere", "gray")]


def _build(**kw):
    args = {"objects": OBJECTS, "views_per_object": 6, "size": 16, "seed": 0, "supersample": 1}
    args.update(kw)
    return build_renders(**args)


def test_deterministic_from_the_seed_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = _build(), _build(), _build(seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.images, b.images) and a.captions == b.captions and torch.equal(a.azimuth, b.azimuth)
    assert not torch.equal(a.azimuth, c.azimuth)
    assert a.images.shape == (18, 16, 16, 3) and a.alphas.shape == (18, 16, 16, 1)
    assert a.objects == [o for o in OBJECTS for _ in range(6)]
    assert len(a) == len(a.captions) == len(a.directions) == 18


def test_captions_name_their_object_and_view_words_follow_prompts():
    rs = _build(view_dependent_fraction=0.5, elevation_range=(-10.0, 80.0))
    assert rs.directions == view_directions(rs.azimuth, rs.elevation)
    suffixed = 0
    for text, obj, direction in zip(rs.captions, rs.objects, rs.directions):
        assert parse_prompt(text) == obj
        if text.endswith(" view"):
            assert text.endswith(f", {direction} view")  # PromptProcessor's format
            suffixed += 1
    assert 0 < suffixed < len(rs)
    assert all(c.endswith(" view") for c in _build(view_dependent_fraction=1.0).captions)
    assert not any(c.endswith(" view") for c in _build(view_dependent_fraction=0.0).captions)
    ranges = _build()
    assert ranges.elevation.min() >= -10 and ranges.elevation.max() <= 45
    assert ranges.distance.min() >= 2.5 and ranges.distance.max() <= 3.0
    assert ranges.fovy.min() >= 40 and ranges.fovy.max() <= 50


def test_backgrounds():
    black = _build(background="black")
    assert (black.images[:, 0, 0] == 0).all()
    rnd = _build(background="random", views_per_object=16)
    corner = rnd.images[:, 0, 0]
    assert torch.equal(corner, rnd.backgrounds)
    assert 0 < rnd.backgrounds[:, 0].sum() < len(rnd)
    with pytest.raises(ValueError, match="background"):
        _build(background="green")


def test_cache_roundtrip(tmp_path, monkeypatch):
    path = tmp_path / "renders.npz"
    a = _build(cache=path)
    assert path.exists()

    def fail(*args, **kwargs):
        raise AssertionError("rendered although the cache matched")

    monkeypatch.setattr(dataset_module, "render_object", fail)
    b = _build(cache=path)
    assert b.captions == a.captions and b.objects == a.objects and b.directions == a.directions
    assert torch.allclose(b.images, a.images, atol=1e-3) and torch.equal(b.azimuth, a.azimuth)
    with pytest.raises(AssertionError, match="rendered"):
        _build(cache=path, seed=5)  # other arguments: rebuilt


def test_batches_are_deterministic_and_cover_the_set():
    rs = _build()
    one = list(iterate_batches(rs, 4, seed=0, epochs=1, drop_last=False))
    assert [len(c) for _, c in one] == [4, 4, 4, 4, 2]
    assert sorted(c for _, cs in one for c in cs) == sorted(rs.captions)
    images, captions = one[0]
    assert images.shape == (4, 16, 16, 3)
    k = next(i for i, x in enumerate(rs.images) if torch.equal(x, images[0]))
    assert rs.captions[k] == captions[0]
    again = next(iterate_batches(rs, 4, seed=0))
    assert again[1] == captions
    forever = iterate_batches(rs, 4, seed=0)
    assert len([next(forever) for _ in range(10)]) == 10  # epochs=None repeats
