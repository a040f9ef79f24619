"""What the viewer needs from whatever it shows: a `Snapshot`, taken on the training thread.

A snapshot is a frozen copy of a representation at one step: optionally its 3D Gaussians as numpy
arrays (shown natively by the browser, viser's Gaussian splat node), optionally a mesh, and a
`render` callable over cameras that the viewer's own thread may call at any time, because it reads
the copy and never the parameters being trained. Systems build one in `System.snapshot`; files
(`gen3d view model.ply | mesh.glb`) build one without a system.

A 4D result (Gaussians that move over time) adds a `Timeline`: the splats of a few frames at evenly spaced times,
sent to the browser one at a time as the viewer's time slider moves, and a render over (cameras, time) for the
server-side modes. The snapshot's own `splats` / `render` stay those of the first frame, so code that knows
nothing of time still shows something sensible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:
    import trimesh

    from gen3d.cameras import Cameras
    from gen3d.rendering.types import RenderOutput


@dataclass
class Splats:
    """3D Gaussians in world space, as viser's splat node takes them."""

    centers: np.ndarray  # [N, 3] float32
    covariances: np.ndarray  # [N, 3, 3] float32
    rgbs: np.ndarray  # [N, 3] float32 in [0, 1]
    opacities: np.ndarray  # [N, 1] float32 in [0, 1]

    def __len__(self) -> int:
        return len(self.centers)


@dataclass
class Timeline:
    """Frames of a 4D result: `splats[i]` is the scene at `times[i]`; see the module docstring.

    Frames are precomputed (rather than a callback over t) because the browser shows splats natively: moving the
    slider must cost one message of ready arrays, not a deformation on the viewer's thread.
    """

    times: list[float]
    """Sorted times in [0, 1], one per frame (F of them)."""
    splats: list[Splats]
    """The splats of each frame (F of them)."""
    render: "Callable[[Cameras, float], RenderOutput] | None" = None
    """Render the frozen frames at a time (the server-side depth / alpha / normal modes); None: nothing to render."""
    fps: float = 8.0
    """Frames per second of the viewer's Play button."""

    def __post_init__(self) -> None:
        times = [float(t) for t in self.times]
        if not times or len(times) != len(self.splats):
            raise ValueError(f"Timeline: needs one Splats per time and at least one frame, got {len(times)} times "
                             f"and {len(self.splats)} splats")
        if any(not 0.0 <= t <= 1.0 for t in times) or times != sorted(times):
            raise ValueError(f"Timeline: times must be sorted and in [0, 1], got {times}")
        if not (self.fps > 0 and math.isfinite(self.fps)):
            raise ValueError(f"Timeline: fps must be > 0, got {self.fps}")
        self.times = times

    def __len__(self) -> int:
        return len(self.times)

    def index_at(self, t: float) -> int:
        """The frame nearest time t (the earlier one on a tie)."""
        return int(np.argmin(np.abs(np.asarray(self.times) - float(t))))


@dataclass
class Snapshot:
    """A frozen view of a representation (see the module docstring)."""

    step: int = 0
    render: "Callable[[Cameras], RenderOutput] | None" = None
    """Render the frozen copy (rgb, alpha, depth, normal when it has them); None: nothing to render on the server."""
    splats: Splats | None = None
    mesh: "trimesh.Trimesh | None" = None
    info: dict[str, str] = field(default_factory=dict)
    """Lines for the viewer's info panel (e.g. the number of Gaussians)."""
    timeline: Timeline | None = None
    """Frames over time of a 4D result (the viewer then shows a time slider); None: a static result."""
