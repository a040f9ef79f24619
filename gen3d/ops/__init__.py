"""Stateless differentiable ops, each with a pure-torch reference (see the README's layout)."""

from gen3d.ops.hash_encoding import grid_resolutions, hash_encode, hash_encode_reference
from gen3d.ops.rasterize import RasterOutput, rasterize_gaussians
from gen3d.ops.sh import eval_sh, rgb_to_sh, sh_to_rgb
from gen3d.ops.triplane import sample_triplane
from gen3d.ops.volume import RaySamples, camera_rays, composite, ray_box, ray_sphere, uniform_samples

__all__ = ["RasterOutput", "rasterize_gaussians", "eval_sh", "rgb_to_sh", "sh_to_rgb", "grid_resolutions",
           "hash_encode", "hash_encode_reference", "sample_triplane", "RaySamples", "camera_rays", "composite",
           "ray_box", "ray_sphere", "uniform_samples"]
