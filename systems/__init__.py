"""Optimization recipes, one file each; installed as `gen3d.systems`.

A config preset names its recipe with ``system: <name>``; `get_system` imports it lazily so
that one recipe's optional dependencies never break another.
"""

from __future__ import annotations

import difflib
import importlib

from gen3d.errors import ConfigError

SYSTEMS: dict[str, str] = {
    "dreamgaussian": "gen3d.systems.dreamgaussian:DreamGaussian",
    "dreamfusion": "gen3d.systems.dreamfusion:DreamFusion",
    "zero123": "gen3d.systems.image_to_3d:Zero123",
    "magic123": "gen3d.systems.image_to_3d:Magic123",
    "dream4d": "gen3d.systems.dynamic:Dream4D",
    "dreamgaussian4d": "gen3d.systems.dynamic:DreamGaussian4D",
}


def get_system(name: str):
    """The System class registered as `name`."""
    if name not in SYSTEMS:
        close = difflib.get_close_matches(name, list(SYSTEMS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown system '{name}'{hint} (known: {', '.join(sorted(SYSTEMS))})")
    module, _, attr = SYSTEMS[name].partition(":")
    return getattr(importlib.import_module(module), attr)
