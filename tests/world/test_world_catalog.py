"""Shapes-world catalog: signed distances, parts, colors, captions, prompt parsing, held-out pairs."""

import math
import random

import pytest
import torch

from gen3d.priors.prompts import DIRECTIONS
from gen3d.world import catalog
from gen3d.world.catalog import (
    BOUND_RADIUS,
    COLORS,
    HELD_OUT,
    SHAPES,
    TEMPLATES,
    WorldObject,
    all_captions,
    all_objects,
    caption,
    held_out_objects,
    parse_prompt,
    training_objects,
    vocabulary,
)
from gen3d.world.metrics import delta_e


def _sphere_points(n: int, radius: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1) * radius


@pytest.mark.parametrize("name", list(SHAPES))
def test_sdf_sign_inside_outside_and_bound(name):
    shape = SHAPES[name]
    assert shape.sdf(torch.tensor([shape.inside_point], dtype=torch.float32)).item() < 0
    assert shape.main(torch.tensor([shape.inside_point], dtype=torch.float32)).item() < 0  # the inside point is in the main part
    assert (shape.sdf(_sphere_points(500, 3.0)) > 2.0).all()
    # everything lies inside the bounding sphere the renderer clips rays to
    assert (shape.sdf(_sphere_points(4000, BOUND_RADIUS)) > 0.02).all()


@pytest.mark.parametrize("name", list(SHAPES))
def test_sdf_is_1_lipschitz(name):
    g = torch.Generator().manual_seed(1)
    p = (torch.rand(3000, 3, generator=g) * 2 - 1) * 0.8
    p.requires_grad_(True)
    d = SHAPES[name].sdf(p)
    (grad,) = torch.autograd.grad(d.sum(), p)
    assert grad.norm(dim=-1).max() <= 1.05
    # and between random pairs of points, not only where the gradient exists
    q = p.detach() + 0.05 * torch.randn(3000, 3, generator=g)
    with torch.no_grad():
        assert ((SHAPES[name].sdf(q) - d).abs() <= (q - p).norm(dim=-1) * 1.0001 + 1e-6).all()


def test_primitives_are_exact_at_known_points():
    p = torch.tensor
    assert catalog.sd_sphere(p([[1.0, 0, 0]]), (0, 0, 0), 0.5).item() == pytest.approx(0.5)
    corner = catalog.sd_box(p([[1.0, 1.0, 1.0]]), (0, 0, 0), (0.5, 0.5, 0.5)).item()
    assert corner == pytest.approx(math.sqrt(3) * 0.5, abs=1e-6)
    assert catalog.sd_box(p([[0.1, 0, 0]]), (0, 0, 0), (0.5, 0.5, 0.5)).item() == pytest.approx(-0.4)
    rim = catalog.sd_cylinder(p([[1.0, 0, 1.0]]), (0, 0, 0), 0.5, 0.5).item()
    assert rim == pytest.approx(math.sqrt(0.5), abs=1e-6)
    # cone of base radius 0.5 at z=-0.5 with apex at z=0.5: above the apex, the distance is to the apex
    assert catalog.sd_cone(p([[0, 0, 1.0]]), (0, 0, 0), 0.5, 0.0, 0.5).item() == pytest.approx(0.5, abs=1e-6)
    # beside the slanted side, the distance is along the side's normal
    side = catalog.sd_cone(p([[0.5, 0, 0.5]]), (0, 0, 0), 0.5, 0.0, 0.5).item()
    assert side == pytest.approx(0.5 / math.sqrt(5) * 2, abs=1e-6)
    assert catalog.sd_torus(p([[0, 0, 0.0]]), (0, 0, 0), 0.4, 0.1).item() == pytest.approx(0.3)
    assert catalog.sd_capsule(p([[0, 0, 1.0]]), (0, 0, -0.5), (0, 0, 0.5), 0.2).item() == pytest.approx(0.3)


