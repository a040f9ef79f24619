"""User-facing errors.

A `Gen3dError` carries one line that says what was wrong and what to do. The CLI prints it
without a traceback and exits with status 2; everything else is a bug and keeps its traceback.
"""

import functools


class Gen3dError(Exception):
    """An error caused by the user's input or environment, with a one-line remedy."""


class ConfigError(Gen3dError):
    """A config file or override is invalid (unknown key, wrong type, bad value)."""


class PriorNotAvailable(Gen3dError):
    """A diffusion prior could not be loaded (not in the local cache, unknown id, broken folder)."""


class CheckpointError(Gen3dError):
    """A checkpoint is missing, corrupted or does not fit the current config."""


class MissingExtra(Gen3dError):
    """An optional dependency is not installed."""


def require(module: str, extra: str, purpose: str):
    """Import an optional dependency lazily, or fail naming the extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtra(
            f"{purpose} needs the optional package '{module}' ({exc}); "
            f"install it with: pip install 'gen3d[{extra}]'"
        ) from exc


@functools.lru_cache(maxsize=None)
def importable(module: str) -> bool:
    """Whether optional dependency `module` imports here: False when it is missing, or when it is installed but fails
    to load (a broken build, a missing system library such as open3d's libusb). Cached per module."""
    import importlib

    try:
        importlib.import_module(module)
    except Exception:
        return False
    return True
