"""Scalar schedules over training steps, in threestudio's notation.

A schedule value in a config is one of:

- a number: constant;
- ``[v0, v1, end]``: linear from v0 at step 0 to v1 at step ``end``, then constant;
- ``[start, v0, v1, end]``: v0 until ``start``, linear to v1 at ``end``, then constant;
- ``[s0, v0, s1, v1, s2, v2, ...]`` (6 or more, even length): piecewise linear through the
  points (s_i, v_i), constant outside them.

A float step position in [0, 1] (``0.5``, ``1.0``) is a fraction of the run's total steps, so
presets keep their shape when ``max_steps`` is overridden; an int (``500``) is a step.
"""

from __future__ import annotations

from typing import Sequence, Union

Schedule = Union[float, int, Sequence[float]]


def _step(s: float, max_steps: int) -> float:
    return s * max_steps if isinstance(s, float) and 0.0 <= s <= 1.0 else float(s)


def _interp(step: float, s0: float, v0: float, s1: float, v1: float) -> float:
    if step <= s0:
        return float(v0)
    if step >= s1 or s1 <= s0:
        return float(v1)
    return float(v0) + (float(v1) - float(v0)) * (step - s0) / (s1 - s0)


def check_schedule(value: Schedule, name: str = "schedule") -> None:
    """Raise ValueError if `value` is not a valid schedule."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, (int, float)) for v in value):
        raise ValueError(f"{name}: expected a number or a list of numbers, got {value!r}")
    if len(value) not in (3, 4) and (len(value) < 6 or len(value) % 2):
        raise ValueError(
            f"{name}: a schedule list has 3 ([v0, v1, end]), 4 ([start, v0, v1, end]) or an even number >= 6 "
            f"([s0, v0, s1, v1, ...]) entries, got {len(value)}: {value!r}"
        )


def schedule_value(value: Schedule, step: int, max_steps: int = 1) -> float:
    """Evaluate schedule `value` at global step `step` of a run of `max_steps` steps."""
    if isinstance(value, (int, float)):
        return float(value)
    check_schedule(value)
    v = list(value)
    if len(v) == 3:
        v = [0, *v]
    if len(v) == 4:
        start, v0, v1, end = v
        return _interp(step, _step(start, max_steps), v0, _step(end, max_steps), v1)
    points = [(_step(v[i], max_steps), float(v[i + 1])) for i in range(0, len(v), 2)]
    if step <= points[0][0]:
        return points[0][1]
    for (s0, a), (s1, b) in zip(points, points[1:]):
        if step <= s1:
            return _interp(step, s0, a, s1, b)
    return points[-1][1]


def warmup_cosine(step: int, peak: float, warmup: int, steps: int, floor: float = 0.1) -> float:
    """Learning rate at `step`: linear warm-up to `peak` over `warmup` steps, then cosine decay to `floor` * peak
    at `steps` (the trainers of the embedded models)."""
    import math

    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))
