"""Stateless differentiable ops, each with a pure-torch reference (see the README's layout)."""

from gen3d.ops.rasterize import RasterOutput, rasterize_gaussians
from gen3d.ops.sh import eval_sh, rgb_to_sh, sh_to_rgb

__all__ = ["RasterOutput", "rasterize_gaussians", "eval_sh", "rgb_to_sh", "sh_to_rgb"]
