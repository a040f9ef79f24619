from dataclasses import dataclass, field

import pytest

from gen3d.config import apply_overrides, describe, field_docs, from_dict, parse_override, read_yaml, to_dict
from gen3d.errors import ConfigError


@dataclass
class Inner:
    guidance_scale: float = 100.0
    """Classifier-free guidance scale."""
    steps: list[int] = field(default_factory=lambda: [1, 2])
    """Some steps."""


@dataclass
class Outer:
    prompt: str = ""
    """What to make."""
    max_steps: int = 10
    """How long."""
    flag: bool = False
    """A switch."""
    size: tuple[float, float] = (1.0, 2.0)
    """A range."""
    clip: float | None = None
    """Optional."""
    guidance: Inner = field(default_factory=Inner)
    """The inner section."""

    def __post_init__(self):
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")


def test_field_docs_are_read_from_attribute_docstrings():
    assert field_docs(Outer)["prompt"] == "What to make."
    assert field_docs(Inner)["guidance_scale"] == "Classifier-free guidance scale."


def test_overrides_are_typed_and_strings_keep_raw_text():
    data = apply_overrides(Outer, {}, ["prompt=yes", "max_steps=20", "guidance.guidance_scale=7", "size=[0, 3]", "flag=true"])
    cfg = from_dict(Outer, data)
    assert cfg.prompt == "yes" and cfg.max_steps == 20 and cfg.flag is True
    assert cfg.guidance.guidance_scale == 7.0 and isinstance(cfg.guidance.guidance_scale, float)
    assert cfg.size == (0.0, 3.0)
    assert from_dict(Outer, apply_overrides(Outer, {}, ["clip=null"])).clip is None
    assert from_dict(Outer, apply_overrides(Outer, {}, ["clip=2"])).clip == 2.0
    assert parse_override('prompt=a red mug') == ("prompt", "a red mug", "a red mug")


@pytest.mark.parametrize("text, value", [("1e-3", 1e-3), ("2E+2", 200.0), ("-.5e1", -5.0), ("3", 3.0), (".25", 0.25)])
def test_exponent_numbers_are_numbers(text, value):
    """YAML 1.1 reads 1e-3 (no dot) as a string; a float field takes it as the number it is."""
    cfg = from_dict(Outer, apply_overrides(Outer, {}, [f"guidance.guidance_scale={text}", f"clip={text}"]))
    assert cfg.guidance.guidance_scale == value and cfg.clip == value


@pytest.mark.parametrize("override, hint", [
    ("promt=x", "did you mean 'prompt'"),
    ("guidance.guidance_scal=3", "did you mean 'guidance.guidance_scale'"),
    ("guidance_scale=3", "did you mean 'guidance.guidance_scale'"),
])
def test_unknown_key_suggests_the_closest(override, hint):
    with pytest.raises(ConfigError, match=hint):
        apply_overrides(Outer, {}, [override])


def test_unknown_key_in_yaml_data_suggests_the_closest():
    with pytest.raises(ConfigError, match="unknown config key 'guidance.scale'"):
        from_dict(Outer, {"guidance": {"scale": 1}})


@pytest.mark.parametrize("override, message", [
    ("max_steps=ten", "max_steps: expected an integer"),
    ("guidance.guidance_scale=1e-3x", "expected a number"),
    ("guidance.guidance_scale=e5", "expected a number"),
    ("flag=maybe", "flag: expected true or false"),
    ("size=[1]", "size: expected 2 values"),
    ("max_steps=0", "max_steps must be >= 1"),
    ("guidance=3", "expected a section"),
    ("prompt", "is not key=value"),
    ("prompt.x=1", "'prompt' is a value, not a section"),
])
def test_bad_values_say_what_is_wrong(override, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Outer, apply_overrides(Outer, {}, [override]))


def test_round_trip_and_describe():
    cfg = from_dict(Outer, apply_overrides(Outer, {}, ["prompt=a mug"]))
    again = from_dict(Outer, to_dict(cfg))
    assert again == cfg
    text = "\n".join(describe(cfg))
    assert "prompt = a mug  # What to make." in text
    assert "guidance.guidance_scale = 100.0  # Classifier-free guidance scale." in text


def test_read_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_yaml(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        read_yaml(lst)
