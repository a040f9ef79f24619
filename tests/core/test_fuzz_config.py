"""Property-based fuzzing of the config parser (`gen3d.config`) over the real system config classes.

The property: any override text, any nested dict of YAML scalars, any YAML file, and any dotted key of a real system
config with any value gives a valid config or a one-line `ConfigError`, never another exception; and a config
written to a run folder (`write_config`) and read back (`load_run_config`, what --resume does) is equal.
Examples are derandomized (the same inputs on every run) and no example database is written.
"""

import atexit
import math
import shutil
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gen3d.cli import list_presets, load_run_config
from gen3d.config import all_keys, apply_overrides, from_dict, parse_override, read_yaml, to_dict
from gen3d.errors import ConfigError
from gen3d.systems import SYSTEMS, get_system
from gen3d.systems.base import write_config

FUZZ = dict(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
WORK = Path(tempfile.mkdtemp(prefix="gen3d-fuzz-config-"))
atexit.register(shutil.rmtree, WORK, True)
CLASSES = {name: get_system(name).Config for name in sorted(SYSTEMS)}
KEYS = sorted({key for cls in CLASSES.values() for key in all_keys(cls)})
PRESETS = {name: read_yaml(path) for name, path in list_presets().items()}


def config_or_error(call):
    """call() or None if it raised a one-line ConfigError; any other exception fails the test."""
    try:
        return call()
    except ConfigError as exc:
        assert "\n" not in str(exc), str(exc)
        return None


# What YAML can produce: scalars (big integers included), lists and mappings of them, keys that are not text.
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-10**400, 10**400), st.floats(),
                    st.text(max_size=12), st.sampled_from(["1e-3", "-.5e1", "gaussians", "auto", "glb", "", " "]))
KEY_TEXT = st.one_of(st.sampled_from(sorted({k.rsplit(".", 1)[-1] for k in KEYS})), st.text(max_size=8))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.one_of(KEY_TEXT, st.integers(), st.none(), st.booleans()), inner, max_size=4)), max_leaves=12)
VALUE_TEXT = st.one_of(
    VALUES.map(lambda v: yaml.safe_dump(v, default_flow_style=True, width=10**6).removesuffix("\n...\n").strip()),
    st.text(max_size=20),
    st.sampled_from(["true", "no", "null", "~", "[0, 30]", "[1, 2, 3]", "{a: 1}", "1e-3", "1E+400", "-.inf", ".nan",
                     "2020-13-45", "2020-01-01", "1" * 400, "[" * 3000, "{" * 3000, "!!python/object:os.system x",
                     "&a [*a]", "*undefined", "0x1F", "0o17", "1_000", "12:30:00", "'unclosed", "[1, 2", "\t", "=", "a=b"]),
)


@settings(max_examples=300, **FUZZ)
@given(st.text(max_size=40))
def test_parse_override_of_any_text(text):
    parsed = config_or_error(lambda: parse_override(text))
    if parsed is not None:
        key, _, raw = parsed
        assert key and "=" not in key and text.endswith(raw)


@settings(max_examples=300, **FUZZ)
@given(st.sampled_from(sorted(CLASSES)), st.dictionaries(st.one_of(KEY_TEXT, st.integers(), st.none()), VALUES,
                                                         max_size=6))
def test_from_dict_of_any_yaml_values(system, data):
    cfg = config_or_error(lambda: from_dict(CLASSES[system], data))
    assert cfg is None or isinstance(cfg, CLASSES[system])


@settings(max_examples=120, **FUZZ)
@given(st.sampled_from(sorted(PRESETS)), st.lists(st.tuples(st.sampled_from(KEYS), VALUE_TEXT), min_size=1,
                                                 max_size=4))
def test_overrides_of_real_keys_with_any_values_and_round_trip(preset, overrides):
    """`gen3d run PRESET key=value ...`; a config that loads survives a write and a read back (what --resume does)."""
    texts = [f"{key}={value}" for key, value in overrides]
    loaded = config_or_error(lambda: load_run_config(str(list_presets()[preset]), texts))
    if loaded is None:
        return
    cfg = loaded[1]
    run_dir = WORK / "run"
    run_dir.mkdir(exist_ok=True)
    write_config(run_dir, cfg)
    _, loaded = load_run_config(str(run_dir), [])
    assert same(to_dict(loaded), to_dict(cfg))
    assert type(loaded) is type(cfg) and (loaded == cfg or has_nan(to_dict(cfg)))


@settings(max_examples=100, **FUZZ)
@given(st.sampled_from(sorted(CLASSES)), st.lists(st.tuples(st.text(max_size=30), VALUE_TEXT), max_size=3))
def test_overrides_of_any_keys(system, overrides):
    cls = CLASSES[system]
    texts = [f"{key}={value}" for key, value in overrides]
    config_or_error(lambda: from_dict(cls, apply_overrides(cls, {}, texts)))


@settings(max_examples=100, **FUZZ)
@given(st.one_of(st.binary(max_size=200), VALUE_TEXT.map(str.encode),
                 st.dictionaries(KEY_TEXT, VALUES, max_size=5).map(lambda d: yaml.safe_dump(d).encode())))
def test_read_yaml_of_any_file(content):
    path = WORK / "fuzz.yaml"
    path.write_bytes(content)
    data = config_or_error(lambda: read_yaml(path))
    assert data is None or isinstance(data, dict)
    if data is not None:
        for cls in CLASSES.values():
            config_or_error(lambda: from_dict(cls, {k: v for k, v in data.items() if k != "system"}))


def test_read_yaml_of_a_folder_and_of_an_unreadable_encoding():
    (WORK / "folder.yaml").mkdir(exist_ok=True)
    for name, content in (("folder.yaml", None), ("latin1.yaml", "prompt: caf\xe9".encode("latin-1"))):
        if content is not None:
            (WORK / name).write_bytes(content)
        try:
            read_yaml(WORK / name)
        except ConfigError as exc:
            assert name in str(exc) and "\n" not in str(exc)
        else:
            raise AssertionError(f"{name} was read")


def test_every_preset_round_trips():
    for name, data in PRESETS.items():
        cls = get_system(data["system"]).Config
        cfg = from_dict(cls, data)
        run_dir = WORK / f"preset-{name}"
        run_dir.mkdir(exist_ok=True)
        write_config(run_dir, cfg)
        assert load_run_config(str(run_dir), [])[1] == cfg, name


def has_nan(value) -> bool:
    if isinstance(value, dict):
        return any(has_nan(v) for v in value.values())
    if isinstance(value, list):
        return any(has_nan(v) for v in value)
    return isinstance(value, float) and math.isnan(value)


def same(a, b) -> bool:
    """Equal plain values of the same types (a list is not a tuple, "1" is not 1), NaN equal to NaN; numbers compare
    by value (a float field's default may be written as an int, 100 for 100.0)."""
    number = (int, float)
    if isinstance(a, number) and isinstance(b, number) and not isinstance(a, bool) and not isinstance(b, bool):
        return a == b or (math.isnan(a) and math.isnan(b))
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b
