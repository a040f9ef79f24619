"""Dynamic 3D Gaussians: canonical Gaussians moved over time by a `DeformationField` (issue 12: 4D generation).

``DynamicGaussians(gaussians, field).at(t)`` is the frame at time t in [0, 1]: a `GaussianFrame` with the attributes
`gen3d.rendering.gaussian.render_gaussians` reads (means, quats, scales, opacities, sh, sh_degree), differentiable
with respect to both the canonical Gaussians and the field, so a loss on a frame's render trains both (4D Gaussian
Splatting, Wu et al. 2024). Opacities and colors are the canonical ones at every time. `GaussianFrame.to_model`
freezes a frame into a `GaussianModel` (for its standard 3DGS PLY); `save_ply_sequence` writes a clip of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from gen3d.representations.deformation import DeformationField
from gen3d.representations.gaussians import GaussianModel


@dataclass
class GaussianFrame:
    """The Gaussians at one time (raw parameters; activated values as properties, like `GaussianModel`)."""

    means: Tensor
    quats: Tensor
    log_scales: Tensor
    opacity_logits: Tensor
    sh: Tensor
    cfg: object = None

    @property
    def sh_degree(self) -> int:
        return round(self.sh.shape[1] ** 0.5) - 1

    @property
    def scales(self) -> Tensor:
        return self.log_scales.exp()

    @property
    def opacities(self) -> Tensor:
        return torch.sigmoid(self.opacity_logits)

    @property
    def num_gaussians(self) -> int:
        return self.means.shape[0]

    def to_model(self) -> GaussianModel:
        """A detached `GaussianModel` copy of the frame."""
        return GaussianModel.from_tensors(self.means, self.log_scales, self.quats, self.opacity_logits, self.sh,
                                          self.cfg)


class DynamicGaussians(nn.Module):
    """Canonical `GaussianModel` + `DeformationField`; `at(t)` gives the frame at time t."""

    def __init__(self, gaussians: GaussianModel, field: DeformationField):
        super().__init__()
        self.gaussians, self.field = gaussians, field

    def at(self, t: float | Tensor) -> GaussianFrame:
        g = self.gaussians
        means, quats, log_scales = self.field.deform(g.means, g.quats, g.log_scales, t)
        return GaussianFrame(means, quats, log_scales, g.opacity_logits, g.sh, g.cfg)

    def times(self, frames: int) -> list[float]:
        """`frames` evenly spaced times from 0 to 1."""
        return torch.linspace(0, 1, frames).tolist() if frames > 1 else [0.0]


def save_ply_sequence(dynamic: DynamicGaussians, folder: str | Path, frames: int) -> list[Path]:
    """One standard 3DGS PLY per frame (``frame_000.ply`` ...) at `frames` evenly spaced times."""
    from gen3d.export.ply import save_gaussian_ply

    if frames < 1:
        raise ValueError(f"save_ply_sequence: frames must be >= 1, got {frames}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        return [save_gaussian_ply(folder / f"frame_{i:03d}.ply", dynamic.at(t).to_model())
                for i, t in enumerate(dynamic.times(frames))]