def test_detail_parts_and_colors():
    house = WorldObject("house", "green")
    door, wall = torch.tensor([[0.318, 0.0, -0.35]]), torch.tensor([[0.3, 0.0, -0.1]])
    assert house.shape_def.part(door).item() == 1 and house.shape_def.part(wall).item() == 0
    assert house.color_at(wall)[0].tolist() == pytest.approx(list(COLORS["green"][0]))
    assert house.color_at(door)[0].tolist() == pytest.approx(list(SHAPES["house"].detail_colors[0]))
    snowman = SHAPES["snowman"]
    assert snowman.part(torch.tensor([[0.3, 0.0, 0.4]])).item() == 1  # the carrot nose points at +x
    for shape in SHAPES.values():
        assert len(shape.details) == len(shape.detail_colors)
        assert shape.has_front != shape.rotational_symmetry
    assert sum(s.has_front for s in SHAPES.values()) >= 4


def test_colors_are_distinct_and_away_from_the_backgrounds():
    assert len(COLORS) >= 8
    rgb = torch.tensor([c for c, _ in COLORS.values()])  # [K, 3]
    for background in (torch.zeros(3), torch.ones(3)):
        assert delta_e(rgb, background).min() > 20
    pairwise = delta_e(rgb[:, None], rgb[None]) + 100 * torch.eye(len(rgb))
    assert pairwise.min() > 10  # distinct albedos (shading scales all channels alike)
    for _, words in COLORS.values():
        assert words and all(w.isascii() and w == w.lower() for w in words)


def test_world_object_validates_names():
    with pytest.raises(ValueError, match="unknown shape"):
        WorldObject("teapot", "red")
    with pytest.raises(ValueError, match="unknown color"):
        WorldObject("mug", "white")
    with pytest.raises(ValueError, match=r"\[P, 3\]"):
        WorldObject("mug", "red").sdf(torch.zeros(4, 2))


def test_every_caption_parses_back_to_its_object():
    for obj in all_objects():
        for text in all_captions(obj.shape, obj.color):
            assert parse_prompt(text) == obj, text
            assert parse_prompt(f"{text}, side view") == obj


def test_captions_are_random_over_templates_and_deterministic():
    assert caption("mug", "red") == "a red mug"
    assert caption("mug", "orange") == "an orange mug"
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = [caption("mug", "red", g1) for _ in range(50)]
    assert a == [caption("mug", "red", g2) for _ in range(50)]
    assert len(set(a)) > 10 and set(a) <= set(all_captions("mug", "red"))
    r = random.Random(0)
    assert {caption("cube", "gray", r) for _ in range(50)} <= set(all_captions("cube", "gray"))
    assert len(TEMPLATES) >= 4


def test_vocabulary_covers_every_caption_and_not_the_view_words():
    vocab = set(vocabulary())
    for obj in all_objects():
        for text in all_captions(obj.shape, obj.color):
            assert set(text.replace(",", " ").split()) <= vocab, text
    assert all(w.isascii() and w.isalnum() and w == w.lower() for w in vocab)
    assert not vocab & {*DIRECTIONS, "view"}  # view words are the prompt processor's, added by the trainer


def test_parse_prompt_synonyms_and_failures():
    assert parse_prompt("a crimson cup, front view") == WorldObject("mug", "red")
    assert parse_prompt("A GREY Toadstool!") == WorldObject("mushroom", "gray")
    assert parse_prompt("a 3d render of an emerald spaceship, back view") == WorldObject("rocket", "green")
    assert parse_prompt("a red teapot") is None
    assert parse_prompt("a donut") is None


def test_held_out_pairs():
    assert len(HELD_OUT) >= 4
    training = {(o.color, o.shape) for o in training_objects()}
    for color, shape in HELD_OUT:
        assert (color, shape) not in training
        assert any(c == color for c, _ in training) and any(s == shape for _, s in training)
    assert len(training) == len(all_objects()) - len(HELD_OUT)
    assert {(o.color, o.shape) for o in held_out_objects()} == set(HELD_OUT)
    assert len(SHAPES) >= 12


def test_closed_form_cone_matches_the_revolved_polygon():
    p = torch.rand(20000, 3, generator=torch.Generator().manual_seed(2)) * 2 - 1
    for r1, r2, h in [(0.42, 0.0, 0.46), (0.36, 0.2, 0.2), (0.1, 0.4, 0.3)]:
        closed = catalog.sd_cone(p, (0.1, 0.0, 0.05), r1, r2, h)
        revolved = catalog.sd_revolved(p, [(0.0, -h), (r1, -h), (r2, h), (0.0, h)], (0.1, 0.0, 0.05))
        assert torch.allclose(closed, revolved, atol=1e-6)
