"""Typed configuration: dataclasses, YAML presets and dotted ``key=value`` overrides.

Every component has a config dataclass whose fields carry an *attribute docstring* (a string
literal on the line after the field). Those docstrings are the documentation shown by
``gen3d run <config> --show-config``. A YAML preset names the system and overrides defaults;
command-line overrides use dotted paths::

    gen3d run dreamgaussian prompt="a red mug" guidance.guidance_scale=50 cameras.batch_size=2

Values are parsed as YAML (``0.1``, ``true``, ``[1, 2]``) and then checked against the field's
type; a string field keeps the raw text, so ``prompt=yes`` stays ``"yes"``. An unknown key fails
with a did-you-mean.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import re
import textwrap
import types
import typing
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Any, Union

import yaml

from gen3d.errors import ConfigError


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


@lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass (and its bases): ``{field: doc}``."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against type `tp`, converting where it is unambiguous (int -> float, list -> tuple)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = {}
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as exc:
                errors[arg] = exc
        if isinstance(value, (int, float, str)) and float in errors and "finite number" in str(errors[float]):
            raise errors[float]  # e.g. guidance_scale=nan: say why the number is refused
        raise ConfigError(f"{path}: {value!r} does not fit type {_type_name(tp)}")
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a section of fields ({tp.__name__}), got {value!r}")
        return from_dict(tp, value, path)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{path}: expected {len(args)} values, got {len(value)}: {list(value)!r}")
            return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{path}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if tp is float:
        if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):  # YAML 1.1 reads 1e-3 as a string
            value = float(value)
        elif isinstance(value, str) and _NON_FINITE.fullmatch(value.strip()):  # nan, inf written as text
            value = float(value.strip().replace(".", ""))
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        # NaN or infinity is never a usable setting: it would poison the run silently many steps later
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an integer beyond the float range
            finite = False
        if not finite:
            raise ConfigError(f"{path} must be a finite number, got {value}")
        return float(value)
    if tp is int:
        if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):  # max_steps=1e3 (YAML 1.1 keeps it text)
            value = float(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float, bool)):
            return str(value)
        raise ConfigError(f"{path}: expected text, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{path}: expected {tp.__name__}, got {value!r}")
    return value


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key a config class accepts."""
    keys = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        keys.append(key)
        tp = _hints(cls)[f.name]
        if _is_dataclass_type(tp):
            keys.extend(all_keys(tp, key + "."))
    return keys


def _unknown(cls: type, key: str, path: str, root: type | None = None) -> ConfigError:
    full = f"{path}.{key}" if path else key
    candidates = all_keys(root or cls)
    close = difflib.get_close_matches(full, candidates, n=1, cutoff=0.6)
    if not close:  # the right leaf under the wrong section, or a misspelled leaf: match on leaf names
        leaves = {c.rsplit(".", 1)[-1]: c for c in reversed(candidates)}
        close = [leaves[m] for m in difflib.get_close_matches(key, list(leaves), n=1, cutoff=0.6)]
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key {full!r}{hint} (list the keys with --show-config)")


def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, checking every key and type."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if not isinstance(key, str) or key not in names:  # YAML keys may also be numbers, null, true
            raise _unknown(cls, str(key), path)
        kwargs[key] = _coerce(value, _hints(cls)[key], f"{path}.{key}" if path else key)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        message = str(exc)
        # most checks name their key already ("cameras.batch_size must be >= 1"); name the section otherwise
        named = not path or message.startswith((path, f"{cls.__name__}.", f"{cls.__name__}:"))
        raise ConfigError(message if named else f"{path}: {message}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain nested dict (tuples as lists) suitable for YAML."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


_DECIMAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_NON_FINITE = re.compile(r"[-+]?\.?(nan|inf|infinity)", re.IGNORECASE)


def parse_override(text: str) -> tuple[str, Any, str]:
    """``"a.b=1"`` -> ``("a.b", 1, "1")`` (key, YAML-parsed value, raw text)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value; write e.g. prompt=\"a red mug\" or max_steps=200")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has no key before '='")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError, RecursionError):  # ValueError: PyYAML's date 2020-13-45; deep [[[...
        value = raw
    return key, value, raw


def apply_overrides(cls: type, data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Merge dotted overrides into a nested dict, checking that each key exists in `cls`."""
    data = _deep_copy(data)
    for text in overrides:
        key, value, raw = parse_override(text)
        parts = key.split(".")
        klass, node, path = cls, data, ""
        for i, part in enumerate(parts):
            names = {f.name for f in dataclasses.fields(klass)}
            if part not in names:
                raise _unknown(klass, part, path, root=cls)
            tp = _hints(klass)[part]
            path = f"{path}.{part}" if path else part
            if i == len(parts) - 1:
                # A text field keeps the raw text (prompt=yes is "yes", not True; prompt=mug: red is not a mapping;
                # prompt=a mug #2 keeps its "#2"), unless the text is quoted.
                quoted = raw.strip()[:1] in ("'", '"') and isinstance(value, str)
                if tp is str and not quoted:
                    value = raw
                elif _accepts_str(tp) and not isinstance(value, str) and not isinstance(value, (list, dict)):
                    value = raw
                node[part] = value
            else:
                if not _is_dataclass_type(tp):
                    raise ConfigError(f"'{path}' is a value, not a section, so {key!r} does not exist")
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"'{path}' is a section; set its fields as {path}.<field>=...")
                klass = tp
    return data


def _accepts_str(tp: Any) -> bool:
    if tp is str:
        return True
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return str in args and not any(a in (int, float, bool) for a in args)
    return False


def _deep_copy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deep_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deep_copy(v) for v in d]
    return d


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' does not exist") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file '{path}' is not text (not UTF-8); pass a YAML file such as "
                          "configs/dreamgaussian.yaml or a preset name") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file '{path}' ({exc.strerror or exc}); pass a readable YAML file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())  # one line, also for a ReaderError
        raise ConfigError(f"config file '{path}' is not valid YAML{where}: {problem}") from None
    except (ValueError, RecursionError) as exc:  # PyYAML's datetime of a date like 2020-13-45; nesting too deep
        raise ConfigError(f"config file '{path}' is not valid YAML: {str(exc)[:100] or type(exc).__name__}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must be a mapping of keys to values, got {type(data).__name__}")
    return data


def clean_text(name: str, text: str) -> str:
    """Prompt-like `text` with each line break or tab turned into a space; ValueError on any other control character
    (NUL, ESC of a terminal color code, ...), which a text encoder cannot read and which would garble logs."""
    text = re.sub(r"[\t\n\r\v\f]", " ", text)
    for i, ch in enumerate(text):
        if unicodedata.category(ch) == "Cc":
            raise ValueError(f"{name} contains the control character U+{ord(ch):04X} at position {i}; remove it "
                             "(line breaks and tabs are read as spaces)")
    return text


def describe(cfg: Any, prefix: str = "") -> list[str]:
    """Lines ``key = value  # doc`` for every field of a config instance, recursively."""
    lines = []
    docs = field_docs(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            lines.append(f"{key}:" + (f"  # {docs[f.name]}" if docs.get(f.name) else ""))
            lines.extend(describe(value, key + "."))
        else:
            shown = yaml.safe_dump(to_dict(value), default_flow_style=True, width=1000).strip()
            shown = shown.removesuffix("...").strip()
            doc = docs.get(f.name, "")
            lines.append(f"{key} = {shown}" + (f"  # {doc}" if doc else ""))
    return lines
