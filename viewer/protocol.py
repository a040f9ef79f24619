"""What the viewer needs from whatever it shows: a `Snapshot`, taken on the training thread.

A snapshot is a frozen copy of a representation at one step: optionally its 3D Gaussians as numpy
arrays (shown natively by the browser, viser's Gaussian splat node), optionally a mesh, and a
`render` callable over cameras that the viewer's own thread may call at any time, because it reads
the copy and never the parameters being trained. Systems build one in `System.snapshot`; files
(`gen3d view model.ply | mesh.glb`) build one without a system.
"""

from __future__ import annotations

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
class Snapshot:
    """A frozen view of a representation (see the module docstring)."""

    step: int = 0
    render: "Callable[[Cameras], RenderOutput] | None" = None
    """Render the frozen copy (rgb, alpha, depth, normal when it has them); None: nothing to render on the server."""
    splats: Splats | None = None
    mesh: "trimesh.Trimesh | None" = None
    info: dict[str, str] = field(default_factory=dict)
    """Lines for the viewer's info panel (e.g. the number of Gaussians)."""
