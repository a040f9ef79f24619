"""View-dependent prompts: the direction table, per-camera embeddings, Perp-Neg weights, config."""

import ast
import inspect
import math

import pytest
import torch

from gen3d.cameras import spherical_cameras
from gen3d.errors import ConfigError
from gen3d.priors import prompts as prompts_module
from gen3d.priors.prompts import PromptConfig, PromptProcessor, view_directions


def _cameras(azimuth, elevation):
    n = len(azimuth)
    full = lambda v: torch.full((n,), float(v))  # noqa: E731
    return spherical_cameras(torch.tensor(azimuth, dtype=torch.float32), torch.tensor(elevation, dtype=torch.float32),
                             full(2.5), full(45.0), 16, 16)


@pytest.mark.parametrize(
    "azimuth, elevation, expected",
    [
        (0, 0, "front"), (44, 0, "front"), (-44, 0, "front"), (46, 0, "side"), (-46, 0, "side"),
        (90, 0, "side"), (134, 0, "side"), (136, 0, "back"), (-136, 0, "back"), (180, 0, "back"),
        (-180, 0, "back"), (360, 0, "front"), (405, 0, "side"), (540, 0, "back"),
        (0, 60, "front"), (0, 61, "overhead"), (180, 61, "overhead"), (90, 89, "overhead"), (0, -80, "front"),
    ],
)
def test_view_direction_table(azimuth, elevation, expected):
    assert view_directions(torch.tensor([float(azimuth)]), torch.tensor([float(elevation)])) == [expected]


def test_view_direction_thresholds():
    az, el = torch.tensor([35.0, 145.0, 0.0]), torch.tensor([0.0, 0.0, 50.0])
    assert view_directions(az, el) == ["front", "back", "front"]
    assert view_directions(az, el, front_threshold=30, back_threshold=30, overhead_threshold=45) == [
        "side", "side", "overhead"]
    with pytest.raises(ValueError, match="azimuth and elevation"):
        view_directions(torch.zeros(2), torch.zeros(3))


def test_processor_picks_view_embeddings(pixel_prior):
    processor = PromptProcessor(pixel_prior, PromptConfig(prompt="a red mug", negative_prompt="blurry"))
    batch = processor(_cameras([0, 90, 180, 10], [0, 0, 0, 70]))
    assert batch.directions == ["front", "side", "back", "overhead"]
    assert batch.cond.shape == batch.uncond.shape == (4, 77, 16)
    assert len(batch) == 4 and batch.neg is None
    for i, d in enumerate(batch.directions):
        torch.testing.assert_close(batch.cond[i], pixel_prior.encode_text([f"a red mug, {d} view"])[0])
        torch.testing.assert_close(batch.uncond[i], pixel_prior.encode_text(["blurry"])[0])


def test_processor_without_view_dependence(pixel_prior):
    processor = PromptProcessor(pixel_prior, PromptConfig(prompt="a blue cube", view_dependent=False))
    batch = processor(_cameras([0, 180], [0, 0]))
    assert batch.directions == ["front", "back"]
    expected = pixel_prior.encode_text(["a blue cube"])[0]
    torch.testing.assert_close(batch.cond, expected.expand(2, -1, -1))
    torch.testing.assert_close(batch.uncond, pixel_prior.encode_text([""])[0].expand(2, -1, -1))


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
def test_empty_prompt(pixel_prior, prompt):
    with pytest.raises(ConfigError) as info:
        PromptProcessor(pixel_prior, PromptConfig(prompt=prompt))
    assert str(info.value) == 'prompt is empty; pass prompt="a red mug"'


def test_perp_neg_batch(pixel_prior):
    processor = PromptProcessor(pixel_prior, PromptConfig(prompt="a red mug", use_perp_neg=True))
    batch = processor(_cameras([0, 45, 90, 180, 30], [0, 0, 0, 0, 80]))
    E = {d: pixel_prior.encode_text([f"a red mug, {d} view"])[0] for d in ("front", "side", "back", "overhead")}
    assert batch.neg.shape == (5, 2, 77, 16) and batch.neg_weights.shape == (5, 2)
    f = lambda a, b, c, r: a * math.exp(-b * r) + c  # noqa: E731
    # azimuth 0: r = 1, all front.
    torch.testing.assert_close(batch.cond[0], E["front"])
    torch.testing.assert_close(batch.neg_weights[0], torch.tensor([-f(4, 0.5, -2.426, 1.0), -f(4, 0.5, -2.426, 0.0)]))
    torch.testing.assert_close(batch.neg[0, 1], E["side"])
    # azimuth 45: halfway between front and side.
    torch.testing.assert_close(batch.cond[1], 0.5 * E["front"] + 0.5 * E["side"])
    # azimuth 90: the side/back branch with r = 1, all side; negatives (side, front).
    torch.testing.assert_close(batch.cond[2], E["side"])
    torch.testing.assert_close(batch.neg[2, 1], E["front"])
    torch.testing.assert_close(batch.neg_weights[2], torch.tensor([-f(1, 0.5, -0.606, 1.0), -f(1, 0.5, 0.967, 1.0)]))
    # azimuth 180: r = 0, all back.
    torch.testing.assert_close(batch.cond[3], E["back"])
    # overhead: overhead prompt, no negatives.
    torch.testing.assert_close(batch.cond[4], E["overhead"])
    torch.testing.assert_close(batch.neg_weights[4], torch.zeros(2))


def test_prompt_config_validation():
    with pytest.raises(ValueError, match="front_threshold"):
        PromptConfig(prompt="x", front_threshold=200)
    with pytest.raises(ValueError, match="overhead_threshold"):
        PromptConfig(prompt="x", overhead_threshold=100)
    with pytest.raises(ValueError, match="use_perp_neg"):
        PromptConfig(prompt="x", view_dependent=False, use_perp_neg=True)


def test_prompt_config_fields_have_docstrings():
    tree = ast.parse(inspect.getsource(prompts_module))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "PromptConfig")
    body = cls.body
    fields = [i for i, n in enumerate(body) if isinstance(n, ast.AnnAssign)]
    assert len(fields) == 7
    for i in fields:
        doc = body[i + 1]
        assert isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str), \
            body[i].target.id
